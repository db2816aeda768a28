"""The device model on an NFIT platform with labelled (nstype 5) regions, without a mount:
DIMMs, interleave sets, namespace creation and deletion through the namespace seed's
attributes (namespace_devs.c), capacity accounting and the labels that persist it.

Platform: four 128 MiB DIMMs; region0 interleaves nmem0+nmem1 (256 MiB) and was provisioned
with one 64 MiB fsdax (map=mem) namespace named "first"; region1 (nmem2+nmem3) is empty.
"""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest
from label_image import read_image
from model_kit import NFIT_TWO, Machine, machine

M = 1 << 20


@pytest.fixture
def m(tmp_path: Path):  # type: ignore[no-untyped-def]
    with machine(tmp_path, NFIT_TWO) as mach:
        yield mach


def create(m: Machine, region: int, size: int, name: str = "") -> str:
    """ndctl create-namespace -r regionN -s SIZE -m raw: the seed's uuid, alt_name, size,
    sector_size, then the bind loop."""
    seed = m.read(f"region{region}/namespace_seed").strip()
    m.write(f"{seed}/uuid", str(uuid.uuid4()))
    m.write(f"{seed}/alt_name", name)
    m.write(f"{seed}/size", f"{size:#x}\n")
    m.write(f"{seed}/sector_size", "512\n")
    m.write("drivers/nd_pmem/bind", seed)
    return seed


def destroy(m: Machine, ns: str) -> None:
    m.write("drivers/nd_pmem/unbind", ns)
    m.write(f"{ns}/size", "0\n")


def test_boot(m: Machine) -> None:
    assert m.read("ndbus0/provider") == "ACPI.NFIT\n"
    assert m.read("ndbus0/commands") == "ars_cap ars_start ars_status clear_error cmd_call \n"
    assert m.read("ndbus0/nfit/revision") == "1\n"
    # region0: the labelled namespace, claimed by the pfn found on its media; since that
    # claim probed, a fresh zero-sized seed was planted
    assert m.read("namespace0.0/holder") == "pfn0.1\n"
    assert m.read("namespace0.0/alt_name") == "first\n"
    assert m.read("namespace0.0/size") == f"{64 * M}\n"
    assert m.read("region0/namespace_seed") == "namespace0.1\n"
    assert m.read("namespace0.1/size") == "0\n"
    # region1 had no labels: scan_labels() published one zero-sized namespace, the seed
    assert m.read("region1/namespace_seed") == "namespace1.0\n"
    assert m.read("region0/init_namespaces") == m.read("region1/init_namespaces") == "1/1\n"
    assert m.dev("namespace1.0").driver is None  # a zero-sized namespace does not probe


def test_region_and_dimm_attributes(m: Machine) -> None:
    assert m.read("region0/nstype") == "5\n"
    assert m.read("region0/size") == f"{256 * M}\n"
    assert m.read("region0/mappings") == "2\n"
    assert m.read("region0/mapping0") == f"nmem0,0,{128 * M},0\n"
    assert m.read("region0/mapping1") == f"nmem1,0,{128 * M},1\n"
    assert m.read("region1/mapping0") == f"nmem2,0,{128 * M},0\n"
    assert m.read("region0/available_size") == f"{192 * M}\n"
    assert m.read("region0/max_available_extent") == f"{192 * M}\n"
    assert m.read("region1/available_size") == f"{256 * M}\n"
    assert m.read("region0/persistence_domain") == "memory_controller\n"
    assert m.read("region0/deep_flush") == "0\n"
    assert m.attr("region0/deep_flush").mode == 0o444  # nvdimm_has_flush() == 0: no flush hints
    cookie = m.read("region0/set_cookie")
    assert cookie.startswith("0x") and int(cookie, 16) != 0 and cookie != m.read("region1/set_cookie")
    assert m.read("region0/nfit/range_index") == "1\n"
    assert [m.read(f"nmem{i}/dev") for i in range(4)] == [f"241:{i}\n" for i in range(4)]
    # what the platform's Intel-family DIMMs answer (health, label area, firmware update and
    # activation, latch shutdown status, security: functions 19-28), and the standard commands among them
    # (acpi_nfit_register_dimms)
    assert [m.read(f"nmem{i}/commands") for i in range(4)] == [
        "smart smart_thresh get_size get_data set_data cmd_call \n"] * 4
    assert m.read("nmem0/nfit/dsm_mask") == "0x7ffff476\n" and m.read("nmem0/nfit/family") == "0\n"
    assert m.read("nmem0/nfit/handle") == "0\n"  # printf("%#x", 0)
    assert m.read("nmem1/nfit/handle") == "0x1\n"
    assert m.read("nmem0/nfit/phys_id") == "0x10\n"
    assert m.read("nmem0/state") == "active\n"
    assert m.read("nmem0/modalias") == "nd:t1\n"


