"""On-media info blocks (pfn.h struct nd_pfn_sb, btt.h struct btt_sb), nd_fletcher64, the pfn
geometry of nd_pfn_init() and the BTT arena layout of btt.c, checked against values computed
here from the kernel's definitions."""

from __future__ import annotations

import random
import struct
import uuid

import kernel_oracle as K
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnvdimm.model.infoblock import (
    BTT_SIG,
    DAX_SIG,
    PFN_MODE_PMEM,
    PFN_MODE_RAM,
    PFN_SIG,
    BttInfo,
    PfnInfo,
    btt_arenas,
    btt_log_init,
    fletcher64,
    pfn_geometry,
    sb_checksum,
)

G = 1 << 30
M = 1 << 20
U1 = uuid.UUID("11111111-2222-3333-4444-555555555555")
U2 = uuid.UUID("66666666-7777-8888-9999-aaaaaaaaaaaa")


def fletcher64_reference(data: bytes) -> int:
    """nd_fletcher64(le=true): lo32 += word; hi32 += lo32, both modulo 2^32."""
    lo = hi = 0
    for i in range(0, len(data), 4):
        lo = (lo + int.from_bytes(data[i:i + 4], "little")) % (1 << 32)
        hi = (hi + lo) % (1 << 32)
    return hi << 32 | lo


