"""The daemon SIGKILLed (with or without its workers) during memmap init and during a stream
of writes to device files: `vnvdimm mount` on the same state dir cleans up the dead mount
point with a message, gets the state lock, shows the same topology and modes, and every byte
whose write returned (and was fsync'ed) before the kill reads back unchanged."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import threading
import time

import pytest
from mount_kit import memmap_state
from reliability_kit import DAX, PFN, alive, check_records, children, e820, kill_group, wait_for

DEAD = "cleaning up the mount of a daemon that died"
# fsdax map=dev, devdax map=mem, sector (BTT), raw: every data path of a device file.
PLATFORM = ("64M fsdax dev", "64M devdax mem", "32M sector", "32M raw")
DEVICES = ("dev/pmem0", "dev/dax1.0", "dev/pmem2s", "dev/pmem3")


def topology(m) -> object:  # type: ignore[no-untyped-def]
    res = m.run("ndctl", "list", "-RNi")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    return doc


def crash(m, how: str) -> list[int]:  # type: ignore[no-untyped-def]
    """SIGKILL the daemon ('group': with its workers at once; 'daemon': the daemon alone,
    its workers must notice and exit by themselves). Returns the pids that were running."""
    pid = m.pid
    procs = [pid, *children(pid)]
    assert len(procs) > 1, "no worker to kill"
    if how == "group":
        kill_group(pid)
    else:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in procs), 60, f"the daemon and its workers ({procs}) to exit")
    return procs


def remount(m) -> None:  # type: ignore[no-untyped-def]
    """`vnvdimm mount` again on the dead mount point and the same state dir."""
    old = m.pid
    res = m.mount()
    assert res.returncode == 0, f"remount failed: {res.stderr}"
    assert DEAD in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert m.is_mounted()
    assert m.pid != old
    assert (m.state_dir / "lock").read_text().split()[0] == str(m.pid)


def test_kill_during_memmap_init(make_mount, figures, shm_unchanged) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(e820(*PLATFORM, ns_per_page=300_000))
    before = topology(m)
    rng = random.Random(1)
    written: dict[str, list[tuple[int, bytes]]] = {}
    for dev in ("dev/pmem0", "dev/dax1.0"):
        size = os.stat(m.path(dev)).st_size
        fd = os.open(m.path(dev), os.O_RDWR)
        try:
            for _ in range(4):  # cold blocks: each write initializes its block first
                off = rng.randrange(0, size - 65536)
                data = rng.randbytes(rng.randrange(1, 65536))
                assert os.pwrite(fd, data, off) == len(data)
                written.setdefault(dev, []).append((off, data))
            os.fsync(fd)
        finally:
            os.close(fd)
    assert memmap_state(m.root, PFN) == "active"
    assert memmap_state(m.root, DAX) == "active"
    assert int(m.read(f"{PFN}/memmap/pages_done")) < int(m.read(f"{PFN}/memmap/pages_total"))
    crash(m, "group")
    figures.add(faults=1)
    with pytest.raises(OSError) as e:
        os.statvfs(m.path("sys"))  # stat() may still be answered from the kernel's cache
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)

    remount(m)
    assert topology(m) == before
    # The memmaps start over (the half-written map=dev records on the media are redone).
    for dev in (PFN, DAX):
        m.write(f"{dev}/memmap/ns_per_page", b"0")
        assert m.write(f"{dev}/memmap_state", b"sync") == 4
    figures.add(records_verified=check_records(m, PFN) + check_records(m, DAX))
    verified = 0
    for dev, writes in written.items():
        with open(m.path(dev), "rb") as f:
            for off, data in writes:
                f.seek(off)
                assert f.read(len(data)) == data, f"{dev}: bytes at {off} changed"
                verified += len(data)
    figures.add(bytes_verified=verified)


class Writer(threading.Thread):
    """Random writes to one device file, an fsync every few writes, until the daemon dies.

    `synced`: the shadow of every write that returned and was followed by an fsync that
    returned; `returned`: every write that returned; `inflight`: the one write (or fsync
    over writes) that had not returned when the mount died."""

    def __init__(self, path: str, base: bytes, seed: int) -> None:
        super().__init__(daemon=True, name=f"writer-{path}")
        self.path = path
        self.returned = bytearray(base)
        self.synced = bytearray(base)
        self.unsynced: list[tuple[int, bytes]] = []
        self.inflight: tuple[int, bytes] | None = None
        self.rng = random.Random(seed)
        self.writes = 0
        self.fsyncs = 0
        self.error: OSError | None = None

    def run(self) -> None:
        size = len(self.returned)
        fd = os.open(self.path, os.O_RDWR)
        try:
            while True:
                n = self.rng.choice((1, 511, 4096, 4097, 65536, self.rng.randrange(1, 200_000)))
                off = self.rng.randrange(0, size - n)
                data = self.rng.randbytes(n)
                self.inflight = (off, data)
                assert os.pwrite(fd, data, off) == n
                self.returned[off: off + n] = data
                self.unsynced.append((off, data))
                self.inflight = None
                self.writes += 1
                if self.rng.random() < 0.3:
                    os.fsync(fd)
                    self.fsyncs += 1
                    for o, d in self.unsynced:
                        self.synced[o: o + len(d)] = d
                    self.unsynced.clear()
        except OSError as e:
            self.error = e
        finally:
            os.close(fd)

    def check(self, got: bytes) -> int:
        """Compare the device after the crash with every write that returned (a superset of
        the fsync'ed ones): returns the bytes verified."""
        size = len(self.synced)
        assert len(got) == size
        flexible = bytearray(size)  # 1 where the in-flight write may or may not have landed
        if self.inflight is not None:
            off, data = self.inflight
            flexible[off: off + len(data)] = b"\1" * len(data)
        got_a = memoryview(got)
        bad = [i for i in range(0, size, 4096)
               if got_a[i: i + 4096] != self.returned[i: i + 4096] and not any(flexible[i: i + 4096])]
        assert not bad, f"{self.path}: {len(bad)} pages differ from what the writes returned, first at {bad[0]}"
        if self.inflight is not None:
            off, data = self.inflight
            for i in range(off, off + len(data)):
                assert got[i] in (self.returned[i], data[i - off]), f"{self.path}: byte {i} is neither old nor new"
        return size


@pytest.mark.parametrize("how", ["group", "daemon"])
def test_kill_during_write_stream(make_mount, figures, shm_unchanged, how: str) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(e820(*PLATFORM))
    for dev in (PFN, DAX):
        m.write(f"{dev}/memmap_state", b"sync")
    before = topology(m)
    writers = []
    for i, dev in enumerate(DEVICES):
        base = m.path(dev).read_bytes()
        writers.append(Writer(str(m.path(dev)), base, seed=100 + i))
    for w in writers:
        w.start()
    time.sleep(random.Random(7).uniform(0.8, 1.5))
    assert all(w.is_alive() for w in writers), [w.error for w in writers]
    crash(m, how)
    figures.add(faults=1)
    for w in writers:
        w.join(10)
        assert not w.is_alive(), f"{w.path}: writer still blocked after the daemon died"
        # ENOTCONN/ECONNABORTED: a request to the dead connection; EIO: an fsync (or the write
        # that reports it) whose writeback the kernel could not hand to the daemon any more.
        assert w.error is not None and w.error.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENXIO,
                                                         errno.EIO), w.error
    assert all(w.writes > 0 and w.fsyncs > 0 for w in writers), [(w.writes, w.fsyncs) for w in writers]

    remount(m)
    assert topology(m) == before
    verified = 0
    for w, dev in zip(writers, DEVICES, strict=True):
        verified += w.check(m.path(dev).read_bytes())
    figures.add(writes=sum(w.writes for w in writers), fsyncs=sum(w.fsyncs for w in writers),
                bytes_verified=verified)


@pytest.mark.parametrize("code", [errno.ENOTCONN, errno.ECONNABORTED])
def test_a_dying_mount_counts_as_dead(monkeypatch, tmp_path, code: int) -> None:  # type: ignore[no-untyped-def]
    """A mount point stat'ed while its daemon is being killed answers ECONNABORTED (the request
    was in flight), once it is dead ENOTCONN: both are cleaned up by the next mount."""
    from vnvdimm import mounts

    def statvfs(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(mounts.os, "statvfs", statvfs)
    assert mounts.is_dead_mount(tmp_path)
