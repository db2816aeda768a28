"""Kernel checks that ndctl's own tests rely on: /sys/block/pmemN/badblocks takes "SECTOR
COUNT" (block/genhd.c, badblocks_store()), a map=dev pfn device clears the media errors of its
memmap area when it is enabled (nd_pfn_clear_memmap_errors()), and an info block whose data
range is not aligned to memremap_compat_align(), or that was written for pages or struct pages
this kernel cannot hold, makes the namespace fail to enable (nd_pfn_validate(), nd_pmem_probe())."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
from model_kit import Machine

from vnvdimm.model.infoblock import DAX_SIG, INFO_BLOCK_OFFSET, INFO_BLOCK_SIZE, PFN_SIG, PfnInfo, sb_checksum

M = 1 << 20
ONE_FSDAX = """\
template = "e820"
[[region]]
size = "64M"
namespace = { mode = "fsdax", map = "dev", align = "2M" }
"""
ONE_RAW = """\
template = "e820"
[[region]]
size = "64M"
namespace = { mode = "raw" }
"""


@pytest.fixture
def fsdax(tmp_path: Path):  # type: ignore[no-untyped-def]
    m = Machine(tmp_path / "state", ONE_FSDAX)
    m.boot()
    yield m
    m.shutdown()


def read_disk(m: Machine, name: str, offset: int, size: int) -> bytes:
    return m.dev(name).data.read(size, offset)  # type: ignore[attr-defined]


@pytest.mark.parametrize("raw", [False, True])
def test_badblocks_store_adds_sectors_that_fail_reads(tmp_path: Path, raw: bool) -> None:
    m = Machine(tmp_path / "state", ONE_RAW if raw else ONE_FSDAX)
    m.boot()
    try:
        assert m.attr("pmem0/badblocks").mode == 0o644
        assert m.read("pmem0/badblocks") == ""
        m.write("pmem0/badblocks", b"8 8\n")
        m.write("pmem0/badblocks", b"100 1")
        assert m.read("pmem0/badblocks") == "8 8\n100 1\n"
        with pytest.raises(OSError) as e:
            read_disk(m, "pmem0", 8 * 512 + 100, 10)
        assert e.value.errno == errno.EIO
        assert read_disk(m, "pmem0", 0, 4096) == bytes(4096)  # sectors 0-7 are good
        # a write of whole sectors clears them (pmem_do_write())
        m.dev("pmem0").data.write(bytes(8 * 512), 8 * 512)  # type: ignore[attr-defined]
        assert m.read("pmem0/badblocks") == "100 1\n"
    finally:
        m.shutdown()


@pytest.mark.parametrize("value", [b"8", b"8 0", b"8 -1", b"x 8", b"8 8 ", b"8 8x", b"", b"-", b"8 99999999999"])
def test_badblocks_store_refuses_what_sscanf_refuses(fsdax: Machine, value: bytes) -> None:
    before = fsdax.read("pmem0/badblocks")
    assert fsdax.errno_of("pmem0/badblocks", value) == errno.EINVAL
    assert fsdax.read("pmem0/badblocks") == before


def test_enabling_a_map_dev_pfn_clears_the_errors_of_its_memmap_area(fsdax: Machine) -> None:
    region = fsdax.dev("region0")
    (pfn,) = [p for p in region.personalities if p.driver is not None]  # type: ignore[attr-defined]
    media, dataoff = region.media, pfn.geometry.dataoff  # type: ignore[attr-defined]
    bb = media.badblocks
    memmap_sector = (8192 + 4096) // 512  # inside the memmap, after the info block area
    data_sector = dataoff // 512 + 16  # in the data: not the memmap's to clear
    media.pwrite(b"\xee" * 512, memmap_sector * 512)
    bb.set(memmap_sector, 1)
    bb.set(data_sector, 2)
    system = fsdax.sys
    with system.lock:  # disable and enable it again: the info block is found and validated
        driver = pfn.driver
        system.driver_detach(pfn)
        system.bind(driver, pfn.name.encode())
    assert pfn.driver is not None
    assert bb.ranges() == [(data_sector, 2)]
    assert media.pread(512, memmap_sector * 512) == bytes(512)


ONE_FSDAX_MAP_MEM = ONE_FSDAX.replace('map = "dev"', 'map = "mem"')
ONE_DEVDAX = ONE_FSDAX.replace('mode = "fsdax"', 'mode = "devdax"')

# struct nd_pfn_sb (drivers/nvdimm/pfn.h): byte offset and little-endian format of the fields
# a test forges, written out here rather than taken from the code under test
PFN_SB_FIELDS = {"version_minor": (54, "<H"), "mode": (72, "<I"), "start_pad": (76, "<I"),
                 "end_trunc": (80, "<I"), "align": (84, "<I"), "page_size": (88, "<I"),
                 "page_struct_size": (92, "<H")}


def forged(block: bytes, **fields: int) -> bytes:
    """`block` with `fields` overwritten and its checksum made valid again."""
    head = bytearray(block)
    for name, value in fields.items():
        offset, fmt = PFN_SB_FIELDS[name]
        struct.pack_into(fmt, head, offset, value)
    head[-8:] = b"\0" * 8
    head[-8:] = struct.pack("<Q", sb_checksum(bytes(head)))
    return bytes(head)


def reboot_with(tmp_path: Path, config: str, signature: bytes, **fields: int) -> Machine:
    """A machine booted once, its info block forged, booted again."""
    m = Machine(tmp_path / "state", config)
    m.boot()
    media = m.dev("region0").media  # type: ignore[attr-defined]
    block = media.pread(INFO_BLOCK_SIZE, INFO_BLOCK_OFFSET)
    assert PfnInfo.unpack(block, signature) is not None
    media.pwrite(forged(block, **fields), INFO_BLOCK_OFFSET)
    m.boot()
    return m


def assert_namespace_failed(m: Machine) -> None:
    ns = m.dev("namespace0.0")
    assert ns.driver is None and ns.claim is None  # type: ignore[attr-defined]
    assert ns.probe_errno == errno.EOPNOTSUPP  # type: ignore[attr-defined]
    assert not any(p.driver is not None for p in m.dev("region0").personalities)  # type: ignore[attr-defined]


@pytest.mark.parametrize("damage", [
    {"start_pad": 0x2000},
    {"end_trunc": 0x1000},
    {"page_size": 0x10000},  # a 64K-page kernel's memmap: more than 4K pages' worth
    {"page_struct_size": 56},  # struct pages smaller than this kernel's
    {"align": 128 << 20},  # more than the namespace holds
])
def test_an_info_block_this_kernel_cannot_use_fails_the_namespace(tmp_path: Path, damage: dict) -> None:  # type: ignore[type-arg]
    m = reboot_with(tmp_path, ONE_FSDAX, PFN_SIG, **damage)
    try:
        assert_namespace_failed(m)
    finally:
        m.shutdown()


def test_a_device_dax_block_with_an_unsupported_alignment_fails_the_namespace(tmp_path: Path) -> None:
    m = reboot_with(tmp_path, ONE_DEVDAX, DAX_SIG, align=0x2000)
    try:
        assert_namespace_failed(m)
    finally:
        m.shutdown()


@pytest.mark.parametrize(("config", "fields"), [
    (ONE_FSDAX_MAP_MEM, {"page_size": 0x10000, "page_struct_size": 56}),  # map=mem: no memmap on the media
    (ONE_FSDAX, {"version_minor": 3, "page_size": 0x10000, "page_struct_size": 56}),  # fields it did not have
    (ONE_FSDAX, {"page_size": 0x800, "page_struct_size": 80}),  # smaller pages, larger records: room enough
])
def test_page_size_fields_that_do_not_matter_are_ignored(tmp_path: Path, config: str, fields: dict) -> None:  # type: ignore[type-arg]
    m = reboot_with(tmp_path, config, PFN_SIG, **fields)
    try:
        assert m.dev("namespace0.0").claim is not None  # type: ignore[attr-defined]
        assert any(p.driver is not None for p in m.dev("region0").personalities)  # type: ignore[attr-defined]
    finally:
        m.shutdown()
