"""Where a job's records live, and the per-chunk page initialization loop shared by every initializer.

A job's storage is described by a picklable :class:`Geometry`, so a worker process can map the
same bytes as the engine:

* ``map=mem`` (:class:`MemStorage`): one memfd holding ``[records | usemap]``. A memfd is anonymous
  shared memory that the kernel frees with its last fd/mapping, so nothing can outlive the
  processes that use it (no /dev/shm name to leak, even on SIGKILL).
* ``map=dev`` (:class:`DevStorage`): the records are in the media file (the kernel's altmap) at
  ``offset``; the usemap (pageblock migratetypes) is not part of the altmap in the kernel either
  (it hangs off ``mem_section``), so it gets a small memfd of its own.

Both memfd layouts end with one control page shared by every process mapping the job: word 0
is the job's ``ns_per_page`` (a float64), read by the initializers between chunks, so a new value
reaches runs already in flight without a message.

Phase 1 (vmemmap population) of a section = make its record bytes really exist (fallocate for a
file, then ``MADV_POPULATE_WRITE`` in the populating process' mapping), section by section.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .page import (
    PAGE_SIZE,
    PAGEBLOCK_ORDER,
    PFN_SECTION_SHIFT,
    RECORD_SIZE,
    VMEMMAP_BASE,
    TemplateCache,
    init_range,
    thread_cache,
)

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+; not in Python 3.11

# Pages per initialization chunk: between two chunks an initializer checks for cancellation and
# applies the ns_per_page floor. 8192 records = 512 KiB: ~0.1-0.3 ms of work, so a cancel is seen
# within a fraction of a millisecond while the per-chunk Python overhead stays ~1% of the copy.
CHUNK_PAGES = 8192
# Longest sleep for the ns_per_page floor before the floor is looked at again (a new value
# applies within this time, also to a run that is sleeping).
FLOOR_SLICE_S = 0.05


@dataclass(frozen=True)
class MemStorage:
    """``map=mem``: records in anonymous shared memory (a memfd) owned by the engine."""


@dataclass(frozen=True)
class DevStorage:
    """``map=dev``: records in ``path`` at byte ``offset`` (page aligned), ``npages * 64`` bytes."""

    path: str
    offset: int


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


@dataclass(frozen=True)
class Geometry:
    """Everything an initializer needs to know about a job; picklable (sent to workers)."""

    first_pfn: int
    npages: int
    reserve_pages: int
    altmap_pages: int
    align_pages: int
    nid: int
    pgmap: int
    vmemmap_base: int = VMEMMAP_BASE
    path: str | None = None  # None: records in the memfd
    offset: int = 0  # byte offset of record 0 in `path`

    @property
    def rec_bytes(self) -> int:
        return self.npages * RECORD_SIZE

    @property
    def first_pageblock(self) -> int:
        return self.first_pfn >> PAGEBLOCK_ORDER

    @property
    def npageblocks(self) -> int:
        if self.npages == 0:
            return 0
        return ((self.first_pfn + self.npages - 1) >> PAGEBLOCK_ORDER) - self.first_pageblock + 1

    @property
    def first_section(self) -> int:
        return self.first_pfn >> PFN_SECTION_SHIFT

    @property
    def nsections(self) -> int:
        if self.npages == 0:
            return 0
        return ((self.first_pfn + self.npages - 1) >> PFN_SECTION_SHIFT) - self.first_section + 1

    @property
    def nblocks(self) -> int:
        return -(-self.npages // self.align_pages)

    def section_pages(self, js: int) -> tuple[int, int]:
        """Job page range [lo, hi) of job-relative section ``js``."""
        s = self.first_section + js
        lo = max(s << PFN_SECTION_SHIFT, self.first_pfn) - self.first_pfn
        hi = min((s + 1) << PFN_SECTION_SHIFT, self.first_pfn + self.npages) - self.first_pfn
        return lo, hi

    def section_of(self, page: int) -> int:
        """Job-relative section of job page ``page``."""
        return ((self.first_pfn + page) >> PFN_SECTION_SHIFT) - self.first_section

    # memfd layout
    @property
    def memfd_rec_span(self) -> int:
        return 0 if self.path is not None else _round_up(self.rec_bytes, PAGE_SIZE)

    @property
    def usemap_span(self) -> int:
        return _round_up(max(self.npageblocks, 1), PAGE_SIZE)

    @property
    def control_offset(self) -> int:
        """Offset of the control page in the memfd (after the records and the usemap)."""
        return self.memfd_rec_span + self.usemap_span

    @property
    def memfd_size(self) -> int:
        return self.control_offset + PAGE_SIZE


def create_memfd(geom: Geometry, name: str) -> int:
    """The job's memfd, sized but sparse: O(1), nothing is faulted in here."""
    fd = os.memfd_create(f"vnvdimm-memmap:{name}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, geom.memfd_size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Mapping:
    """One process' mapping of a job's records and usemap.

    Takes ownership of nothing: ``memfd`` stays the caller's (the mapping keeps the memory alive
    on its own). :meth:`close` unmaps; it must not be called while a view is in use.
    """

    def __init__(self, geom: Geometry, memfd: int) -> None:
        self.geom = geom
        self._maps: list[mmap.mmap] = []
        self._file_fd: int | None = None
        self._rec_map: mmap.mmap | None = None
        try:
            if geom.path is None:
                # [records | usemap] in one memfd.
                whole = mmap.mmap(memfd, geom.memfd_size)
                self._maps.append(whole)
                self._rec_map = whole
                use_map, use_off = whole, geom.memfd_rec_span
                ctl_map, ctl_off = whole, geom.control_offset
            else:
                if geom.offset % mmap.ALLOCATIONGRANULARITY:
                    raise ValueError(f"DevStorage offset {geom.offset:#x} is not page aligned")
                self._file_fd = os.open(geom.path, os.O_RDWR | os.O_CLOEXEC)
                size = os.fstat(self._file_fd).st_size
                if size < geom.offset + geom.rec_bytes:
                    raise ValueError(
                        f"{geom.path}: {size} bytes, records need "
                        f"[{geom.offset:#x}, {geom.offset + geom.rec_bytes:#x})"
                    )
                if geom.npages:
                    self._rec_map = mmap.mmap(self._file_fd, geom.rec_bytes, offset=geom.offset)
                    self._maps.append(self._rec_map)
                # [usemap | control] of the memfd
                use_map, use_off = mmap.mmap(memfd, geom.usemap_span + PAGE_SIZE), 0
                self._maps.append(use_map)
                ctl_map, ctl_off = use_map, geom.usemap_span
        except BaseException:
            self.close()
            raise
        if self._rec_map is not None and geom.npages:
            self.words = np.frombuffer(self._rec_map, dtype=np.uint64, count=geom.npages * 8).reshape(
                geom.npages, 8
            )
        else:
            self.words = np.zeros((0, 8), dtype=np.uint64)
        self.usemap = np.frombuffer(use_map, dtype=np.uint8, count=geom.npageblocks, offset=use_off)
        self._control = np.frombuffer(ctl_map, dtype=np.float64, count=1, offset=ctl_off)
        self._rec_map_len = geom.memfd_rec_span if geom.path is None else geom.rec_bytes

    @property
    def ns_per_page(self) -> float:
        """The job's floor, as every process mapping it sees it now."""
        return float(self._control[0])

    @ns_per_page.setter
    def ns_per_page(self, value: float) -> None:
        self._control[0] = value  # one aligned 8-byte store: never seen torn

    def populate_section(self, js: int) -> None:
        """Phase 1 for job-relative section ``js``: make its record bytes exist, in this mapping."""
        if self._rec_map is None:
            return
        lo, hi = self.geom.section_pages(js)
        start = (lo * RECORD_SIZE) // PAGE_SIZE * PAGE_SIZE
        end = min(_round_up(hi * RECORD_SIZE, PAGE_SIZE), self._rec_map_len)
        if self._file_fd is not None:
            # Allocate the file blocks first: a write fault on a hole of a full filesystem is
            # SIGBUS, while fallocate reports ENOSPC as an exception we can handle.
            os.posix_fallocate(self._file_fd, self.geom.offset + start, end - start)
        try:
            self._rec_map.madvise(MADV_POPULATE_WRITE, start, end - start)
        except OSError:
            pass  # old kernel (EINVAL): the first write faults the pages in instead

    def drop_pages(self, lo: int, hi: int) -> None:
        """map=dev: unmap the records of job pages [lo, hi) from this process once written.

        They stay in the media file (the page cache writes them back); dropping the mapping
        keeps the daemon's and the workers' resident size at the sections in flight instead
        of the whole memmap, as the kernel's altmap costs no RAM either."""
        if self._file_fd is None or self._rec_map is None:
            return
        start = _round_up(lo * RECORD_SIZE, PAGE_SIZE)
        end = (hi * RECORD_SIZE) // PAGE_SIZE * PAGE_SIZE
        if end > start:
            self._rec_map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self.words = np.zeros((0, 8), dtype=np.uint64)
        self.usemap = np.zeros(0, dtype=np.uint8)
        self._control = np.zeros(1, dtype=np.float64)
        self._rec_map = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                # A view escaped; the map is freed when it is garbage collected instead.
                pass
        self._maps = []
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None


class PageFloor:
    """The ``ns_per_page`` floor of one run, at the rate in force now.

    The floor is a debt in pages: every initialized page adds one, and time pays it off at the
    current rate (``elapsed / ns_per_page``, the initialization's own time included). Read
    again at every look, a new rate applies at once to what is still owed: 0 cancels the debt,
    a larger value makes what is left last longer.
    """

    def __init__(self, rate: Callable[[], float]) -> None:
        self._rate = rate
        self._debt = 0.0
        self._t = time.monotonic()

    def add(self, pages: int) -> None:
        self._debt += pages

    def owed(self) -> float:
        """Seconds still owed at the current rate (0 when nothing is)."""
        now = time.monotonic()
        ns = self._rate()
        if ns <= 0:
            self._debt = 0.0
        else:
            self._debt = max(0.0, self._debt - (now - self._t) / (ns * 1e-9))
        self._t = now
        return self._debt * ns * 1e-9 if ns > 0 else 0.0


def initialize_pages(
    m: Mapping,
    lo: int,
    hi: int,
    *,
    ensure_section: Callable[[int], None],
    pause: Callable[[float], bool],
    cache: TemplateCache | None = None,
) -> bool:
    """Initialize job pages [lo, hi) (all outside the reserve) in chunks.

    Before the first write into a section, ``ensure_section(js)`` runs phase 1 for it if needed.
    After every chunk, ``pause(t)`` is called (at least once, then until the ``ns_per_page``
    floor of :attr:`Mapping.ns_per_page` is paid, ``t`` at most :data:`FLOOR_SLICE_S`): it
    sleeps up to ``t`` and returns True if the work must stop (cancel); then this returns
    False, with the chunks done so far initialized and the rest not.
    """
    g = m.geom
    cache = cache if cache is not None else thread_cache()
    floor = PageFloor(lambda: m.ns_per_page)
    p = lo
    words = m.words
    current_section = -1
    while p < hi:
        pfn = g.first_pfn + p
        js = g.section_of(p)
        end = min(hi, p + CHUNK_PAGES, (((pfn >> PFN_SECTION_SHIFT) + 1) << PFN_SECTION_SHIFT) - g.first_pfn)
        has_pgmap = p >= g.altmap_pages
        if not has_pgmap:
            end = min(end, g.altmap_pages)
        if js != current_section:
            ensure_section(js)
            current_section = js
        init_range(words[p:end], pfn, nid=g.nid, pgmap=g.pgmap, has_pgmap=has_pgmap,
                   vmemmap_base=g.vmemmap_base, usemap=m.usemap, usemap_first_pfn=g.first_pfn,
                   cache=cache)
        floor.add(end - p)
        p = end
        owed = floor.owed()
        while True:
            if pause(min(owed, FLOOR_SLICE_S)):
                return False
            owed = floor.owed()
            if owed <= 0:
                break
    m.drop_pages(lo, hi)
    return True
