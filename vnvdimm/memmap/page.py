"""The page record (x86_64 ``struct page``, 4.18 era) and its initializers.

Three initializers of the same thing, from slow-and-obvious to fast:

* :func:`init_page_reference` - one record, field by field, in the order of
  ``memmap_init_one`` (docs/memmap-abi.md, "A page record"). The tests' oracle.
* :func:`init_range_naive` - the same per-page, per-field loop over a range, in pure Python:
  the "before" baseline of the benchmark.
* :func:`init_range` - the engine's vectorized initializer. Fresh storage here is bound by page
  faults, so the only thing worth optimizing is the number of passes over the memory: each chunk
  is one broadcast copy of a prebuilt template (measured on a 2-vCPU guest: 5-8 ns/page faulted
  in for a template copy, vs 20+ for per-field assignment; 2.5 here with a 512-record template), plus a
  column write for the few fields that vary per page (the ``lru`` self-pointers, only on the
  pages that hold the memmap itself).

Flags layout modelled (include/linux/page-flags-layout.h, x86_64, 4-level paging, sparsemem):
``| SECTION (19) | NODE (6) | ZONE (3) | ... unused ... | page flags (bits 0..24) |``
i.e. ``SECTIONS_PGSHIFT = 45``, ``NODES_PGSHIFT = 39``, ``ZONES_PGSHIFT = 36``. A real x86_64
kernel with SPARSEMEM_VMEMMAP leaves the section out of ``page->flags``; we keep it (as classic
SPARSEMEM does, ``SECTION_IN_PAGE_FLAGS``) so that a record tells which section it belongs to and
a test can catch a record written into the wrong place. ``CONFIG_NUMA_BALANCING`` is modelled off,
so ``page_cpupid_reset_last()`` is a no-op and no cpupid bits appear.
"""

from __future__ import annotations

import threading

import numpy as np

# --- geometry (x86_64) ---------------------------------------------------------------------------
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
RECORD_SIZE = 64  # sizeof(struct page)
SECTION_SIZE_BITS = 27  # 128 MiB memory sections
PFN_SECTION_SHIFT = SECTION_SIZE_BITS - PAGE_SHIFT  # 15
PAGES_PER_SECTION = 1 << PFN_SECTION_SHIFT  # 32768 pages = 2 MiB of records
MAX_PHYSMEM_BITS = 46  # 4-level paging
PAGEBLOCK_ORDER = 9  # pageblock_order = HUGETLB_PAGE_ORDER on x86_64
PAGEBLOCK_NR_PAGES = 1 << PAGEBLOCK_ORDER  # 512

# --- page->flags layout (page-flags-layout.h) --------------------------------------------------------
SECTIONS_WIDTH = MAX_PHYSMEM_BITS - SECTION_SIZE_BITS  # 19
NODES_WIDTH = 6  # CONFIG_NODES_SHIFT default on x86_64 (non-MAXSMP)
ZONES_WIDTH = 3  # MAX_NR_ZONES = 5 (DMA, DMA32, NORMAL, MOVABLE, DEVICE) -> 3 bits
SECTIONS_PGSHIFT = 64 - SECTIONS_WIDTH  # 45
NODES_PGSHIFT = SECTIONS_PGSHIFT - NODES_WIDTH  # 39
ZONES_PGSHIFT = NODES_PGSHIFT - ZONES_WIDTH  # 36
SECTIONS_MASK = (1 << SECTIONS_WIDTH) - 1
NODES_MASK = (1 << NODES_WIDTH) - 1
ZONES_MASK = (1 << ZONES_WIDTH) - 1

# enum zone_type (4.18, 64-bit: no ZONE_HIGHMEM)
ZONE_DMA, ZONE_DMA32, ZONE_NORMAL, ZONE_MOVABLE, ZONE_DEVICE = range(5)