def test_seed_attributes(m: Machine) -> None:
    assert m.read("namespace1.0/nstype") == "5\n"
    assert m.read("namespace1.0/modalias") == "nd:t5\n"
    assert m.read("namespace1.0/uuid") == "\n"
    assert m.read("namespace1.0/alt_name") == "\n"
    assert m.read("namespace1.0/sector_size") == "[512] 4096 \n"
    assert m.read("namespace1.0/mode") == "raw\n"
    assert m.read("namespace1.0/dpa_extents") == "0\n"
    assert m.read("namespace0.0/dpa_extents") == "2\n"
    with pytest.raises(OSError) as e:
        m.read("namespace1.0/resource")  # no address to convey without an allocation
    assert e.value.errno == errno.ENXIO
    assert m.attr("namespace1.0/size").mode == 0o644
    assert m.attr("namespace1.0/resource").mode == 0o400


def test_create_enable_and_reboot(tmp_path: Path) -> None:
    with machine(tmp_path, NFIT_TWO) as m:
        ns = create(m, 1, 32 * M, "mine")
        assert ns == "namespace1.0"
        assert m.dev(ns).driver.name == "nd_pmem"
        assert m.dev(ns).disk.name == "pmem1"  # id 0: no ".0" in the disk name
        assert m.read("region1/namespace_seed") == "namespace1.1\n"
        assert m.read("region1/available_size") == f"{224 * M}\n"
        assert int(m.read(f"{ns}/resource"), 16) == int(m.read("region1/resource"), 16)
        ns2 = create(m, 1, 64 * M)
        assert ns2 == "namespace1.1" and m.dev(ns2).disk.name == "pmem1.1"
        assert int(m.read(f"{ns2}/resource"), 16) == int(m.read("region1/resource"), 16) + 32 * M
        uuids = {n: m.read(f"{n}/uuid") for n in (ns, ns2)}
    m = Machine(tmp_path / "state", None)
    m.boot()
    try:
        assert {n: m.read(f"{n}/uuid") for n in ("namespace1.0", "namespace1.1")} == uuids
        assert m.read("namespace1.0/alt_name") == "mine\n"
        assert m.read("namespace1.1/size") == f"{64 * M}\n"
        assert m.read("region1/available_size") == f"{160 * M}\n"
        assert m.read("region1/namespace_seed") == "namespace1.2\n"
        assert m.read("region1/init_namespaces") == "2/2\n"
    finally:
        m.shutdown()


def test_labels_are_in_each_dimms_label_area(m: Machine) -> None:
    """The labels are the kernel's bytes in each DIMM's label storage area (labels/nmemN.lsa),
    read back here by an independent reader of the format."""
    create(m, 1, 32 * M, "mine")
    state = m.state.path
    images = [read_image((state / "labels" / f"nmem{i}.lsa").read_bytes()) for i in (2, 3)]
    labels = [[lab for lab in found if lab.name == b"mine"] for _, _, _, found in images]
    assert [len(x) for x in labels] == [1, 1]
    (a,), (b,) = labels
    assert str(a.uuid) == str(b.uuid) == m.read("namespace1.0/uuid").strip()
    assert (a.position, b.position) == (0, 1) and a.nlabel == b.nlabel == 2
    assert a.rawsize == b.rawsize == 16 * M  # each DIMM holds half of the interleave
    assert a.cookie == b.cookie == int(m.read("region1/set_cookie"), 16)
    assert [size for size, _, _, _ in images] == [256, 256]  # blank DIMMs get v1.2 labels, as the kernel's
    assert not list((state / "labels").glob(".*.tmp"))


@pytest.mark.parametrize("value,code", [
    (b"0x1000000\n", errno.ENXIO),  # no uuid yet
])
def test_size_needs_a_uuid(m: Machine, value: bytes, code: int) -> None:
    before = m.snapshot()
    assert m.errno_of("namespace1.0/size", value) == code
    assert m.snapshot() == before


@pytest.mark.parametrize("value,code", [
    (b"0x800000", errno.EINVAL),  # not a multiple of the region align (16 MiB)
    (b"4096", errno.EINVAL),
    (b"0x11000000", errno.ENOSPC),  # 272 MiB > the region
    (b"16M", errno.EINVAL),
    (b"-16777216", errno.EINVAL),
    (b"99999999999999999999", errno.ERANGE),
])
def test_size_store_rejects(m: Machine, value: bytes, code: int) -> None:
    m.write("namespace1.0/uuid", str(uuid.uuid4()))
    before = m.snapshot()
    assert m.errno_of("namespace1.0/size", value) == code
    assert m.snapshot() == before


