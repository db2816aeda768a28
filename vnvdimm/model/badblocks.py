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

Each `Media` owns its `BadBlocks`. Errors are injected through the bus's ``vnvdimm/`` group
(`vnvdimm.model.extensions`); injected errors live as long as the daemon (like nfit_test's,
which vanish with the module); the media bytes are never changed.
"""

from __future__ import annotations

import bisect
import errno
import logging
import threading
from collections.abc import Callable, Iterable

from vnvdimm.model.base import fail

log = logging.getLogger("vnvdimm.model")

SECTOR = 512
BB_MAX_LEN = 512  # badblocks_show() prints ranges of at most this many sectors per line

class BadBlocks:
    """A set of bad sectors kept as sorted, merged, disjoint [start, end) ranges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._ends: list[int] = []
        # The platform's side of a clear by write (the CLEAR_ERROR the pmem driver sends):
        # called with the media byte range a write made good again.
        self.on_cleared: Callable[[int, int], None] | None = None
        # The kernel's side: pmem_clear_poison() ends with a sysfs_notify() of badblocks.
        self.on_write_cleared: Callable[[], None] | None = None

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

    # -- the data path's checks; extents are (media offset, length)

    def check_read(self, extents: Iterable[tuple[int, int]]) -> None:
        """EIO if any extent touches a bad sector."""
        if not self:
            return
        for moff, n in extents:
            if self.overlaps(*_sectors(moff, n, whole=False)):
                raise fail(errno.EIO, f"media error in [{moff:#x}, {moff + n:#x})")

    def check_write(self, extents: Iterable[tuple[int, int]], media_name: str) -> None:
        """EIO if a write would cover only part of a bad sector (nothing is written then)."""
        if not self:
            return
        for moff, n in extents:
            first, count = _sectors(moff, n, whole=False)
            for sector in {first, first + count - 1}:
                lo, hi = sector * SECTOR, (sector + 1) * SECTOR
                partial = moff > lo or moff + n < hi
                if partial and self.overlaps(sector, 1):
                    raise fail(errno.EIO, f"partial write of bad sector {sector} of {media_name}")

    def clear_written(self, extents: Iterable[tuple[int, int]], media_name: str) -> None:
        """pmem_clear_poison(): the whole sectors a successful write covered are good again."""
        if not self:
            return
        cleared = False
        for moff, n in extents:
            first, count = _sectors(moff, n, whole=True)
            if self.clear(first, count):
                cleared = True
                log.info("%s: media errors cleared by a write of sectors [%d, %d)", media_name, first,
                         first + count)
                if self.on_cleared is not None:
                    self.on_cleared(first * SECTOR, count * SECTOR)
        if cleared and self.on_write_cleared is not None:
            self.on_write_cleared()


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


def _sectors(moff: int, length: int, whole: bool) -> tuple[int, int]:
    """Sectors an extent touches (whole=False) or covers entirely (whole=True): (first, count)."""
    if whole:
        first = -(-moff // SECTOR)
        last = (moff + length) // SECTOR
    else:
        first = moff // SECTOR
        last = -(-(moff + length) // SECTOR)
    return first, max(0, last - first)
