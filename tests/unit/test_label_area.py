"""The raw label storage area of a DIMM: exact size, byte-faithful reads and writes at any
offset, bounds refused with EINVAL and nothing written, content kept across a reboot, and the
area exposed as `dimm.label_area` on every DIMM of an nfit platform."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_kit import NFIT_TWO, Machine

from vnvdimm.model.label_area import NFIT_TEST_LABEL_SIZE, NFIT_TEST_MAX_XFER, LabelArea, nfit_test_fill

SIZE = 8192


def test_fresh_area_holds_the_fill_then_zeroes(tmp_path: Path) -> None:
    area = LabelArea.create(tmp_path / "a.lsa", SIZE, 4096, nfit_test_fill(3))
    try:
        assert area.read(0, 7) == b"label3\0"
        assert area.read(7, SIZE - 7) == bytes(SIZE - 7)
        assert (tmp_path / "a.lsa").stat().st_size == SIZE
        assert (area.size, area.max_xfer) == (SIZE, 4096)
    finally:
        area.close()


@settings(max_examples=60, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, SIZE - 1), st.binary(min_size=0, max_size=600)), max_size=12))
def test_writes_read_back_byte_for_byte(tmp_path_factory: pytest.TempPathFactory,
                                        writes: list[tuple[int, bytes]]) -> None:
    path = tmp_path_factory.mktemp("area") / "a.lsa"
    expected = bytearray(SIZE)
    area = LabelArea.create(path, SIZE, 4096)
    try:
        for offset, data in writes:
            data = data[: SIZE - offset]
            area.write(offset, data)
            expected[offset:offset + len(data)] = data
        assert area.read(0, SIZE) == bytes(expected)
    finally:
        area.close()
    reopened = LabelArea(path, SIZE, 4096)  # persisted, nothing cached
    try:
        assert reopened.read(0, SIZE) == bytes(expected)
    finally:
        reopened.close()


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (SIZE, 1), (SIZE - 4, 5), (0, SIZE + 1), (0, -1)])
def test_out_of_range_is_einval_and_changes_nothing(tmp_path: Path, offset: int, length: int) -> None:
    area = LabelArea.create(tmp_path / "a.lsa", SIZE, 4096, b"keep")
    try:
        with pytest.raises(OSError) as e:
            area.read(offset, length)
        assert e.value.errno == errno.EINVAL
        if length > 0:  # a write's length is its data's
            with pytest.raises(OSError) as e:
                area.write(offset, b"x" * length)
            assert e.value.errno == errno.EINVAL
        assert area.read(0, SIZE) == b"keep" + bytes(SIZE - 4)
    finally:
        area.close()


def test_a_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.lsa").write_bytes(bytes(100))
    with pytest.raises(ValueError, match="100 bytes"):
        LabelArea(tmp_path / "a.lsa", SIZE, 4096)


def test_reset_restores_the_fresh_area(tmp_path: Path) -> None:
    area = LabelArea.create(tmp_path / "a.lsa", SIZE, 4096, b"label0\0")
    try:
        area.write(100, b"\xff" * 300)
        area.reset(b"label0\0")
        assert area.read(0, SIZE) == b"label0\0" + bytes(SIZE - 7)
    finally:
        area.close()


def test_every_nfit_dimm_has_a_label_area_that_survives_reboot(tmp_path: Path) -> None:
    machine = Machine(tmp_path, NFIT_TWO)
    try:
        system = machine.boot()
        dimms = system.buses[0].dimms
        assert len(dimms) == 4
        for dimm in dimms:
            area = dimm.label_area
            assert area is not None
            assert (area.size, area.max_xfer) == (NFIT_TEST_LABEL_SIZE, NFIT_TEST_MAX_XFER)
        dimms[2].label_area.write(4096, b"written by a test")  # type: ignore[union-attr]
        system = machine.boot()
        assert system.buses[0].dimms[2].label_area.read(4096, 17) == b"written by a test"  # type: ignore[union-attr]
    finally:
        machine.shutdown()