def test_size_store_of_an_enabled_namespace(m: Machine) -> None:
    ns = create(m, 1, 32 * M)
    before = m.snapshot()
    assert m.errno_of(f"{ns}/size", "0x2000000") == errno.EBUSY
    assert m.errno_of(f"{ns}/size", "junk") == errno.EINVAL  # size_store() parses first
    for attr, value in (("uuid", str(uuid.uuid4())), ("alt_name", "x"), ("sector_size", "4096"),
                        ("holder_class", "pfn")):
        assert m.errno_of(f"{ns}/{attr}", value) == errno.EBUSY, attr
    assert m.snapshot() == before


def test_smaller_region_align_allows_smaller_namespaces(m: Machine) -> None:
    m.write("region1/align", "0x2000")  # two ways: 4 KiB per DIMM
    m.write("namespace1.0/uuid", str(uuid.uuid4()))
    m.write("namespace1.0/size", "0x2000")  # the kernel has no 16 MiB minimum here
    assert m.read("namespace1.0/size") == "8192\n"
    assert m.errno_of("namespace1.0/size", "0x3000") == errno.EINVAL


def test_fill_the_region_then_destroy_and_create_again(m: Machine) -> None:
    names = [create(m, 1, 64 * M) for _ in range(4)]
    assert names == ["namespace1.0", "namespace1.1", "namespace1.2", "namespace1.3"]
    assert m.read("region1/available_size") == "0\n"
    assert m.read("region1/max_available_extent") == "0\n"
    seed = m.read("region1/namespace_seed").strip()
    assert seed == "namespace1.4"
    m.write(f"{seed}/uuid", str(uuid.uuid4()))
    assert m.errno_of(f"{seed}/size", f"{16 * M}") == errno.ENOSPC
    destroy(m, "namespace1.1")  # not the seed, not id 0: unregistered
    assert not m.has("namespace1.1")
    assert m.read("region1/available_size") == f"{64 * M}\n"
    destroy(m, "namespace1.0")  # id 0 stays, zero-sized, its uuid cleared
    assert m.read("namespace1.0/size") == "0\n"
    assert m.read("namespace1.0/uuid") == "\n"
    assert m.read("region1/available_size") == f"{128 * M}\n"
    assert m.read("region1/max_available_extent") == f"{128 * M}\n"  # [0, 128M) is free in one piece
    m.write(f"{seed}/size", f"{128 * M:#x}")
    m.write("drivers/nd_pmem/bind", seed)
    assert int(m.read(f"{seed}/resource"), 16) == int(m.read("region1/resource"), 16)
    assert m.read("region1/available_size") == "0\n"


def test_uuid_must_be_unique_on_the_bus(m: Machine) -> None:
    first = m.read("namespace0.0/uuid").strip()
    pfn = m.read("pfn0.1/uuid").strip()
    before = m.snapshot()
    assert m.errno_of("namespace1.0/uuid", first) == errno.EINVAL  # another region's namespace
    assert m.errno_of("namespace1.0/uuid", pfn) == errno.EINVAL  # a pfn's uuid
    assert m.snapshot() == before
    fresh = str(uuid.uuid4())
    m.write("dax1.0/uuid", fresh)
    m.write("namespace1.0/uuid", fresh)  # nd_is_uuid_unique() does not look at nd dax devices
    assert m.read("namespace1.0/uuid") == f"{fresh}\n"
    assert m.errno_of("namespace1.0/uuid", fresh) == errno.EINVAL  # its own current uuid too


def test_renaming_a_uuid_needs_labels_on_every_dimm(m: Machine) -> None:
    # namespace_update_uuid(): with an old uuid set, an interleave set without labels is EBUSY
    m.write("namespace1.0/uuid", str(uuid.uuid4()))
    before = m.snapshot()
    assert m.errno_of("namespace1.0/uuid", str(uuid.uuid4())) == errno.EBUSY
    assert m.snapshot() == before
    # region0 holds labels (namespace0.0): its seed can be renamed
    m.write("namespace0.1/uuid", str(uuid.uuid4()))
    renamed = uuid.uuid4()
    m.write("namespace0.1/uuid", str(renamed))
    assert m.read("namespace0.1/uuid") == f"{renamed}\n"


@pytest.mark.parametrize("value,shown", [
    (b"name", "name"), (b"name\n", "name"), (b"  two words \t\n\0junk", "two words"), (b"\n", ""),
    (b"x" * 63, "x" * 63), (b"\xffraw\xfe", "\xffraw\xfe"),
])
def test_alt_name_store(m: Machine, value: bytes, shown: str) -> None:
    m.write("namespace1.0/alt_name", value)
    got = m.read("namespace1.0/alt_name").encode("utf-8", "surrogateescape")
    assert got == shown.encode("latin-1") + b"\n"


