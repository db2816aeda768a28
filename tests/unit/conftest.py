"""Shared by the memmap unit tests: the kernel oracle's page records."""

from __future__ import annotations

import kernel_oracle as K
import numpy as np
import pytest

from vnvdimm.memmap import PAGE_DTYPE


def build_expected_records(first_pfn: int, n: int, *, nid: int, pgmap: int, has_pgmap: bool) -> np.ndarray:
    """Records as the kernel leaves them (kernel_oracle.page_records, written from the struct
    page layout and memmap_init_one(), not from vnvdimm's initializer), as PAGE_DTYPE: the
    tests' oracle for whole arrays."""
    return K.page_records(first_pfn, n, nid=nid, pgmap=pgmap, has_pgmap=has_pgmap).view(PAGE_DTYPE)


@pytest.fixture
def expected_records():  # type: ignore[no-untyped-def]
    """The :func:`build_expected_records` function (a fixture: test modules import no conftest)."""
    return build_expected_records
