"""Block disks (pmemN, pmemNs) and the data paths behind every device file.

A `DataPath` maps device-file offsets onto the region's media and, for pfn/dax devices,
knows which memmap pages an access touches: before any byte is returned or stored, those
pages are initialized (the series' memmap_sync at the first fault, done per align block).
"""

from __future__ import annotations

import errno
import re
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from vnvdimm.model.badblocks import SECTOR, show
from vnvdimm.model.base import PAGE_SIZE, Device, DevNode, Entry, Group, Link, cstring, fail, ro, rw, uevent_store
from vnvdimm.model.nd import BLKEXT_MAJOR

if TYPE_CHECKING:
    from vnvdimm.memmap import MemmapJob
    from vnvdimm.model.media import Media
    from vnvdimm.model.namespace import Namespace
    from vnvdimm.model.personality import Personality
    from vnvdimm.model.system import System

class DataPath:
    """The bytes of one device file: a linear window of the media (a BTT disk's bytes go
    through its map instead: vnvdimm.model.btt.BttDataPath)."""

    _serial = 0
    _serial_lock = threading.Lock()
    #: whether reads and writes may be spliced between the FUSE channel and the media file at
    #: the extents read_extents()/write_extents() give
    spliceable = True
    has_badblocks = True  # the disk shows the region's bad sectors over its range
    logical_block_size: int | None = None  # None: the disk's (its namespace's sector size)

    def __init__(self, media: Media, size: int, media_offset: int = 0, job: MemmapJob | None = None,
                 first_data_page: int = 0, read_only: Callable[[], bool] | None = None) -> None:
        self.media = media
        self.size = size
        self.media_offset = media_offset
        self.job = job
        self.first_data_page = first_data_page
        self.read_only = read_only or (lambda: False)
        self.closed = False
        self.serial = 0
        self.contents_changed()  # a new path means new contents: page caches must drop

    def contents_changed(self) -> None:
        """The bytes behind this path changed other than by writing through it (media errors
        injected): a new serial makes the page caches of its files drop."""
        with DataPath._serial_lock:
            DataPath._serial += 1
            self.serial = DataPath._serial

    def _extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        yield self.media_offset + offset, length

    def _sync(self, offset: int, length: int) -> None:
        job = self.job
        if job is None or length <= 0:
            return
        first = self.first_data_page + offset // PAGE_SIZE
        last = self.first_data_page + (offset + length - 1) // PAGE_SIZE
        job.sync_range(first, last - first + 1)

    def _check_open(self) -> None:
        if self.closed:
            raise fail(errno.ENXIO, "device is gone")

    def read_extents(self, offset: int, size: int) -> list[tuple[int, int]]:
        """Where the bytes of a read of `size` at `offset` are on the media, as (media offset,
        length) extents, once the read may proceed: ENXIO if the device is gone, EIO if a
        bad sector is touched, the memmap pages covered initialized. Empty at the end."""
        self._check_open()
        size = min(size, self.size - offset)
        if size <= 0:
            return []
        extents = list(self._extents(offset, size))
        self.media.badblocks.check_read(extents)
        self._sync(offset, size)
        return extents

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Read into `buf` (the FUSE reply buffer: no intermediate copy); returns the length."""
        done = 0
        for moff, n in self.read_extents(offset, len(buf)):
            done += self.media.preadinto(buf[done: done + n], moff)
        return done

    def read(self, size: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(size, self.size - offset)))
        n = self.readinto(memoryview(buf), offset) if buf else 0
        return bytes(buf[:n])

    def write_extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Where a write of `length` bytes at `offset` goes on the media (cut at the end of the
        device), once it may proceed: ENXIO if the device is gone, EPERM if it is read-only
        (blkdev_write_iter()), ENOSPC at or past
        the end, EIO if it covers part of a bad sector, the memmap pages covered
        initialized. Call written() with the extents once the bytes are on the media."""
        self._check_open()
        if self.read_only():
            raise fail(errno.EPERM, "read-only")  # blkdev_write_iter(): bdev_read_only()
        if offset >= self.size:
            raise fail(errno.ENOSPC, "write past the end of the device")
        length = min(length, self.size - offset)
        extents = list(self._extents(offset, length))
        self.media.badblocks.check_write(extents, self.media.path.name)
        self._sync(offset, length)
        return extents

    def written(self, extents: list[tuple[int, int]], length: int) -> None:
        """The first `length` bytes of a write to these extents (write_extents()) are on the
        media (a short write stops early): whole bad sectors they cover are good again."""
        done: list[tuple[int, int]] = []
        for moff, n in extents:
            if length <= 0:
                break
            done.append((moff, min(n, length)))
            length -= n
        self.media.badblocks.clear_written(done, self.media.path.name)

    def write(self, data: bytes | memoryview, offset: int) -> int:
        extents = self.write_extents(offset, len(data))
        view = memoryview(data)
        done = 0
        for moff, n in extents:
            self.media.pwrite(view[done: done + n], moff)
            done += n
        self.written(extents, done)
        return done

    def fsync(self) -> None:
        self._check_open()
        self.media.fsync()

    def close(self) -> None:
        """The device is gone: later accesses fail with ENXIO."""
        self.closed = True


