"""The Block Translation Table (drivers/nvdimm/btt.c): sector writes made atomic on pmem.

A BTT splits its namespace into arenas (512 GiB at most). Each arena has an info block and its
backup copy, a data area of `internal_nlba` blocks, a map from each of its `external_nlba`
external blocks (premap) to a data block (postmap), and a flog of `nfree` (256) lanes. Every
lane owns one free block. A sector write goes to the lane's free block, then the lane's flog
entry {lba, old_map, new_map, seq} is written (seq last), then the map entry flips to the new
block; the old block becomes the lane's free block. A crash at any point leaves the sector old
or new: at the next start, a flog entry whose map write did not happen is replayed
(btt_freelist_init()).

The media is the region's file: every store below is a pwrite or a store into a shared mmap
of that file, so it is in the host's page cache in program order, which a SIGKILL of the daemon
does not undo. The map and the flog are read and written through mmaps (a map lookup is a
memoryview index), the data blocks through pread/pwrite.

Version and place, as nd_btt_version() chooses them: a namespace whose claim class is BTT2
(v1.2 labels) has a BTT 2.0 whose first arena starts at namespace offset 0; any other (no
labels, v1.1 labels) a BTT 1.1 starting at 4 KiB.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vnvdimm.model.base import NULL_UUID, SZ_4K, fail
from vnvdimm.model.disk import DataPath
from vnvdimm.model.infoblock import (
    ARENA_MIN_SIZE,
    BTT_DEFAULT_NFREE,
    BTT_PG_SIZE,
    INFO_BLOCK_SIZE,
    LOG_GRP_SIZE,
    BttArena,
    BttInfo,
    btt_arenas,
    btt_log_init,
)

if TYPE_CHECKING:
    from collections.abc import Callable

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

_LOG_HALF = struct.Struct("<II")
_LOG_ENT = struct.Struct("<IIII")


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
    def parsed(cls, sb: dict[str, int], arena_off: int, lba_start: int) -> Arena:
        """parse_arena_meta(): offsets in the info block are relative to the arena."""
        nextoff = 0 if sb["nextoff"] == 0 else arena_off + sb["nextoff"]
        info2off = arena_off + sb["info2off"]
        size = sb["nextoff"] if sb["nextoff"] > 0 else info2off - arena_off + BTT_PG_SIZE
        return cls(size, lba_start, sb["internal_nlba"], sb["internal_lbasize"], sb["external_nlba"],
                   sb["external_lbasize"], sb["nfree"], sb["version_major"], sb["version_minor"], nextoff,
                   arena_off, arena_off + sb["dataoff"], arena_off + sb["mapoff"], arena_off + sb["logoff"],
                   info2off, sb["flags"])

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


def arena_is_valid(block: bytes, parent_uuid: uuidlib.UUID) -> dict[str, object] | None:
    """nd_btt_arena_is_valid(): signature, a null parent uuid or the namespace's, checksum."""
    info = BttInfo.unpack(block, all_fields=True)
    if info is None or info["parent_uuid"] not in (NULL_UUID, parent_uuid):
        return None
    return info


class _Window:
    """A shared mmap of a byte range of the media (mmap wants a page-aligned offset)."""

    def __init__(self, media: Media, offset: int, length: int) -> None:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        self.delta = offset - start
        self.map = mmap.mmap(media.fd, self.delta + length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=start)

    def close(self) -> None:
        self.map.close()


