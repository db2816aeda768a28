"""Unmounting while readers are blocked on a cold device and memmap jobs are active
(`vnvdimm umount`, `fusermount3 -u` then `-u -z`, SIGTERM): the command returns within 1 s,
every blocked reader gets an error instead of hanging, and the daemon and all its workers
exit."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from mount_kit import fuse_waiting, memmap_state
from reliability_kit import DAX, PFN, SMALL, alive, children, e820, wait_for

# 20 ms per page: one 2 MiB block takes 10 s to initialize, a whole memmap hours.
NS_PER_PAGE = 20_000_000

READER = r"""
import errno, os, sys, time
path, off, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(path, {"r": os.O_RDONLY, "w": os.O_RDWR, "s": os.O_WRONLY}[mode])
print("ready", flush=True)
t0 = time.monotonic()
try:
    if mode == "r":
        os.pread(fd, 4096, off)
    elif mode == "w":
        os.pwrite(fd, b"x" * 4096, off)
    else:
        os.write(fd, b"sync\n")
except OSError as e:
    print(f"errno {e.errno} {time.monotonic() - t0:.3f}", flush=True)
    sys.exit(3)
print(f"ok {time.monotonic() - t0:.3f}", flush=True)
"""


def start_blocked(m) -> list[tuple[str, subprocess.Popen[str]]]:  # type: ignore[no-untyped-def]
    """Readers and writers of cold blocks of both devices (foreground init in the daemon, and
    waits on blocks a worker holds), and `echo sync` writers: all blocked."""
    jobs = []
    size = os.stat(m.path("dev/pmem0")).st_size
    for dev in ("dev/pmem0", "dev/dax1.0"):
        for i, mode in enumerate("rrrw"):
            off = (size // 5) * (i + 1)
            jobs.append((f"{mode} {dev}@{off}", [str(m.path(dev)), str(off), mode]))
        # The first blocks: being initialized by the workers (the reader waits for them).
        jobs.append((f"r {dev}@0", [str(m.path(dev)), "0", "r"]))
    for dev in (PFN, DAX):
        jobs.append((f"sync {dev}", [str(m.path(f"{dev}/memmap_state")), "0", "s"]))
    procs = [(name, subprocess.Popen([sys.executable, "-c", READER, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) for name, args in jobs]
    t0 = time.monotonic()
    for name, p in procs:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n", f"{name}: {p.stderr.read() if p.stderr else ''}"
    started = time.monotonic() - t0
    # Blocked in the daemon: fusectl counts their requests.
    wait_for(lambda: fuse_waiting(m) >= len(procs), 60, "every caller to wait in the daemon", interval=0.1,
             report=lambda: f"{fuse_waiting(m)} requests waiting, {len(procs)} callers")
    done = [(n, p.returncode, p.stdout.readline() if p.stdout else "") for n, p in procs if p.poll() is not None]
    assert not done, f"not all blocked ({started:.2f} s to start them): {done}"
    return procs


@pytest.mark.parametrize("how", ["vnvdimm-umount", "fusermount3", "sigterm", "sigint", "sighup"])
def test_unmount_with_blocked_readers(make_mount, figures, shm_unchanged, how: str) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(e820(*SMALL, ns_per_page=NS_PER_PAGE))
    daemon = m.pid
    workers = children(daemon)
    assert len(workers) == 2
    procs = start_blocked(m)
    assert memmap_state(m.root, PFN) == "active"
    try:
        t0 = time.monotonic()
        if how == "vnvdimm-umount":
            res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", "umount", str(m.root)], capture_output=True,
                                 text=True, timeout=30)
            assert res.returncode == 0, res.stderr
        elif how == "fusermount3":
            res = subprocess.run(["fusermount3", "-u", str(m.root)], capture_output=True, text=True, timeout=30)
            # Open files make the plain unmount fail with EBUSY; the lazy one detaches.
            assert res.returncode != 0 and "busy" in res.stderr.lower(), res
            res = subprocess.run(["fusermount3", "-u", "-z", str(m.root)], capture_output=True, text=True,
                                 timeout=30)
            assert res.returncode == 0, res.stderr
        else:
            os.kill(daemon, {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sighup": signal.SIGHUP}[how])
        took = time.monotonic() - t0
        assert took < 10, f"{how} took {took:.2f} s"  # (the blocked callers wait for hours)
        figures.add(faults=1)
        # Every blocked caller returns, readers and writers with an error.
        results = {}
        for name, p in procs:
            out, err = p.communicate(timeout=5)
            results[name] = (p.returncode, out.strip().splitlines()[-1] if out.strip() else err[-300:])
        for name, (code, last) in results.items():
            if name.startswith("sync"):
                assert code in (0, 3), (name, last)  # `echo sync` returns (the job is over)
                continue
            assert code == 3, f"{name}: {last} (exit {code})"
            err = int(last.split()[1])
            assert err in (errno.ENXIO, errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV), (name, last)
        figures.add(blocked_callers_released=len(results))
        # The daemon and every worker exit, and the mount is gone.
        wait_for(lambda: not alive(daemon) and not any(alive(w) for w in workers), 60,
                 "the daemon and its workers to exit")
        wait_for(lambda: not m.is_mounted(), 60, "the mount to go away")
        assert time.monotonic() - t0 < 5
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


HOLDER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
os.preadv(fd, [buf], 0)
print("ready", flush=True)
while sys.stdin.readline() == "read\n":
    try:
        os.preadv(fd, [buf], 0)
        print("read ok", flush=True)
    except OSError as e:
        print(f"errno {e.errno}", flush=True)
os.close(fd)
"""


def test_lazy_unmount_with_an_idle_open_file(make_mount, figures) -> None:  # type: ignore[no-untyped-def]
    """A process keeps a device file open (not blocked) across `fusermount3 -u -z`: the
    devices are closed at once (its next read fails), the daemon serves the connection
    until the file is closed (lazy unmount semantics), then it and its workers exit."""
    m = make_mount(e820(*SMALL))
    daemon = m.pid
    workers = children(daemon)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(m.path("dev/pmem0"))], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == "ready\n"
        res = subprocess.run(["fusermount3", "-u", str(m.root)], capture_output=True, text=True, timeout=30)
        assert res.returncode != 0 and "busy" in res.stderr.lower(), res
        t0 = time.monotonic()
        res = subprocess.run(["fusermount3", "-u", "-z", str(m.root)], capture_output=True, text=True, timeout=30)
        took = time.monotonic() - t0
        assert res.returncode == 0 and took < 10, (res, f"took {took:.2f} s")

        def read_fails() -> bool:
            p.stdin.write("read\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
            answer = p.stdout.readline()  # type: ignore[union-attr]
            assert answer in ("read ok\n", f"errno {errno.ENXIO}\n"), answer
            return answer != "read ok\n"

        wait_for(read_fails, 60, "the device to be closed after the unmount", interval=0.02)
        assert alive(daemon)
        t0 = time.monotonic()
        p.stdin.write("close\n")
        p.stdin.flush()
        p.wait(timeout=5)
        wait_for(lambda: not alive(daemon) and not any(alive(w) for w in workers), 60,
                 "the daemon and its workers to exit once the file is closed")
        figures.add(faults=1)
        figures.note(exit_after_close_ms=round((time.monotonic() - t0) * 1e3))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
