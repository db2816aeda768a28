"""Media errors (poison) and their error injection, the way nfit_test offers them.

The state is one sorted list of bad 512-byte sectors per region media (what the bus's poison
list holds for that SPA range). Everything else is derived from it, as the kernel derives it:

* ``regionN/badblocks``: the sectors relative to the region start (nd_region's badblocks);
* ``/sys/block/pmemN/badblocks``: the sectors relative to the disk's first byte, i.e. after
  the pfn info block and memmap for fsdax (pmem_attach_disk() populates its badblocks from the
  region over the data range only). A BTT disk has no badblocks (disk->bb is NULL, so the
  attribute is hidden);
* reads through any device file that touch a bad sector fail with EIO (pmem_do_read(),
  nsio_rw_bytes()), before any data is returned;
* a write that covers whole bad sectors clears them (pmem_do_write(): write, clear the
  poison, write again); a write that covers only part of a bad sector fails with EIO (the
  block layer would have to read the rest of that sector first).

Errors are injected and removed through ``ndbusN/vnvdimm/inject_error`` and
``ndbusN/vnvdimm/uninject_error`` (0200, vnvdimm extensions; ioctls, which ndctl's
``inject-error`` uses, cannot reach a FUSE file system). Each takes exactly
``namespaceR.N BLOCK COUNT`` (one line; numbers decimal or 0x-hex): BLOCK and COUNT are in
512-byte blocks relative to the namespace as ``ndctl inject-error`` counts them, i.e. from the
start of the data area (pfn/dax ``resource``) for an enabled fsdax/devdax namespace, from the
namespace start otherwise. Injected errors live as long as the daemon (like nfit_test's,
which vanish with the module); the media bytes are never changed.
"""

from __future__ import annotations

import bisect
import errno
import logging
import re
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from vnvdimm.model.base import Attr, Entry, Group, cstring, fail, kstrtoull

if TYPE_CHECKING:
    from vnvdimm.model.bus import NvdimmBus
    from vnvdimm.model.disk import Disk
    from vnvdimm.model.media import Media
    from vnvdimm.model.namespace import Namespace
    from vnvdimm.model.region import Region

log = logging.getLogger("vnvdimm.model")

SECTOR = 512
BB_MAX_LEN = 512  # badblocks_show() prints ranges of at most this many sectors per line