# enum pageflags (4.18, x86_64 with CONFIG_MMU, ARCH_USES_PG_UNCACHED, MEMORY_FAILURE,
# IDLE_PAGE_TRACKING): the bit numbers that /proc/kpageflags copies from page->flags.
PG_locked = 0
PG_error = 1
PG_referenced = 2
PG_uptodate = 3
PG_dirty = 4
PG_lru = 5
PG_active = 6
PG_waiters = 7
PG_slab = 8
PG_owner_priv_1 = 9
PG_arch_1 = 10
PG_reserved = 11
PG_private = 12
PG_private_2 = 13
PG_writeback = 14
PG_head = 15
PG_mappedtodisk = 16
PG_reclaim = 17
PG_swapbacked = 18
PG_unevictable = 19
PG_mlocked = 20
PG_uncached = 21
PG_hwpoison = 22
PG_young = 23
PG_idle = 24

# enum migratetype (4.18)
MIGRATE_UNMOVABLE = 0
MIGRATE_MOVABLE = 1
MIGRATE_RECLAIMABLE = 2

# include/linux/poison.h with x86_64 CONFIG_ILLEGAL_POINTER_VALUE
POISON_POINTER_DELTA = 0xDEAD000000000000
LIST_POISON1 = 0x100 + POISON_POINTER_DELTA
LIST_POISON2 = 0x200 + POISON_POINTER_DELTA

VMEMMAP_BASE = 0xFFFFEA0000000000  # x86_64 vmemmap_base without KASLR
LRU_OFFSET = 8  # offsetof(struct page, lru)

# include/uapi/linux/kernel-page-flags.h
KPF_LOCKED = 0
KPF_ERROR = 1
KPF_REFERENCED = 2
KPF_UPTODATE = 3
KPF_DIRTY = 4
KPF_LRU = 5
KPF_ACTIVE = 6
KPF_SLAB = 7
KPF_WRITEBACK = 8
KPF_RECLAIM = 9
KPF_BUDDY = 10
KPF_MMAP = 11
KPF_ANON = 12
KPF_SWAPCACHE = 13
KPF_SWAPBACKED = 14
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17
KPF_UNEVICTABLE = 18
KPF_HWPOISON = 19
KPF_NOPAGE = 20
KPF_KSM = 21
KPF_THP = 22
KPF_BALLOON = 23
KPF_ZERO_PAGE = 24
KPF_IDLE = 25
KPF_PGTABLE = 26
KPF_RESERVED = 32
KPF_MLOCKED = 33
KPF_MAPPEDTODISK = 34
KPF_PRIVATE = 35
KPF_PRIVATE_2 = 36
KPF_OWNER_PRIVATE = 37
KPF_ARCH = 38
KPF_UNCACHED = 39

# page_type lives in the _mapcount word (4.18 PageType()): a type bit is *cleared* when set.
PAGE_TYPE_BASE = 0xF0000000
PG_buddy = 0x00000080
PG_table = 0x00000400

# --- the record ------------------------------------------------------------------------------------
# Titles give the ZONE_DEVICE names of the union members that overlay the lru words, so
# rec["pgmap"] and rec["lru_next"] are the same 8 bytes (as in 4.18's struct page).
PAGE_DTYPE = np.dtype(
    {
        "names": [
            "flags", "lru_next", "lru_prev", "mapping", "index", "private",
            "_mapcount", "_refcount", "memcg_data",
        ],
        "formats": ["<u8", "<u8", "<u8", "<u8", "<u8", "<u8", "<i4", "<i4", "<u8"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 52, 56],
        "titles": [None, "pgmap", "zone_device_data", None, None, None, None, None, None],
        "itemsize": RECORD_SIZE,
    }
)
# Word index of each 8-byte field in the uint64 view used by the fast path.
_W_FLAGS, _W_LRU_NEXT, _W_LRU_PREV = 0, 1, 2
_W_COUNTS = 6  # _mapcount (low half) and _refcount (high half)


def page_links(pfn: int, nid: int, zone: int = ZONE_DEVICE) -> int:
    """``set_page_links()``: zone, node and section bits of ``page->flags`` for ``pfn``."""
    return (
        ((pfn >> PFN_SECTION_SHIFT) & SECTIONS_MASK) << SECTIONS_PGSHIFT
        | (nid & NODES_MASK) << NODES_PGSHIFT
        | (zone & ZONES_MASK) << ZONES_PGSHIFT
    )


