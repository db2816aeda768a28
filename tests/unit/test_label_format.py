"""The kernel's label format: images made by an independent writer (and by a kernel) read back
as the namespaces they describe, vnvdimm's label updates read back by an independent reader,
round trips through create/resize/rename/delete, and damage handled the way label.c handles it."""

from __future__ import annotations

import errno
import uuid as uuidlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_image import ImageLabel, geometry, image, read_image

from vnvdimm.model.label_area import NFIT_TEST_LABEL_SIZE, nfit_test_fill
from vnvdimm.model.label_format import (
    DimmLabelData,
    InterleaveSet,
    InterleaveSetLabels,
    LabelMapping,
    ScannedNamespace,
)
from vnvdimm.model.label_layout import CLAIM_CLASS_GUIDS, NSLABEL_FLAG_UPDATING, best_seq, sizeof_namespace_index
from vnvdimm.model.nfit_iset import DcrIdentity, SetMember, interleave_set

M = 1 << 20
SIZE = NFIT_TEST_LABEL_SIZE
ISET = InterleaveSet(cookie1=0x1111_2222_3333_4444, cookie2=0x5555_6666_7777_8888, altcookie=0x9999)
NFIT_TEST_DATE = int.from_bytes((2016).to_bytes(2, "big"), "little")  # cpu_to_be16(2016) as stored