class BadBlocks:
    """A set of bad sectors kept as sorted, merged, disjoint [start, end) ranges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def ranges(self) -> list[tuple[int, int]]:
        """(first sector, count) of each range."""
        with self._lock:
            return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]

    def set(self, start: int, count: int) -> None:
        if count <= 0:
            return
        with self._lock:
            ranges = [(s, e) for s, e in zip(self._starts, self._ends, strict=True)] + [(start, start + count)]
            ranges.sort()
            merged: list[list[int]] = []
            for s, e in ranges:
                if merged and s <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], e)
                else:
                    merged.append([s, e])
            self._starts = [s for s, _ in merged]
            self._ends = [e for _, e in merged]

    def clear(self, start: int, count: int) -> bool:
        """Remove [start, start + count); True if anything was bad there."""
        if count <= 0:
            return False
        end = start + count
        with self._lock:
            out: list[tuple[int, int]] = []
            hit = False
            for s, e in zip(self._starts, self._ends, strict=True):
                if e <= start or s >= end:
                    out.append((s, e))
                    continue
                hit = True
                if s < start:
                    out.append((s, start))
                if e > end:
                    out.append((end, e))
            self._starts = [s for s, _ in out]
            self._ends = [e for _, e in out]
            return hit

    def overlaps(self, start: int, count: int) -> bool:
        if not self._starts or count <= 0:
            return False
        with self._lock:
            i = bisect.bisect_right(self._starts, start + count - 1) - 1
            return i >= 0 and self._ends[i] > start

    def within(self, first: int, count: int) -> list[tuple[int, int]]:
        """The bad ranges inside [first, first + count), relative to `first`."""
        end = first + count
        return [(max(s, first) - first, min(s + n, end) - max(s, first))
                for s, n in self.ranges() if s < end and s + n > first]


def show(ranges: Iterable[tuple[int, int]]) -> str:
    """badblocks_show(): "sector count" lines, long ranges split as the kernel stores them."""
    lines = []
    for start, count in ranges:
        while count > 0:
            n = min(count, BB_MAX_LEN)
            lines.append(f"{start} {n}\n")
            start += n
            count -= n
    return "".join(lines)


# ---------------------------------------------------------------- per-media state

_BY_MEDIA: weakref.WeakKeyDictionary[Media, BadBlocks] = weakref.WeakKeyDictionary()
_BY_MEDIA_LOCK = threading.Lock()


def of(media: Media) -> BadBlocks:
    bb = _BY_MEDIA.get(media)
    if bb is None:
        with _BY_MEDIA_LOCK:
            bb = _BY_MEDIA.setdefault(media, BadBlocks())
    return bb


def _sectors(moff: int, length: int, whole: bool) -> tuple[int, int]:
    """Sectors an extent touches (whole=False) or covers entirely (whole=True): (first, count)."""
    if whole:
        first = -(-moff // SECTOR)
        last = (moff + length) // SECTOR
    else:
        first = moff // SECTOR
        last = -(-(moff + length) // SECTOR)
    return first, max(0, last - first)


# ---------------------------------------------------------------- data path hooks


def check_read(media: Media, extents: Iterable[tuple[int, int]]) -> None:
    """EIO if any media extent (offset, length) touches a bad sector."""
    bb = _BY_MEDIA.get(media)
    if not bb:
        return
    for moff, n in extents:
        if bb.overlaps(*_sectors(moff, n, whole=False)):
            raise fail(errno.EIO, f"media error in [{moff:#x}, {moff + n:#x})")


def check_write(media: Media, extents: Iterable[tuple[int, int]]) -> None:
    """EIO if a write would cover only part of a bad sector (nothing is written then)."""
    bb = _BY_MEDIA.get(media)
    if not bb:
        return
    for moff, n in extents:
        first, count = _sectors(moff, n, whole=False)
        for sector in {first, first + count - 1}:
            lo, hi = sector * SECTOR, (sector + 1) * SECTOR
            partial = moff > lo or moff + n < hi
            if partial and bb.overlaps(sector, 1):
                raise fail(errno.EIO, f"partial write of bad sector {sector} of {media.path.name}")


def clear_written(media: Media, extents: Iterable[tuple[int, int]]) -> None:
    """pmem_clear_poison(): the whole sectors a successful write covered are good again."""
    bb = _BY_MEDIA.get(media)
    if not bb:
        return
    for moff, n in extents:
        first, count = _sectors(moff, n, whole=True)
        if bb.clear(first, count):
            log.info("%s: media errors cleared by a write of sectors [%d, %d)", media.path.name, first,
                     first + count)


# ---------------------------------------------------------------- sysfs views


def region_show(region: Region) -> str:
    return show(of(region.media).ranges())


def disk_has_badblocks(disk: Disk) -> bool:
    """A BTT disk has no badblocks (the attribute is hidden, as disk_visible() does)."""
    return disk.data.mapper is None


def disk_show(disk: Disk) -> str:
    data = disk.data
    first = data.media_offset // SECTOR
    return show(of(data.media).within(first, data.size // SECTOR))


# ---------------------------------------------------------------- injection


def injection_window(ns: Namespace) -> tuple[int, int]:
    """Media byte offset and size of what `ndctl inject-error` counts blocks from."""
    from vnvdimm.model.personality import Pfn

    claim = ns.claim
    geometry = getattr(claim, "geometry", None)
    if isinstance(claim, Pfn) and claim.driver is not None and geometry is not None:
        return ns.offset + geometry.dataoff, geometry.data_size
    return ns.offset, ns.size


_REQUEST = re.compile(r"(namespace\d+\.\d+) (\S+) (\S+)")


def parse_request(buf: bytes) -> tuple[str, int, int]:
    """'namespaceR.N BLOCK COUNT' with at most one trailing newline (and ndctl's NUL)."""
    text = cstring(buf)
    if text.endswith(b"\n"):
        text = text[:-1]
    m = _REQUEST.fullmatch(text.decode("latin-1"))
    if m is None:
        raise fail(errno.EINVAL, "expected 'namespaceR.N BLOCK COUNT'")
    block = kstrtoull(m.group(2).encode())
    count = kstrtoull(m.group(3).encode())
    if count == 0:
        raise fail(errno.EINVAL, "COUNT must be at least 1")
    return m.group(1), block, count


def _find_namespace(bus: NvdimmBus, name: str) -> Namespace:
    for region in bus.regions:
        for ns in region.namespaces:
            if ns.name == name:
                return ns
    raise fail(errno.ENODEV, f"{name} not found on {bus.name}")


def _apply(bus: NvdimmBus, buf: bytes, inject: bool) -> None:
    name, block, count = parse_request(buf)
    ns = _find_namespace(bus, name)
    offset, size = injection_window(ns)
    if (block + count) * SECTOR > size:
        raise fail(errno.EINVAL, f"blocks [{block}, {block + count}) beyond the {size // SECTOR} blocks of {name}")
    region = ns.region
    first = offset // SECTOR + block
    bb = of(region.media)
    if inject:
        bb.set(first, count)
    else:
        bb.clear(first, count)
    log.info("%s: %s %d bad block(s) at block %d (%s sector %d)", name, "injected" if inject else "uninjected",
             count, block, region.name, first)
    _changed(region)


def _changed(region: Region) -> None:
    """Page caches of every device file on this media drop (so reads see the poison), and
    pollers of the badblocks attributes wake (the kernel's sysfs_notify of bb_state)."""
    from vnvdimm.model.disk import DataPath, Disk

    system = region.system
    system.notify(region, "badblocks")
    for dev in system.all_devices():
        for obj in (dev, getattr(dev, "disk", None)):
            data = getattr(obj, "data", None)
            if isinstance(data, DataPath) and data.media is region.media:
                with DataPath._serial_lock:
                    DataPath._serial += 1
                    data.serial = DataPath._serial
                if isinstance(obj, Disk):
                    system.notify(obj, "badblocks")


def bus_entries(bus: NvdimmBus) -> list[Entry]:
    """The bus's `vnvdimm/` extension group: the error injection controls, and the memmap
    pause mark of every device (memmap_pause.py)."""
    from vnvdimm.model import memmap_pause

    return [Group("vnvdimm", [
        Attr("inject_error", 0o200, store=lambda buf: _apply(bus, buf, inject=True)),
        Attr("uninject_error", 0o200, store=lambda buf: _apply(bus, buf, inject=False)),
        memmap_pause.bus_attr(bus.system),
    ])]
