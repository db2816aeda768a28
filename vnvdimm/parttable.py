"""Partition tables read as the kernel's partition parsers read them (block/partitions/efi.c,
msdos.c): which partitions a rescan of a disk finds.

The daemon needs this because the host kernel behind the loop devices may have no parser at
all (a minimal kernel built without CONFIG_EFI_PARTITION and CONFIG_MSDOS_PARTITION finds no
partition on any disk): it reads the table itself and tells the kernel about each partition
with BLKPG, where the kernel's own scan (at attach, BLKRRPART) found none.

Only the two formats parted and sfdisk write by default: GPT (with its protective MBR) and
MBR with primary, extended and logical partitions. Offsets and lengths are in bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

GPT_SIGNATURE = b"EFI PART"
MBR_SIGNATURE = b"\x55\xaa"
MBR_ENTRIES = 446
PROTECTIVE = 0xEE
EXTENDED = (0x05, 0x0F, 0x85)
MAX_LOGICAL = 60  # the kernel stops following the chain of extended boot records at some point
GPT_MAX_ENTRIES = 1024  # no table parted or sfdisk writes has more (128 by default)

# reads `length` bytes at `offset` of the disk (OSError if they cannot be read)
Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class TablePartition:
    number: int
    start: int  # bytes
    length: int  # bytes


def read_table(read: Reader, disk_size: int, sector: int) -> list[TablePartition]:
    """The partitions of the disk's table (GPT if the MBR is protective, else MBR), those
    outside the disk left out as the kernel leaves them out; [] if there is no table or it
    cannot be read."""
    try:
        mbr = read(0, 512)
    except OSError:
        return []
    if len(mbr) < 512 or mbr[510:512] != MBR_SIGNATURE:
        return []
    entries = [struct.unpack_from("<B3xBxxxII", mbr, MBR_ENTRIES + 16 * i) for i in range(4)]
    if any(kind == PROTECTIVE for _, kind, _, _ in entries):
        return _inside(_gpt(read, disk_size, sector), disk_size)
    return _inside(_msdos(read, entries, sector), disk_size)


def _inside(parts: list[TablePartition], disk_size: int) -> list[TablePartition]:
    return [p for p in parts if p.length > 0 and p.start + p.length <= disk_size]


def _gpt(read: Reader, disk_size: int, sector: int) -> list[TablePartition]:
    try:
        header = read(sector, sector)
    except OSError:
        return []
    if header[:8] != GPT_SIGNATURE:
        return []
    header_size, = struct.unpack_from("<I", header, 12)
    if not 92 <= header_size <= sector:
        return []
    crc, = struct.unpack_from("<I", header, 16)
    zeroed = header[:16] + b"\0\0\0\0" + header[20:header_size]
    if zlib.crc32(zeroed) != crc:
        return []
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    entries_crc, = struct.unpack_from("<I", header, 88)
    if entry_size < 128 or count > GPT_MAX_ENTRIES or entries_lba * sector >= disk_size:
        return []
    try:
        table = read(entries_lba * sector, count * entry_size)
    except OSError:
        return []
    if len(table) < count * entry_size or zlib.crc32(table) != entries_crc:
        return []
    parts = []
    for i in range(count):
        entry = table[i * entry_size:(i + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue  # unused
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last >= first:
            parts.append(TablePartition(i + 1, first * sector, (last - first + 1) * sector))
    return parts


def _msdos(read: Reader, entries: list[tuple[int, int, int, int]], sector: int) -> list[TablePartition]:
    parts = []
    extended = None
    for i, (_, kind, start, count) in enumerate(entries):
        if kind == 0 or count == 0:
            continue
        if kind in EXTENDED:
            # the kernel shows the extended partition itself as a 1 KiB stub
            parts.append(TablePartition(i + 1, start * sector, min(count * sector, 1024)))
            extended = extended or start
        else:
            parts.append(TablePartition(i + 1, start * sector, count * sector))
    if extended is not None:
        parts.extend(_logical(read, extended, sector))
    return parts


def _logical(read: Reader, extended: int, sector: int) -> list[TablePartition]:
    """The logical partitions (5, 6...): a chain of extended boot records, each with the
    partition (relative to its own record) and a link to the next (relative to the extended
    partition's start)."""
    parts: list[TablePartition] = []
    record = extended
    seen: set[int] = set()
    while len(parts) < MAX_LOGICAL and record not in seen:
        seen.add(record)
        try:
            ebr = read(record * sector, 512)
        except OSError:
            break
        if len(ebr) < 512 or ebr[510:512] != MBR_SIGNATURE:
            break
        links = [struct.unpack_from("<B3xBxxxII", ebr, MBR_ENTRIES + 16 * i) for i in range(4)]
        following = None
        for _, kind, start, count in links:
            if kind == 0 or count == 0:
                continue
            if kind in EXTENDED:
                following = following or extended + start
            elif not any(p.start == (record + start) * sector for p in parts):
                parts.append(TablePartition(5 + len(parts), (record + start) * sector, count * sector))
        if following is None:
            break
        record = following
    return parts
