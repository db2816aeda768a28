"""The BTT's on-media format (drivers/nvdimm/btt.h, btt.c): map entries and their flags, flog
entries and sequence numbers, the arena record an info block describes (struct arena_info), the
check that an info block belongs to a namespace, the two versions and where each starts, and the
one-off conversion of the in-place layout an older vnvdimm wrote. vnvdimm.model.btt runs a BTT
over this format; the info block's bytes themselves are vnvdimm.model.infoblock's.
"""

from __future__ import annotations

import errno
import logging
import struct
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vnvdimm.model.base import NULL_UUID, SZ_4K
from vnvdimm.model.infoblock import (
    BTT_DEFAULT_NFREE,
    BTT_PG_SIZE,
    INFO_BLOCK_SIZE,
    LOG_GRP_SIZE,
    BttArena,
    BttInfo,
    BttSuperblock,
    btt_arenas,
)

if TYPE_CHECKING:
    from vnvdimm.model.media import Media

log = logging.getLogger("vnvdimm.model")

# btt.h: the two top bits of a map entry are its flags
MAP_TRIM_SHIFT, MAP_ERR_SHIFT = 31, 30
MAP_TRIM_MASK, MAP_ERR_MASK = 1 << MAP_TRIM_SHIFT, 1 << MAP_ERR_SHIFT
MAP_LBA_MASK = ~(MAP_TRIM_MASK | MAP_ERR_MASK) & 0xFFFFFFFF
MAP_ENT_NORMAL = MAP_TRIM_MASK | MAP_ERR_MASK  # both set: a plain mapping (both clear: identity)
LOG_ENT_SIZE = 16
LOG_SEQ_INIT = 1
IB_FLAG_ERROR_MASK = 0x00000001

BTT1_OFFSET = SZ_4K  # nd_btt_version(): v1.1 starts after the first 4 KiB of the namespace
BTT2_OFFSET = 0

LOG_HALF = struct.Struct("<II")
LOG_ENT = struct.Struct("<IIII")


def ent_lba(entry: int) -> int:
    return entry & MAP_LBA_MASK


def ent_e_flag(entry: int) -> bool:
    return bool(entry & MAP_ERR_MASK)


def ent_normal(entry: int) -> bool:
    return entry & MAP_ENT_NORMAL == MAP_ENT_NORMAL


def nd_inc_seq(seq: int) -> int:
    """The flog's sequence numbers cycle 1, 2, 3, 1... (0 means never written)."""
    return {0: 0, 1: 2, 2: 3, 3: 1}[seq & 3]


def btt_sector_size(lbasize: int) -> int:
    """btt_init(): the disk's sector is 4096 bytes for lbasize >= 4096, else 512 (the rest
    of each block is integrity metadata)."""
    return 4096 if lbasize >= 4096 else 512


@dataclass(frozen=True)
class BttVersion:
    major: int
    minor: int
    initial_offset: int


BTT_V1_1 = BttVersion(1, 1, BTT1_OFFSET)
BTT_V2_0 = BttVersion(2, 0, BTT2_OFFSET)


class BttError(Exception):
    """The BTT on the media cannot be used (the kernel's btt_init() fails): the message says why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class FreeEntry:
    """struct free_entry: a lane's free block and where its next flog entry goes."""

    block: int
    sub: int
    seq: int
    has_err: bool = False


@dataclass
class Arena:
    """struct arena_info, its offsets relative to the BTT's start (as debugfs shows them)."""

    size: int
    external_lba_start: int
    internal_nlba: int
    internal_lbasize: int
    external_nlba: int
    external_lbasize: int
    nfree: int
    version_major: int
    version_minor: int
    nextoff: int
    infooff: int
    dataoff: int
    mapoff: int
    logoff: int
    info2off: int
    flags: int = 0
    log_index: list[int] = field(default_factory=lambda: [0, 1])
    freelist: list[FreeEntry] = field(default_factory=list)
    log_base: int = 0  # where the flog starts in its mmap

    @classmethod
    def created(cls, a: BttArena, version: BttVersion) -> Arena:
        """alloc_arena() + create_arenas(): nextoff is the arena's size (relative)."""
        return cls(a.size, a.external_lba_start, a.internal_nlba, a.internal_lbasize, a.external_nlba,
                   a.external_lbasize, BTT_DEFAULT_NFREE, version.major, version.minor, a.nextoff, a.offset,
                   a.dataoff, a.mapoff, a.logoff, a.info2off)

    @classmethod
    def parsed(cls, sb: BttSuperblock, arena_off: int, lba_start: int) -> Arena:
        """parse_arena_meta(): offsets in the info block are relative to the arena."""
        nextoff = 0 if sb.nextoff == 0 else arena_off + sb.nextoff
        info2off = arena_off + sb.info2off
        size = sb.nextoff if sb.nextoff > 0 else info2off - arena_off + BTT_PG_SIZE
        return cls(size, lba_start, sb.internal_nlba, sb.internal_lbasize, sb.external_nlba, sb.external_lbasize,
                   sb.nfree, sb.version_major, sb.version_minor, nextoff, arena_off, arena_off + sb.dataoff,
                   arena_off + sb.mapoff, arena_off + sb.logoff, info2off, sb.flags)

    def debugfs_value(self, name: str) -> str:
        return dict(self.debugfs())[name]

    def debugfs(self) -> list[tuple[str, str]]:
        """arena_debugfs_init(): (file, contents); x64/x32 files print %#018llx / %#010x."""
        def x64(v: int) -> str:
            return f"0x{v:016x}\n"

        def x32(v: int) -> str:
            return f"0x{v:08x}\n"

        return [
            ("size", x64(self.size)), ("external_lba_start", x64(self.external_lba_start)),
            ("internal_nlba", x32(self.internal_nlba)), ("internal_lbasize", f"{self.internal_lbasize}\n"),
            ("external_nlba", x32(self.external_nlba)), ("external_lbasize", f"{self.external_lbasize}\n"),
            ("nfree", f"{self.nfree}\n"), ("version_major", f"{self.version_major}\n"),
            ("version_minor", f"{self.version_minor}\n"), ("nextoff", x64(self.nextoff)),
            ("infooff", x64(self.infooff)), ("dataoff", x64(self.dataoff)), ("mapoff", x64(self.mapoff)),
            ("logoff", x64(self.logoff)), ("info2off", x64(self.info2off)), ("flags", x32(self.flags)),
            ("log_index_0", f"{self.log_index[0]}\n"), ("log_index_1", f"{self.log_index[1]}\n"),
        ]


