"""The daemon's reading of kernel keys (vnvdimm.model.keyring) against the kernel's own
encrypted-key blobs, and the suite's skip where the host forbids keyctl."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vnvdimm import suite
from vnvdimm.model import keyring

needs_keyctl = pytest.mark.skipif(keyring.keyctl_available() is not None, reason=f"{keyring.keyctl_available()}")
MASTER = b"0123456789abcdef0123456789abcdef"


@needs_keyctl
def test_an_encrypted_key_blob_decrypts_under_its_master_and_only_under_it() -> None:
    # a session keyring of its own: both keys go when the session does
    script = ("printf %s \"$0\" | keyctl padd user vnvdimm-unit-master @s >/dev/null && "
              "k=$(keyctl add encrypted vnvdimm-unit:1 'new enc32 user:vnvdimm-unit-master 32' @s) && "
              "keyctl pipe $k")
    res = subprocess.run(["keyctl", "session", "-", "sh", "-c", script, MASTER.decode()],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    blob = res.stdout.encode()
    assert blob.startswith(b"enc32 user:vnvdimm-unit-master 32 ")
    passphrase = keyring.decrypt_blob(blob, MASTER)
    assert len(passphrase) == 32
    assert keyring.decrypt_blob(blob, MASTER) == passphrase
    with pytest.raises(ValueError, match="HMAC"):
        keyring.decrypt_blob(blob, b"x" * 32)
    tampered = blob[:-3] + (b"0" if blob[-3:-2] != b"0" else b"1") + blob[-2:]
    with pytest.raises(ValueError):
        keyring.decrypt_blob(tampered, MASTER)


def test_a_serial_that_is_no_key_is_no_passphrase() -> None:
    assert keyring.lookup_user_key(2**31 - 7) is None


def test_the_suite_skips_keyring_tests_where_keyctl_is_forbidden(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "needs-keys.sh"
    script.write_text("#!/bin/bash\nkeyctl show\nexit 1\n")
    why = "the keyctl system call fails here: Operation not permitted"
    monkeypatch.setattr(keyring, "keyctl_available", lambda: why)
    result = suite.run_one(suite.SuiteTest(script.name, script), 10, {"PATH": os.environ["PATH"]})
    assert result.status == "SKIP" and "Operation not permitted" in result.tail and "kernel keyring" in result.tail


def test_the_suite_guards_the_keys_of_a_test_that_runs_security_sh(tmp_path: Path) -> None:
    # nfit-security.sh is `$(dirname $0)/security.sh nfit`: the keyctl calls are in security.sh
    (tmp_path / "security.sh").write_text("#!/bin/bash\nkeyctl show\n")
    script = tmp_path / "nfit-security.sh"
    script.write_text("#!/bin/bash -Ex\n$(dirname $0)/security.sh nfit\n")
    assert any("keyctl" in text for text in suite._sourced_scripts(suite.SuiteTest(script.name, script)))
