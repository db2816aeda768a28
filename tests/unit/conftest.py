"""Shared by the memmap unit tests: an independent construction of expected page records."""

from __future__ import annotations

import numpy as np
import pytest

from vnvdimm.memmap import PAGE_DTYPE
from vnvdimm.memmap import page as P


def build_expected_records(first_pfn: int, n: int, *, nid: int, pgmap: int, has_pgmap: bool,
                     vmemmap_base: int = P.VMEMMAP_BASE) -> np.ndarray:
    """Records built field by field from the definitions (no template): the tests' oracle for
    whole arrays, itself checked against ``init_page_reference`` in test_memmap_page.py."""
    pfn = np.arange(first_pfn, first_pfn + n, dtype=np.uint64)
    out = np.zeros(n, dtype=PAGE_DTYPE)
    out["flags"] = (
        ((pfn >> np.uint64(15)) << np.uint64(45))
        | np.uint64(nid << 39)
        | np.uint64(P.ZONE_DEVICE << 36)
        | np.uint64(1 << 11)
    )
    out["_refcount"] = 1
    out["_mapcount"] = -1
    if has_pgmap:
        out["lru_next"] = pgmap
        out["lru_prev"] = P.LIST_POISON2
    else:
        self_ptr = np.uint64(vmemmap_base) + pfn * np.uint64(64) + np.uint64(8)
        out["lru_next"] = self_ptr
        out["lru_prev"] = self_ptr
    return out


@pytest.fixture
def expected_records():  # type: ignore[no-untyped-def]
    """The :func:`build_expected_records` function (a fixture: test modules import no conftest)."""
    return build_expected_records
