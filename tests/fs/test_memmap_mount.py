"""The memmap ABI on a real mount: memmap_state, sync, poll, the binary views, and device
files whose reads, writes and mmap faults wait for (and initialize) the pages they touch."""

from __future__ import annotations

import errno
import mmap
import os
import random
import select
import struct
import threading
import time
from pathlib import Path

import kernel_oracle as K
import numpy as np
import pytest
from mount_kit import alive, daemon_tree, memfds, memmap_state, wait_for

from vnvdimm.memmap import PAGE_DTYPE

KPF_NOPAGE = 1 << 20
KPF_RESERVED = 1 << 32

# 256 MiB regions; a memmap slow enough (100 us/page/worker -> ~3 s) to be seen active.
SLOW = """\
template = "e820"
[memmap]
workers = 2
ns_per_page = {ns}
[[region]]
size = "256M"
namespace = {{ mode = "fsdax", map = "dev", align = "2M" }}
[[region]]
size = "256M"
namespace = {{ mode = "devdax", map = "mem", align = "2M" }}
"""

PFN = "sys/bus/nd/devices/pfn0.1"
DAX = "sys/bus/nd/devices/dax1.1"


def read_u64s(path: Path, first: int, count: int) -> list[int]:
    with open(path, "rb") as f:
        f.seek(first * 8)
        data = f.read(count * 8)
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def wait_idle(mnt, rel: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while memmap_state(mnt.root, rel) != "idle":
        assert time.monotonic() < deadline, f"{rel} still active after {timeout} s"
        time.sleep(0.05)


def test_state_goes_active_then_idle_and_sync_waits(make_mount) -> None:  # type: ignore[no-untyped-def]
    mnt = make_mount(SLOW.format(ns=100_000))
    assert memmap_state(mnt.root, PFN) == "active"
    total = int(mnt.read(f"{PFN}/memmap/pages_total"))
    assert total == 256 * 256 - 2  # every page but the 8 KiB altmap reserve
    done_before = int(mnt.read(f"{PFN}/memmap/pages_done"))
    assert done_before < total
    # Held at half way, `echo sync` waits (it cannot return before the memmap is done)...
    mnt.write(f"{PFN}/memmap/pause_at", b"500\n")
    wait_for(lambda: int(mnt.read(f"{PFN}/memmap/pages_done")) * 2 >= total, 60, "the pause mark")
    result: list[object] = []

    def sync() -> None:
        try:
            result.append(mnt.write(f"{PFN}/memmap_state", b"sync\0"))
            result.append(memmap_state(mnt.root, PFN))
        except BaseException as e:  # (reported below)
            result.append(e)

    t = threading.Thread(target=sync, daemon=True)
    t.start()
    t.join(2)
    assert t.is_alive(), f"sync returned while the memmap was held: {result}"
    assert memmap_state(mnt.root, PFN) == "active"
    # ...and returns once it is, with every page initialized.
    mnt.write(f"{PFN}/memmap/ns_per_page", b"0\n")
    mnt.write(f"{PFN}/memmap/pause_at", b"1000\n")
    t.join(60)
    assert not t.is_alive() and result == [5, "idle"], result
    assert int(mnt.read(f"{PFN}/memmap/pages_done")) == total
    assert int(mnt.read(f"{PFN}/memmap/elapsed_us")) > 0
    # Writing sync while idle succeeds at once; seeds are idle too.
    assert mnt.write(f"{PFN}/memmap_state", b"sync\n") == 5
    assert memmap_state(mnt.root, "sys/bus/nd/devices/pfn0.0") == "idle"
    assert mnt.write("sys/bus/nd/devices/pfn0.0/memmap_state", b"sync") == 4


@pytest.mark.parametrize("bad", [b"", b"SYNC", b" sync", b"sync\n\n", b"syncX", b"idle\n", b"active"])
def test_bad_writes_are_einval_and_change_nothing(mnt, bad: bytes) -> None:  # type: ignore[no-untyped-def]
    before = mnt.read(f"{PFN}/memmap_state")
    if not bad:
        assert mnt.write(f"{PFN}/memmap_state", bad) == 0  # kernfs: an empty write stores nothing
    else:
        with pytest.raises(OSError) as e:
            mnt.write(f"{PFN}/memmap_state", bad)
        assert e.value.errno == errno.EINVAL
    assert mnt.read(f"{PFN}/memmap_state") in (before, "idle\n")


def test_mode_is_0644_everywhere(mnt) -> None:  # type: ignore[no-untyped-def]
    for dev in ("pfn0.0", "pfn0.1", "dax0.0", "dax1.0", "dax1.1", "pfn1.0"):
        st = os.stat(mnt.path(f"sys/bus/nd/devices/{dev}/memmap_state"))
        assert st.st_mode & 0o777 == 0o644
        assert st.st_size == 4096
    assert not os.path.exists(mnt.path("sys/bus/nd/devices/btt0.0/memmap_state"))
    assert not os.path.exists(mnt.path("sys/bus/nd/devices/namespace0.0/memmap_state"))


def test_poll_wakes_on_transition(make_mount) -> None:  # type: ignore[no-untyped-def]
    mnt = make_mount(SLOW.format(ns=20_000))
    fd = os.open(mnt.path(f"{DAX}/memmap_state"), os.O_RDONLY)
    try:
        assert os.pread(fd, 64, 0) == b"active\n"
        p = select.poll()
        p.register(fd, select.POLLPRI | select.POLLERR)
        t0 = time.monotonic()
        events = p.poll(60_000)
        assert events, "poll timed out"
        assert events[0][1] & (select.POLLPRI | select.POLLERR)
        assert os.pread(fd, 64, 0) == b"idle\n"
        assert memmap_state(mnt.root, DAX) == "idle"
        assert time.monotonic() - t0 < 60
        # After reading the new value, poll blocks again (nothing changed since).
        assert p.poll(200) == []
    finally:
        os.close(fd)


def test_cold_reads_and_writes_initialize_their_pages(make_mount) -> None:  # type: ignore[no-untyped-def]
    mnt = make_mount(SLOW.format(ns=100_000))
    hold_background(mnt)
    dev = mnt.path("dev/pmem0")
    size = os.stat(dev).st_size
    start_pfn = int(mnt.read(f"{PFN}/memmap/start_pfn"), 16)
    kpf = mnt.path(f"{PFN}/memmap/kpageflags")
    resource = int(mnt.read(f"{PFN}/resource"), 16)
    first_data_page = resource // 4096 - start_pfn
    rng = random.Random(7)
    fd = os.open(dev, os.O_RDWR)
    checked = 0
    try:
        for _ in range(8):
            off = rng.randrange(0, size - 4096) // 512 * 512
            pattern = rng.randbytes(4096)
            page = first_data_page + off // 4096
            block0 = page // 512 * 512
            if not all(f & KPF_NOPAGE for f in read_u64s(kpf, block0, 512)):
                continue  # warm (an earlier write's block, or the workers' before the hold)
            assert os.pwrite(fd, pattern, off) == 4096
            flags = read_u64s(kpf, block0, 512)
            assert all(not f & KPF_NOPAGE and f & KPF_RESERVED for f in flags), "covering block not initialized"
            assert os.pread(fd, 4096, off) == pattern
            checked += 1
        assert checked >= 6, f"only {checked} of 8 writes hit a cold block"
        assert memmap_state(mnt.root, PFN) == "active"
    finally:
        os.close(fd)
        mnt.write(f"{PFN}/memmap/pause_at", b"1000\n")
    mnt.write(f"{PFN}/memmap/ns_per_page", b"0")
    wait_idle(mnt, PFN)


def nopage(mnt, rel: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Per page of the device's memmap: True while not initialized (KPF_NOPAGE)."""
    return (np.frombuffer(mnt.path(f"{rel}/memmap/kpageflags").read_bytes(), dtype="<u8") & KPF_NOPAGE) != 0


def hold_background(mnt) -> None:  # type: ignore[no-untyped-def]
    """Hold the background init (the pool is shared: every device holds) and wait until the
    runs already handed out are done: from then on only foreground accesses initialize."""
    mnt.write(f"{PFN}/memmap/pause_at", b"1\n")
    wait_for(lambda: int(mnt.read(f"{PFN}/memmap/pages_done")) > 0, 30, "the memmap to reach its mark")
    masks = {rel: nopage(mnt, rel) for rel in (PFN, DAX)}

    stable: list[bool] = []

    def settled() -> bool:
        now = {rel: nopage(mnt, rel) for rel in (PFN, DAX)}
        same = all((now[rel] == masks[rel]).all() for rel in now)
        masks.update(now)
        stable.append(same)
        return stable[-2:] == [True, True]  # (a run in flight on a loaded machine may be slow)

    wait_for(settled, 30, "the held memmaps to stand still", interval=1.0)


def test_mmap_faults_wait_for_their_pages(make_mount) -> None:  # type: ignore[no-untyped-def]
    """With the background init held, a write and an mmap read fault of cold blocks return
    with exactly their blocks initialized (they waited for them, nothing else moved)."""
    mnt = make_mount(SLOW.format(ns=100_000))
    hold_background(mnt)
    dev = mnt.path("dev/dax1.0")
    size = os.stat(dev).st_size
    data_page = int(mnt.read(f"{DAX}/resource"), 16) // 4096 - int(mnt.read(f"{DAX}/memmap/start_pfn"), 16)
    tail_block = (data_page + size // 4096 - 1) // 512
    fault_block = (data_page + 12345) // 512

    def block(mask: np.ndarray, b: int) -> np.ndarray:
        return mask[b * 512:(b + 1) * 512]

    before = nopage(mnt, DAX)
    assert block(before, tail_block).all() and block(before, fault_block).all(), "the blocks are not cold"
    with open(dev, "r+b") as f:
        f.seek(size - 4096)
        f.write(b"tail" * 1024)
        f.flush()
        os.fsync(f.fileno())
        written = nopage(mnt, DAX)
        assert not block(written, tail_block).any(), "the write returned before its block was initialized"
        assert block(written, fault_block).all()
        m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            assert m[size - 4096: size - 4092] == b"tail"
            assert m[12345 * 4096: 12345 * 4096 + 8] == b"\0" * 8
            after = nopage(mnt, DAX)
            assert not block(after, fault_block).any(), "the fault returned before its block was initialized"
        finally:
            m.close()
    # Only the blocks read: the write's, and the fault's with the kernel's read-around of up
    # to 2 MiB (half of it before the fault) on either side.
    changed = {int(p) // 512 for p in np.flatnonzero(before != after)}
    assert changed <= {tail_block, fault_block - 1, fault_block, fault_block + 1}, sorted(changed)
    assert memmap_state(mnt.root, DAX) == "active"
    mnt.write(f"{PFN}/memmap/pause_at", b"1000\n")
    mnt.write(f"{DAX}/memmap/ns_per_page", b"0")
    mnt.write(f"{PFN}/memmap/ns_per_page", b"0")
    wait_idle(mnt, DAX)


def test_records_equal_the_reference_and_altmap_pages_have_no_pgmap(make_mount) -> None:  # type: ignore[no-untyped-def]
    mnt = make_mount(SLOW.format(ns=0))
    wait_idle(mnt, PFN)
    raw = mnt.path(f"{PFN}/memmap/records").read_bytes()
    records = np.frombuffer(raw, dtype=PAGE_DTYPE)
    npages = 256 * 256
    assert len(records) == npages
    start_pfn = int(mnt.read(f"{PFN}/memmap/start_pfn"), 16)
    data_page = int(mnt.read(f"{PFN}/resource"), 16) // 4096 - start_pfn
    pgmap = int(records[data_page]["lru_next"])
    flags = np.frombuffer(mnt.path(f"{PFN}/memmap/kpageflags").read_bytes(), dtype="<u8")
    assert (flags[:2] & KPF_NOPAGE).all()  # the altmap reserve is never initialized
    assert not (flags[2:] & KPF_NOPAGE).any()
    # Every record (this namespace is small enough to check them all) against the kernel's.
    expected = K.device_memmap(start_pfn, npages, nid=0, on_media=True, data_page=data_page).view(PAGE_DTYPE)
    assert pgmap == K.device_pgmap(start_pfn)
    differ = np.nonzero(records[2:].view("V64") != expected[2:].view("V64"))[0]
    assert differ.size == 0, f"{differ.size} records differ from the reference, first: page {differ[0] + 2}"
    # The pages holding the memmap itself (before the data offset) carry no pgmap.
    assert (records[2:data_page]["lru_next"] != pgmap).all()
    assert (records[data_page:]["lru_next"] == pgmap).all()


def test_unbind_cancels_promptly_and_leaves_no_segment(make_mount) -> None:  # type: ignore[no-untyped-def]
    """Unbinding a device whose memmap has 30 s to go cancels it: the unbind returns, and
    the job's records (a memfd, for map=mem) are gone from the daemon and every worker (as an
    fd and as a mapping); the other device's memmap is untouched. Unmounting frees the rest."""
    shm_before = set(os.listdir("/dev/shm"))
    mnt = make_mount(SLOW.format(ns=1_000_000))
    assert memmap_state(mnt.root, DAX) == "active"
    ours = "vnvdimm-memmap:dax1.1"
    held = memfds(daemon_tree(mnt.pid))
    assert ours in held and mnt.pid in held[ours], f"the daemon holds no {ours}: {held}"
    t0 = time.monotonic()
    mnt.write("sys/bus/nd/drivers/dax_pmem/unbind", b"dax1.1\0")
    took = time.monotonic() - t0
    assert took < 10, f"unbind took {took:.2f} s (its memmap had 30 s to go)"
    assert memmap_state(mnt.root, DAX) == "idle"
    assert not os.path.exists(mnt.path("dev/dax1.0"))
    wait_for(lambda: ours not in memfds(daemon_tree(mnt.pid)), 60, f"{ours} to be released",
             report=lambda: str(memfds(daemon_tree(mnt.pid))))
    assert memmap_state(mnt.root, PFN) == "active"
    assert set(os.listdir("/dev/shm")) <= shm_before
    pids = daemon_tree(mnt.pid)
    t0 = time.monotonic()
    mnt.umount()
    took = time.monotonic() - t0
    assert took < 10, f"umount took {took:.2f} s"
    assert not any(alive(p) for p in pids)
    assert set(os.listdir("/dev/shm")) <= shm_before