def arena_is_valid(block: bytes, parent_uuid: uuidlib.UUID) -> BttSuperblock | None:
    """nd_btt_arena_is_valid(): signature, a null parent uuid or the namespace's, checksum."""
    info = BttInfo.unpack(block)
    if info is None or info.parent_uuid not in (NULL_UUID, parent_uuid):
        return None
    return info


def convert_in_place_v1_1(media: Media, ns_offset: int, ns_size: int, lbasize: int, uuid: uuidlib.UUID,
                          parent_uuid: uuidlib.UUID, name: str = "btt") -> None:
    """Turn the BTT 1.1 at 4 KiB that vnvdimm wrote, blocks in place, before its BTT write
    path (on every namespace, whatever its labels said) into the BTT 2.0 at offset 0 that the
    v1.2 labels of the namespace call for, moving no data: old block k (disk sector k, at
    namespace offset 8 KiB + k * internal_lbasize) is block k + d of the new arena (whose data
    starts at 4 KiB; d = 4096 / internal_lbasize), so the new map sends lba k there and the
    256 blocks left over are the lanes' free blocks. Possible for one arena and a block size
    that divides 4 KiB (512 and 4096 byte sectors); BttError otherwise.

    Crash-safe by its order: the new map, flog and backup info block first (over the old
    BTT's map and flog, which an in-place layout never used), the info block at offset 0 last;
    until then the old info block at 4 KiB stays valid and a new start converts again."""
    old = btt_arenas(ns_size - BTT1_OFFSET, lbasize)
    new = btt_arenas(ns_size, lbasize)
    if len(old) != 1 or len(new) != 1 or SZ_4K % old[0].internal_lbasize:
        raise BttError(errno.ENXIO, f"{name}: a BTT 1.1 written in place by an older vnvdimm, with "
                       f"{lbasize}-byte sectors{' over several arenas' if len(old) != 1 else ''}, cannot be "
                       "turned into the BTT 2.0 that the namespace's v1.2 labels call for: refusing it "
                       "(see docs/limits.md, \"Sector mode\")")
    (o,), (a,) = old, new
    ilbs = a.internal_lbasize
    shift = SZ_4K // ilbs
    assert a.external_nlba >= o.external_nlba and a.external_nlba + shift <= a.internal_nlba
    # lbas the old disk did not have read as zeros
    tail = a.dataoff + (o.external_nlba + shift) * ilbs
    media.zero(ns_offset + tail, (a.external_nlba - o.external_nlba) * ilbs)
    chunk = 1 << 18
    for first in range(0, a.external_nlba, chunk):
        entries = [(k + shift) | MAP_ENT_NORMAL for k in range(first, min(first + chunk, a.external_nlba))]
        media.pwrite(struct.pack(f"<{len(entries)}I", *entries), ns_offset + a.mapoff + 4 * first)
    free = [*range(shift), *range(a.external_nlba + shift, a.internal_nlba)]
    assert len(free) == BTT_DEFAULT_NFREE
    flog = b"".join(LOG_ENT.pack(lane, block, block, LOG_SEQ_INIT) + bytes(LOG_GRP_SIZE - LOG_ENT_SIZE)
                    for lane, block in enumerate(free))
    media.zero(ns_offset + a.logoff, a.info2off - a.logoff)
    media.pwrite(flog, ns_offset + a.logoff)
    sb = BttInfo(uuid, parent_uuid, a, BTT_V2_0.major, BTT_V2_0.minor).pack()
    media.pwrite(sb, ns_offset + a.info2off)
    media.pwrite(sb, ns_offset + a.offset)
    # The old info block is now in free blocks of the new arena; left there, it would make
    # tools that look for a BTT 1.1 first (ndctl check-namespace) take the wrong one.
    # (BttEngine.drop_stale_v1_1_info() finishes this after a crash right here.)
    media.zero(ns_offset + BTT1_OFFSET, INFO_BLOCK_SIZE)
    log.warning("%s: converted the BTT 1.1 an older vnvdimm wrote in place into the BTT 2.0 its v1.2 labels "
                "call for (%d sectors of %d bytes, no data moved)", name, o.external_nlba, btt_sector_size(lbasize))