class BttEngine:
    """A live BTT over a namespace range of the media: btt_init() on probe, then the read and
    write paths (btt_read_pg() / btt_write_pg()) for its disk."""

    def __init__(self, media: Media, ns_offset: int, ns_size: int, version: BttVersion, lbasize: int,
                 uuid: uuidlib.UUID, parent_uuid: uuidlib.UUID, read_only: bool, name: str = "btt") -> None:
        self.media = media
        self.name = name
        self.version = version
        self.base = ns_offset + version.initial_offset  # media offset of the BTT's start
        self.rawsize = ns_size - version.initial_offset
        self.lbasize = lbasize
        self.sector_size = btt_sector_size(lbasize)
        self.uuid = uuid
        self.parent_uuid = parent_uuid
        self.lock = threading.Lock()
        self.arenas: list[Arena] = []
        self._maps: list[memoryview] = []
        self._logs: list[mmap.mmap] = []
        self._windows: list[_Window] = []
        self._next_lane = 0
        self.closed = False
        if self.rawsize < ARENA_MIN_SIZE:
            raise BttError(errno.ENXIO, f"{name}: the namespace must be at least "
                           f"{ARENA_MIN_SIZE + version.initial_offset} bytes")
        try:
            if not self._discover():
                if read_only:
                    raise BttError(errno.ENXIO, f"{name}: the region is read-only, unable to init btt metadata")
                self._create()
        except BaseException:
            self.close()
            raise
        self.nlba = sum(a.external_nlba for a in self.arenas)
        self.size = self.nlba * self.sector_size

    # ------------------------------------------------------------ layout

    def _info_read(self, off: int) -> bytes:
        return self.media.pread(INFO_BLOCK_SIZE, self.base + off)

    def _discover(self) -> bool:
        """discover_arenas(): False if there is no BTT (the first info block is not valid)."""
        remaining, cur_off, cur_nlba = self.rawsize, 0, 0
        while remaining > 0:
            sb = arena_is_valid(self._info_read(cur_off), self.parent_uuid)
            if sb is None:
                if remaining == self.rawsize:
                    return False
                raise BttError(errno.ENODEV, f"{self.name}: found corrupted metadata in the arena at {cur_off:#x}")
            arena = Arena.parsed(sb, cur_off, cur_nlba)  # type: ignore[arg-type]
            self._open_arena(arena)
            self._log_set_indices(len(self.arenas) - 1)
            self._freelist_init(len(self.arenas) - 1)
            remaining -= arena.size
            cur_off += arena.size
            cur_nlba += arena.external_nlba
            if arena.nextoff == 0:
                break
        self._refuse_in_place_layout()
        return True

    def _refuse_in_place_layout(self) -> None:
        """vnvdimm before its BTT write path wrote a sector of `lbasize` bytes in place: block k
        held disk bytes [k * lbasize, (k + 1) * lbasize), its map and flog untouched. For 512
        and 4096 that is exactly a BTT with an identity map. For the other sizes the disk now
        has 512- or 4096-byte sectors (the rest of each block is integrity metadata), so such a
        layout would be read shifted: refused where it can be one, i.e. where no flog lane was
        ever used and the data area holds bytes (new BTTs of these sizes start with their data
        area punched out, so their unwritten data area has none)."""
        if self.lbasize == self.sector_size:
            return
        padding = (0, 0, 0, 0)
        for ai, arena in enumerate(self.arenas):
            for lane in range(arena.nfree):
                free = arena.external_nlba + lane
                if self._log_group(ai, lane) != ((lane, free, free, LOG_SEQ_INIT), padding, padding, padding):
                    return  # written through a BTT write path
        first = self.arenas[0]
        start = self.base + first.dataoff
        end = self.base + first.mapoff
        try:
            data = os.lseek(self.media.fd, start, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but holes from there on
            return
        if data < end:
            raise BttError(errno.ENXIO, f"{self.name}: its {self.lbasize}-byte sectors were written in place by an "
                           f"older vnvdimm (block k holds bytes [{self.lbasize}k, {self.lbasize}(k+1)) of the old "
                           f"disk), which the kernel's BTT would read as {self.sector_size}-byte sectors: refusing "
                           "it (see docs/limits.md, \"Sector mode\")")

    def _create(self) -> None:
        """create_arenas() + btt_meta_init() (btt_arena_write_layout()): map zeroed (identity),
        flog initialized, then the info blocks, backup first."""
        for geometry in btt_arenas(self.rawsize, self.lbasize):
            arena = Arena.created(geometry, self.version)
            base = self.base
            if self.lbasize != self.sector_size:  # (see _refuse_in_place_layout)
                self.media.zero(base + arena.dataoff, arena.mapoff - arena.dataoff)
            self.media.zero(base + arena.mapoff, arena.logoff - arena.mapoff)
            self.media.zero(base + arena.logoff, arena.info2off - arena.logoff)
            self.media.pwrite(btt_log_init(geometry), base + arena.logoff)
            sb = BttInfo(self.uuid, self.parent_uuid, geometry, self.version.major, self.version.minor).pack()
            self.media.pwrite(sb, base + arena.info2off)
            self.media.pwrite(sb, base + arena.infooff)
            self._open_arena(arena)
            self._freelist_init(len(self.arenas) - 1)

    def _open_arena(self, arena: Arena) -> None:
        if arena.nfree != BTT_DEFAULT_NFREE or arena.logoff + arena.nfree * LOG_GRP_SIZE > arena.info2off \
                or not arena.infooff < arena.dataoff <= arena.mapoff < arena.logoff < arena.info2off \
                or arena.external_nlba * 4 > arena.logoff - arena.mapoff \
                or arena.internal_lbasize < self.sector_size or arena.external_nlba > arena.internal_nlba \
                or arena.dataoff + arena.internal_nlba * arena.internal_lbasize > arena.mapoff \
                or arena.info2off + BTT_PG_SIZE > self.rawsize or arena.external_lbasize != self.lbasize:
            raise BttError(errno.ENODEV, f"{self.name}: the info block of the arena at {arena.infooff:#x} "
                           "describes an impossible layout")
        map_window = _Window(self.media, self.base + arena.mapoff, arena.external_nlba * 4)
        log_window = _Window(self.media, self.base + arena.logoff, arena.nfree * LOG_GRP_SIZE)
        self._windows += [map_window, log_window]
        view = memoryview(map_window.map)[map_window.delta: map_window.delta + arena.external_nlba * 4].cast("I")
        self._maps.append(view)
        self._logs.append(log_window.map)
        arena.log_base = log_window.delta
        self.arenas.append(arena)

    # ------------------------------------------------------------ flog

    def _log_group(self, ai: int, lane: int) -> tuple[tuple[int, int, int, int], ...]:
        mm = self._logs[ai]
        off = self.arenas[ai].log_base + lane * LOG_GRP_SIZE
        if self._range_is_bad(self.base + self.arenas[ai].logoff + lane * LOG_GRP_SIZE, LOG_GRP_SIZE):
            raise BttError(errno.EIO, f"{self.name}: media error in the flog of lane {lane}")
        return tuple(_LOG_ENT.unpack_from(mm, off + 16 * j) for j in range(4))

    def _log_set_indices(self, ai: int) -> None:
        """log_set_indices(): which two of a log group's four slots hold entries, (0, 1) for
        the kernel's current format or (0, 2) for the old padding format."""
        arena = self.arenas[ai]
        idx_set, initial_state = False, True
        index = [-1, -1]
        next_idx = 0
        for lane in range(arena.nfree):
            group = self._log_group(ai, lane)
            pad_count = 0
            for j, ent in enumerate(group):
                padding = ent == (0, 0, 0, 0)
                if not idx_set:
                    if padding:
                        pad_count += 1
                        continue
                    if next_idx == 1 and j == index[0]:
                        continue
                    index[next_idx] = j
                    next_idx += 1
                    if next_idx == 2:
                        idx_set = True
                elif j == index[0]:
                    if padding:
                        raise BttError(errno.ENXIO, f"{self.name}: unable to deduce log/padding indices")
                elif j != index[1] and not padding:
                    raise BttError(errno.ENXIO, f"{self.name}: unable to deduce log/padding indices")
            if pad_count < 3:
                initial_state = False
        if not initial_state and not idx_set:
            raise BttError(errno.ENXIO, f"{self.name}: unable to deduce log/padding indices")
        if initial_state:
            index[1] = 1
        if index[0] != 0 or index[1] not in (1, 2):
            raise BttError(errno.ENXIO, f"{self.name}: found an unknown padding scheme")
        arena.log_index = index

    def _log_get_old(self, arena: Arena, seqs: list[int]) -> int:
        """btt_log_get_old(): which of the two entries (by sub) is the older; -1 if corrupt."""
        s0, s1 = seqs
        if s0 == 0:
            seqs[0] = 1
            return 0
        if s0 == s1 or s0 + s1 > 5:
            return -1
        if s0 < s1:
            return 0 if s1 - s0 == 1 else 1
        return 1 if s0 - s1 == 1 else 0

    def log_read(self, ai: int, lane: int, old: bool) -> tuple[int, tuple[int, int, int, int]]:
        """btt_log_read(): (sub, entry) of the lane's old or new flog entry."""
        arena = self.arenas[ai]
        group = self._log_group(ai, lane)
        ents = [group[arena.log_index[0]], group[arena.log_index[1]]]
        seqs = [ents[0][3], ents[1][3]]
        old_ent = self._log_get_old(arena, seqs)
        if old_ent < 0:
            raise BttError(errno.EIO, f"{self.name}: log corruption: lane {lane} seq [{ents[0][3]}, {ents[1][3]}]")
        sub = old_ent if old else 1 - old_ent
        lba, old_map, new_map, _seq = ents[sub]
        return sub, (lba, old_map, new_map, seqs[sub])

    def _freelist_init(self, ai: int) -> None:
        """btt_freelist_init(): each lane's free block from its newest flog entry, replaying a
        map write that a crash cut off after its flog entry was written."""
        arena = self.arenas[ai]
        mapv = self._maps[ai]
        arena.freelist = []
        for lane in range(arena.nfree):
            new, (lba, old_map, new_map, seq) = self.log_read(ai, lane, old=False)
            entry = FreeEntry(ent_lba(old_map), 1 - new, nd_inc_seq(seq))
            arena.freelist.append(entry)
            if ent_e_flag(old_map) and not ent_normal(old_map):
                entry.has_err = True
                self._clear_free_error(ai, entry)
            if ent_lba(old_map) == ent_lba(new_map):
                continue
            if lba >= arena.external_nlba:
                raise BttError(errno.EIO, f"{self.name}: flog lane {lane} names lba {lba:#x} past the arena")
            if self._range_is_bad(self.base + arena.mapoff + 4 * lba, 4):
                raise BttError(errno.EIO, f"{self.name}: media error in the map entry of lba {lba}")
            mapping = self._map_lookup(mapv, lba)[0]
            if ent_lba(new_map) != mapping and ent_lba(old_map) == mapping:
                mapv[lba] = ent_lba(new_map) | MAP_ENT_NORMAL
                log.info("%s: arena %d: replayed the map write of lba %d from flog lane %d",
                         self.name, ai, lba, lane)

    # ------------------------------------------------------------ map

    @staticmethod
    def _map_lookup(mapv: memoryview, premap: int) -> tuple[int, bool, bool]:
        """btt_map_read(): (postmap, trim, error)."""
        raw = mapv[premap]
        ze = raw >> MAP_ERR_SHIFT
        if ze == 0:
            return premap, False, False
        return raw & MAP_LBA_MASK, ze == 2, ze == 1

    def _lba_to_arena(self, lba: int) -> tuple[int, int]:
        for ai, arena in enumerate(self.arenas):
            if lba < arena.external_nlba:
                return ai, lba
            lba -= arena.external_nlba
        raise fail(errno.EIO, f"{self.name}: lba past the end")

    def _block_offset(self, arena: Arena, postmap: int) -> int:
        return self.base + arena.dataoff + postmap * arena.internal_lbasize

    def _block_is_bad(self, moff: int) -> bool:
        return self._range_is_bad(moff, self.sector_size)

    def _range_is_bad(self, moff: int, length: int) -> bool:
        """is_bad_pmem(): whether a media range touches a bad sector (nsio_rw_bytes() fails
        such a read with EIO, and an atomic write too: only a plain write clears poison)."""
        bb = self.media.badblocks
        if not bb:
            return False
        first = moff // 512
        return bb.overlaps(first, -(-(moff + length) // 512) - first)

    def _check_map_entry(self, arena: Arena, premap: int) -> None:
        """btt_map_read()/btt_map_write() go through arena_read/write_bytes(): a bad sector
        under the map entry fails them with EIO."""
        if self.media.badblocks and self._range_is_bad(self.base + arena.mapoff + 4 * premap, 4):
            raise fail(errno.EIO, f"{self.name}: media error in the map entry of lba {premap}")

    def _clear_free_error(self, ai: int, entry: FreeEntry) -> None:
        """arena_clear_freelist_error(): a lane's bad free block is written with zeros (a
        plain, non-atomic write, which clears the poison) before it takes data."""
        moff = self._block_offset(self.arenas[ai], entry.block)
        self.media.pwrite(bytes(self.sector_size), moff)
        self.media.badblocks.clear_written([(moff, self.sector_size)], self.media.path.name)
        entry.has_err = False

    # ------------------------------------------------------------ I/O

    def read_sector(self, lba: int, buf: memoryview) -> None:
        """btt_read_pg() of one sector into `buf` (sector_size bytes)."""
        moff = self._locate(lba)
        if moff is None:
            buf[:] = bytes(len(buf))
        else:
            self.media.preadinto(buf, moff)

    def _locate(self, lba: int) -> int | None:
        """btt_read_pg() up to the data read: the media offset of the sector's block, None for
        a sector whose map entry has the zero flag; EIO for the error flag or a bad block
        (which sets the error flag)."""
        ai, premap = self._lba_to_arena(lba)
        arena = self.arenas[ai]
        mapv = self._maps[ai]
        self._check_map_entry(arena, premap)
        postmap, trim, error = self._map_lookup(mapv, premap)
        if trim:
            return None
        if error:
            raise fail(errno.EIO, f"{self.name}: lba {lba} has a media error")
        if postmap >= arena.internal_nlba:
            raise fail(errno.EIO, f"{self.name}: lba {lba} maps to {postmap:#x}, past the arena")
        moff = self._block_offset(arena, postmap)
        if self._block_is_bad(moff):
            # Media error: the map entry gets its error flag, so it persists (btt_read_pg())
            mapv[premap] = postmap | MAP_ERR_MASK
            raise fail(errno.EIO, f"{self.name}: media error reading lba {lba}")
        return moff

    def write_sector(self, lba: int, data: memoryview) -> None:
        """btt_write_pg() of one sector: free block, flog entry, map flip."""
        ai, premap = self._lba_to_arena(lba)
        arena = self.arenas[ai]
        if arena.flags & IB_FLAG_ERROR_MASK:
            raise fail(errno.EIO, f"{self.name}: arena {ai} is in an error state")
        lane = self._next_lane
        self._next_lane = (lane + 1) % arena.nfree
        free = arena.freelist[lane]
        if free.has_err or self._block_is_bad(self._block_offset(arena, free.block)):
            self._clear_free_error(ai, free)
        new_postmap = free.block
        if new_postmap >= arena.internal_nlba:
            raise fail(errno.EIO, f"{self.name}: free block {new_postmap:#x} past the arena")
        self.media.pwrite(data, self._block_offset(arena, new_postmap))
        mapv = self._maps[ai]
        self._check_map_entry(arena, premap)
        old_postmap, _trim, e_flag = self._map_lookup(mapv, premap)
        if old_postmap >= arena.internal_nlba:
            raise fail(errno.EIO, f"{self.name}: lba {lba} maps to {old_postmap:#x}, past the arena")
        old_map = old_postmap | MAP_ERR_MASK if e_flag else old_postmap
        # btt_flog_write(): the 16-byte entry in two halves, the sequence number last
        mm = self._logs[ai]
        off = arena.log_base + lane * LOG_GRP_SIZE + arena.log_index[free.sub] * LOG_ENT_SIZE
        if self.media.badblocks and self._range_is_bad(self.base + arena.logoff + off - arena.log_base, LOG_ENT_SIZE):
            raise fail(errno.EIO, f"{self.name}: media error in the flog of lane {lane}")
        _LOG_HALF.pack_into(mm, off, premap, old_map)
        _LOG_HALF.pack_into(mm, off + 8, new_postmap, free.seq)
        free.sub = 1 - free.sub
        free.seq = nd_inc_seq(free.seq)
        free.has_err = e_flag
        free.block = old_postmap
        mapv[premap] = new_postmap | MAP_ENT_NORMAL
        if e_flag:
            self._clear_free_error(ai, free)

    def read(self, offset: int, buf: memoryview) -> None:
        """Bytes [offset, offset + len(buf)) of the disk (sector-aligned or not)."""
        ss = self.sector_size
        with self.lock:
            self._check_live()
            done = 0
            # whole sectors whose blocks follow each other on the media are read with one pread
            run_at, run_moff, run_len = 0, 0, 0
            while done < len(buf):
                lba, within = divmod(offset + done, ss)
                n = min(ss - within, len(buf) - done)
                if within == 0 and n == ss:
                    moff = self._locate(lba)
                    if moff is not None and run_len and run_moff + run_len == moff and run_at + run_len == done:
                        run_len += ss
                    else:
                        if run_len:
                            self.media.preadinto(buf[run_at: run_at + run_len], run_moff)
                        run_at, run_moff, run_len = done, moff or 0, ss if moff is not None else 0
                        if moff is None:
                            buf[done: done + ss] = bytes(ss)
                else:
                    sector = bytearray(ss)
                    self.read_sector(lba, memoryview(sector))
                    buf[done: done + n] = sector[within: within + n]
                done += n
            if run_len:
                self.media.preadinto(buf[run_at: run_at + run_len], run_moff)

    def write(self, offset: int, data: memoryview) -> None:
        """A write of whole or partial sectors; each sector is replaced atomically (a partial
        one by reading it, merging, and writing the result to a free block)."""
        ss = self.sector_size
        with self.lock:
            self._check_live()
            done = 0
            while done < len(data):
                lba, within = divmod(offset + done, ss)
                n = min(ss - within, len(data) - done)
                if within == 0 and n == ss:
                    self.write_sector(lba, data[done: done + ss])
                else:
                    sector = bytearray(ss)
                    self.read_sector(lba, memoryview(sector))
                    sector[within: within + n] = data[done: done + n]
                    self.write_sector(lba, memoryview(sector))
                done += n

    def drop_stale_v1_1_info(self) -> None:
        """A BTT 2.0 whose first 8 KiB still hold the valid BTT 1.1 info block it was converted
        from (a crash cut convert_in_place_v1_1() short before it zeroed it): zero it, if the
        blocks under it are free (they are, after a conversion), so nothing takes it for a BTT."""
        if self.version != BTT_V2_0 or not self.arenas:
            return
        arena = self.arenas[0]
        block = self.media.pread(INFO_BLOCK_SIZE, self.base + BTT1_OFFSET)
        info = arena_is_valid(block, self.parent_uuid)
        if info is None or (info["version_major"], info["version_minor"]) != (1, 1):
            return
        first = (BTT1_OFFSET - arena.dataoff) // arena.internal_lbasize
        last = (BTT1_OFFSET + INFO_BLOCK_SIZE - 1 - arena.dataoff) // arena.internal_lbasize
        free = {f.block for f in arena.freelist}
        if arena.dataoff <= BTT1_OFFSET and all(b in free for b in range(first, last + 1)):
            self.media.zero(self.base + BTT1_OFFSET, INFO_BLOCK_SIZE)
            log.info("%s: zeroed the BTT 1.1 info block left from its conversion", self.name)

    def _check_live(self) -> None:
        if self.closed:  # the disk went away while this request waited for the lock
            raise fail(errno.ENXIO, f"{self.name}: device is gone")

    def close(self) -> None:
        self.closed = True
        for view in self._maps:
            view.release()
        self._maps = []
        self._logs = []
        for window in self._windows:
            window.close()
        self._windows = []


class BttDataPath(DataPath):
    """The bytes of a BTT disk (pmemNs): every access goes through the map, so reads and
    writes are served from memory, not spliced from the media file."""

    spliceable = False
    has_badblocks = False  # a BTT disk has no badblocks (disk->bb is NULL)

    def __init__(self, engine: BttEngine, read_only: Callable[[], bool] | None = None) -> None:
        self.engine = engine
        super().__init__(engine.media, engine.size, read_only=read_only)
        self.logical_block_size = engine.sector_size

    def readinto(self, buf: memoryview, offset: int) -> int:
        self._check_open()
        n = max(0, min(len(buf), self.size - offset))
        if n:
            self.engine.read(offset, buf[:n])
        return n

    def read_extents(self, offset: int, size: int) -> list[tuple[int, int]]:
        raise fail(errno.EINVAL, "a BTT disk is read through its map, not by extents")

    def write_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        raise fail(errno.EINVAL, "a BTT disk is written through its map, not by extents")

    def write(self, data: bytes | memoryview, offset: int) -> int:
        self._check_open()
        if self.read_only():
            raise fail(errno.EROFS, "read-only")
        if offset >= self.size:
            raise fail(errno.ENOSPC, "write past the end of the device")
        n = min(len(data), self.size - offset)
        self.engine.write(offset, memoryview(data)[:n])
        return n

    def close(self) -> None:
        self.closed = True
        with self.engine.lock:
            self.engine.close()



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
    flog = b"".join(_LOG_ENT.pack(lane, block, block, LOG_SEQ_INIT) + bytes(LOG_GRP_SIZE - LOG_ENT_SIZE)
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
