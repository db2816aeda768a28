"""The block ioctls of /dev/pmemN and /dev/pmemNs (block/ioctl.c): sizes, block sizes and
the read-only flag, in the types the kernel copies out."""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from vnvdimm.model.commands.envelope import CommandError, UserMemory

if TYPE_CHECKING:
    from vnvdimm.model.disk import Disk

BLKROSET = 0x125D  # _IO(0x12, 93): int in
BLKROGET = 0x125E  # _IO(0x12, 94): int
BLKGETSIZE = 0x1260  # _IO(0x12, 96): unsigned long, 512-byte sectors
BLKSSZGET = 0x1268  # _IO(0x12, 104): int, logical block size
BLKBSZGET = 0x80081270  # _IOR(0x12, 112, size_t): int, the block device's soft block size
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): u64, bytes
BLKPBSZGET = 0x127B  # _IO(0x12, 123): unsigned int, physical block size

PAGE_SIZE = 4096


def disk_ioctl(disk: Disk, request: int, user: UserMemory) -> int:
    if request & 0xFFFFFFFF == BLKROSET:
        # blkdev_roset(): the caller's int, nonzero for read-only; it sets the block device's
        # policy, which a read-only disk overrides (BLKROGET still answers 1 then)
        (value,) = struct.unpack("<i", user.read(0, 4))
        disk.policy_read_only = value != 0
        return 0
    size = disk.data.size
    logical = disk.logical_block_size
    answers = {
        BLKROGET: struct.pack("<i", int(disk.data.read_only())),
        BLKGETSIZE: struct.pack("<Q", size >> 9),
        BLKSSZGET: struct.pack("<i", logical),
        BLKBSZGET: struct.pack("<i", max(logical, PAGE_SIZE)),
        BLKGETSIZE64: struct.pack("<Q", size),
        BLKPBSZGET: struct.pack("<I", max(logical, PAGE_SIZE)),
    }
    answer = answers.get(request & 0xFFFFFFFF)
    if answer is None:
        raise CommandError(errno.ENOTTY, f"block ioctl {request:#x} on {disk.name}")
    user.write(0, answer)
    return 0
