"""The device model on a label-less (e820) platform, without a mount: what the drivers probe
at boot, the driver core's errno, claims and personalities (claim.c, pfn_devs.c, btt_devs.c,
dax_devs.c), seeds, and persistence through the info blocks on the media.

Platform: four 64 MiB e820 regions provisioned as fsdax (map=dev), devdax (map=mem), raw and
sector (4096). At boot, as in the kernel, each region registers its IO namespace and the
btt/pfn/dax seeds (id 0) first; the namespace probe then finds the info block and creates the
personality that claims it (id 1).
"""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest
from model_kit import Machine, machine

from vnvdimm.model.infoblock import INFO_BLOCK_OFFSET, PfnInfo

SZ_64M = 64 << 20
MAP_DEV_SIZE = SZ_64M - (2 << 20)  # roundup(8K + 64 * npfns, 2M) = 2M of info block + memmap
MAP_MEM_SIZE = SZ_64M - (2 << 20)  # roundup(8K, 2M)


def btt_size(ns_size: int, lbasize: int) -> int:
    """btt.c create_arenas() + alloc_arena() for a BTT v1.1 (4 KiB initial offset), one arena."""
    available = ns_size - 4096
    available -= available % 4096
    available -= 2 * 4096  # info block + its copy
    available -= 256 * 64  # the log: nfree (ND_MAX_LANES) groups of 64 bytes, page rounded
    internal = -(-lbasize // 64) * 64
    internal_nlba = (available - 4096) // (internal + 4)
    return (internal_nlba - 256) * lbasize


@pytest.fixture
def m(tmp_path: Path):  # type: ignore[no-untyped-def]
    with machine(tmp_path) as mach:
        yield mach


def driver_of(m: Machine, name: str) -> str | None:
    dev = m.dev(name)
    return dev.driver.name if dev.driver else None


# ---------------------------------------------------------------- boot


def test_boot_creates_seeds_first_then_the_personalities_found_on_the_media(m: Machine) -> None:
    bound = {d.name: (type(d).__name__, d.driver.name if d.driver else None) for d in m.sys.bus_devices("nd")}
    assert bound == {
        "ndbus0": ("NvdimmBus", "nd_bus"),
        "region0": ("Region", "nd_region"), "region1": ("Region", "nd_region"),
        "region2": ("Region", "nd_region"), "region3": ("Region", "nd_region"),
        "namespace0.0": ("NamespaceIo", None), "namespace1.0": ("NamespaceIo", None),
        "namespace2.0": ("NamespaceIo", "nd_pmem"), "namespace3.0": ("NamespaceIo", None),
        "btt0.0": ("Btt", None), "pfn0.0": ("Pfn", None), "dax0.0": ("Dax", None), "pfn0.1": ("Pfn", "nd_pmem"),
        "btt1.0": ("Btt", None), "pfn1.0": ("Pfn", None), "dax1.0": ("Dax", None), "dax1.1": ("Dax", "dax_pmem"),
        "btt2.0": ("Btt", None), "pfn2.0": ("Pfn", None), "dax2.0": ("Dax", None),
        "btt3.0": ("Btt", None), "pfn3.0": ("Pfn", None), "dax3.0": ("Dax", None), "btt3.1": ("Btt", "nd_pmem"),
    }
    # the device-dax instance is named after the namespace (dax1.0), on the dax bus
    assert [(d.name, d.driver.name) for d in m.sys.bus_devices("dax")] == [("dax1.0", "device_dax")]
    assert [m.dev(n).disk.name for n in ("pfn0.1", "namespace2.0", "btt3.1")] == ["pmem0", "pmem2", "pmem3s"]


def test_region_attributes(m: Machine) -> None:
    for r in range(4):
        assert m.read(f"region{r}/size") == f"{SZ_64M}\n"
        assert m.read(f"region{r}/align") == "0x1000000\n"
        assert m.read(f"region{r}/nstype") == "4\n"
        assert m.read(f"region{r}/mappings") == "0\n"
        assert m.read(f"region{r}/btt_seed") == f"btt{r}.0\n"
        assert m.read(f"region{r}/pfn_seed") == f"pfn{r}.0\n"
        assert m.read(f"region{r}/dax_seed") == f"dax{r}.0\n"
        # nd_region_register_namespaces(): the IO namespace is the region's namespace seed
        assert m.read(f"region{r}/namespace_seed") == f"namespace{r}.0\n"
        assert m.read(f"region{r}/init_namespaces") == "1/1\n"
        assert m.read(f"region{r}/max_available_extent") == "0\n"
        assert m.read(f"region{r}/read_only") == "0\n"
        assert m.read(f"region{r}/modalias") == "nd:t2\n"
        assert m.read(f"region{r}/badblocks") == ""
        # region_visible(): no interleave set, no labels
        for hidden in ("available_size", "set_cookie", "deep_flush", "persistence_domain", "mapping0"):
            assert not m.exists(f"region{r}/{hidden}")
    starts = [int(m.read(f"region{r}/resource"), 16) for r in range(4)]
    assert starts == sorted(starts) and all(s % (1 << 30) == 0 for s in starts)
    assert m.attr("region0/resource").mode == 0o400


def test_namespace_and_personality_attributes(m: Machine) -> None:
    assert [m.read(f"namespace{r}.0/mode") for r in range(4)] == ["memory\n", "dax\n", "memory\n", "safe\n"]
    assert [m.read(f"namespace{r}.0/holder") for r in range(4)] == ["pfn0.1\n", "dax1.1\n", "\n", "btt3.1\n"]
    assert [m.read(f"namespace{r}.0/size") for r in range(4)] == [f"{SZ_64M}\n"] * 4
    assert m.read("namespace0.0/nstype") == "4\n"
    assert m.read("namespace0.0/modalias") == "nd:t4\n"
    assert m.read("namespace0.0/force_raw") == "0\n"
    assert not m.exists("namespace0.0/uuid")  # IO namespaces have no uuid, alt_name, sector_size
    assert not m.exists("namespace0.0/alt_name")
    assert m.read("pfn0.1/mode") == "pmem\n"
    assert m.read("pfn0.1/namespace") == "namespace0.0\n"
    assert m.read("pfn0.1/align") == "2097152\n"
    assert m.read("pfn0.1/size") == f"{MAP_DEV_SIZE}\n"
    assert int(m.read("pfn0.1/resource"), 16) == int(m.read("region0/resource"), 16) + (2 << 20)
    assert m.read("pfn0.1/supported_alignments") == "4096 2097152 1073741824 \n"
    assert m.read("pfn0.1/modalias") == "nd:t4\n"
    assert m.read("dax1.1/modalias") == "nd:t7\n"
    assert m.read("dax1.1/mode") == "ram\n"
    assert m.read("dax1.1/size") == f"{MAP_MEM_SIZE}\n"
    assert m.read("dax1.1/dax_region/size") == f"{MAP_MEM_SIZE}\n"
    assert m.read("dax1.1/dax_region/align") == "2097152\n"
    assert m.read("dax1.1/dax_region/id") == "1\n"
    assert m.read("daxdev/dax1.0/size") == f"{MAP_MEM_SIZE}\n"
    assert m.read("daxdev/dax1.0/align") == "2097152\n"
    assert m.read("btt3.1/sector_size") == "512 520 528 [4096] 4104 4160 4224 \n"
    assert m.read("btt3.1/size") == f"{btt_size(SZ_64M, 4096)}\n"
    assert m.read("btt3.1/log_zero_flags") == "Y\n"
    # seeds: empty settings, and no address or size to convey while disabled
    assert m.read("pfn0.0/uuid") == "\n"
    assert m.read("pfn0.0/mode") == "none\n"
    assert m.read("pfn0.0/namespace") == "\n"
    assert m.read("btt0.0/sector_size") == "512 520 528 4096 4104 4160 4224 \n"
    for path in ("pfn0.0/resource", "pfn0.0/size", "btt0.0/size", "dax0.0/size"):
        with pytest.raises(OSError) as e:
            m.read(path)
        assert e.value.errno == errno.ENXIO, path


def test_static_dax_region_attribute_visibility(m: Machine) -> None:
    # dev_dax_visible(): size and align read-only on a static region; dax_region_visible():
    # available_size/create/seed/delete hidden, region align 0400
    assert m.attr("daxdev/dax1.0/align").store is None
    assert m.attr("daxdev/dax1.0/align").mode == 0o444
    assert m.attr("dax1.1/dax_region/align").mode == 0o400
    for hidden in ("available_size", "create", "seed", "delete"):
        assert not m.exists(f"dax1.1/dax_region/{hidden}")


# ---------------------------------------------------------------- driver core


@pytest.mark.parametrize("driver,device,code", [
    ("nd_region", "namespace2.0", errno.ENODEV),  # no match
    ("dax_pmem", "pfn0.0", errno.ENODEV),
    ("nd_pmem", "dax1.0", errno.ENODEV),
    ("nd_pmem", "region0", errno.ENODEV),
    ("nd_pmem", "nosuch", errno.ENODEV),
    ("nd_pmem", "", errno.ENODEV),
    ("nd_pmem", "namespace0.0", errno.ENXIO),  # claimed by pfn0.1
    ("nd_pmem", "pfn0.1", errno.EBUSY),  # already bound
    ("nd_pmem", "namespace2.0", errno.EBUSY),
    ("nd_pmem", "pfn0.0", errno.ENODEV),  # a seed without a namespace: the probe refuses
    ("nd_pmem", "btt0.0", errno.ENODEV),
    ("dax_pmem", "dax0.0", errno.ENODEV),
    ("nd_region", "region0", errno.EBUSY),
    ("nd_bus", "ndbus0", errno.EBUSY),
])
def test_bind_errno(m: Machine, driver: str, device: str, code: int) -> None:
    before = m.snapshot()
    assert m.errno_of(f"drivers/{driver}/bind", device) == code
    assert m.snapshot() == before


@pytest.mark.parametrize("driver,device", [
    ("nd_pmem", "namespace0.0"), ("dax_pmem", "pfn0.1"), ("nd_region", "pfn0.1"), ("nd_pmem", "pfn0.0"),
    ("nd_pmem", "nosuch"), ("nd_pmem", "pfn0.1 "), ("nd_pmem", "pfn0.1\n\n"),
])
def test_unbind_of_a_device_not_bound_to_that_driver_is_enodev(m: Machine, driver: str, device: str) -> None:
    before = m.snapshot()
    assert m.errno_of(f"drivers/{driver}/unbind", device) == errno.ENODEV
    assert m.snapshot() == before


def test_bind_and_unbind_accept_newline_and_nul(m: Machine) -> None:
    m.write("drivers/nd_pmem/unbind", b"pfn0.1\n")
    assert driver_of(m, "pfn0.1") is None and m.dev("pfn0.1").disk is None
    m.write("drivers/nd_pmem/bind", b"pfn0.1\n\0garbage")
    assert driver_of(m, "pfn0.1") == "nd_pmem"
    assert m.dev("pfn0.1").disk.name == "pmem0"


def test_unbinding_a_region_removes_its_children_and_binding_reprobes_them(m: Machine) -> None:
    m.write("drivers/nd_region/unbind", "region0")
    assert not any(m.has(n) for n in ("namespace0.0", "pfn0.0", "pfn0.1", "btt0.0", "dax0.0"))
    assert m.read("region0/namespace_seed") == "\n"
    assert m.read("region0/pfn_seed") == "\n"
    with pytest.raises(OSError) as e:
        m.read("region0/init_namespaces")
    assert e.value.errno == errno.ENXIO
    m.write("drivers/nd_region/bind", "region0")
    assert m.read("namespace0.0/holder") == "pfn0.1\n"
    assert driver_of(m, "pfn0.1") == "nd_pmem"
    assert m.read("region0/pfn_seed") == "pfn0.0\n"


# ---------------------------------------------------------------- claims (nd_namespace_store)


@pytest.mark.parametrize("device,value,code", [
    ("pfn2.0", b"foo\0", errno.EINVAL),
    ("pfn2.0", b" namespace2.0\0", errno.EINVAL),  # strim()'s return value is ignored: leading space stays
    ("pfn2.0", b"\tnamespace2.0\n", errno.EINVAL),
    ("pfn2.0", b"namespace9.9\0", errno.ENODEV),
    ("pfn2.0", b"namespace2.0x\0", errno.ENODEV),
    ("pfn2.0", b"namespace0.0\0", errno.ENODEV),  # device_find_child() of the pfn's own region
    ("pfn0.0", b"namespace0.0\0", errno.EBUSY),  # claimed by pfn0.1
    ("btt1.0", b"namespace1.0\n", errno.EBUSY),
    ("dax3.0", b"namespace3.0", errno.EBUSY),
])
def test_namespace_store_rejects(m: Machine, device: str, value: bytes, code: int) -> None:
    before = m.snapshot()
    assert m.errno_of(f"{device}/namespace", value) == code
    assert m.snapshot() == before


@pytest.mark.parametrize("value", [
    b"namespace2.0", b"namespace2.0\n", b"namespace2.0\0", b"namespace2.0 \t\n\0", b"namespace2.0\xa0",
])
def test_namespace_store_claims_and_detaches(m: Machine, value: bytes) -> None:
    m.write("pfn2.0/namespace", value)
    assert m.read("pfn2.0/namespace") == "namespace2.0\n"
    assert m.read("namespace2.0/holder") == "pfn2.0\n"
    assert m.read("namespace2.0/mode") == "memory\n"  # the claim makes it a pfn namespace
    m.write("pfn2.0/namespace", b" \n\0")  # all whitespace: empty, detach and reset
    assert m.read("pfn2.0/namespace") == "\n"
    assert m.read("namespace2.0/holder") == "\n"
    assert m.has("pfn2.0")  # a seed is reset, not unregistered


def test_holder_class_reserves_the_namespace_for_one_personality(m: Machine) -> None:
    m.write("drivers/nd_pmem/unbind", "namespace2.0")
    m.write("namespace2.0/holder_class", "dax")
    assert m.read("namespace2.0/holder_class") == "dax\n"
    assert m.errno_of("pfn2.0/namespace", "namespace2.0") == errno.EBUSY
    assert m.errno_of("btt2.0/namespace", "namespace2.0") == errno.EBUSY
    m.write("dax2.0/namespace", "namespace2.0")
    assert m.read("namespace2.0/holder") == "dax2.0\n"
    assert m.errno_of("namespace2.0/holder_class", "") == errno.EBUSY  # claimed
    assert m.errno_of("namespace2.0/force_raw", "1") is None  # force_raw has no busy check


@pytest.mark.parametrize("value,shown", [
    (b"btt", "btt\n"), (b"pfn\n", "pfn\n"), (b"dax\0", "dax\n"), (b"\n", "\n"), (b"\0", "\n"),
])
def test_holder_class_values(m: Machine, value: bytes, shown: str) -> None:
    m.write("drivers/nd_pmem/unbind", "namespace2.0")
    m.write("namespace2.0/holder_class", b"pfn" if shown != "pfn\n" else b"dax")
    m.write("namespace2.0/holder_class", value)
    assert m.read("namespace2.0/holder_class") == shown


@pytest.mark.parametrize("value", [b"BTT", b"btt ", b" btt", b"btt\n\n", b"raw", b"none"])
def test_holder_class_rejects(m: Machine, value: bytes) -> None:
    m.write("drivers/nd_pmem/unbind", "namespace2.0")
    before = m.snapshot()
    assert m.errno_of("namespace2.0/holder_class", value) == errno.EINVAL
    assert m.snapshot() == before


def test_holder_class_of_an_enabled_namespace_is_ebusy(m: Machine) -> None:
    assert m.errno_of("namespace2.0/holder_class", "pfn") == errno.EBUSY


# ---------------------------------------------------------------- pfn attributes


@pytest.mark.parametrize("value,mode", [
    (b"pmem\0", "pmem"), (b"pmem\n", "pmem"), (b"pmem", "pmem"), (b"ram\n\0", "ram"), (b"none", "none"),
    # mode_store() compares only len - 1 bytes (strncmp): prefixes and single bytes select pmem
    (b"p\n", "pmem"), (b"pm\0", "pmem"), (b"x", "pmem"), (b"\n", "pmem"), (b"r\n", "ram"), (b"ra\0", "ram"),
    (b"n\n", "none"), (b"pmem\0trailing", "pmem"),
])
def test_pfn_mode_store(m: Machine, value: bytes, mode: str) -> None:
    m.write("pfn2.0/mode", b"none\n" if mode != "none" else b"ram\n")
    m.write("pfn2.0/mode", value)
    assert m.read("pfn2.0/mode") == f"{mode}\n"


@pytest.mark.parametrize("value", [b"PMEM\0", b"pmemx\0", b"memory\0", b"xx", b"pme\n\n", b"ramx\n"])
def test_pfn_mode_rejects(m: Machine, value: bytes) -> None:
    before = m.snapshot()
    assert m.errno_of("pfn2.0/mode", value) == errno.EINVAL
    assert m.snapshot() == before


@pytest.mark.parametrize("value,code", [
    (b"2097152\n\0", None), (b"4096", None), (b"0x40000000", None), (b"0x200000\n", None),
    (b"8192", errno.EINVAL), (b"0", errno.EINVAL), (b"2M", errno.EINVAL), (b"-4096", errno.EINVAL),
    (b"99999999999999999999", errno.ERANGE),
])
def test_pfn_align_store(m: Machine, value: bytes, code: int | None) -> None:
    before = m.snapshot()
    assert m.errno_of("pfn2.0/align", value) == code
    if code is None:
        assert m.read("pfn2.0/align") == f"{int(value.strip(bytes([0, 10])), 0)}\n"
    else:
        assert m.snapshot() == before


@pytest.mark.parametrize("attr,value", [
    ("pfn0.1/mode", "ram"), ("pfn0.1/align", "4096"), ("pfn0.1/uuid", str(uuid.uuid4())),
    ("pfn0.1/namespace", "namespace2.0"), ("pfn0.1/namespace", ""), ("dax1.1/mode", "pmem"),
    ("btt3.1/sector_size", "512"), ("btt3.1/uuid", str(uuid.uuid4())), ("btt3.1/namespace", ""),
])
def test_stores_to_an_active_personality_are_ebusy(m: Machine, attr: str, value: str) -> None:
    before = m.snapshot()
    assert m.errno_of(attr, value) == errno.EBUSY
    assert m.snapshot() == before


def test_btt_sector_size_store(m: Machine) -> None:
    for size in (512, 520, 528, 4096, 4104, 4160, 4224):
        m.write("btt2.0/sector_size", f"{size}\n")
        assert f"[{size}] " in m.read("btt2.0/sector_size")
    before = m.snapshot()
    for bad, code in ((b"1024", errno.EINVAL), (b"4k", errno.EINVAL), (b"4096 ", errno.EINVAL),
                      (b"18446744073709551616", errno.ERANGE)):
        assert m.errno_of("btt2.0/sector_size", bad) == code
    assert m.snapshot() == before


# ---------------------------------------------------------------- personalities: create, seeds, reset


def enable_fsdax_on_namespace2(m: Machine, mode: str = "pmem", align: str = "2097152") -> str:
    """ndctl's write sequence for create-namespace -e namespace2.0 -m fsdax on a raw namespace."""
    m.write("drivers/nd_pmem/unbind", "namespace2.0")
    m.write("namespace2.0/holder_class", "pfn")
    seed = m.read("region2/pfn_seed").strip()
    m.write(f"{seed}/uuid", str(uuid.uuid4()))
    m.write(f"{seed}/mode", mode)
    m.write(f"{seed}/align", align)
    m.write(f"{seed}/namespace", "namespace2.0")
    m.write("drivers/nd_pmem/bind", seed)
    return seed


def test_enabling_a_seed_replaces_it_and_writes_the_info_block(m: Machine) -> None:
    seed = enable_fsdax_on_namespace2(m)
    assert seed == "pfn2.0"
    assert driver_of(m, "pfn2.0") == "nd_pmem"
    assert m.read("region2/pfn_seed") == "pfn2.1\n"  # a fresh idle seed
    assert m.read("pfn2.1/mode") == "none\n"
    assert m.read("namespace2.0/mode") == "memory\n"
    assert m.read("pfn2.0/size") == f"{MAP_DEV_SIZE}\n"
    block = m.dev("namespace2.0").read_info_block()  # type: ignore[attr-defined]
    info = PfnInfo.unpack(block, b"NVDIMM_PFN_INFO\0")
    assert info is not None
    assert str(info.uuid) == m.read("pfn2.0/uuid").strip()
    assert info.dataoff == 2 << 20 and info.mode == 2 and info.align == 2 << 20
    assert info.npfns == MAP_DEV_SIZE // 4096


def test_disabling_and_detaching_a_non_seed_personality_unregisters_it(m: Machine) -> None:
    m.write("drivers/nd_pmem/unbind", "pfn0.1")
    assert m.read("pfn0.1/namespace") == "namespace0.0\n"
    m.write("pfn0.1/namespace", "\n")  # nd_detach_and_reset(): idle and not a seed -> gone
    assert not m.has("pfn0.1")
    assert m.read("namespace0.0/holder") == "\n"
    # the info block is still on the media: probing the namespace finds it again
    assert m.errno_of("drivers/nd_pmem/bind", "namespace0.0") == errno.ENXIO
    assert m.read("namespace0.0/holder") == "pfn0.1\n"  # the lowest free id again
    assert driver_of(m, "pfn0.1") == "nd_pmem"


def test_detaching_a_seed_resets_its_settings(m: Machine) -> None:
    m.write("pfn2.0/uuid", str(uuid.uuid4()))
    m.write("pfn2.0/mode", "ram")
    m.write("pfn2.0/align", "4096")
    m.write("pfn2.0/namespace", "")
    assert (m.read("pfn2.0/uuid"), m.read("pfn2.0/mode"), m.read("pfn2.0/align")) == ("\n", "none\n", "4096\n")
    m.write("btt2.0/uuid", str(uuid.uuid4()))
    m.write("btt2.0/sector_size", "520")
    m.write("btt2.0/namespace", "")
    assert m.read("btt2.0/uuid") == "\n"
    assert "[" not in m.read("btt2.0/sector_size")


def test_a_personality_needs_uuid_and_mode(m: Machine) -> None:
    m.write("drivers/nd_pmem/unbind", "namespace2.0")
    m.write("pfn2.0/namespace", "namespace2.0")
    assert m.errno_of("drivers/nd_pmem/bind", "pfn2.0") == errno.ENODEV  # no uuid
    m.write("pfn2.0/uuid", str(uuid.uuid4()))
    assert m.errno_of("drivers/nd_pmem/bind", "pfn2.0") == errno.ENXIO  # mode none
    m.write("pfn2.0/mode", "pmem")
    m.write("drivers/nd_pmem/bind", "pfn2.0")
    assert driver_of(m, "pfn2.0") == "nd_pmem"


def test_a_personality_of_an_enabled_namespace_is_ebusy(m: Machine) -> None:
    m.write("pfn2.0/uuid", str(uuid.uuid4()))
    m.write("pfn2.0/mode", "pmem")
    m.write("pfn2.0/namespace", "namespace2.0")  # allowed: the claim is checked at probe
    assert m.errno_of("drivers/nd_pmem/bind", "pfn2.0") == errno.EBUSY


def test_read_only_region_cannot_get_a_new_info_block(m: Machine) -> None:
    m.write("region2/read_only", "1")
    m.write("drivers/nd_pmem/unbind", "namespace2.0")
    m.write("pfn2.0/uuid", str(uuid.uuid4()))
    m.write("pfn2.0/mode", "pmem")
    m.write("pfn2.0/namespace", "namespace2.0")
    assert m.errno_of("drivers/nd_pmem/bind", "pfn2.0") == errno.ENXIO
    assert m.dev("namespace2.0").read_info_block() == bytes(4096)  # type: ignore[attr-defined]


@pytest.mark.parametrize("value,ro", [
    (b"1", True), (b"y\n", True), (b"on", True), (b"t", True), (b"0\0", False), (b"n", False), (b"off", False),
])
def test_read_only_store(m: Machine, value: bytes, ro: bool) -> None:
    m.write("region2/read_only", b"1" if not ro else b"0")
    m.write("region2/read_only", value)
    assert m.read("region2/read_only") == f"{int(ro)}\n"
    assert m.read("pmem2/ro") == f"{int(ro)}\n"


# ---------------------------------------------------------------- region align


@pytest.mark.parametrize("value,code", [
    (b"0x1000000", None), (b"4096", None), (b"0x4000000\n", None),  # == the region size
    (b"0x8000000", errno.EINVAL),  # > the region size
    (b"0x3000", errno.EINVAL),  # not a power of two
    (b"2048", errno.EINVAL), (b"0", errno.EINVAL), (b"16M", errno.EINVAL),
])
def test_region_align_store(m: Machine, value: bytes, code: int | None) -> None:
    before = m.snapshot()
    assert m.errno_of("region0/align", value) == code  # no EBUSY: namespaces or not
    if code is None:
        assert int(m.read("region0/align"), 16) == int(value, 0)
    else:
        assert m.snapshot() == before


# ---------------------------------------------------------------- persistence (the media)


def test_reboot_recreates_every_personality_from_its_info_block(tmp_path: Path) -> None:
    with machine(tmp_path) as m:
        enable_fsdax_on_namespace2(m, mode="ram", align="4096")
        shown = {p: m.read(p) for p in ("pfn2.0/uuid", "pfn2.0/size", "pfn0.1/uuid", "dax1.1/uuid", "btt3.1/uuid",
                                         "btt3.1/size", "dax1.1/dax_region/size")}
    m = Machine(tmp_path / "state", None)  # no config: the state dir's platform
    m.boot()
    try:
        # the seeds took id 0 again, so the personalities found on the media are id 1
        assert m.read("namespace2.0/holder") == "pfn2.1\n"
        assert m.read("pfn2.1/mode") == "ram\n"
        assert m.read("pfn2.1/align") == "4096\n"
        assert m.read("pfn2.1/uuid") == shown["pfn2.0/uuid"]
        assert m.read("pfn2.1/size") == shown["pfn2.0/size"]
        for p in ("pfn0.1/uuid", "dax1.1/uuid", "btt3.1/uuid", "btt3.1/size", "dax1.1/dax_region/size"):
            assert m.read(p) == shown[p], p
    finally:
        m.shutdown()


def test_zeroed_info_block_makes_the_namespace_raw_again(tmp_path: Path) -> None:
    with machine(tmp_path) as m:
        m.write("drivers/nd_pmem/unbind", "pfn0.1")
        m.write("pfn0.1/namespace", "")
        m.dev("namespace0.0").write_media(bytes(8192), 0)  # type: ignore[attr-defined]
        m.write("drivers/nd_pmem/bind", "namespace0.0")
        assert driver_of(m, "namespace0.0") == "nd_pmem"
        assert m.read("namespace0.0/holder") == "\n"
        assert m.dev("namespace0.0").disk.data.size == SZ_64M  # type: ignore[attr-defined]
    m = Machine(tmp_path / "state", None)
    m.boot()
    try:
        assert driver_of(m, "namespace0.0") == "nd_pmem"
        assert m.read("namespace0.0/holder") == "\n"
    finally:
        m.shutdown()


def test_force_raw_probes_raw_over_an_info_block(m: Machine) -> None:
    m.write("drivers/nd_pmem/unbind", "pfn0.1")
    m.write("pfn0.1/namespace", "")
    m.write("namespace0.0/force_raw", "1\n")
    m.write("drivers/nd_pmem/bind", "namespace0.0")
    assert driver_of(m, "namespace0.0") == "nd_pmem"
    assert m.read("namespace0.0/mode") == "raw\n"  # force_raw: no legacy page map either
    assert m.dev("namespace0.0").disk.data.size == SZ_64M  # type: ignore[attr-defined]
    m.write("drivers/nd_pmem/unbind", "namespace0.0")
    m.write("namespace0.0/force_raw", "0\n")
    assert m.errno_of("drivers/nd_pmem/bind", "namespace0.0") == errno.ENXIO  # found pfn0.1 again
    assert m.read("namespace0.0/holder") == "pfn0.1\n"


def test_pfn_info_block_of_another_parent_is_not_adopted(m: Machine) -> None:
    # nd_pfn_validate(): parent_uuid must match the namespace's (null for IO namespaces)
    m.write("drivers/nd_pmem/unbind", "pfn0.1")
    m.write("pfn0.1/namespace", "")
    ns = m.dev("namespace0.0")
    info = PfnInfo.unpack(ns.read_info_block(), b"NVDIMM_PFN_INFO\0")  # type: ignore[attr-defined]
    assert info is not None
    forged = PfnInfo(info.signature, info.uuid, uuid.uuid4(), info.dataoff, info.npfns, info.mode, info.align)
    ns.write_media(forged.pack(), INFO_BLOCK_OFFSET)  # type: ignore[attr-defined]
    m.write("drivers/nd_pmem/bind", "namespace0.0")
    assert driver_of(m, "namespace0.0") == "nd_pmem"
    assert m.read("namespace0.0/holder") == "\n"
    assert not m.has("pfn0.1")


# ---------------------------------------------------------------- dax bus drivers


@pytest.mark.parametrize("value,code", [
    (b"dax1.0", None), (b"dax1.0\n", None), (b"dax7.3\0", None), (b"dax-1.0", None),
    (b"dax01.0", errno.EINVAL), (b"dax+1.0", errno.EINVAL), (b"dax 1.0", errno.EINVAL), (b"dax1", errno.EINVAL),
    (b"daxfoo", errno.EINVAL), (b"dax1.0 ", errno.EINVAL), (b"dax1.0\n\n", errno.EINVAL), (b"1.0", errno.EINVAL),
    (b"dax4294967296.0", errno.EINVAL),
])
def test_dax_driver_id_stores(m: Machine, value: bytes, code: int | None) -> None:
    for attr in ("dax/drivers/kmem/new_id", "dax/drivers/kmem/remove_id", "dax/drivers/device_dax/remove_id"):
        assert m.errno_of(attr, value) == code, attr


def test_device_dax_still_binds_after_remove_id(m: Machine) -> None:
    m.write("dax/drivers/device_dax/remove_id", "dax1.0")
    m.write("dax/drivers/device_dax/unbind", "dax1.0")
    assert m.devdax("dax1.0").driver is None
    assert m.errno_of("dax/drivers/kmem/bind", "dax1.0") == errno.ENODEV  # kmem matches by id only
    m.write("dax/drivers/device_dax/bind", "dax1.0")  # dax_bus_match(): device type matches
    assert m.devdax("dax1.0").driver.name == "device_dax"


def test_new_id_attaches_unbound_instances(m: Machine) -> None:
    m.write("dax/drivers/device_dax/unbind", "dax1.0")
    m.write("dax/drivers/device_dax/new_id", "dax1.0")
    assert m.devdax("dax1.0").driver.name == "device_dax"


# ---------------------------------------------------------------- uevent, autoprobe


@pytest.mark.parametrize("path", ["region0/uevent", "namespace0.0/uevent", "pfn0.1/uevent", "pmem0/uevent",
                                  "daxdev/dax1.0/uevent", "ndctl0/uevent", "drivers/nd_pmem/uevent"])
def test_uevent_stores(m: Machine, path: str) -> None:
    assert m.errno_of(path, b"change\n") is None
    assert m.errno_of(path, b"add\0") is None
    assert m.errno_of(path, b"\n") == errno.EINVAL
    assert m.errno_of(path, b"bogus") == errno.EINVAL
