"""On-media info blocks, byte for byte as drivers/nvdimm writes them.

* pfn / dax: `struct nd_pfn_sb` (pfn.h), 4 KiB at namespace offset 4 KiB, signature
  "NVDIMM_PFN_INFO\\0" or "NVDIMM_DAX_INFO\\0", version 1.4, fletcher64 checksum.
* btt: `struct btt_sb` (btt.h), an arena's info block, with the arena geometry of btt.c's
  alloc_arena() (the BTT itself, its map and flog: vnvdimm/model/btt.py).
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

from vnvdimm.model.base import PAGE_SIZE, SZ_4K, SZ_8K, align_down, align_up

INFO_BLOCK_OFFSET = SZ_4K
INFO_BLOCK_SIZE = 4096
PFN_SIG = b"NVDIMM_PFN_INFO\0"
DAX_SIG = b"NVDIMM_DAX_INFO\0"
BTT_SIG = b"BTT_ARENA_INFO\0\0"

PFN_MODE_NONE, PFN_MODE_RAM, PFN_MODE_PMEM = 0, 1, 2
MAX_STRUCT_PAGE_SIZE = 64
MEMREMAP_COMPAT_ALIGN = 2 << 20  # SUBSECTION_SIZE on x86_64


def fletcher64(data: bytes) -> int:
    """nd_fletcher64(addr, len, le=true): running 32-bit sum and 64-bit sum of sums."""
    lo32 = 0
    hi = 0
    for (word,) in struct.iter_unpack("<I", data):
        lo32 = (lo32 + word) & 0xFFFFFFFF
        hi += lo32
    return ((hi << 32) | lo32) & 0xFFFFFFFFFFFFFFFF


def sb_checksum(block: bytes) -> int:
    """nd_sb_checksum(): fletcher64 of the 4 KiB block with its last 8 bytes (checksum) zeroed."""
    return fletcher64(block[:-8] + b"\0" * 8)


# ---------------------------------------------------------------- pfn / dax


_PFN_HEAD = struct.Struct("<16s16s16sIHHQQIIIIIH")


@dataclass(frozen=True)
class PfnGeometry:
    """What nd_pfn_init() derives from the namespace range, the mode and the alignment."""

    dataoff: int  # bytes from the namespace start to the first data byte
    npfns: int  # data pages
    end_trunc: int

    @property
    def data_size(self) -> int:
        return self.npfns * PAGE_SIZE


def pfn_geometry(start: int, size: int, mode: int, align: int) -> PfnGeometry | None:
    """nd_pfn_init()'s arithmetic; None where the kernel fails with ENXIO (zero-size device)."""
    align = max(align, MEMREMAP_COMPAT_ALIGN)
    npfns = (size - SZ_8K) // PAGE_SIZE
    end_trunc = start + size - align_down(start + size, align)
    if mode == PFN_MODE_PMEM:
        offset = align_up(start + SZ_8K + MAX_STRUCT_PAGE_SIZE * npfns, align) - start
    elif mode == PFN_MODE_RAM:
        offset = align_up(start + SZ_8K, align) - start
    else:
        return None
    if offset >= size - end_trunc:
        return None
    return PfnGeometry(offset, (size - offset - end_trunc) // PAGE_SIZE, end_trunc)


@dataclass(frozen=True)
class PfnInfo:
    signature: bytes
    uuid: uuidlib.UUID
    parent_uuid: uuidlib.UUID
    dataoff: int
    npfns: int
    mode: int
    align: int
    end_trunc: int = 0
    start_pad: int = 0
    version_minor: int = 4
    page_size: int = PAGE_SIZE
    page_struct_size: int = MAX_STRUCT_PAGE_SIZE

    def pack(self) -> bytes:
        head = _PFN_HEAD.pack(
            self.signature,
            self.uuid.bytes,
            self.parent_uuid.bytes,
            0,  # flags
            1,
            self.version_minor,
            self.dataoff,
            self.npfns,
            self.mode,
            self.start_pad,
            self.end_trunc,
            self.align,
            self.page_size,
            self.page_struct_size,
        )
        block = head + b"\0" * (INFO_BLOCK_SIZE - 8 - len(head)) + b"\0" * 8
        return block[:-8] + struct.pack("<Q", sb_checksum(block))

    @classmethod
    def unpack(cls, block: bytes, signature: bytes) -> PfnInfo | None:
        """The info block if `block` holds a valid one with that signature (nd_pfn_validate's
        signature and checksum checks), else None."""
        if len(block) != INFO_BLOCK_SIZE or block[:16] != signature:
            return None
        (checksum,) = struct.unpack_from("<Q", block, INFO_BLOCK_SIZE - 8)
        if checksum != sb_checksum(block):
            return None
        (sig, u, pu, _flags, _major, minor, dataoff, npfns, mode, start_pad, end_trunc, align, page_size,
         page_struct_size) = _PFN_HEAD.unpack_from(block)
        # nd_pfn_validate(): the major version is not looked at; fields a minor version did
        # not have yet count as zero; a zero align means the largest power of 2 <= dataoff.
        if mode not in (PFN_MODE_RAM, PFN_MODE_PMEM):
            return None
        if minor < 1:
            start_pad = end_trunc = 0
        if minor < 2:
            align = 0
        if minor < 4:  # blocks older than the page size fields were written for 4K pages of 64 bytes
            page_size, page_struct_size = PAGE_SIZE, MAX_STRUCT_PAGE_SIZE
        if align == 0:
            align = 1 << (dataoff.bit_length() - 1) if dataoff else 0
        return cls(sig, uuidlib.UUID(bytes=u), uuidlib.UUID(bytes=pu), dataoff, npfns, mode, align,
                   end_trunc, start_pad, minor, page_size, page_struct_size)


# ---------------------------------------------------------------- btt

ARENA_MIN_SIZE = 1 << 24
ARENA_MAX_SIZE = 1 << 39
BTT_PG_SIZE = 4096
BTT_DEFAULT_NFREE = 256  # ND_MAX_LANES
LOG_GRP_SIZE = 64
MAP_ENT_SIZE = 4
INT_LBASIZE_ALIGNMENT = 64
# btt_lbasize_supported[]: the sector sizes a BTT takes (sector_size, external_lbasize)
BTT_SECTOR_SIZES = (512, 520, 528, 4096, 4104, 4160, 4224)

_BTT_HEAD = struct.Struct("<16s16s16sIHHIIIIIIQQQQQ")


@dataclass(frozen=True)
class BttArena:
    """One arena as alloc_arena() lays it out; offsets are relative to the BTT's start."""

    offset: int  # arena start (infooff) within the BTT
    size: int
    external_lba_start: int
    external_lbasize: int
    internal_lbasize: int
    internal_nlba: int
    external_nlba: int
    dataoff: int
    mapoff: int
    logoff: int
    info2off: int
    nextoff: int


def btt_arenas(rawsize: int, lbasize: int) -> list[BttArena]:
    """create_arenas() + alloc_arena(): the arenas of a BTT over `rawsize` bytes."""
    arenas: list[BttArena] = []
    remaining = rawsize
    cur_off = 0
    nlba = 0
    while remaining:
        arena_size = min(ARENA_MAX_SIZE, remaining)
        remaining -= arena_size
        if arena_size < ARENA_MIN_SIZE:
            break
        internal_lbasize = align_up(lbasize, INT_LBASIZE_ALIGNMENT)
        available = arena_size - arena_size % BTT_PG_SIZE
        available -= 2 * BTT_PG_SIZE
        logsize = align_up(BTT_DEFAULT_NFREE * LOG_GRP_SIZE, BTT_PG_SIZE)
        available -= logsize
        internal_nlba = (available - BTT_PG_SIZE) // (internal_lbasize + MAP_ENT_SIZE)
        external_nlba = internal_nlba - BTT_DEFAULT_NFREE
        mapsize = align_up(external_nlba * MAP_ENT_SIZE, BTT_PG_SIZE)
        datasize = available - mapsize
        dataoff = cur_off + BTT_PG_SIZE
        mapoff = dataoff + datasize
        logoff = mapoff + mapsize
        info2off = logoff + logsize
        nextoff = arena_size if remaining >= ARENA_MIN_SIZE else 0
        arenas.append(BttArena(cur_off, arena_size, nlba, lbasize, internal_lbasize, internal_nlba,
                               external_nlba, dataoff, mapoff, logoff, info2off, nextoff))
        nlba += external_nlba
        cur_off += arena_size
    return arenas


@dataclass(frozen=True)
class BttInfo:
    uuid: uuidlib.UUID
    parent_uuid: uuidlib.UUID
    arena: BttArena
    version_major: int = 1
    version_minor: int = 1

    def pack(self) -> bytes:
        a = self.arena
        head = _BTT_HEAD.pack(
            BTT_SIG, self.uuid.bytes, self.parent_uuid.bytes, 0, self.version_major, self.version_minor,
            a.external_lbasize, a.external_nlba, a.internal_lbasize, a.internal_nlba, BTT_DEFAULT_NFREE,
            INFO_BLOCK_SIZE, a.nextoff, a.dataoff - a.offset, a.mapoff - a.offset, a.logoff - a.offset,
            a.info2off - a.offset,
        )
        block = head + b"\0" * (INFO_BLOCK_SIZE - len(head))
        return block[:-8] + struct.pack("<Q", sb_checksum(block))

    @staticmethod
    def unpack(block: bytes) -> BttSuperblock | None:
        """The fields of a valid BTT info block (signature and checksum), else None."""
        if len(block) != INFO_BLOCK_SIZE or block[:16] != BTT_SIG:
            return None
        (checksum,) = struct.unpack_from("<Q", block, INFO_BLOCK_SIZE - 8)
        if checksum != sb_checksum(block):
            return None
        f = _BTT_HEAD.unpack_from(block)
        return BttSuperblock(uuidlib.UUID(bytes=f[1]), uuidlib.UUID(bytes=f[2]), *f[3:])


@dataclass(frozen=True)
class BttSuperblock:
    """struct btt_sb as read from the media (offsets relative to its arena)."""

    uuid: uuidlib.UUID
    parent_uuid: uuidlib.UUID
    flags: int
    version_major: int
    version_minor: int
    external_lbasize: int
    external_nlba: int
    internal_lbasize: int
    internal_nlba: int
    nfree: int
    infosize: int
    nextoff: int
    dataoff: int
    mapoff: int
    logoff: int
    info2off: int

    @property
    def version(self) -> tuple[int, int]:
        return self.version_major, self.version_minor


def btt_log_init(arena: BttArena) -> bytes:
    """btt_log_init(): one log group per lane, slot 0 holding {lba=i, old=new=nlba+i, seq=1}."""
    out = bytearray()
    for lane in range(BTT_DEFAULT_NFREE):
        post = arena.external_nlba + lane
        out += struct.pack("<IIII", lane, post, post, 1) + b"\0" * 48
    return bytes(out)