class Area:
    """A label area in memory (the product's LabelArea does the same on a file)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = bytearray(data)
        self.size = len(data)
        self.max_xfer = 4096

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        assert offset >= 0 and offset + len(data) <= self.size
        self.data[offset:offset + len(data)] = data


def region(areas: list[Area], start: int = 0, size: int = 16 * M, iset: InterleaveSet = ISET) -> InterleaveSetLabels:
    return InterleaveSetLabels([LabelMapping(DimmLabelData(a), start, size) for a in areas], iset)


# ---------------------------------------------------------------- formats and cookies


def test_index_geometry_of_a_128k_area() -> None:
    # 1016 slots of 128 bytes (v1.1) or 510 of 256 (v1.2), two 256-byte index blocks
    assert sizeof_namespace_index(SIZE, 128) == sizeof_namespace_index(SIZE, 256) == 256
    assert geometry(SIZE, 128) == (1016, 256) and geometry(SIZE, 256) == (510, 256)
    assert sizeof_namespace_index(512, 128) == 0  # too small for two blocks and labels


@pytest.mark.parametrize(("a", "b", "best"), [(1, 2, 2), (2, 3, 3), (3, 1, 1), (2, 1, 2), (1, 3, 1), (3, 3, 3),
                                              (0, 2, 2), (1, 0, 1)])
def test_best_sequence_number(a: int, b: int, best: int) -> None:
    assert best_seq(a, b) == best


def nfit_test_spa1() -> list[SetMember]:
    handles = (0x0, 0x1, 0x100, 0x101)
    offsets = (1 << 16, 1 << 24, 1 << 32, 1 << 40)
    return [SetMember(off, DcrIdentity(0xABCD, ~h & 0xFFFF_FFFF, NFIT_TEST_DATE, 0xA))
            for h, off in zip(handles, offsets, strict=True)]


def test_cookies_match_labels_written_by_a_kernel_on_nfit_test() -> None:
    """ndctl ships label images a kernel wrote on nfit_test's 4-way set (test/nmem1-4.bin of
    ndctl v76.1); their labels carry isetcookie 0x0803f6d70100fefb, the pre-4.11 sort order."""
    iset, positions = interleave_set(nfit_test_spa1())
    assert iset.altcookie == 0x0803F6D70100FEFB
    assert positions == [0, 1, 2, 3]
    assert iset.cookie1 != iset.altcookie and iset.cookie2 not in (iset.cookie1, 0)


def test_nfit_ids_as_the_kernel_formats_them() -> None:
    assert DcrIdentity(0xABCD, ~0x100 & 0xFFFF_FFFF, NFIT_TEST_DATE, 0xA).nfit_id == "cdab-0a-07e0-fffeffff"
    assert DcrIdentity(0xABCD, ~0 & 0xFFFF_FFFF, NFIT_TEST_DATE, 0xA, valid_fields=0).nfit_id == "cdab-ffffffff"


def test_positions_follow_the_region_offset_order() -> None:
    members = nfit_test_spa1()[::-1]
    _, positions = interleave_set(members)
    assert positions == [3, 2, 1, 0]


# ---------------------------------------------------------------- reading images made elsewhere


@pytest.mark.parametrize("label_size", [128, 256])
def test_images_of_the_independent_writer_describe_their_namespaces(label_size: int) -> None:
    cookie = ISET.cookie1 if label_size == 128 else ISET.cookie2
    a, b = uuidlib.uuid4(), uuidlib.uuid4()
    stranger = uuidlib.uuid4()
    per_dimm = []
    for pos in (0, 1):
        per_dimm.append(image(SIZE, label_size, [
            ImageLabel(b, slot=0, dpa=32 * M + 6 * M, rawsize=2 * M, position=pos, nlabel=2, cookie=cookie,
                       name=b"second", lbasize=4096, abstraction=CLAIM_CLASS_GUIDS["dax"]),
            ImageLabel(a, slot=3, dpa=32 * M, rawsize=4 * M, position=pos, nlabel=2, cookie=cookie, name=b"first"),
            # another interleave set's label on the same DIMM: skipped
            ImageLabel(stranger, slot=5, dpa=0, rawsize=4 * M, position=0, nlabel=1, cookie=0xDEAD),
        ]))
    found = region([Area(d) for d in per_dimm], start=32 * M, size=16 * M).scan()
    assert [(ns.uuid, ns.name.rstrip(b"\0"), ns.offset, ns.size, ns.lbasize) for ns in found] == [
        (a, b"first", 0, 8 * M, 0), (b, b"second", 12 * M, 4 * M, 4096)]
    assert found[1].claim_class == ("dax" if label_size == 256 else "")


def test_the_kernel_written_nfit_test_image_with_its_legacy_cookie() -> None:
    """A label set written with the old sort order (altcookie) is accepted, as the kernel does."""
    iset, _ = interleave_set(nfit_test_spa1())
    uuid = uuidlib.UUID("6830f039-7914-423e-bad6-22bda8fde8d6")
    areas = [Area(image(SIZE, 128, [ImageLabel(uuid, slot=0, dpa=16 * M, rawsize=16 * M, position=pos, nlabel=4,
                                               cookie=iset.altcookie, flags=NSLABEL_FLAG_UPDATING)], seqs=(3, 3)))
             for pos in range(4)]
    [ns] = region(areas, start=16 * M, size=16 * M, iset=iset).scan()
    assert (ns.uuid, ns.offset, ns.size) == (uuid, 0, 64 * M)


def test_a_label_missing_on_one_dimm_fails_the_region() -> None:
    uuid = uuidlib.uuid4()
    full = image(SIZE, 256, [ImageLabel(uuid, slot=0, dpa=0, rawsize=4 * M, position=0, nlabel=2, cookie=ISET.cookie2)])
    empty = image(SIZE, 256, [])
    with pytest.raises(OSError) as e:
        region([Area(full), Area(empty)]).scan()
    assert e.value.errno == errno.ENODEV


def test_label_outside_the_mapping_fails_the_region() -> None:
    uuid = uuidlib.uuid4()
    labs = [image(SIZE, 256, [ImageLabel(uuid, slot=0, dpa=4 * M, rawsize=20 * M, position=p, nlabel=2,
                                         cookie=ISET.cookie2)]) for p in (0, 1)]
    with pytest.raises(OSError) as e:
        region([Area(d) for d in labs]).scan()
    assert e.value.errno == errno.ENODEV


def test_v12_label_of_another_range_type_is_not_part_of_the_set() -> None:
    uuid = uuidlib.uuid4()
    area = image(SIZE, 256, [ImageLabel(uuid, slot=0, dpa=0, rawsize=4 * M, cookie=ISET.cookie2,
                                        type_guid=uuidlib.uuid4())])
    with pytest.raises(OSError):  # found on mapping 0 but matches no position
        region([Area(area)]).scan()


def test_the_fill_pattern_is_no_index() -> None:
    area = Area(nfit_test_fill(0) + bytes(SIZE - 7))
    dimm = DimmLabelData(area)
    assert (dimm.ns_current, dimm.ns_next, dimm.label_size) == (-1, -1, 256)
    assert region([area]).scan() == []


# ---------------------------------------------------------------- vnvdimm's writes, read independently


def ns(uuid: uuidlib.UUID, offset: int, size: int, name: bytes = b"", lbasize: int = 512,
       claim: str = "") -> ScannedNamespace:
    return ScannedNamespace(uuid, name.ljust(64, b"\0"), offset, size, lbasize, claim)


def test_first_namespace_on_blank_dimms_writes_v12_as_the_kernel_does() -> None:
    areas = [Area(nfit_test_fill(i) + bytes(SIZE - 7)) for i in range(2)]
    labels = region(areas, start=16 * M, size=16 * M)
    uuid = uuidlib.uuid4()
    labels.update(ns(uuid, 8 * M, 16 * M, b"web", 4096, "pfn"))
    for pos, area in enumerate(areas):
        label_size, current, seq, found = read_image(area.data)
        # init wrote seq 3 (block 0) and 2 (block 1); the first update wrote block 1 with
        # inc(2) = 3 (both blocks 3: the later one wins), the second block 0 with inc(3) = 1
        assert (label_size, current, seq) == (256, 0, 1)
        [lab] = found
        assert (lab.uuid, lab.name, lab.position, lab.nlabel, lab.flags) == (uuid, b"web", pos, 2, 0)
        assert (lab.dpa, lab.rawsize, lab.lbasize, lab.cookie) == (16 * M + 4 * M, 8 * M, 4096, ISET.cookie2)
        assert lab.abstraction == CLAIM_CLASS_GUIDS["pfn"]
        assert lab.type_guid == uuidlib.UUID("66f0d379-b4f3-4074-ac43-0d3318b78cdb")
        assert area.data[:7] != nfit_test_fill(pos)  # the index block replaced the fill


def test_v11_dimms_get_v11_labels_with_cookie1() -> None:
    areas = [Area(image(SIZE, 128, [])) for _ in range(2)]  # what `ndctl init-labels` leaves
    labels = region(areas)
    uuid = uuidlib.uuid4()
    labels.update(ns(uuid, 0, 4 * M))
    for area in areas:
        label_size, _, _, [lab] = read_image(area.data)
        assert (label_size, lab.cookie, lab.rawsize) == (128, ISET.cookie1, 2 * M)


def test_an_update_leaves_the_previous_index_describing_the_updating_label() -> None:
    area = Area(image(SIZE, 256, []))
    labels = region([area])
    uuid = uuidlib.uuid4()
    labels.update(ns(uuid, 0, 4 * M))
    # the older index block still points at the pass-one label, flagged UPDATING
    _, current, _, _ = read_image(area.data)
    older = bytearray(area.data)
    isize = 256
    older[current * isize:(current + 1) * isize] = bytes(isize)  # kill the current block
    _, _, _, [lab] = read_image(older)
    assert lab.flags == NSLABEL_FLAG_UPDATING and lab.uuid == uuid


# ---------------------------------------------------------------- round trips and damage

SLOT = 4 * M  # namespace i lives at offset i * SLOT, at most SLOT bytes

op = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 3), st.integers(1, 4),
              st.binary(max_size=63).filter(lambda b: b"\0" not in b),
              st.sampled_from([512, 4096]), st.sampled_from(["", "btt", "pfn", "dax"])),
    st.tuples(st.just("delete"), st.integers(0, 3)),
    st.tuples(st.just("rename"), st.integers(0, 3)),
)


def apply(labels: InterleaveSetLabels, state: dict[int, ScannedNamespace], step: tuple) -> bool:  # type: ignore[type-arg]
    """Perform `step`; whether it wrote labels."""
    kind, i = step[0], step[1]
    if kind == "set":
        _, _, pages, name, lbasize, claim = step
        uuid = state[i].uuid if i in state else uuidlib.uuid4()
        state[i] = ns(uuid, i * SLOT * len(labels.mappings), pages * M * len(labels.mappings), name, lbasize, claim)
        labels.update(state[i])
    elif i in state and kind == "delete":
        labels.delete(state.pop(i).uuid)
    elif i in state:
        old = state[i]
        state[i] = ScannedNamespace(uuidlib.uuid4(), old.name, old.offset, old.size, old.lbasize, old.claim_class)
        labels.update(state[i], old_uuid=old.uuid)
    else:
        return False
    return True


def expected(state: dict[int, ScannedNamespace], label_size: int) -> list[ScannedNamespace]:
    out = sorted(state.values(), key=lambda n: n.offset)
    if label_size == 256:
        return out
    return [ScannedNamespace(n.uuid, n.name, n.offset, n.size, n.lbasize, "") for n in out]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ways=st.sampled_from([1, 2, 4]), label_size=st.sampled_from([128, 256]), steps=st.lists(op, max_size=8))
def test_round_trip(ways: int, label_size: int, steps: list[tuple]) -> None:  # type: ignore[type-arg]
    areas = [Area(image(SIZE, label_size, [])) for _ in range(ways)]
    labels = region(areas, size=16 * M)
    state: dict[int, ScannedNamespace] = {}
    for step in steps:
        apply(labels, state, step)
        assert labels.scan() == expected(state, label_size)
    # what a reboot (DIMM probe) reads from the bytes is the same
    assert region(areas, size=16 * M).scan() == expected(state, label_size)
    for area in areas:  # and an independent reader agrees on what is in use
        _, _, _, found = read_image(area.data)
        assert {lab.uuid for lab in found} == {n.uuid for n in state.values()}
        assert all(lab.flags == 0 for lab in found)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(op, min_size=1, max_size=6), which=st.sampled_from(["current", "other"]),
       at=st.integers(0, 255), xor=st.integers(1, 255))
def test_damage_to_one_index_block(steps: list[tuple], which: str, at: int, xor: int) -> None:  # type: ignore[type-arg]
    """One damaged index block: the kernel uses the other one, which describes the namespaces
    either as they are or as they were before the last change (a delete is one index write)."""
    area = Area(image(SIZE, 256, []))
    labels = region([area], size=16 * M)
    state: dict[int, ScannedNamespace] = {}
    before: list[ScannedNamespace] = []
    for step in steps:
        previous = expected(state, 256)
        if apply(labels, state, step):
            before = previous
    current = DimmLabelData(area).ns_current
    block = current if which == "current" else 1 - current
    area.data[block * 256 + at] ^= xor
    found = region([area], size=16 * M).scan()
    if which == "other":
        assert found == expected(state, 256)
    else:
        assert found in (expected(state, 256), before)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(op, min_size=1, max_size=6), at=st.integers(0, 255), xor=st.integers(1, 255),
       pick=st.integers(0, 10))
def test_damage_to_a_v12_label(steps: list[tuple], at: int, xor: int, pick: int) -> None:  # type: ignore[type-arg]
    """A v1.2 label whose checksum fails is not a label: its namespace is gone (one DIMM)."""
    area = Area(image(SIZE, 256, []))
    labels = region([area], size=16 * M)
    state: dict[int, ScannedNamespace] = {}
    for step in steps:
        apply(labels, state, step)
    _, _, _, found = read_image(area.data)
    if not found:
        return
    victim = found[pick % len(found)]
    area.data[512 + victim.slot * 256 + at] ^= xor
    assert region([area], size=16 * M).scan() == [n for n in expected(state, 256) if n.uuid != victim.uuid]


@settings(max_examples=80, deadline=None)
@given(garbage=st.binary(min_size=0, max_size=1024), at=st.integers(0, 1024))
def test_arbitrary_bytes_never_crash_the_scan(garbage: bytes, at: int) -> None:
    area = Area(image(SIZE, 256, [ImageLabel(uuidlib.uuid4(), slot=0, dpa=0, rawsize=4 * M, cookie=ISET.cookie2)]))
    area.data[at:at + len(garbage)] = garbage
    area.data = area.data[:SIZE]
    try:
        region([area]).scan()
    except OSError as e:
        assert e.errno == errno.ENODEV


def test_label_area_file_round_trip(tmp_path: Path) -> None:
    from vnvdimm.model.label_area import LabelArea

    area = LabelArea.create(tmp_path / "nmem0.lsa", SIZE, 4096, nfit_test_fill(0))
    try:
        uuid = uuidlib.uuid4()
        region([area]).update(ns(uuid, 0, 4 * M, b"on disk"))  # type: ignore[list-item]
        [found] = region([LabelArea(tmp_path / "nmem0.lsa", SIZE, 4096)]).scan()  # type: ignore[list-item]
        assert (found.uuid, found.name.rstrip(b"\0"), found.size) == (uuid, b"on disk", 4 * M)
    finally:
        area.close()