class Disk(Device):
    """A gendisk (class block) living in its parent's `block/` directory."""

    subdir = "block"

    def __init__(self, system: System, name: str, parent: Namespace | Personality, data: DataPath,
                 dax: bool = False, lbasize: int = 512) -> None:
        super().__init__(system, name, parent)
        self.data = data
        self.dax = dax  # the disk of an fsdax (pfn) device supports DAX
        self.lbasize = lbasize  # the logical block size, where the data path has none of its own
        self.devt: tuple[int, int] = (BLKEXT_MAJOR, system.minors[BLKEXT_MAJOR].get())
        # the block device's own read-only policy (BLKROSET: bdev_set_flag(BD_READ_ONLY)),
        # on top of the disk's (the region's read_only): bdev_read_only() is either
        self.policy_read_only = False
        disk_read_only = data.read_only
        data.read_only = lambda: self.policy_read_only or disk_read_only()
        # dax/write_cache of a pmem disk (its dax_device, drivers/dax/super.c): on where the
        # region has a cache to flush (nvdimm_has_cache(): persistence is not cpu_cache)
        self.write_cache = parent.region.persistence != "cpu_cache"

    def devnode(self) -> DevNode:
        return DevNode(self.name, self.devt, kind="b", data=self.data)

    def _write_cache_store(self, buf: bytes) -> None:
        """write_cache_store(): kstrtobool."""
        word = cstring(buf).strip().lower()
        if word[:1] in (b"1", b"y", b"t") or word in (b"on",):
            self.write_cache = True
        elif word[:1] in (b"0", b"n", b"f") or word in (b"off",):
            self.write_cache = False
        else:
            raise fail(errno.EINVAL, f"write_cache: not a boolean: {word!r}")

    def entries(self) -> list[Entry]:
        sectors = self.data.size // 512
        return [
            ro("dev", lambda: f"{self.devt[0]}:{self.devt[1]}\n"),
            ro("size", lambda: f"{sectors}\n"),
            ro("ro", lambda: "1\n" if self.data.read_only() else "0\n"),
            ro("removable", lambda: "0\n"),
            ro("range", lambda: "1\n"),
            ro("ext_range", lambda: "256\n"),
            ro("capability", lambda: "0\n"),
            ro("alignment_offset", lambda: "0\n"),
            ro("discard_alignment", lambda: "0\n"),
            # a BTT disk has no badblocks (disk->bb is NULL: the attribute is hidden) and no dax
            # device (nd_pmem's disks have one, whatever the namespace's mode)
            *([rw("badblocks", self._badblocks_show, self._badblocks_store),
               Group("dax", [rw("write_cache", lambda: f"{int(self.write_cache)}\n", self._write_cache_store)])]
              if self.data.has_badblocks else []),
            rw("uevent", lambda: f"MAJOR={self.devt[0]}\nMINOR={self.devt[1]}\nDEVNAME={self.name}\nDEVTYPE=disk\n",
               uevent_store),
            Group("queue", [
                ro("logical_block_size", lambda: f"{self.logical_block_size}\n"),
                ro("physical_block_size", lambda: f"{max(self.logical_block_size, 4096)}\n"),
                ro("hw_sector_size", lambda: f"{self.logical_block_size}\n"),
                ro("rotational", lambda: "0\n"),
                ro("dax", lambda: "1\n" if self.dax else "0\n"),
            ]),
            Group("holders", []),
            Group("slaves", []),
            Link("subsystem", "/class/block"),
            Link("device", self.parent) if self.parent else Link("device", "/devices"),
        ]

    def _badblocks_store(self, buf: bytes) -> None:
        """disk_badblocks_store() -> badblocks_store(): "SECTOR COUNT" (sscanf "%llu %d%c",
        a third character only if it is a newline), COUNT > 0; the sectors, relative to the
        disk, become bad (reads of them fail with EIO until a write clears them). Sectors past
        the disk's end are not kept: no I/O through this disk reaches them."""
        match = re.fullmatch(rb"\s*(\d+)\s+([-+]?\d+)(\n.*)?", cstring(buf), re.S)
        if match is None:
            raise fail(errno.EINVAL, "badblocks: write SECTOR COUNT")
        sector, count = int(match.group(1)), int(match.group(2))
        if count <= 0 or count >= 1 << 31 or sector >= 1 << 64:
            raise fail(errno.EINVAL, f"badblocks: bad count {count}")
        sectors = self.data.size // SECTOR
        if sector < sectors:
            first = self.data.media_offset // SECTOR + sector
            self.data.media.badblocks.set(first, min(count, sectors - sector))
            # Pages cached before must not answer for them: a read of a bad sector fails.
            self.data.contents_changed()
            self.system.notify(self, "badblocks")

    @property
    def logical_block_size(self) -> int:
        return self.data.logical_block_size or self.lbasize

    def _badblocks_show(self) -> str:
        """The region's bad sectors over the disk's data range, relative to its first byte."""
        data = self.data
        return show(data.media.badblocks.within(data.media_offset // SECTOR, data.size // SECTOR))

    def close(self) -> None:
        self.data.close()
        self.system.minors[BLKEXT_MAJOR].put(self.devt[1])