def record_address(pfn: int, vmemmap_base: int = VMEMMAP_BASE) -> int:
    """Kernel virtual address of ``pfn_to_page(pfn)`` (vmemmap: base + pfn * sizeof(struct page))."""
    return (vmemmap_base + pfn * RECORD_SIZE) & 0xFFFFFFFFFFFFFFFF


def init_page_reference(
    pfn: int, *, nid: int, pgmap: int, has_pgmap: bool, vmemmap_base: int = VMEMMAP_BASE
) -> np.ndarray:
    """One record, initialized as ``memmap_init_one()`` does (docs/memmap-abi.md), step by step.

    Returns a 0-d array of :data:`PAGE_DTYPE` (``.tobytes()`` gives the 64 bytes).
    The pageblock migratetype is not part of the record (it lives in the usemap).
    """
    rec = np.zeros((), dtype=PAGE_DTYPE)  # mm_zero_struct_page()
    rec["flags"] = page_links(pfn, nid)  # set_page_links(page, ZONE_DEVICE, nid, pfn)
    rec["_refcount"] = 1  # init_page_count()
    rec["_mapcount"] = -1  # page_mapcount_reset()
    # page_cpupid_reset_last(): no-op without CONFIG_NUMA_BALANCING (see module docstring).
    lru = record_address(pfn, vmemmap_base) + LRU_OFFSET  # INIT_LIST_HEAD(&page->lru)
    rec["lru_next"] = lru
    rec["lru_prev"] = lru
    rec["flags"] = int(rec["flags"]) | (1 << PG_reserved)  # SetPageReserved()
    if has_pgmap:  # is_zone_device_page() and not an altmap (memmap storage) page
        rec["lru_prev"] = LIST_POISON2  # page->lru.prev = LIST_POISON2 (hmm_data overlays it)
        rec["pgmap"] = pgmap  # page->pgmap = pgmap (overlays lru.next)
    return rec


def init_range_naive(
    records: np.ndarray,
    first_pfn: int,
    *,
    nid: int,
    pgmap: int,
    has_pgmap: bool,
    vmemmap_base: int = VMEMMAP_BASE,
) -> None:
    """The pure-Python per-page per-field loop: the benchmark's 'before' baseline. Do not use."""
    for i in range(len(records)):
        pfn = first_pfn + i
        r = records[i]
        for name in PAGE_DTYPE.names:
            r[name] = 0
        r["flags"] = page_links(pfn, nid)
        r["_refcount"] = 1
        r["_mapcount"] = -1
        lru = record_address(pfn, vmemmap_base) + LRU_OFFSET
        r["lru_next"] = lru
        r["lru_prev"] = lru
        r["flags"] = int(r["flags"]) | (1 << PG_reserved)
        if has_pgmap:
            r["lru_prev"] = LIST_POISON2
            r["pgmap"] = pgmap


def as_words(records: np.ndarray) -> np.ndarray:
    """A ``(n, 8)`` uint64 view of a contiguous record array (no copy)."""
    if records.dtype == np.uint64 and records.ndim == 2:
        return records
    return records.view(np.uint64).reshape(-1, 8)


def _counts_word() -> int:
    # _mapcount = -1 (low 32 bits), _refcount = 1 (high 32 bits), little endian.
    return (1 << 32) | 0xFFFFFFFF


# Records in a template. Within one section every pgmap page's record is identical, so a chunk
# is a broadcast copy of a small template: 512 records (32 KiB) stay in L1/L2 and copy as fast as a
# section-sized template (measured: 2.5 vs 2.4 ns/page faulted in), while moving the template to
# another section rewrites 512 flags words instead of 32768.
TEMPLATE_PAGES = 512


