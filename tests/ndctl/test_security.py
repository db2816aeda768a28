"""DIMM security on nfit_test.0 through the real ndctl and the kernel keyring: setup-passphrase,
update-passphrase, remove-passphrase, freeze-security, sanitize-dimm --crypto-erase and
--overwrite, wait-overwrite, the unlock of a locked DIMM, and the refusals, with the errno of
direct writes to nmemN/security as an attacker would make them.

ndctl keeps its keys in the user keyring of root (KEY_SPEC_USER_KEYRING) and their blobs in
/etc/ndctl/keys. Each test gets a master key of its own name (a host's `nvdimm-master` is never
touched), its own folder bound over /etc/ndctl/keys in every command's mount namespace, and a
teardown that unlinks from the user keyring every key the test added, pass or fail."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_kit import have_ndctl, wait_for

from vnvdimm.model import keyring

pytestmark = [
    pytest.mark.ndctl,
    pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl"),
    pytest.mark.skipif(keyring.keyctl_available() is not None, reason=f"{keyring.keyctl_available()}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="ndctl's keys live in root's user keyring here"),
    pytest.mark.skipif(not Path("/etc/ndctl/keys").is_dir(), reason="needs ndctl's /etc/ndctl/keys to bind over"),
]

M = 1 << 20
NFIT_TEST = 'template = "nfit_test"\n[memmap]\nworkers = 1\n'
DIMM, DIMM_ID = "nmem0", "cdab-0a-07e0-ffffffff"  # in region0 (with nmem1) and region1 (all four)


class Keys:
    """The test's view of the keyring and of ndctl's key folder."""

    def __init__(self, mount, folder: Path) -> None:  # type: ignore[no-untyped-def]
        self.mount = mount
        self.folder = folder
        self.master = f"vnvdimm-test-{secrets.token_hex(4)}"

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        """CMD in the mount, with the test's folder as /etc/ndctl/keys."""
        return self.mount.run("sh", "-c", 'mount --bind "$0" /etc/ndctl/keys && exec "$@"', str(self.folder), *cmd)

    def ndctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("ndctl", *args)

    def make_master(self) -> None:
        res = subprocess.run(["sh", "-c", f"head -c 32 /dev/urandom | keyctl padd user {self.master} @u"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr

    def serial(self, kind: str, desc: str) -> int:
        res = subprocess.run(["keyctl", "search", "@u", kind, desc], capture_output=True, text=True)
        return int(res.stdout) if res.returncode == 0 else 0

    def new_encrypted(self, desc: str) -> int:
        """An encrypted key of the attacker's own: same master, a passphrase of its own."""
        res = subprocess.run(["keyctl", "add", "encrypted", desc, f"new enc32 user:{self.master} 32", "@u"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return int(res.stdout)

    def security(self) -> str:
        return self.mount.read(f"sys/bus/nd/devices/{DIMM}/security").strip()

    def frozen(self) -> str:
        return self.mount.read(f"sys/bus/nd/devices/{DIMM}/frozen").strip()

    def store(self, text: str) -> int:
        """A write to nmemN/security: 0 or the errno it failed with."""
        fd = os.open(self.mount.path(f"sys/bus/nd/devices/{DIMM}/security"), os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        except OSError as e:
            return e.errno or -1
        finally:
            os.close(fd)
        return 0


@pytest.fixture
def keys(make_mount, tmp_path: Path) -> Iterator[Keys]:  # type: ignore[no-untyped-def]
    before = keyring.user_keyring_links()
    folder = tmp_path / "ndctl-keys"
    folder.mkdir()
    k = Keys(make_mount(NFIT_TEST), folder)
    try:
        res = k.ndctl("disable-region", "-b", "nfit_test.0", "all")
        assert res.returncode == 0, res.stderr
        k.make_master()
        yield k
    finally:
        for serial in keyring.user_keyring_links() - before:
            with contextlib.suppress(OSError):
                keyring.unlink_from_user_keyring(serial)


def setup_passphrase(k: Keys) -> int:
    res = k.ndctl("setup-passphrase", DIMM, "-k", f"user:{k.master}")
    assert res.returncode == 0, res.stderr
    assert k.security() == "unlocked"
    serial = k.serial("encrypted", f"nvdimm:{DIMM_ID}")
    assert serial and (k.folder / f"nvdimm_{DIMM_ID}_{os.uname().nodename}.blob").is_file()
    return serial


def test_setup_update_and_remove_passphrase(keys: Keys) -> None:
    k = keys
    assert (k.security(), k.frozen()) == ("disabled", "0")
    first = setup_passphrase(k)
    listed = json.loads(k.ndctl("list", "-D", "-d", DIMM).stdout)
    assert listed[0]["security"] == "unlocked" and "security_frozen" not in listed[0]

    res = k.ndctl("update-passphrase", DIMM)
    assert res.returncode == 0, res.stderr
    second = k.serial("encrypted", f"nvdimm:{DIMM_ID}")
    assert second not in (0, first) and k.security() == "unlocked"
    # the old passphrase no longer opens the DIMM: the old key, loaded again, is refused
    assert k.store(f"disable {second}") == 0 and k.security() == "disabled"
    assert k.store(f"update 0 {second}") == 0 and k.security() == "unlocked"

    res = k.ndctl("remove-passphrase", DIMM)
    assert res.returncode == 0, res.stderr
    assert k.security() == "disabled" and k.serial("encrypted", f"nvdimm:{DIMM_ID}") == 0
    assert list(k.folder.iterdir()) == []  # ndctl removed the blob: nothing else was written


def test_wrong_passphrases_and_keys_are_refused_with_the_kernels_errno(keys: Keys) -> None:
    k = keys
    setup_passphrase(k)
    other = k.new_encrypted("vnvdimm-test-attacker")  # a valid 32-byte key, the wrong passphrase
    assert k.store(f"disable {other}") == errno.EINVAL
    assert k.store("disable 0") == errno.EINVAL  # the zero key is not the passphrase either
    assert k.store(f"update {other} {other}") == errno.EINVAL
    assert k.store(f"erase {other}") == errno.EINVAL
    master = k.serial("user", k.master)
    assert k.store(f"disable {master}") == errno.ENOKEY  # a user key is not a passphrase
    assert k.store("disable 2147483000") == errno.ENOKEY  # no such key
    assert k.store(f"update 0 {other}") == errno.EINVAL  # a set passphrase needs the old one
    assert k.store(f"update {other} 0") == errno.ENOKEY  # the new key cannot be the zero key
    for bad in ("", "unlock 1", "disable", "disable x", "disable 4294967296", "freezes"):
        assert k.store(bad or "\n") in (errno.EINVAL, errno.ERANGE), bad
    assert k.security() == "unlocked"
    res = k.ndctl("remove-passphrase", DIMM)  # the real key still works
    assert res.returncode == 0, res.stderr


def test_freeze_refuses_every_change(keys: Keys) -> None:
    k = keys
    serial = setup_passphrase(k)
    res = k.ndctl("freeze-security", DIMM)
    assert res.returncode == 0, res.stderr
    assert (k.security(), k.frozen()) == ("unlocked", "1")
    assert json.loads(k.ndctl("list", "-D", "-d", DIMM).stdout)[0]["security_frozen"] is True
    assert k.ndctl("remove-passphrase", DIMM).returncode != 0
    assert k.ndctl("update-passphrase", DIMM).returncode != 0 or k.security() == "unlocked"
    assert k.ndctl("sanitize-dimm", "--crypto-erase", DIMM).returncode != 0
    for op in (f"disable {serial}", f"update {serial} {serial}", f"erase {serial}", f"master_update 0 {serial}"):
        assert k.store(op) == errno.EIO, op
    assert (k.security(), k.frozen()) == ("unlocked", "1")


def write_pattern(k: Keys) -> tuple[str, bytes]:
    """A namespace on region0 with a pattern in its data, then the region disabled."""
    res = k.ndctl("enable-region", "region0")
    assert res.returncode == 0, res.stderr
    res = k.ndctl("create-namespace", "-r", "region0", "-m", "raw", "-s", "16M")
    assert res.returncode == 0, res.stderr
    ns = json.loads(res.stdout)
    pattern = secrets.token_bytes(4096) * 16
    with open(k.mount.path(f"dev/{ns['blockdev']}"), "r+b") as f:
        f.write(pattern)
    res = k.ndctl("disable-region", "region0")
    assert res.returncode == 0, res.stderr
    return ns["uuid"], pattern


def read_back(k: Keys, uuid: str) -> tuple[dict[str, object] | None, bytes]:
    res = k.ndctl("enable-region", "region0")
    assert res.returncode == 0, res.stderr
    found = [ns for ns in json.loads(k.ndctl("list", "-N", "-r", "region0").stdout or "[]") if ns.get("uuid") == uuid]
    if not found:
        return None, b""
    with open(k.mount.path(f"dev/{found[0]['blockdev']}"), "rb") as f:
        return found[0], f.read(16 * 4096)


def test_crypto_erase_scrambles_the_data_and_keeps_the_labels(keys: Keys) -> None:
    k = keys
    uuid, pattern = write_pattern(k)
    setup_passphrase(k)
    # refused while a region using the DIMM is enabled (nvdimm->busy)
    res = k.ndctl("enable-region", "region0")
    assert res.returncode == 0, res.stderr
    res = k.ndctl("sanitize-dimm", "--crypto-erase", DIMM)
    assert res.returncode != 0 and k.security() == "unlocked"
    assert k.store(f"erase {k.serial('encrypted', f'nvdimm:{DIMM_ID}')}") == errno.EBUSY
    res = k.ndctl("disable-region", "region0")
    assert res.returncode == 0, res.stderr
    res = k.ndctl("sanitize-dimm", "--crypto-erase", DIMM)
    assert res.returncode == 0, res.stderr
    assert k.security() == "disabled" and k.serial("encrypted", f"nvdimm:{DIMM_ID}") == 0
    ns, data = read_back(k, uuid)
    assert ns is not None, "the namespace label is kept"
    assert len(data) == len(pattern) and data != pattern and data != bytes(len(data))


def test_overwrite_wipes_data_and_labels_and_reports_overwrite_until_done(keys: Keys) -> None:
    k = keys
    uuid, _ = write_pattern(k)
    setup_passphrase(k)
    res = k.ndctl("sanitize-dimm", "--overwrite", DIMM)
    assert res.returncode == 0, res.stderr
    assert k.security() == "overwrite"
    assert k.store("freeze") == errno.EBUSY
    res = k.ndctl("enable-region", "region0")  # nd_region_activate(): EBUSY while overwriting
    assert "region0: failed to enable" in res.stderr and "enabled 0 regions" in res.stderr
    res = k.ndctl("wait-overwrite", DIMM)  # polls nmemN/security until the query says done
    assert res.returncode == 0, res.stderr
    assert k.security() != "overwrite"
    # the kernel keeps the labels it read at probe: the DIMM re-reads its (wiped) area
    res = k.run("sh", "-c", f"ndctl disable-dimm {DIMM} && ndctl enable-dimm {DIMM}")
    assert res.returncode == 0, res.stderr
    ns, _ = read_back(k, uuid)
    assert ns is None, "the overwrite wiped the labels"
    area = Path(k.mount.state_dir, "labels", "nmem0.lsa").read_bytes()
    assert area == bytes(len(area))


def test_a_locked_dimm_is_unlocked_at_enable_with_the_writers_key(keys: Keys) -> None:
    k = keys
    serial = setup_passphrase(k)
    knob = "sys/devices/platform/nfit_test.0/nfit_test_dimm/test_dimm0/lock_dimm"
    res = k.ndctl("disable-dimm", DIMM)
    assert res.returncode == 0, res.stderr
    k.mount.write(knob, b"1")
    assert k.security() == "locked"
    # without the key in the keyring the enable cannot unlock it
    keyring.unlink_from_user_keyring(serial)
    assert k.ndctl("enable-dimm", DIMM).returncode == 0 and k.security() == "locked"
    assert k.ndctl("disable-dimm", DIMM).returncode == 0
    blob = (k.folder / f"nvdimm_{DIMM_ID}_{os.uname().nodename}.blob").read_text()
    res = subprocess.run(["keyctl", "add", "encrypted", f"nvdimm:{DIMM_ID}", f"load {blob}", "@u"],
                         capture_output=True, text=True)  # the saved blob brings the key back, as load-keys
    assert res.returncode == 0, res.stderr
    assert k.ndctl("enable-dimm", DIMM).returncode == 0
    wait_for(lambda: k.security() == "unlocked", 10, "the DIMM unlocked")


def test_master_passphrase_and_master_erase(keys: Keys) -> None:
    k = keys
    setup_passphrase(k)
    res = k.ndctl("setup-passphrase", DIMM, "-m", "-k", f"user:{k.master}")
    assert res.returncode == 0, res.stderr
    master = k.serial("encrypted", f"nvdimm-master:{DIMM_ID}")
    assert master
    other = k.new_encrypted("vnvdimm-test-attacker")
    assert k.store(f"master_erase {other}") == errno.EINVAL
    res = k.ndctl("sanitize-dimm", "--crypto-erase", "--master-passphrase", DIMM)
    assert res.returncode == 0, res.stderr
    assert k.security() == "disabled"


NFIT = '''template = "nfit"
[memmap]
workers = 1
[[dimm]]
size = "64M"
[[region]]
dimms = [0]
'''


def test_an_acpi_nfit_dimm_takes_a_passphrase_too(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    before = keyring.user_keyring_links()
    folder = tmp_path / "ndctl-keys"
    folder.mkdir()
    k = Keys(make_mount(NFIT), folder)
    try:
        k.make_master()
        dimm_id = k.mount.read("sys/bus/nd/devices/nmem0/nfit/id").strip()
        assert k.ndctl("disable-region", "all").returncode == 0
        res = k.ndctl("setup-passphrase", "nmem0", "-k", f"user:{k.master}")
        assert res.returncode == 0, res.stderr
        assert k.security() == "unlocked" and k.serial("encrypted", f"nvdimm:{dimm_id}")
        res = k.ndctl("remove-passphrase", "nmem0")
        assert res.returncode == 0, res.stderr
        assert k.security() == "disabled"
    finally:
        for serial in keyring.user_keyring_links() - before:
            with contextlib.suppress(OSError):
                keyring.unlink_from_user_keyring(serial)
