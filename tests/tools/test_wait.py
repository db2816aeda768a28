"""`vnvdimm wait` on a real mount: quiet and on a terminal, timeouts, device names, and that it
sleeps in poll() on memmap_state rather than in a loop."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import pytest
from mount_kit import memmap_state
from tooltest import VNVDIMM, PtyRun, clean_env, hold_memmap, holder, memmap_progress, release_memmap, strip_ansi

from vnvdimm import wait as wait_mod
from vnvdimm.client import Root
from vnvdimm.mounts import holders


def wait_cmd(m, *args: str) -> list[str]:
    return [*VNVDIMM, "wait", str(m.root), *args]


def test_quiet_wait_returns_once_idle(slow_mnt) -> None:
    pfn = holder(slow_mnt, "namespace0.0")
    hold_memmap(slow_mnt, pfn, 300)
    proc = subprocess.Popen(wait_cmd(slow_mnt), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.7)  # held: still waiting
        release_memmap(slow_mnt, pfn)
        out, err = proc.communicate(timeout=30)
    finally:
        release_memmap(slow_mnt, pfn)
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert (out, err) == ("", "")  # not a terminal: nothing printed
    assert memmap_progress(slow_mnt, pfn)[0] == "idle"


def test_timeout_exits_1_and_names_what_is_active(slow_mnt) -> None:
    pfn = holder(slow_mnt, "namespace0.0")
    hold_memmap(slow_mnt, pfn, 300)
    try:
        t0 = time.monotonic()
        res = subprocess.run(wait_cmd(slow_mnt, "pmem0", "--timeout", "0.5"), capture_output=True, text=True,
                             timeout=60, env=clean_env())
        elapsed = time.monotonic() - t0
    finally:
        release_memmap(slow_mnt, pfn)
    assert res.returncode == 1
    assert 0.5 <= elapsed < 10
    assert re.search(rf"timed out after 0\.5 s; still active: {pfn} \(\d+/65534 pages\)", res.stderr), res.stderr
    assert res.stdout == ""


def test_progress_bar_on_a_terminal(slow_mnt) -> None:
    pfn = holder(slow_mnt, "namespace0.0")
    hold_memmap(slow_mnt, pfn, 300)
    run = PtyRun(wait_cmd(slow_mnt, "pmem0", "--timeout", "60"))
    try:
        run.read_until(b"pages", 20)
        release_memmap(slow_mnt, pfn)
        assert run.finish(60) == 0
    finally:
        release_memmap(slow_mnt, pfn)
    text = strip_ansi(run.output)
    assert b"\x1b[" in run.output  # drawn with colours and cursor moves
    assert f"pmem0 ({pfn})" in text
    frames = re.findall(r"(\d+)%\s+(\d+)/65534 pages", text)
    assert frames, text
    percents = [int(p) for p, _ in frames]
    assert percents[0] < 100 and percents[-1] == 100  # seen moving, ends complete
    assert "━" in text


def test_device_names(mnt) -> None:
    for name in ("pmem0", "/dev/pmem0", "dax1.0", "/dev/dax1.0", "namespace0.0", "namespace1.0",
                 holder(mnt, "namespace0.0"), holder(mnt, "namespace1.0")):
        res = subprocess.run(wait_cmd(mnt, name, "--timeout", "10"), capture_output=True, text=True, timeout=60)
        assert (res.returncode, res.stderr) == (0, ""), name
    res = subprocess.run(wait_cmd(mnt, "pmem9"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "pmem9: no such device" in res.stderr
    res = subprocess.run([*VNVDIMM, "wait", str(mnt.root.parent)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a vnvdimm mount" in res.stderr


def test_named_device_resolves_to_its_memmap(mnt) -> None:
    root = Root.of(mnt.root)
    pfn, dax = holder(mnt, "namespace0.0"), holder(mnt, "namespace1.0")
    assert wait_mod.resolve(root, "pmem0").device == pfn
    assert wait_mod.resolve(root, "/dev/dax1.0").device == dax  # the char device, not nd dax1.0
    assert wait_mod.resolve(root, "namespace1.0").device == dax
    assert wait_mod.resolve(root, pfn).device == pfn


def test_sleeps_in_poll_not_in_a_loop(slow_mnt, monkeypatch) -> None:
    """The waiter reads each state file once, then again only when poll() says it changed."""
    pfn = holder(slow_mnt, "namespace0.0")
    hold_memmap(slow_mnt, pfn, 300)
    reads = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, off: int) -> bytes:
        reads.append(fd)
        return real_pread(fd, n, off)

    def no_sleep(seconds: float) -> None:
        raise AssertionError("wait must not sleep")

    monkeypatch.setattr(wait_mod.os, "pread", counting_pread)
    monkeypatch.setattr(wait_mod.time, "sleep", no_sleep)
    released = []
    timer = threading.Timer(1.0, lambda: (release_memmap(slow_mnt, pfn), released.append(time.monotonic())))
    timer.start()
    try:
        root = Root.of(slow_mnt.root)
        assert wait_mod.wait_idle(root, [wait_mod.resolve(root, "pmem0")], timeout=30)
        woke = time.monotonic()
    finally:
        timer.join()
        release_memmap(slow_mnt, pfn)
    assert released and woke - released[0] < 5  # woken by the change (init takes ~0.5 s more)
    assert len(reads) <= 3  # the first read, and one per change: no polling of the file


def test_waits_for_every_memmap_by_default(slow_mnt) -> None:
    pfn, dax = holder(slow_mnt, "namespace0.0"), holder(slow_mnt, "namespace1.0")
    hold_memmap(slow_mnt, dax, 300)
    try:
        res = subprocess.run(wait_cmd(slow_mnt, "--timeout", "0.3"), capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and dax in res.stderr
        # pmem0's memmap is held too (the pool is shared), unless it finished before the hold:
        # held, its state cannot change until the release, so it says which answer is right.
        pfn_state = memmap_state(slow_mnt.root, pfn)
        res = subprocess.run(wait_cmd(slow_mnt, "pmem0", "--timeout", "0.3"), capture_output=True, text=True,
                             timeout=60)
        assert (res.returncode, pfn in res.stderr) == ((1, True) if pfn_state == "active" else (0, False)), \
            (pfn_state, res.returncode, res.stderr)
    finally:
        release_memmap(slow_mnt, dax)
    res = subprocess.run(wait_cmd(slow_mnt, "--timeout", "30"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert memmap_progress(slow_mnt, pfn)[0] == memmap_progress(slow_mnt, dax)[0] == "idle"


def test_a_vanished_mount_is_not_success(slow_mnt) -> None:
    pfn = holder(slow_mnt, "namespace0.0")
    hold_memmap(slow_mnt, pfn, 300)
    proc = subprocess.Popen(wait_cmd(slow_mnt, "--timeout", "60"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env())
    try:
        # Unmount once it waits in poll() (it has the memmap_state files open), not before it
        # even found the mount (a loaded machine may take longer than any fixed delay to start it).
        deadline = time.monotonic() + 30
        while not any(h.pid == proc.pid and h.path.endswith("/memmap_state") for h in holders(slow_mnt.root)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        slow_mnt.umount()
        out, err = proc.communicate(timeout=30)
        assert out == ""
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 2 and "the mount is gone" in err
