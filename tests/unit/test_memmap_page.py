"""The page record, its reference initializer and the vectorized one (no engine, no processes)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vnvdimm.memmap import PAGE_DTYPE, init_page_reference, init_range, init_range_naive
from vnvdimm.memmap import page as P

PGMAP = 0xFFFF888123400000


def test_dtype_layout() -> None:
    assert PAGE_DTYPE.itemsize == 64
    offsets = {name: PAGE_DTYPE.fields[name][1] for name in PAGE_DTYPE.names}
    assert offsets == {
        "flags": 0, "lru_next": 8, "lru_prev": 16, "mapping": 24, "index": 32, "private": 40,
        "_mapcount": 48, "_refcount": 52, "memcg_data": 56,
    }
    assert PAGE_DTYPE.fields["pgmap"][1] == 8
    assert PAGE_DTYPE.fields["zone_device_data"][1] == 16
    assert PAGE_DTYPE.fields["_mapcount"][0] == np.dtype("<i4")
    assert PAGE_DTYPE.fields["_refcount"][0] == np.dtype("<i4")


def test_flags_layout_constants() -> None:
    # 19 section + 6 node + 3 zone bits at the top of the word, below them the page flags.
    assert P.SECTIONS_PGSHIFT + P.SECTIONS_WIDTH == 64
    assert P.ZONES_PGSHIFT == 36
    assert P.PG_idle < P.ZONES_PGSHIFT
    assert P.PG_reserved == 11
    assert P.ZONE_DEVICE == 4
    assert P.LIST_POISON2 == 0xDEAD000000000200
    assert P.PAGES_PER_SECTION == 32768


@pytest.mark.parametrize("has_pgmap", [True, False])
def test_reference_field_by_field(has_pgmap: bool) -> None:
    pfn = 0x340000 + 0x8123  # section 0x68, not section aligned
    rec = init_page_reference(pfn, nid=3, pgmap=PGMAP, has_pgmap=has_pgmap)
    assert rec.dtype == PAGE_DTYPE and rec.tobytes().__len__() == 64
    flags = int(rec["flags"])
    assert flags >> 45 == pfn >> 15  # section
    assert (flags >> 39) & 0x3F == 3  # node
    assert (flags >> 36) & 0x7 == P.ZONE_DEVICE
    assert flags & ((1 << 36) - 1) == 1 << P.PG_reserved  # only PG_reserved among page flags
    assert int(rec["_refcount"]) == 1
    assert int(rec["_mapcount"]) == -1
    assert int(rec["mapping"]) == int(rec["index"]) == int(rec["private"]) == int(rec["memcg_data"]) == 0
    self_ptr = 0xFFFFEA0000000000 + pfn * 64 + 8
    if has_pgmap:
        assert int(rec["pgmap"]) == PGMAP
        assert int(rec["lru_prev"]) == P.LIST_POISON2
        assert int(rec["zone_device_data"]) == P.LIST_POISON2
    else:
        assert int(rec["lru_next"]) == self_ptr
        assert int(rec["lru_prev"]) == self_ptr


def test_independent_construction_matches_reference(expected_records) -> None:
    for has in (True, False):
        exp = expected_records(0x7FFF0, 40, nid=1, pgmap=PGMAP, has_pgmap=has)
        for i in range(40):
            assert exp[i].tobytes() == init_page_reference(0x7FFF0 + i, nid=1, pgmap=PGMAP,
                                                           has_pgmap=has).tobytes()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    first_pfn=st.one_of(
        st.integers(0, 1 << 30),
        # near a section boundary, so ranges cross it
        st.integers(1, 1 << 12).map(lambda s: (s << 15) - 37),
    ),
    npages=st.integers(1, 1200),
    has_pgmap=st.booleans(),
    nid=st.integers(0, 63),
)
def test_init_range_equals_reference(first_pfn: int, npages: int, has_pgmap: bool, nid: int, expected_records) -> None:
    rec = np.full(npages, 0xA5, dtype=np.uint8).repeat(64).view(PAGE_DTYPE)  # garbage first
    init_range(rec, first_pfn, nid=nid, pgmap=PGMAP, has_pgmap=has_pgmap)
    exp = expected_records(first_pfn, npages, nid=nid, pgmap=PGMAP, has_pgmap=has_pgmap)
    assert rec.tobytes() == exp.tobytes()
    # and record by record against the pure-Python reference, on a few pages
    for i in {0, npages // 2, npages - 1}:
        ref = init_page_reference(first_pfn + i, nid=nid, pgmap=PGMAP, has_pgmap=has_pgmap)
        assert rec[i].tobytes() == ref.tobytes()


def test_init_range_crosses_sections_and_pageblocks(expected_records) -> None:
    first = (5 << 15) - 1000  # 1000 pages before a section boundary, not pageblock aligned
    n = 3 * 32768
    rec = np.zeros(n, dtype=PAGE_DTYPE)
    usemap_first_pfn = first
    nblocks = ((first + n - 1) >> 9) - (first >> 9) + 1
    usemap = np.zeros(nblocks, dtype=np.uint8)
    init_range(rec, first, nid=2, pgmap=PGMAP, has_pgmap=True, usemap=usemap,
               usemap_first_pfn=usemap_first_pfn)
    assert rec.tobytes() == expected_records(first, n, nid=2, pgmap=PGMAP, has_pgmap=True).tobytes()
    # the first pageblock starts before `first`: its aligned pfn is not in the range -> unmarked
    assert usemap[0] == P.MIGRATE_UNMOVABLE
    assert (usemap[1:] == P.MIGRATE_MOVABLE).all()


def test_template_cache_follows_sections_and_params(expected_records) -> None:
    cache = P.TemplateCache()
    for first, nid, pgmap in [(0, 0, 1 << 20), (1 << 15, 0, 1 << 20), (3 << 15, 1, 1 << 21), (1 << 15, 0, 1 << 20)]:
        rec = np.zeros(100, dtype=PAGE_DTYPE)
        init_range(rec, first + 7, nid=nid, pgmap=pgmap, has_pgmap=True, cache=cache)
        assert rec.tobytes() == expected_records(first + 7, 100, nid=nid, pgmap=pgmap,
                                                 has_pgmap=True).tobytes()


def test_naive_equals_reference(expected_records) -> None:
    for has in (True, False):
        rec = np.zeros(50, dtype=PAGE_DTYPE)
        init_range_naive(rec, (1 << 15) - 25, nid=1, pgmap=PGMAP, has_pgmap=has)
        exp = expected_records((1 << 15) - 25, 50, nid=1, pgmap=PGMAP, has_pgmap=has)
        assert rec.tobytes() == exp.tobytes()


def test_kpageflags_and_kpagecount_of_fresh_pages(expected_records) -> None:
    rec = expected_records(0x1000, 4, nid=0, pgmap=PGMAP, has_pgmap=True)
    present = np.array([True, True, False, True])
    flags = P.kpageflags_of(rec, present)
    assert list(flags) == [1 << P.KPF_RESERVED, 1 << P.KPF_RESERVED, 1 << P.KPF_NOPAGE, 1 << P.KPF_RESERVED]
    assert list(P.kpagecount_of(rec, present)) == [0, 0, 0, 0]
    # a mapped, dirty, locked page
    rec[0]["_mapcount"] = 2
    rec[0]["flags"] |= np.uint64((1 << P.PG_dirty) | (1 << P.PG_locked))
    flags = P.kpageflags_of(rec, present)
    assert int(flags[0]) == (1 << P.KPF_RESERVED) | (1 << P.KPF_MMAP) | (1 << P.KPF_DIRTY) | 1
    assert int(P.kpagecount_of(rec, present)[0]) == 3
