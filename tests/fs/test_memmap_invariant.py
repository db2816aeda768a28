"""memmap_state tells the truth: ``idle`` only once every page record of the device is
initialized and equal to the kernel's, ``active`` only while pages are still to go. Checked
(mount_kit.memmap_state) at every read, across map=dev/map=mem, fsdax/devdax, device sizes,
``ns_per_page``, pauses at any point of the init, and worker processes killed mid-job."""

from __future__ import annotations

import mmap
import os
import select
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mount_kit import alive, children, memmap_state, mounted, wait_for
from topologies import e820

# One region per (mode, map), of different sizes (not all a power of two, the largest
# spanning two 128 MiB memory sections).
REGIONS = [("32M", "fsdax", "dev"), ("48M", "fsdax", "mem"), ("64M", "devdax", "dev"), ("160M", "devdax", "mem")]
WORKERS = 2
BOUND_S = 60  # generous: the largest memmap at the slowest setting takes ~0.8 s on 2 workers


@pytest.fixture(scope="module")
def mnt4(request: pytest.FixtureRequest) -> Iterator[Any]:
    with mounted(request, e820(*(" ".join(r) for r in REGIONS), workers=WORKERS)) as m:
        m.devices = [m.read(f"sys/bus/nd/devices/namespace{i}.0/holder").strip() for i in range(len(REGIONS))]
        yield m


def restart(m: Any, dev: str) -> None:
    driver = "dax_pmem" if dev.startswith("dax") else "nd_pmem"
    m.write(f"sys/bus/nd/drivers/{driver}/unbind", dev.encode())
    m.write(f"sys/bus/nd/drivers/{driver}/bind", dev.encode())


def progress(m: Any, dev: str) -> tuple[int, int]:
    d = f"sys/bus/nd/devices/{dev}/memmap"
    return int(m.read(f"{d}/pages_done")), int(m.read(f"{d}/pages_total"))


def wait_idle_checking(m: Any, dev: str) -> int:
    """Sleep in poll() on memmap_state (woken when it changes), checking the invariant at
    every wake-up and every 50 ms; the number of checks made."""
    checks = 0
    fd = os.open(m.path(f"sys/bus/nd/devices/{dev}/memmap_state"), os.O_RDONLY)
    try:
        p = select.poll()
        p.register(fd, select.POLLPRI | select.POLLERR)
        os.read(fd, 64)
        for _ in range(BOUND_S * 20):
            checks += 1
            if memmap_state(m.root, dev) == "idle":
                return checks
            p.poll(50)
            os.lseek(fd, 0, os.SEEK_SET)
            os.read(fd, 64)
    finally:
        os.close(fd)
    raise AssertionError(f"{dev} not idle after {BOUND_S} s: {progress(m, dev)}")


@pytest.mark.timeout(900)  # (a loaded machine: each example restarts a memmap, some kill a worker)
@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(which=st.integers(0, len(REGIONS) - 1), ns_per_page=st.sampled_from([0, 1000, 5000, 10000]),
       pause=st.one_of(st.none(), st.integers(1, 990)), kill=st.booleans())
