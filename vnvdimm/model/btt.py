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
import threading
import uuid as uuidlib
from typing import TYPE_CHECKING

from vnvdimm.model.base import fail
from vnvdimm.model.btt_layout import (
    BTT1_OFFSET,
    BTT_V1_1,
    BTT_V2_0,
    IB_FLAG_ERROR_MASK,
    LOG_ENT,
    LOG_ENT_SIZE,
    LOG_HALF,
    LOG_SEQ_INIT,
    MAP_ENT_NORMAL,
    MAP_ERR_MASK,
    MAP_ERR_SHIFT,
    MAP_LBA_MASK,
    Arena,
    BttError,
    BttVersion,
    FreeEntry,
    arena_is_valid,
    btt_sector_size,
    convert_in_place_v1_1,
    ent_e_flag,
    ent_lba,
    ent_normal,
    nd_inc_seq,
)
from vnvdimm.model.disk import DataPath
from vnvdimm.model.infoblock import (
    ARENA_MIN_SIZE,
    BTT_DEFAULT_NFREE,
    BTT_PG_SIZE,
    INFO_BLOCK_SIZE,
    LOG_GRP_SIZE,
    BttInfo,
    btt_arenas,
    btt_log_init,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from vnvdimm.model.media import Media

# the format's names that drivers and tests use, with the engine's
__all__ = [
    "BTT_V1_1", "BTT_V2_0", "MAP_ENT_NORMAL", "MAP_ERR_MASK", "BttDataPath", "BttEngine", "BttError",
    "BttVersion", "arena_is_valid", "convert_in_place_v1_1",
]

log = logging.getLogger("vnvdimm.model")


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
        self.ns_end = ns_offset + ns_size
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
            arena = Arena.parsed(sb, cur_off, cur_nlba)
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
        area punched out, so their unwritten data area has none). The sizes are the arena's,
        which laid the blocks out, whatever the sector size this BTT was enabled with."""
        first = self.arenas[0]
        lbasize = first.external_lbasize
        if lbasize == btt_sector_size(lbasize):
            return
        padding = (0, 0, 0, 0)
        for ai, arena in enumerate(self.arenas):
            for lane in range(arena.nfree):
                free = arena.external_nlba + lane
                if self._log_group(ai, lane) != ((lane, free, free, LOG_SEQ_INIT), padding, padding, padding):
                    return  # written through a BTT write path
        start = self.base + first.dataoff
        end = self.base + first.mapoff
        try:
            data = os.lseek(self.media.fd, start, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but holes from there on
            return
        if data < end:
            raise BttError(errno.ENXIO, f"{self.name}: its {lbasize}-byte sectors were written in place by an "
                           f"older vnvdimm (block k holds bytes [{lbasize}k, {lbasize}(k+1)) of the old disk), "
                           f"which the kernel's BTT would read as {btt_sector_size(lbasize)}-byte sectors: "
                           "refusing it (see docs/limits.md, \"Sector mode\")")

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
        # vnvdimm's own guard (the kernel trusts a valid info block): offsets that would put the
        # map, the flog or the data outside the arena. Not a geometry check: discover_arenas()
        # takes an arena whatever its lbasize, so a BTT set to 4096-byte sectors runs over an
        # arena laid out for 512 (its disk then has the arena's block count of 4096-byte
        # sectors; see _block_offset()).
        if arena.nfree != BTT_DEFAULT_NFREE or arena.logoff + arena.nfree * LOG_GRP_SIZE > arena.info2off \
                or not arena.infooff < arena.dataoff <= arena.mapoff < arena.logoff < arena.info2off \
                or arena.external_nlba * 4 > arena.logoff - arena.mapoff \
                or arena.internal_lbasize < 512 or arena.external_nlba > arena.internal_nlba \
                or arena.dataoff + arena.internal_nlba * arena.internal_lbasize > arena.mapoff \
                or arena.info2off + BTT_PG_SIZE > self.rawsize:
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
        return tuple(LOG_ENT.unpack_from(mm, off + 16 * j) for j in range(4))

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
        """to_namespace_offset() on the media: where a block's sector starts. A sector is read
        and written whole from there even when it is larger than the arena's blocks (an arena
        discovered with another lbasize), running over the next blocks as the kernel's does; only
        past the namespace's end does nsio_rw_bytes() refuse it (-EFAULT, an I/O error)."""
        moff = self.base + arena.dataoff + postmap * arena.internal_lbasize
        if moff + self.sector_size > self.ns_end:
            raise fail(errno.EIO, f"{self.name}: block {postmap:#x}'s {self.sector_size}-byte sector runs past "
                       "the namespace")
        return moff

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
        LOG_HALF.pack_into(mm, off, premap, old_map)
        LOG_HALF.pack_into(mm, off + 8, new_postmap, free.seq)
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
        if info is None or info.version != (1, 1):
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
            raise fail(errno.EPERM, "read-only")  # blkdev_write_iter(): bdev_read_only()
        if offset >= self.size:
            raise fail(errno.ENOSPC, "write past the end of the device")
        n = min(len(data), self.size - offset)
        self.engine.write(offset, memoryview(data)[:n])
        return n

    def close(self) -> None:
        self.closed = True
        with self.engine.lock:
            self.engine.close()