def test_fletcher64_known_values() -> None:
    assert fletcher64(bytes(4096)) == 0
    assert fletcher64(struct.pack("<III", 1, 2, 3)) == (1 + 3 + 6) << 32 | 6
    assert fletcher64(b"\xff" * 8) == (0xFFFFFFFF + 0xFFFFFFFE) % (1 << 32) << 32 | 0xFFFFFFFE


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=512).map(lambda b: b[: len(b) // 4 * 4]))
def test_fletcher64_matches_reference(data: bytes) -> None:
    assert fletcher64(data) == fletcher64_reference(data)


# ---------------------------------------------------------------- pfn info block


def test_pfn_info_block_layout() -> None:
    info = PfnInfo(PFN_SIG, U1, U2, dataoff=0x4200000, npfns=1031680, mode=PFN_MODE_PMEM, align=2 * M,
                   end_trunc=0x1000)
    block = info.pack()
    assert len(block) == 4096
    assert block[0:16] == b"NVDIMM_PFN_INFO\0"
    assert block[16:32] == U1.bytes and block[32:48] == U2.bytes
    flags, major, minor = struct.unpack_from("<IHH", block, 48)
    assert (flags, major, minor) == (0, 1, 4)
    dataoff, npfns, mode, start_pad, end_trunc, align, page_size, page_struct_size = struct.unpack_from(
        "<QQIIIIIH", block, 56)
    assert (dataoff, npfns, mode, start_pad, end_trunc, align) == (0x4200000, 1031680, 2, 0, 0x1000, 2 * M)
    assert (page_size, page_struct_size) == (4096, 64)
    assert block[94:4088] == bytes(3994)  # padding
    (checksum,) = struct.unpack_from("<Q", block, 4088)
    assert checksum == fletcher64_reference(block[:4088] + bytes(8))


@pytest.mark.parametrize("sig", [PFN_SIG, DAX_SIG])
def test_pfn_info_round_trip(sig: bytes) -> None:
    info = PfnInfo(sig, U1, U2, 2 * M, 4000, PFN_MODE_RAM, G)
    assert PfnInfo.unpack(info.pack(), sig) == info
    other = DAX_SIG if sig == PFN_SIG else PFN_SIG
    assert PfnInfo.unpack(info.pack(), other) is None


@pytest.mark.parametrize("offset", [0, 17, 56, 1000, 4087, 4088, 4095])
def test_pfn_info_corrupted_is_rejected(offset: int) -> None:
    block = bytearray(PfnInfo(PFN_SIG, U1, U2, 2 * M, 4000, PFN_MODE_RAM, 2 * M).pack())
    block[offset] ^= 0x40
    assert PfnInfo.unpack(bytes(block), PFN_SIG) is None


def rechecksum(block: bytearray) -> bytes:
    block[4088:] = struct.pack("<Q", sb_checksum(bytes(block)))
    return bytes(block)


def test_pfn_info_validation_follows_nd_pfn_validate() -> None:
    base = bytearray(PfnInfo(PFN_SIG, U1, U2, 0x4200000, 4000, PFN_MODE_PMEM, 2 * M).pack())
    # the major version is not checked by the kernel
    b = bytearray(base)
    struct.pack_into("<H", b, 52, 2)
    assert PfnInfo.unpack(rechecksum(b), PFN_SIG) is not None
    # an unknown mode is refused
    b = bytearray(base)
    struct.pack_into("<I", b, 72, 3)
    assert PfnInfo.unpack(rechecksum(b), PFN_SIG) is None
    # minor < 2: no recorded align; align 0 means 1 << ilog2(dataoff)
    b = bytearray(base)
    struct.pack_into("<H", b, 54, 1)
    info = PfnInfo.unpack(rechecksum(b), PFN_SIG)
    assert info is not None and info.align == 64 * M  # ilog2(0x4200000) = 26
    b = bytearray(base)
    struct.pack_into("<I", b, 84, 0)
    info = PfnInfo.unpack(rechecksum(b), PFN_SIG)
    assert info is not None and info.align == 64 * M
    # minor 0: start_pad and end_trunc did not exist
    b = bytearray(base)
    struct.pack_into("<H", b, 54, 0)
    struct.pack_into("<II", b, 76, 4096, 8192)
    info = PfnInfo.unpack(rechecksum(b), PFN_SIG)
    assert info is not None and (info.start_pad, info.end_trunc) == (0, 0)


# ---------------------------------------------------------------- pfn geometry (nd_pfn_init)


def geometry_reference(start: int, size: int, mode: int, align: int) -> tuple[int, int]:
    """(dataoff, data size) from nd_pfn_init()'s formulas with MAX_STRUCT_PAGE_SIZE 64."""
    align = max(align, 2 * M)
    npfns = (size - 8192) // 4096
    end_trunc = start + size - (start + size) // align * align
    if mode == PFN_MODE_PMEM:
        offset = -(-(start + 8192 + 64 * npfns) // align) * align - start
    else:
        offset = -(-(start + 8192) // align) * align - start
    return offset, (size - offset - end_trunc) // 4096 * 4096


@pytest.mark.parametrize("size,mode,expected", [
    (4 * G, PFN_MODE_PMEM, 4225761280),  # docs/ndctl-abi.md, "Sizes that look real"
    (4 * G, PFN_MODE_RAM, 4292870144),
    (8 * G, PFN_MODE_PMEM, 8453619712),
    (256 * M, PFN_MODE_PMEM, 262144000),
    (256 * M, PFN_MODE_RAM, 266338304),
])
def test_pfn_geometry_sizes(size: int, mode: int, expected: int) -> None:
    g = pfn_geometry(16 * G, size, mode, 2 * M)
    assert g is not None
    assert g.data_size == expected
    assert (g.dataoff, g.data_size) == geometry_reference(16 * G, size, mode, 2 * M)


def test_pfn_geometry_alignment_and_truncation() -> None:
    g = pfn_geometry(16 * G, 4 * G, PFN_MODE_PMEM, G)  # 1 GiB align: the memmap rounds up to 1 GiB
    assert g is not None and g.dataoff == G and g.data_size == 3 * G
    g = pfn_geometry(16 * G, 64 * M + 4096, PFN_MODE_RAM, 4096)  # 4K align still pads to 2 MiB
    assert g is not None and g.end_trunc == 4096 and g.data_size == 62 * M
    assert pfn_geometry(16 * G, 2 * M, PFN_MODE_RAM, 2 * M) is None  # zero-sized device: ENXIO
    assert pfn_geometry(16 * G, 64 * M, 0, 2 * M) is None  # PFN_MODE_NONE


@settings(max_examples=100, deadline=None)
@given(st.integers(8, 4096).map(lambda n: n * 2 * M), st.sampled_from([PFN_MODE_RAM, PFN_MODE_PMEM]),
       st.sampled_from([4096, 2 * M, G]), st.integers(0, 64).map(lambda n: (16 << 30) + n * 2 * M))
def test_pfn_geometry_matches_reference(size: int, mode: int, align: int, start: int) -> None:
    g = pfn_geometry(start, size, mode, align)
    offset, data = geometry_reference(start, size, mode, align)
    if offset >= size - (start + size - (start + size) // max(align, 2 * M) * max(align, 2 * M)):
        assert g is None
    else:
        assert g is not None and (g.dataoff, g.data_size) == (offset, data)


# ---------------------------------------------------------------- BTT


def arena_reference(arena_size: int, lbasize: int) -> tuple[int, int, int]:
    """alloc_arena(): (internal_nlba, external_nlba, mapoff - dataoff) for one arena."""
    available = arena_size - arena_size % 4096 - 2 * 4096 - 16384
    internal_lbasize = -(-lbasize // 64) * 64
    internal_nlba = (available - 4096) // (internal_lbasize + 4)
    external_nlba = internal_nlba - 256
    mapsize = -(-(external_nlba * 4) // 4096) * 4096
    return internal_nlba, external_nlba, available - mapsize


@pytest.mark.parametrize("lbasize", [512, 520, 528, 4096, 4104, 4160, 4224])
def test_btt_single_arena(lbasize: int) -> None:
    rawsize = 4 * G - 4096
    (a,) = btt_arenas(rawsize, lbasize)
    internal, external, datasize = arena_reference(rawsize, lbasize)
    assert (a.internal_nlba, a.external_nlba) == (internal, external)
    assert a.internal_lbasize == -(-lbasize // 64) * 64
    assert a.dataoff == 4096 and a.mapoff == 4096 + datasize
    assert a.logoff == a.mapoff + -(-(external * 4) // 4096) * 4096
    assert a.info2off == a.logoff + 16384
    assert a.info2off + 4096 <= rawsize
    assert a.nextoff == 0
    if lbasize == 4096:
        assert external * 4096 == 4289695744


def test_btt_multiple_arenas() -> None:
    max_arena = 1 << 39
    rawsize = max_arena + 100 * G + 10 * M  # a full arena, then a 100 GiB one; 10 MiB < 16 MiB dropped?
    arenas = btt_arenas(rawsize, 4096)
    assert [a.size for a in arenas] == [max_arena, 100 * G + 10 * M]
    assert arenas[0].nextoff == max_arena and arenas[1].nextoff == 0
    assert arenas[1].offset == max_arena
    assert arenas[1].external_lba_start == arenas[0].external_nlba
    tiny = btt_arenas(max_arena + 15 * M, 512)  # the remainder is under ARENA_MIN_SIZE: no arena
    assert len(tiny) == 1 and tiny[0].nextoff == 0


def test_btt_info_round_trip_and_layout() -> None:
    (a,) = btt_arenas(256 * M - 4096, 4096)
    block = BttInfo(U1, U2, a).pack()
    assert len(block) == 4096 and block[:16] == BTT_SIG
    fields = struct.unpack_from("<IHHIIIIIIQQQQQ", block, 48)
    flags, major, minor, ext_lbasize, ext_nlba, int_lbasize, int_nlba, nfree, infosize = fields[:9]
    nextoff, dataoff, mapoff, logoff, info2off = fields[9:]
    assert (flags, major, minor) == (0, 1, 1)
    assert (ext_lbasize, ext_nlba, int_lbasize, int_nlba, nfree, infosize) == (
        4096, a.external_nlba, 4096, a.internal_nlba, 256, 4096)
    assert (nextoff, dataoff, mapoff, logoff, info2off) == (0, 4096, a.mapoff, a.logoff, a.info2off)
    assert struct.unpack_from("<Q", block, 4088)[0] == fletcher64_reference(block[:4088] + bytes(8))
    parsed = BttInfo.unpack(block)
    assert parsed is not None
    assert (parsed.uuid, parsed.parent_uuid, parsed.external_lbasize, parsed.version) == (U1, U2, 4096, (1, 1))
    assert (parsed.external_nlba, parsed.nfree, parsed.info2off) == (a.external_nlba, 256, a.info2off)
    corrupted = bytearray(block)
    corrupted[100] ^= 1
    assert BttInfo.unpack(bytes(corrupted)) is None


def test_btt_log_init() -> None:
    (a,) = btt_arenas(64 * M - 4096, 512)
    log = btt_log_init(a)
    assert len(log) == 256 * 64
    for lane in (0, 1, 255):
        lba, old, new, seq = struct.unpack_from("<IIII", log, lane * 64)
        assert (lba, old, new, seq) == (lane, a.external_nlba + lane, a.external_nlba + lane, 1)
        assert log[lane * 64 + 16: lane * 64 + 64] == bytes(48)


# ---------------------------------------------------------------- against the kernel's layouts


@pytest.mark.parametrize("seed", range(20))
def test_checksum_is_the_kernels_fletcher64(seed: int) -> None:
    block = random.Random(seed).randbytes(4096)
    assert sb_checksum(block) == K.fletcher64(block[:4088] + bytes(8))


@pytest.mark.parametrize("sig,kernel_sig", [(PFN_SIG, K.PFN_SIGNATURE), (DAX_SIG, K.DAX_SIGNATURE)])
@pytest.mark.parametrize("mode,align", [(PFN_MODE_PMEM, 2 * M), (PFN_MODE_RAM, 4096), (PFN_MODE_PMEM, G)])
def test_pfn_blocks_read_back_as_the_kernel_lays_them_out(sig: bytes, kernel_sig: bytes, mode: int,
                                                          align: int) -> None:
    """struct nd_pfn_sb decoded from its byte offsets (kernel_oracle): what vnvdimm writes is
    what nd_pfn_validate() reads."""
    info = PfnInfo(sig, U1, U2, dataoff=0x4200000, npfns=1031680, mode=mode, align=align, end_trunc=8192)
    got = K.decode_pfn_sb(info.pack(), kernel_sig)
    assert got is not None
    assert (got["uuid"], got["parent_uuid"], got["dataoff"], got["npfns"], got["mode"], got["align"],
            got["end_trunc"], got["start_pad"]) == (U1, U2, 0x4200000, 1031680, mode, align, 8192, 0)
    assert (got["version_major"], got["page_size"], got["page_struct_size"]) == (1, 4096, 64)
    assert K.decode_pfn_sb(info.pack(), K.BTT_SIGNATURE) is None


@pytest.mark.parametrize("lbasize", [512, 4096])
def test_btt_blocks_read_back_as_the_kernel_lays_them_out(lbasize: int) -> None:
    arena = btt_arenas(600 * M, lbasize)[0]
    got = K.decode_btt_sb(BttInfo(U1, U2, arena).pack())
    assert got is not None
    assert (got["uuid"], got["parent_uuid"], got["external_lbasize"], got["external_nlba"],
            got["internal_lbasize"], got["internal_nlba"], got["nfree"], got["infosize"]) == \
        (U1, U2, lbasize, arena.external_nlba, arena.internal_lbasize, arena.internal_nlba, 256, 4096)
    # btt.c: the offsets in the block are relative to the arena's info block
    assert (got["dataoff"], got["mapoff"], got["logoff"], got["info2off"]) == \
        (arena.dataoff - arena.offset, arena.mapoff - arena.offset, arena.logoff - arena.offset,
         arena.info2off - arena.offset)
    # internal_nlba: (available - one page) / (internal lbasize + 4-byte map entry), nfree reserved
    assert got["external_nlba"] == got["internal_nlba"] - 256
