"""Every blocking path makes progress within a documented bound, and a waiter that goes away
leaves nothing behind.

Worst cases (README, Reliability), with B = one align block (512 pages at 2 MiB) and
t = max(ns_per_page, the native cost of a page):
* a read/write/fault of a cold range: the blocks it covers, B x t each, initialized by the
  caller itself, or the end of the worker run holding them (a run is one block, or up to a
  section when ns_per_page = 0; a worker has at most 2 queued): about 3 x B x t per block;
* `echo sync > memmap_state`: the rest of the memmap, pages_left x t / workers;
* `wait_probe`: the longest model operation under the model lock (no memmap wait happens
  under it, not even in sync mode);
* none of these holds up other requests: each waiter holds one of up to 1024 loop threads.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from mount_kit import ROOT_FUSECTL, fuse_waiting, memmap_state, needs_root
from reliability_kit import DAX, PFN, SMALL, e820, wait_for

KPF_NOPAGE = 1 << 20


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    out = fn(*args)
    return time.monotonic() - t0, out


def nopage(m, dev: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Per page of dev's memmap: True while not initialized (KPF_NOPAGE)."""
    return (np.frombuffer(m.path(f"{dev}/memmap/kpageflags").read_bytes(), dtype="<u8") & KPF_NOPAGE) != 0


