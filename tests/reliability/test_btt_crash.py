"""Sector atomicity of the BTT across a daemon crash: the daemon is SIGKILLed while threads
write 4 KiB blocks of distinct patterns to /dev/pmem0s (the FUSE device file, O_DIRECT so
that each write is one request); after the remount every sector of the disk holds one of the
patterns written to it (or its content before the round), never a mix of two, never one older
than the last write that returned, and `ndctl check-namespace` finds the BTT consistent.
Twenty rounds, each killed at a different point."""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time

from reliability_kit import alive, e820, kill_group, wait_for

BLOCK = 4096
ROUNDS = 20
NAMESPACE = "namespace0.0"


def remount(m) -> None:  # type: ignore[no-untyped-def]
    """`vnvdimm mount` again on the dead mount point and the same state dir."""
    res = m.mount()
    assert res.returncode == 0, f"remount failed: {res.stderr}"
    assert "Traceback" not in res.stderr


def pattern(write_id: int, block: int) -> bytes:
    """A block no other write has: every 16 bytes name the write and the block."""
    return struct.pack("<QQ", write_id, block) * (BLOCK // 16)


class BlockWriter(threading.Thread):
    """Random 4 KiB writes until the mount dies. Per block: the id of the last write that
    returned, and every id issued after it (the one in flight may or may not have landed)."""

    def __init__(self, path: str, blocks: int, first_id: int, seed: int, owned: range) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.blocks = blocks
        self.next_id = first_id
        self.rng = random.Random(seed)
        self.owned = owned  # the blocks this thread writes (no two threads write one block)
        self.returned: dict[int, int] = {}
        self.pending: dict[int, list[int]] = {}
        self.writes = 0
        self.error: OSError | None = None

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        try:
            while True:
                block = self.rng.choice(self.owned)
                write_id = self.next_id
                self.next_id += 1
                self.pending.setdefault(block, []).append(write_id)
                assert os.pwrite(fd, pattern(write_id, block), block * BLOCK) == BLOCK
                self.returned[block] = write_id
                self.pending[block] = []
                self.writes += 1
        except OSError as e:
            self.error = e
        finally:
            os.close(fd)


def check_sectors(got: bytes, sector: int, before: bytes, writers: list[BlockWriter]) -> int:
    """Every sector is whole: the returned write's pattern, a later one's, or (never written
    in this round) what it held before. Returns the number of sectors written this round."""
    allowed: dict[int, list[int]] = {}
    for w in writers:
        for block in set(w.returned) | set(w.pending):
            ids = ([w.returned[block]] if block in w.returned else []) + w.pending.get(block, [])
            allowed[block] = ids
    checked = 0
    for block, ids in allowed.items():
        for s in range(block * BLOCK, (block + 1) * BLOCK, sector):
            have = got[s: s + sector]
            options = [pattern(i, block)[s % BLOCK: s % BLOCK + sector] for i in ids]
            if block not in {b for w in writers for b in w.returned}:
                options.append(before[s: s + sector])  # only in-flight writes: old may stay
            assert have in options, (f"sector at {s} (block {block}) is none of writes {ids}"
                                     f"{' or its old content' if len(options) > len(ids) else ''}: "
                                     f"starts {have[:32].hex()}")
            checked += 1
    untouched = [b for b in range(len(got) // BLOCK) if b not in allowed]
    for block in untouched[:: max(1, len(untouched) // 64)]:  # a sample of the rest is unchanged
        assert got[block * BLOCK: (block + 1) * BLOCK] == before[block * BLOCK: (block + 1) * BLOCK], block
    return checked


def test_btt_sectors_survive_sigkill_whole(make_mount, figures, shm_unchanged) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(e820("32M sector sector_size=4096"))
    dev = m.path("dev/pmem0s")
    sector = int(m.read("sys/block/pmem0s/queue/logical_block_size"))
    rng = random.Random(22)
    next_id = 1
    total_writes = 0
    for round_no in range(ROUNDS):
        before = dev.read_bytes()
        blocks = len(before) // BLOCK
        # a few hundred blocks, so that blocks are rewritten (and free blocks reused) often
        hot = rng.sample(range(blocks), 256)
        writers = [BlockWriter(str(dev), blocks, next_id + i * 10_000_000, rng.randrange(1 << 30), hot[i::4])
                   for i in range(4)]
        for w in writers:
            w.start()
        wait_for(lambda ws=writers: sum(w.writes for w in ws) >= 50 or any(not w.is_alive() for w in ws), 60,
                 "the writers to get going")
        time.sleep(rng.uniform(0.0, 0.3))
        pid = m.pid
        kill_group(pid)
        wait_for(lambda p=pid: not alive(p), 60, "the daemon to exit")
        for w in writers:
            w.join(30)
            assert not w.is_alive(), "a writer is still blocked after the daemon died"
            assert w.error is not None and w.error.errno in (errno.ENOTCONN, errno.ECONNABORTED), w.error
        next_id += 4 * 10_000_000
        total_writes += sum(w.writes for w in writers)
        remount(m)
        checked = check_sectors(dev.read_bytes(), sector, before, writers)
        assert checked > 0, f"round {round_no}: no write reached the device"
        figures.add(faults=1, writes=sum(w.writes for w in writers), bytes_verified=checked * sector)
        if round_no in (0, ROUNDS // 2, ROUNDS - 1):  # the whole BTT, as ndctl checks it
            m.ndctl("disable-namespace", NAMESPACE)
            res = m.run("ndctl", "check-namespace", "--verbose", NAMESPACE)
            assert res.returncode == 0, f"round {round_no}: check-namespace: {res.stderr}"
            assert "error" not in res.stderr.lower().replace("errors: 0", ""), res.stderr
            m.ndctl("enable-namespace", NAMESPACE)
    assert total_writes > ROUNDS * 50
