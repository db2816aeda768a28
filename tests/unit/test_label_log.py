"""What the kernel says about label areas it cannot use, in the daemon's log: both index
blocks invalid (and why, in __nd_label_validate()'s words), a namespace labelled on only some
DIMMs of its set (scan_labels()' "nmemN missing label for UUID"), overlapping labels; and the
index checks themselves (labeloff)."""

from __future__ import annotations

import logging
import uuid as uuidlib
from pathlib import Path

import pytest
from label_image import ImageLabel, fletcher, geometry, get, image, put, read_image
from model_kit import Machine
from topologies import nfit

from vnvdimm.model.label_area import NFIT_TEST_LABEL_SIZE, nfit_test_fill
from vnvdimm.model.label_format import DimmLabelData

SIZE = NFIT_TEST_LABEL_SIZE
M = 1 << 20
_, ISIZE = geometry(SIZE, 256)


class Area:
    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)
        self.size = len(data)
        self.max_xfer = 4096

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data


def patch_index(area: bytearray, which: int, offset: int, value: int, width: int) -> None:
    """Change a field of index block `which` and give it a correct checksum again."""
    base = which * ISIZE
    put(area, base + offset, value, width)
    put(area, base + 64, 0, 8)
    put(area, base + 64, fletcher(bytes(area[base:base + ISIZE])), 8)


def model_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "vnvdimm.model")


def test_labeloff_must_point_right_after_the_two_index_blocks(caplog: pytest.LogCaptureFixture) -> None:
    uuid = uuidlib.uuid4()
    area = image(SIZE, 256, [ImageLabel(uuid, slot=0, dpa=0, rawsize=4 * M)])  # block 1 is current
    patch_index(area, 1, 48, 2 * ISIZE + 256, 8)
    assert DimmLabelData(Area(area), "nmem0").ns_current == 0  # the kernel falls back on block 0
    patch_index(area, 0, 48, 0, 8)
    with caplog.at_level(logging.DEBUG, "vnvdimm.model"):
        dimm = DimmLabelData(Area(area), "nmem0")
    assert dimm.ns_current == -1
    log = model_log(caplog)
    assert f"nmem0: nsindex1 labeloff: {2 * ISIZE + 256:#x} invalid (256-byte labels)" in log
    assert "nmem0: both namespace index blocks invalid (nsindex0 labeloff: 0x0 invalid, nsindex1 labeloff: " \
           f"{2 * ISIZE + 256:#x} invalid): the label area is not used" in log


def test_both_index_blocks_damaged_is_said_and_a_blank_area_is_not(caplog: pytest.LogCaptureFixture) -> None:
    area = image(SIZE, 256, [])
    area[20] ^= 0x4  # block 0's seq: its checksum no longer matches
    put(area, ISIZE + 20, 0, 4)
    put(area, ISIZE + 64, 0, 8)
    put(area, ISIZE + 64, fletcher(bytes(area[ISIZE:2 * ISIZE])), 8)  # block 1: seq 0, checksummed
    with caplog.at_level(logging.INFO, "vnvdimm.model"):
        assert DimmLabelData(Area(area), "nmem3").ns_current == -1
        assert DimmLabelData(Area(nfit_test_fill(0) + bytes(SIZE - 7)), "nmem4").ns_current == -1
    log = model_log(caplog)
    assert "nmem3: both namespace index blocks invalid (nsindex0 checksum invalid, nsindex1 sequence: 0x0 " \
           "invalid)" in log, log
    assert "nmem4" not in log  # a new DIMM's blank area is nothing to report


def label_area_file(m: Machine, dimm: int) -> Path:
    return m.state.label_area_path(dimm)


def test_a_namespace_labelled_on_some_dimms_only_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = Machine(tmp_path / "state", nfit("128M 128M", "0,1: 32M raw"))
    m.boot()
    uuid = m.read("namespace0.0/uuid").strip()
    m.shutdown()
    label_area_file(m, 1).write_bytes(bytes(image(SIZE, 256, [])))  # nmem1 loses its label
    with caplog.at_level(logging.INFO, "vnvdimm.model"):
        m.boot()
    assert m.dev("region0").driver is None
    assert f"region0: nmem1 missing label for {uuid}: namespace labels not usable, region not enabled" \
        in model_log(caplog)
    m.shutdown()


def test_overlapping_labels_are_named_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = Machine(tmp_path / "state", nfit("128M 128M", "0,1: 32M raw; 32M raw"))
    m.boot()
    first, second = (m.read(f"namespace0.{i}/uuid").strip() for i in (0, 1))
    m.shutdown()
    for dimm in (0, 1):
        path = label_area_file(m, dimm)
        label_size, _, _, labels = read_image(path.read_bytes())
        lower = min(lab.dpa for lab in labels)
        for lab in labels:
            if str(lab.uuid) == second:
                lab.dpa = lower + 8 * M  # into the first namespace's 16M on this DIMM
        path.write_bytes(bytes(image(SIZE, label_size, labels)))
        assert get(path.read_bytes(), 48, 8) == 2 * ISIZE
    with caplog.at_level(logging.INFO, "vnvdimm.model"):
        m.boot()
    log = model_log(caplog)
    assert f"region0: labels of {second} (offset 0x1000000, size 0x2000000, on nmem0, nmem1) overlap those of " \
           f"{first} (up to 0x2000000): namespace skipped" in log, log
    uuids = [str(ns.uuid) for ns in m.dev("region0").namespaces if ns.uuid is not None]  # type: ignore[attr-defined]
    assert uuids == [first]
    m.shutdown()
