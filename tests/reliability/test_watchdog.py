"""The watchdog (tests/conftest.py): a test hung in a request through a mount fails within
its bound instead of freezing the run; the daemon's stacks are in the failure, the daemon
is killed (which releases the blocked caller: ECONNABORTED, ENOTCONN after) and nothing is left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mount_kit import alive, fuse_mounts_under

from vnvdimm.mounts import vnvdimm_processes

CASES = Path(__file__).resolve().parent / "watchdog_cases"


def test_a_hung_echo_sync_fails_its_test_within_its_bound(tmp_path: Path) -> None:
    bound = 8
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--basetemp",
                             str(tmp_path / "inner"), "--timeout", "600", str(CASES / "hung_sync.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HUNG_SYNC_BOUND": str(bound)}, cwd=CASES.parents[2])
    try:
        out, _ = proc.communicate(timeout=bound + 120)
    except subprocess.TimeoutExpired:
        # Without the watchdog the inner test stays in the kernel's FUSE wait even past
        # SIGKILL: only the death of its daemon releases it.
        for daemon in vnvdimm_processes(tmp_path):
            os.kill(daemon, signal.SIGKILL)
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the hung test outlived its bound by 120 s: the watchdog did not end it\n{out[-3000:]}")
    took = time.monotonic() - t0
    assert proc.returncode == 1, out[-3000:]
    assert took < bound + 60, f"the hung test took {took:.1f} s (bound {bound} s)"
    daemon = int(re.search(r"daemon (\d+)", out).group(1))  # type: ignore[union-attr]
    # Failed by the watchdog, with what it saw: the daemon's stacks (the thread waiting in
    # the sync), and the caller released with ENOTCONN.
    assert f"still running after {bound} s" in out, out[-3000:]
    assert f"daemon {daemon} (workers" in out and "killed after dumping its stacks" in out, out[-3000:]
    assert re.search(r"Thread 0x[0-9a-f]+", out) and "in sync_store" in out, out[-3000:]
    # (a request in flight when the connection dies ends with ECONNABORTED, later ones ENOTCONN)
    assert "ConnectionAbortedError" in out or "Transport endpoint is not connected" in out, out[-3000:]
    assert not alive(daemon)
    assert fuse_mounts_under(tmp_path) == []