def test_alt_name_too_long(m: Machine) -> None:
    before = m.snapshot()
    assert m.errno_of("namespace1.0/alt_name", b"x" * 64) == errno.EINVAL
    assert m.errno_of("namespace1.0/alt_name", b" " + b"y" * 64 + b"\n") == errno.EINVAL
    assert m.snapshot() == before


@pytest.mark.parametrize("value,code", [
    (b"4096\n", None), (b"512", None), (b"0x1000", None), (b"520", errno.EINVAL), (b"4224", errno.EINVAL),
    (b"big", errno.EINVAL),
])
def test_pmem_namespace_sector_size(m: Machine, value: bytes, code: int | None) -> None:
    assert m.errno_of("namespace1.0/sector_size", value) == code
    if code is None:
        assert f"[{int(value, 0)}] " in m.read("namespace1.0/sector_size")


def test_nfit_scrub_attributes(m: Machine) -> None:
    assert m.read("ndbus0/nfit/scrub") == "0\n"
    before = m.snapshot()
    for bad in (b"0", b"2", b"-1", b"yes", b"9223372036854775808"):
        assert m.errno_of("ndbus0/nfit/scrub", bad) in (errno.EINVAL, errno.ERANGE), bad
    assert m.snapshot() == before
    m.write("ndbus0/nfit/scrub", "1\n")
    assert m.read("ndbus0/nfit/scrub") == "1\n"  # one scrub done, none running
    m.write("ndbus0/nfit/hw_error_scrub", "0")
    assert m.read("ndbus0/nfit/hw_error_scrub") == "0\n"
    assert m.errno_of("ndbus0/nfit/hw_error_scrub", "2") == errno.EINVAL
    assert m.read("ndbus0/nfit/hw_error_scrub") == "0\n"


def test_a_new_region_align_does_not_drop_namespaces_at_the_next_probe(m: Machine) -> None:
    ns = create(m, 1, 32 * M, "kept")
    uuid_before = m.read(f"{ns}/uuid")
    m.write("region1/align", "0x4000000")  # 64 MiB: larger than the namespace
    m.write("drivers/nd_region/unbind", "region1")
    m.write("drivers/nd_region/bind", "region1")  # scan_labels() does not look at the align
    assert m.read(f"{ns}/uuid") == uuid_before
    assert m.read(f"{ns}/size") == f"{32 * M}\n"
    assert m.read(f"{ns}/alt_name") == "kept\n"


def test_btt_info_block_validation_follows_nd_btt_arena_is_valid(m: Machine) -> None:
    """nd_btt_version()/nd_btt_arena_is_valid(): a null parent_uuid matches any namespace;
    a v1.1 probe (info block at 4 KiB) wants version 1.1."""
    import struct

    from vnvdimm.model.infoblock import INFO_BLOCK_OFFSET, BttInfo, btt_arenas, btt_log_init, sb_checksum

    ns = create(m, 1, 64 * M)
    m.write("drivers/nd_pmem/unbind", ns)
    dev = m.dev(ns)
    (arena,) = btt_arenas(64 * M - 4096, 4096)
    block = BttInfo(uuid.uuid4(), uuid.UUID(int=0), arena).pack()
    dev.write_media(block, INFO_BLOCK_OFFSET)  # type: ignore[attr-defined]
    # (a BTT whose flog is all zeros has no log/padding indices: btt_init() would fail)
    dev.write_media(btt_log_init(arena), INFO_BLOCK_OFFSET + arena.logoff)  # type: ignore[attr-defined]
    assert m.errno_of("drivers/nd_pmem/bind", ns) == errno.ENXIO  # found a btt: claimed
    holder = m.read(f"{ns}/holder").strip()
    assert holder.startswith("btt1.") and m.dev(holder).driver is not None
    assert m.read(f"{holder}/sector_size").count("[4096]") == 1
    m.write("drivers/nd_pmem/unbind", holder)
    m.write(f"{holder}/namespace", "")
    v2 = bytearray(block)
    struct.pack_into("<HH", v2, 52, 2, 0)
    v2[4088:] = struct.pack("<Q", sb_checksum(bytes(v2)))
    dev.write_media(bytes(v2), INFO_BLOCK_OFFSET)  # type: ignore[attr-defined]
    m.write("drivers/nd_pmem/bind", ns)  # not a v1.1 BTT: the namespace is raw
    assert m.read(f"{ns}/holder") == "\n" and m.dev(ns).driver is not None