def test_memmap_state_is_idle_exactly_when_every_record_is_initialized(
        mnt4: Any, which: int, ns_per_page: int, pause: int | None, kill: bool) -> None:
    m, dev = mnt4, mnt4.devices[which]
    assert memmap_state(m.root, dev) == "idle"  # the previous example left it done
    m.write(f"sys/bus/nd/devices/{dev}/memmap/ns_per_page", f"{ns_per_page}\n".encode())
    if kill:  # slow enough that a worker holds runs when it dies
        m.write(f"sys/bus/nd/devices/{dev}/memmap/ns_per_page", b"20000\n")
    m.write(f"sys/bus/nd/devices/{dev}/memmap/pause_at", f"{pause or 1000}\n".encode())
    try:
        restart(m, dev)
        if pause is not None:
            # Held at the mark: active, with pages to go, however long we look.
            done, total = wait_for(lambda: (p := progress(m, dev))[0] * 1000 >= pause * p[1] and p, BOUND_S,
                                   f"{dev} to reach its pause mark {pause}")
            # Runs already handed out finish, so a small device may be done by now: the
            # invariant holds whichever state it reads.
            memmap_state(m.root, dev)
            memmap_state(m.root, dev)
        if kill:
            pool = wait_for(lambda: (c := children(m.pid)) and len(c) == WORKERS and c, 60, "the worker pool")
            memmap_state(m.root, dev)
            os.kill(pool[0], signal.SIGKILL)
            wait_for(lambda: not alive(pool[0]), 60, f"worker {pool[0]} to die")
            memmap_state(m.root, dev)
            m.write(f"sys/bus/nd/devices/{dev}/memmap/ns_per_page", f"{ns_per_page}\n".encode())
    finally:
        m.write(f"sys/bus/nd/devices/{dev}/memmap/pause_at", b"1000\n")
    wait_idle_checking(m, dev)
    done, total = progress(m, dev)
    assert done == total > 0
    if kill:
        wait_for(lambda: len(children(m.pid)) == WORKERS, 60, "the pool to be back to full size",
                 report=lambda: f"{children(m.pid)}; {(m.state_dir / 'vnvdimm.log').read_text()[-3000:]}")


def test_memmap_state_reads_active_while_held_at_a_mark(mnt4: Any) -> None:
    """The other half: held at 30 % (slow pages, so the mark is not overrun), the device
    reads active with pages to go, as often as we look; released, it reads idle with every
    record right."""
    m, dev = mnt4, mnt4.devices[-1]
    m.write(f"sys/bus/nd/devices/{dev}/memmap/ns_per_page", b"20000\n")
    m.write(f"sys/bus/nd/devices/{dev}/memmap/pause_at", b"300\n")
    try:
        restart(m, dev)
        wait_for(lambda: (p := progress(m, dev))[0] * 1000 >= 300 * p[1], BOUND_S, f"{dev} to reach 30 %")
        for _ in range(5):
            assert memmap_state(m.root, dev) == "active"
        done, total = progress(m, dev)
        assert done < total
    finally:
        m.write(f"sys/bus/nd/devices/{dev}/memmap/pause_at", b"1000\n")
        m.write(f"sys/bus/nd/devices/{dev}/memmap/ns_per_page", b"0\n")
    wait_idle_checking(m, dev)


def test_memmap_state_reads_active_with_one_block_to_go(mnt4: Any) -> None:
    """An early idle is caught every time, not when polling happens to land on it: the
    background is held at its start (pause mark 1), then reads of the device file initialize
    every block but the last in the foreground, so the device sits at 95 % or more with a
    block to go, for as long as we look: it must read active there."""
    m, dev = mnt4, mnt4.devices[1]  # pfn1.1: 48M fsdax map=mem, 24 blocks of 2 MiB
    (disk,) = os.listdir(m.path(f"sys/bus/nd/devices/{dev}/block"))
    # slow pages: background runs of one 2 MiB block (at full speed one run is the device)
    m.write(f"sys/bus/nd/devices/{dev}/memmap/ns_per_page", b"20000\n")
    m.write(f"sys/bus/nd/devices/{dev}/memmap/pause_at", b"1\n")
    try:
        restart(m, dev)
        wait_for(lambda: (p := progress(m, dev))[0] * 1000 >= p[1], BOUND_S, f"{dev} to reach its pause mark")
        # O_DIRECT: no readahead into the last block, no page cache answering for the daemon
        fd = os.open(m.path(f"dev/{disk}"), os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 1 << 20)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            for offset in range(0, size - (2 << 20), 1 << 20):
                assert os.preadv(fd, [buf], offset) == 1 << 20
        finally:
            buf.close()
            os.close(fd)
        done, total = progress(m, dev)
        assert done * 100 >= total * 90 and done < total, f"{dev}: held at {done} of {total} pages"
        for _ in range(5):
            assert memmap_state(m.root, dev) == "active"
        assert progress(m, dev) == (done, total)
    finally:
        m.write(f"sys/bus/nd/devices/{dev}/memmap/pause_at", b"1000\n")
        m.write(f"sys/bus/nd/devices/{dev}/memmap/ns_per_page", b"0\n")
    wait_idle_checking(m, dev)