class TemplateCache:
    """Ready-made records for the current (nid, pgmap, section), one set per ``has_pgmap``.

    Not thread-safe: one per thread (see :func:`thread_cache`) or per worker.
    """

    def __init__(self) -> None:
        self._key: dict[bool, tuple[int, int, int]] = {}
        self._section: dict[bool, int] = {}
        self._tmpl: dict[bool, np.ndarray] = {}

    def get(self, *, nid: int, pgmap: int, has_pgmap: bool, section: int, vmemmap_base: int) -> np.ndarray:
        """A ``(TEMPLATE_PAGES, 8)`` uint64 template of records of ``section``."""
        key = (nid, pgmap, vmemmap_base)
        tmpl = self._tmpl.get(has_pgmap)
        if tmpl is None or self._key.get(has_pgmap) != key:
            rec = np.zeros(8, dtype=np.uint64)
            rec[_W_FLAGS] = page_links(section << PFN_SECTION_SHIFT, nid) | (1 << PG_reserved)
            rec[_W_COUNTS] = _counts_word()
            if has_pgmap:
                rec[_W_LRU_NEXT] = pgmap
                rec[_W_LRU_PREV] = LIST_POISON2
            # (no pgmap: the lru words are per-page self-pointers, written after the copy)
            tmpl = np.empty((TEMPLATE_PAGES, 8), dtype=np.uint64)
            tmpl[:] = rec
            self._tmpl[has_pgmap] = tmpl
            self._key[has_pgmap] = key
            self._section[has_pgmap] = section
        elif self._section[has_pgmap] != section:
            tmpl[:, _W_FLAGS] = page_links(section << PFN_SECTION_SHIFT, nid) | (1 << PG_reserved)
            self._section[has_pgmap] = section
        return tmpl


class _ThreadCache(threading.local):
    def __init__(self) -> None:
        self.cache = TemplateCache()


_tls = _ThreadCache()


def thread_cache() -> TemplateCache:
    """The calling thread's :class:`TemplateCache`."""
    return _tls.cache