def test_cold_reads_wait_for_their_blocks_only(make_mount, figures) -> None:  # type: ignore[no-untyped-def]
    """A read of a cold range returns once the block it covers is initialized (it waited
    for it: the block is done when the read returns) and initializes nothing else: the
    background init is held, so every page that changes state is the read's doing."""
    ns = 200_000  # 0.2 ms/page: a block takes 0.1 s
    m = make_mount(e820("256M fsdax dev", "256M devdax mem", ns_per_page=ns))
    m.write(f"{PFN}/memmap/pause_at", b"1\n")  # the pool is shared: both memmaps hold
    wait_for(lambda: int(m.read(f"{PFN}/memmap/pages_done")) > 0, 30, "the memmap to reach its mark")
    # Runs already handed out finish: wait until nothing moves any more.
    masks = {dev: nopage(m, dev) for dev in (PFN, DAX)}

    stable: list[bool] = []

    def settled() -> bool:
        now = {dev: nopage(m, dev) for dev in (PFN, DAX)}
        same = all((now[d] == masks[d]).all() for d in now)
        masks.update(now)
        stable.append(same)
        return stable[-2:] == [True, True]  # (a run in flight on a loaded machine may be slow)

    wait_for(settled, 30, "the held memmaps to stand still", interval=1.0)
    rng = random.Random(3)
    worst = 0.0
    for dev, devfile in ((PFN, "dev/pmem0"), (DAX, "dev/dax1.0")):
        data_page = int(m.read(f"{dev}/resource"), 16) // 4096 - int(m.read(f"{dev}/memmap/start_pfn"), 16)
        size = os.stat(m.path(devfile)).st_size
        fd = os.open(m.path(devfile), os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(12):
                before = nopage(m, dev)
                cold = [b for b in range((data_page + 511) // 512, len(before) // 512)
                        if before[b * 512:(b + 1) * 512].all()]
                assert cold, f"{dev}: no cold block left"
                block = rng.choice(cold)
                page = block * 512 + rng.randrange(512)
                buf = bytearray(4096)
                took, n = timed(os.preadv, fd, [buf], (page - data_page) * 4096)
                assert n == 4096 and buf == bytes(4096)
                worst = max(worst, took)
                after = nopage(m, dev)
                assert not after[block * 512:(block + 1) * 512].any(), \
                    f"{dev}: read of page {page} returned before its block was initialized"
                changed = np.flatnonzero(before != after)
                assert set(changed.tolist()) <= set(range(block * 512, (block + 1) * 512)), \
                    f"{dev}: read of page {page} initialized pages outside its block: {changed[:8]}"
                assert size > (page - data_page) * 4096
        finally:
            os.close(fd)
        # The reads waited for their blocks, not for the memmap.
        assert memmap_state(m.root, dev) == "active"
    m.write(f"{PFN}/memmap/pause_at", b"1000\n")
    figures.add(blocking_calls=24)
    figures.note(worst_cold_read_ms=round(worst * 1e3, 1))


@needs_root(ROOT_FUSECTL)
def test_waiters_do_not_stall_the_mount(make_mount, figures) -> None:  # type: ignore[no-untyped-def]
    """24 callers blocked on cold blocks (10 s each) and 2 `echo sync` writers: the rest of
    the mount keeps answering at once (libfuse's default of 10 loop threads did not)."""
    m = make_mount(e820(*SMALL, ns_per_page=20_000_000))
    size = os.stat(m.path("dev/pmem0")).st_size
    procs = []
    for i in range(12):
        for dev in ("dev/pmem0", "dev/dax1.0"):
            off = (i + 1) * (size // 13) // 4096 * 4096
            procs.append(subprocess.Popen(["dd", f"if={m.path(dev)}", "of=/dev/null", "bs=4096", "count=1",
                                           f"skip={off // 4096}"], stderr=subprocess.DEVNULL))
    for dev in (PFN, DAX):
        procs.append(subprocess.Popen(["sh", "-c", f"echo sync > {m.path(dev)}/memmap_state"],
                                      stderr=subprocess.DEVNULL))
    try:
        # Every caller is blocked in the daemon (fusectl counts their requests)...
        wait_for(lambda: fuse_waiting(m) >= len(procs), 60, "every caller to be waiting in the daemon",
                 interval=0.2, report=lambda: f"{fuse_waiting(m)} requests waiting, {len(procs)} callers")
        assert all(p.poll() is None for p in procs), "a waiter returned: the blocks were not cold"
        worst = 0.0
        for _ in range(20):
            for rel in (f"{PFN}/memmap_state", f"{PFN}/memmap/pages_done", "sys/bus/nd/devices/region0/size",
                        f"{DAX}/mode"):
                took, _v = timed(m.read, rel)
                worst = max(worst, took)
            took, _v = timed(os.listdir, m.path("sys/bus/nd/devices"))
            worst = max(worst, took)
        # (the blocked callers wait 10 s each: an access queued behind them takes that long)
        assert worst < 5, f"a sysfs access took {worst:.3f} s while callers were blocked"
        assert memmap_state(m.root, PFN) == "active"
        figures.add(blocking_calls=len(procs))
        figures.note(worst_sysfs_access_ms=round(worst * 1e3, 1))
    finally:
        # A caller whose request the daemon holds stays (even SIGKILLed) until it is answered,
        # as a writer of the kernel's memmap_state stays in D state, its files open: a forced
        # unmount cancels the jobs, which answers them all.
        for p in procs:
            p.kill()
        m.umount(force=True)
        for p in procs:
            p.wait(timeout=10)


@needs_root(ROOT_FUSECTL)
def test_sync_and_wait_probe_are_bounded(make_mount, figures) -> None:  # type: ignore[no-untyped-def]
    ns = 100_000  # 16384 pages: ~0.8 s per memmap on 2 workers
    m = make_mount(e820(*SMALL, ns_per_page=ns))
    bus = "sys/devices/platform/e820_pmem/ndbus0"
    # wait_probe answers at once while memmaps are active...
    took, v = timed(m.read, f"{bus}/wait_probe")
    assert v == "1\n" and memmap_state(m.root, PFN) == "active", f"wait_probe took {took:.2f} s"
    # ...and `echo sync` returns when the memmap is done, within pages_left x t / workers.
    done, total = int(m.read(f"{PFN}/memmap/pages_done")), int(m.read(f"{PFN}/memmap/pages_total"))
    expect = (total - done) * ns * 1e-9 / 2
    took, n = timed(m.write, f"{PFN}/memmap_state", b"sync\n")
    assert n == 5 and memmap_state(m.root, PFN) == "idle"
    assert took < 2 * expect + 1.0, f"sync took {took:.2f} s, expected about {expect:.2f} s"
    # A sync waiting on a memmap that will take hours returns promptly when the device is
    # disabled (its job cancelled), and so does a reader of a cold block.
    m.write(f"{DAX}/memmap/ns_per_page", b"1000000000")  # 1 s per page
    m.write("sys/bus/nd/drivers/dax_pmem/unbind", b"dax1.1\0")
    m.write("sys/bus/nd/drivers/dax_pmem/bind", b"dax1.1\0")
    assert memmap_state(m.root, DAX) == "active"
    results: dict[str, object] = {}

    def sync() -> None:
        try:
            results["sync"] = m.write(f"{DAX}/memmap_state", b"sync")
        except OSError as e:
            results["sync"] = e.errno

    t = threading.Thread(target=sync, daemon=True)
    t.start()
    wait_for(lambda: fuse_waiting(m) >= 1, 60, "the sync to wait in the daemon", interval=0.1)
    assert t.is_alive()
    # wait_probe is not held up by the waiting sync either.
    took, v = timed(m.read, f"{bus}/wait_probe")
    assert v == "1\n" and t.is_alive() and took < 10, f"wait_probe took {took:.2f} s"
    t0 = time.monotonic()
    m.write("sys/bus/nd/drivers/dax_pmem/unbind", b"dax1.1\0")
    t.join(5)
    assert not t.is_alive(), "sync still blocked after the device was disabled"
    took = time.monotonic() - t0
    assert took < 10, f"the disable took {took:.2f} s to release the sync (its memmap had hours to go)"
    assert results["sync"] in (4, 6), results  # returns (the job is over), or ENXIO
    figures.add(blocking_calls=4)


def test_sync_mode_bind_does_not_hold_wait_probe(make_mount, figures) -> None:  # type: ignore[no-untyped-def]
    """memmap mode = "sync" (the pre-series kernel): the enabling write blocks until the
    memmap is done, but outside the model lock, so wait_probe and other stores go on."""
    m = make_mount(e820(*SMALL, mode="sync"))
    bus = "sys/devices/platform/e820_pmem/ndbus0"
    m.write(f"{DAX}/memmap/ns_per_page", b"200000")  # the next memmap of dax1.1: ~1.6 s
    m.write("sys/bus/nd/drivers/dax_pmem/unbind", b"dax1.1\0")
    t = threading.Thread(target=m.write, args=("sys/bus/nd/drivers/dax_pmem/bind", b"dax1.1\0"), daemon=True)
    t0 = time.monotonic()
    t.start()
    wait_for(lambda: memmap_state(m.root, DAX) == "active", 60, "the sync-mode memmap to start")
    took, v = timed(m.read, f"{bus}/wait_probe")
    assert v == "1\n" and t.is_alive(), f"wait_probe took {took:.2f} s, the bind returned"
    took, _ = timed(m.write, f"{PFN}/memmap/ns_per_page", b"0")
    assert t.is_alive(), f"a store took {took:.2f} s, until the bind returned"
    assert t.is_alive(), "the sync-mode bind returned before its memmap was done"
    t.join(30)
    assert not t.is_alive()
    assert memmap_state(m.root, DAX) == "idle"
    assert time.monotonic() - t0 > 0.5
    figures.add(blocking_calls=3)


READER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
os.pread(fd, 4096, int(sys.argv[2]))
print("read", flush=True)
"""


@needs_root(ROOT_FUSECTL)
def test_killed_reader_leaves_nothing_stuck(make_mount, figures) -> None:  # type: ignore[no-untyped-def]
    """A reader SIGKILLed while it waits on a cold block: it goes away, the daemon finishes
    that block (no request stays unanswered, no block stays claimed), the memmap completes,
    and a later read of the same range works."""
    ns = 4_000_000  # 4 ms/page: a block takes 2 s
    m = make_mount(e820(*SMALL, ns_per_page=ns))
    size = os.stat(m.path("dev/pmem0")).st_size
    # One reader does the foreground init of its block, one waits on a block a worker holds.
    offsets = {"dev/pmem0": size // 2 // 4096 * 4096, "dev/dax1.0": 0}
    procs = {}
    for dev, off in offsets.items():
        p = subprocess.Popen([sys.executable, "-c", READER, str(m.path(dev)), str(off)], stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        procs[dev] = p
    wait_for(lambda: fuse_waiting(m) >= 2, 60, "both reads to wait in the daemon", interval=0.1)
    assert all(p.poll() is None for p in procs.values()), "a read returned before the kill"
    t0 = time.monotonic()
    for p in procs.values():
        p.send_signal(signal.SIGKILL)
    figures.add(faults=len(procs))
    for dev, p in procs.items():
        p.wait(timeout=10)
        gone = time.monotonic() - t0
        assert gone < 512 * ns * 1e-9 + 2, f"{dev}: killed reader took {gone:.2f} s to go"
    # The daemon answers the orphaned requests once their blocks are done: nothing waits.
    wait_for(lambda: fuse_waiting(m) == 0, 512 * ns * 1e-9 * 3 + 5, "the orphaned requests to be answered")
    # No block stays claimed: with the floor removed the memmap completes, every page done.
    for dev in (PFN, DAX):
        m.write(f"{dev}/memmap/ns_per_page", b"0")
    for dev in (PFN, DAX):
        assert m.write(f"{dev}/memmap_state", b"sync") == 4
        assert int(m.read(f"{dev}/memmap/pages_done")) == int(m.read(f"{dev}/memmap/pages_total"))
        flags = np.frombuffer(m.path(f"{dev}/memmap/kpageflags").read_bytes(), dtype="<u8")
        reserve = 2 if dev == PFN else 0
        assert not (flags[reserve:] & KPF_NOPAGE).any()
    # A later read of the same ranges works, and sees the media.
    for dev, off in offsets.items():
        fd = os.open(m.path(dev), os.O_RDWR)
        try:
            os.pwrite(fd, b"after" * 800, off)
            assert os.pread(fd, 4000, off) == b"after" * 800
        finally:
            os.close(fd)
    # close() returns before the daemon answers: the kernel sends RELEASE in the background
    # (fuse_file_put without sync), and the daemon's release fsyncs the media. So wait, briefly.
    wait_for(lambda: fuse_waiting(m) == 0, 10, "the last releases to be answered", interval=0.05)
    # The readers died of the kill, before reading anything.
    assert {dev: p.returncode for dev, p in procs.items()} == {dev: -signal.SIGKILL for dev in procs}
    assert all(p.stdout is not None and p.stdout.read() == "" for p in procs.values())


OPENER = r"""
import os, sys, time
t0 = time.monotonic()
fd = os.open(sys.argv[1], os.O_RDONLY)
print(f"opened {time.monotonic() - t0:.3f}", flush=True)
os.pread(fd, 4096, int(sys.argv[2]))
"""


def test_open_does_not_wait_for_reads_in_flight(make_mount, figures) -> None:  # type: ignore[no-untyped-def]
    """Processes opening a device file at the same time and reading cold blocks (10 s each):
    every open returns at once (an open that dropped the page cache waited for the locked
    pages of the others' reads)."""
    m = make_mount(e820(*SMALL, ns_per_page=20_000_000))
    size = os.stat(m.path("dev/pmem0")).st_size
    offsets = [(i + 1) * (size // 9) // 4096 * 4096 for i in range(8)]
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(m.path(dev)), str(off)], stdout=subprocess.PIPE,
                              text=True) for off in offsets for dev in ("dev/pmem0", "dev/dax1.0")]
    try:
        worst = 0.0
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.startswith("opened "), line
            worst = max(worst, float(line.split()[1]))
        assert worst < 5, f"an open took {worst:.2f} s (the reads in flight take 10 s)"
        assert all(p.poll() is None for p in procs)
        figures.add(blocking_calls=len(procs))
        figures.note(worst_open_ms=round(worst * 1e3, 1))
    finally:
        for p in procs:
            p.kill()
        m.umount(force=True)  # the killed readers keep their files until answered
        for p in procs:
            p.wait(timeout=10)