def init_range(
    records: np.ndarray,
    first_pfn: int,
    *,
    nid: int,
    pgmap: int,
    has_pgmap: bool,
    vmemmap_base: int = VMEMMAP_BASE,
    usemap: np.ndarray | None = None,
    usemap_first_pfn: int = 0,
    cache: TemplateCache | None = None,
) -> None:
    """Initialize ``records`` (record ``i`` is pfn ``first_pfn + i``) like :func:`init_page_reference`.

    ``records`` is a contiguous :data:`PAGE_DTYPE` array or its ``(n, 8)`` uint64 view. If
    ``usemap`` is given (one byte per pageblock, index ``(pfn >> 9) - (usemap_first_pfn >> 9)``),
    the pageblock of every pageblock-aligned pfn in the range is marked ``MIGRATE_MOVABLE``, as
    ``memmap_init_one()`` does with ``set_pageblock_migratetype()``.
    """
    words = as_words(records)
    n = words.shape[0]
    cache = cache if cache is not None else thread_cache()
    done = 0
    while done < n:
        pfn = first_pfn + done
        section = pfn >> PFN_SECTION_SHIFT
        # Stay within one section: the template's section bits are uniform.
        take = min(n - done, ((section + 1) << PFN_SECTION_SHIFT) - pfn)
        tmpl = cache.get(nid=nid, pgmap=pgmap, has_pgmap=has_pgmap, section=section,
                         vmemmap_base=vmemmap_base)
        dst = words[done : done + take]
        # Every byte of dst is written once, with its final value: a second initializer of the
        # same records (a stalled worker resuming work handed to another) writes what is
        # already there, so a reader never sees a record change after it was initialized.
        out = dst if has_pgmap else np.empty((take, 8), dtype=np.uint64)
        full = take - take % TEMPLATE_PAGES
        if full:
            np.copyto(out[:full].reshape(-1, TEMPLATE_PAGES, 8), tmpl)
        if take > full:
            np.copyto(out[full:], tmpl[: take - full])
        if not has_pgmap:
            # INIT_LIST_HEAD: both lru words point at the record's own lru field.
            lru = np.arange(pfn, pfn + take, dtype=np.uint64)
            lru *= np.uint64(RECORD_SIZE)
            lru += np.uint64((vmemmap_base + LRU_OFFSET) & 0xFFFFFFFFFFFFFFFF)
            out[:, _W_LRU_NEXT] = lru
            out[:, _W_LRU_PREV] = lru
            np.copyto(dst, out)
        done += take
    if usemap is not None and n:
        base_pb = usemap_first_pfn >> PAGEBLOCK_ORDER
        pb0 = -(-first_pfn // PAGEBLOCK_NR_PAGES)  # first pageblock-aligned pfn in range
        pb1 = -(-(first_pfn + n) // PAGEBLOCK_NR_PAGES)
        if pb1 > pb0:
            usemap[pb0 - base_pb : pb1 - base_pb] = MIGRATE_MOVABLE


# --- kpageflags / kpagecount (fs/proc/page.c) ----------------------------------------------------
_KPF_COPY = (
    (KPF_LOCKED, PG_locked), (KPF_SLAB, PG_slab), (KPF_ERROR, PG_error), (KPF_DIRTY, PG_dirty),
    (KPF_UPTODATE, PG_uptodate), (KPF_WRITEBACK, PG_writeback), (KPF_LRU, PG_lru),
    (KPF_REFERENCED, PG_referenced), (KPF_ACTIVE, PG_active), (KPF_RECLAIM, PG_reclaim),
    (KPF_SWAPBACKED, PG_swapbacked), (KPF_UNEVICTABLE, PG_unevictable), (KPF_MLOCKED, PG_mlocked),
    (KPF_HWPOISON, PG_hwpoison), (KPF_UNCACHED, PG_uncached), (KPF_RESERVED, PG_reserved),
    (KPF_MAPPEDTODISK, PG_mappedtodisk), (KPF_PRIVATE, PG_private), (KPF_PRIVATE_2, PG_private_2),
    (KPF_OWNER_PRIVATE, PG_owner_priv_1), (KPF_ARCH, PG_arch_1), (KPF_IDLE, PG_idle),
)


def kpageflags_of(records: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``stable_page_flags()`` of each record (uint64), ``KPF_NOPAGE`` where ``present`` is False.

    Covers what a record can express: the copied page flags, ``KPF_MMAP`` (page_mapped:
    ``_mapcount >= 0``), compound head/tail (``PG_head`` / ``compound_head`` bit 0 of lru.next),
    and the ``page_type`` kinds kept in ``_mapcount`` (buddy, page table).
    """
    flags = records["flags"].astype(np.uint64)
    out = np.zeros(len(records), dtype=np.uint64)
    for kpf, pg in _KPF_COPY:
        out |= ((flags >> np.uint64(pg)) & np.uint64(1)) << np.uint64(kpf)
    mapcount = records["_mapcount"]
    out[mapcount >= 0] |= np.uint64(1 << KPF_MMAP)
    out |= ((flags >> np.uint64(PG_head)) & np.uint64(1)) << np.uint64(KPF_COMPOUND_HEAD)
    tail = (records["lru_next"] & np.uint64(1)).astype(bool)  # compound_head word, bit 0
    out[tail] |= np.uint64(1 << KPF_COMPOUND_TAIL)
    ptype = mapcount.view(np.uint32)
    out[(ptype & np.uint32(PAGE_TYPE_BASE | PG_buddy)) == PAGE_TYPE_BASE] |= np.uint64(1 << KPF_BUDDY)
    out[(ptype & np.uint32(PAGE_TYPE_BASE | PG_table)) == PAGE_TYPE_BASE] |= np.uint64(1 << KPF_PGTABLE)
    out[~present] = np.uint64(1 << KPF_NOPAGE)
    return out


def kpagecount_of(records: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``page_mapcount()`` (``_mapcount + 1``) of each record; 0 where ``present`` is False."""
    out = records["_mapcount"].astype(np.int64) + 1
    # A page_type page keeps its type in the _mapcount word (a large negative value): not mapped.
    out[out < 0] = 0
    out[~present] = 0
    return out.astype(np.uint64)
