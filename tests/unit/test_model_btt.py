"""The BTT (vnvdimm/model/btt.py) on a media file: its layout by version against btt.c's
arithmetic and struct btt_sb's byte offsets, and its write path's invariants (every internal
block is either mapped or a lane's free block, the flog names the current mapping, a write
cut short by a crash leaves the sector old or new)."""

from __future__ import annotations

import errno
import os
import random
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import kernel_oracle as K
import pytest

from vnvdimm.model.btt import (
    BTT_V1_1,
    BTT_V2_0,
    MAP_ENT_NORMAL,
    MAP_ERR_MASK,
    BttEngine,
    BttError,
    BttVersion,
    convert_in_place_v1_1,
)
from vnvdimm.model.media import Media

M = 1 << 20
SIZE = 64 * M
NS_OFFSET = 2 * M  # the namespace does not start at the media's first byte
U_BTT = uuid.UUID("6c1d2d3f-0a41-4f1e-9a2b-7b6c5d4e3f21")
U_NS = uuid.UUID("0f0e0d0c-0b0a-4908-8706-050403020100")


@pytest.fixture
def media(tmp_path: Path) -> Iterator[Media]:
    path = tmp_path / "media"
    Media.create(path, NS_OFFSET + SIZE)
    m = Media(path, NS_OFFSET + SIZE)
    yield m
    m.close()


def engine(media: Media, version: BttVersion = BTT_V1_1, lbasize: int = 4096) -> BttEngine:
    return BttEngine(media, NS_OFFSET, SIZE, version, lbasize, U_BTT, U_NS, read_only=False)


def reference_arena(rawsize: int, lbasize: int) -> dict[str, int]:
    """alloc_arena() for one arena, written out from btt.c independently."""
    internal_lbasize = -(-lbasize // 64) * 64
    available = rawsize - rawsize % 4096 - 2 * 4096 - 256 * 64
    internal_nlba = (available - 4096) // (internal_lbasize + 4)
    external_nlba = internal_nlba - 256
    mapsize = -(-(external_nlba * 4) // 4096) * 4096
    dataoff = 4096
    mapoff = dataoff + available - mapsize
    logoff = mapoff + mapsize
    return {"internal_lbasize": internal_lbasize, "internal_nlba": internal_nlba, "external_nlba": external_nlba,
            "dataoff": dataoff, "mapoff": mapoff, "logoff": logoff, "info2off": logoff + 256 * 64}


def read(e: BttEngine, lba: int) -> bytes:
    buf = bytearray(e.sector_size)
    e.read(lba * e.sector_size, memoryview(buf))
    return bytes(buf)


def write(e: BttEngine, lba: int, data: bytes) -> None:
    e.write(lba * e.sector_size, memoryview(data))


def raw_map(media: Media, e: BttEngine, premap: int) -> int:
    a = e.arenas[0]
    return struct.unpack("<I", media.pread(4, e.base + a.mapoff + 4 * premap))[0]


def log_group(media: Media, e: BttEngine, lane: int) -> list[tuple[int, int, int, int]]:
    a = e.arenas[0]
    raw = media.pread(64, e.base + a.logoff + 64 * lane)
    return [struct.unpack_from("<IIII", raw, 16 * j) for j in range(4)]


@pytest.mark.parametrize(("version", "start"), [(BTT_V1_1, 4096), (BTT_V2_0, 0)])
@pytest.mark.parametrize("lbasize", [512, 520, 4096, 4160])
def test_layout_by_version(media: Media, version: BttVersion, start: int, lbasize: int) -> None:
    """nd_btt_version(): BTT 1.1 starts 4 KiB into the namespace, 2.0 at its first byte; the
    info block and its backup hold the same btt_sb, the geometry alloc_arena()'s."""
    e = engine(media, version, lbasize)
    try:
        ref = reference_arena(SIZE - start, lbasize)
        sb = K.decode_btt_sb(media.pread(4096, NS_OFFSET + start))
        assert sb is not None
        assert (sb["version_major"], sb["version_minor"]) == (version.major, version.minor)
        assert sb["uuid"] == U_BTT and sb["parent_uuid"] == U_NS
        for field in ("internal_lbasize", "internal_nlba", "external_nlba", "dataoff", "mapoff", "logoff",
                      "info2off"):
            assert sb[field] == ref[field], field
        assert (sb["external_lbasize"], sb["nfree"], sb["nextoff"]) == (lbasize, 256, 0)
        assert media.pread(4096, NS_OFFSET + start + ref["info2off"]) == media.pread(4096, NS_OFFSET + start)
        # the disk: 512-byte sectors below lbasize 4096, 4096 from there (btt_init())
        assert e.sector_size == (4096 if lbasize >= 4096 else 512)
        assert e.size == ref["external_nlba"] * e.sector_size
        debugfs = dict(e.arenas[0].debugfs())
        assert debugfs["dataoff"] == f"0x{ref['dataoff']:016x}\n"
        assert debugfs["external_nlba"] == f"0x{ref['external_nlba']:08x}\n"
        assert debugfs["internal_lbasize"] == f"{ref['internal_lbasize']}\n"
        assert (debugfs["log_index_0"], debugfs["log_index_1"]) == ("0\n", "1\n")
        # the flog: slot 0 of each lane names its free block, slots 1-3 are padding (zeros)
        assert log_group(media, e, 7) == [(7, ref["external_nlba"] + 7, ref["external_nlba"] + 7, 1),
                                          (0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0)]
    finally:
        e.close()


def test_multiple_arenas_split_at_512_gib(tmp_path: Path) -> None:
    """create_arenas(): arenas of at most 512 GiB; a sparse media file makes this cheap."""
    size = (512 << 30) + 64 * M
    path = tmp_path / "big"
    Media.create(path, size)
    media = Media(path, size)
    try:
        e = BttEngine(media, 0, size, BTT_V1_1, 4096, U_BTT, U_NS, read_only=False)
        assert [a.size for a in e.arenas] == [512 << 30, size - 4096 - (512 << 30)]
        assert e.arenas[0].nextoff == 512 << 30 and e.arenas[1].nextoff == 0
        write(e, e.arenas[0].external_nlba + 5, b"B" * 4096)  # the second arena's lba 5
        e.close()
        e = BttEngine(media, 0, size, BTT_V1_1, 4096, U_BTT, U_NS, read_only=False)
        assert e.arenas[1].external_lba_start == e.arenas[0].external_nlba
        assert read(e, e.arenas[0].external_nlba + 5) == b"B" * 4096
        e.close()
    finally:
        media.close()


def check_invariants(media: Media, e: BttEngine) -> None:
    """Every internal block is mapped by exactly one lba or is exactly one lane's free block;
    each lane's free block is the old block of its newest flog entry, whose new block is
    still mapped by its lba unless a later write freed it."""
    a = e.arenas[0]
    mapped = []
    for premap in range(a.external_nlba):
        entry = raw_map(media, e, premap)
        assert entry >> 30 in (0, 3), (premap, hex(entry))
        mapped.append(premap if entry == 0 else entry & ~MAP_ENT_NORMAL)
    free = [f.block for f in a.freelist]
    assert sorted(mapped + free) == list(range(a.internal_nlba))
    for lane in range(a.nfree):
        _sub, (lba, old_map, new_map, seq) = e.log_read(0, lane, old=False)
        assert seq in (1, 2, 3)
        assert a.freelist[lane].block == old_map, lane
        if old_map != new_map:  # lba still maps there, or a later write (another lane) freed it
            assert mapped[lba] == new_map or new_map in free, lane


def test_write_path_keeps_every_block_mapped_or_free(media: Media) -> None:
    rng = random.Random(7)
    e = engine(media, BTT_V2_0, 512)
    written: dict[int, bytes] = {}
    for _ in range(3000):
        lba = rng.randrange(e.nlba)
        data = rng.randbytes(512)
        write(e, lba, data)
        written[lba] = data
    check_invariants(media, e)
    e.close()
    e = engine(media, BTT_V2_0, 512)  # the free list comes back from the flog
    try:
        check_invariants(media, e)
        for lba, data in written.items():
            assert read(e, lba) == data
        assert read(e, next(i for i in range(e.nlba) if i not in written)) == bytes(512)
    finally:
        e.close()


def test_partial_and_multi_sector_writes(media: Media) -> None:
    e = engine(media, BTT_V1_1, 512)
    try:
        e.write(1000, memoryview(b"x" * 3000))  # sectors 1-5, the first and last in part
        buf = bytearray(4096)
        e.read(0, memoryview(buf))
        assert bytes(buf) == bytes(1000) + b"x" * 3000 + bytes(96)
    finally:
        e.close()


def test_crash_after_the_flog_entry_is_replayed(media: Media) -> None:
    """btt_freelist_init(): a flog entry whose map write never happened is completed at the
    next start, so the sector is the new one."""
    e = engine(media)
    write(e, 3, b"o" * 4096)
    entry_before = raw_map(media, e, 3)
    write(e, 3, b"n" * 4096)
    e.close()
    # the crash: the map entry is still the old one
    media.pwrite(struct.pack("<I", entry_before), e.base + e.arenas[0].mapoff + 12)
    e = engine(media)
    try:
        assert read(e, 3) == b"n" * 4096
        check_invariants(media, e)
    finally:
        e.close()


def test_crash_before_the_flog_entry_keeps_the_old_sector(media: Media) -> None:
    e = engine(media)
    write(e, 3, b"o" * 4096)
    lane = e._next_lane
    free_block = e.arenas[0].freelist[lane].block
    e.close()
    # the crash: the data went to the lane's free block, nothing else was written
    media.pwrite(b"n" * 4096, e.base + e.arenas[0].dataoff + free_block * 4096)
    e = engine(media)
    try:
        assert read(e, 3) == b"o" * 4096
        check_invariants(media, e)
    finally:
        e.close()


def test_old_padding_format_is_recognised_and_kept(media: Media) -> None:
    """log_set_indices(): flog entries in slots 0 and 2 (the pre-4.15 padding) give log_index
    (0, 2), and writes keep using those slots."""
    e = engine(media)
    write(e, 1, b"a" * 4096)
    a = e.arenas[0]
    e.close()
    for lane in range(256):  # move slot 1 to slot 2
        group = log_group(media, e, lane)
        raw = b"".join(struct.pack("<IIII", *ent) for ent in (group[0], (0, 0, 0, 0), group[1], (0, 0, 0, 0)))
        media.pwrite(raw, e.base + a.logoff + 64 * lane)
    e = engine(media)
    try:
        assert e.arenas[0].log_index == [0, 2]
        for i in range(600):
            write(e, i % 50, bytes([i % 251]) * 4096)
        assert all(log_group(media, e, lane)[1] == (0, 0, 0, 0) for lane in range(256))
        check_invariants(media, e)
    finally:
        e.close()
    e = engine(media)
    try:
        assert e.arenas[0].log_index == [0, 2] and read(e, 49) == bytes([599 % 251]) * 4096
    finally:
        e.close()


def test_unknown_padding_scheme_is_refused(media: Media) -> None:
    e = engine(media)
    write(e, 1, b"a" * 4096)
    e.close()
    for lane in range(256):  # entries in slots 1 and 3: no kernel wrote that
        group = log_group(media, e, lane)
        raw = b"".join(struct.pack("<IIII", *ent) for ent in ((0, 0, 0, 0), group[0], (0, 0, 0, 0), group[1]))
        media.pwrite(raw, e.base + e.arenas[0].logoff + 64 * lane)
    with pytest.raises(BttError) as info:
        engine(media)
    assert info.value.errno == errno.ENXIO


def test_media_error_sets_the_map_error_flag_and_a_write_clears_it(media: Media) -> None:
    """btt_read_pg(): a read of a bad block fails with EIO and sets the map entry's error
    flag; btt_write_pg(): a write of that lba goes to a free block, and the bad block, freed
    with the error in its flog entry, is zeroed, which clears the poison."""
    e = engine(media)
    try:
        write(e, 9, b"d" * 4096)
        postmap = raw_map(media, e, 9) & ~MAP_ENT_NORMAL
        block = e.base + e.arenas[0].dataoff + postmap * 4096
        media.badblocks.set(block // 512 + 2, 1)
        with pytest.raises(OSError) as info:
            read(e, 9)
        assert info.value.errno == errno.EIO
        assert raw_map(media, e, 9) == postmap | MAP_ERR_MASK
        with pytest.raises(OSError):
            read(e, 9)  # the flag alone fails it now
        write(e, 9, b"e" * 4096)
        assert read(e, 9) == b"e" * 4096
        assert not media.badblocks  # the old block was cleared
        assert os.pread(media.fd, 4096, block) == bytes(4096)
    finally:
        e.close()


def test_a_read_only_region_gets_no_new_btt(media: Media) -> None:
    with pytest.raises(BttError) as info:
        BttEngine(media, NS_OFFSET, SIZE, BTT_V1_1, 4096, U_BTT, U_NS, read_only=True)
    assert info.value.errno == errno.ENXIO
    assert media.pread(4096, NS_OFFSET + 4096) == bytes(4096)


def test_an_older_vnvdimm_in_place_520_byte_layout_is_refused(media: Media) -> None:
    """Older vnvdimm wrote 520-byte sectors in place (block k: disk bytes [520k, 520k + 520))
    with the map and flog as created: read as the kernel's BTT (512-byte sectors) it would be
    shifted, so it is refused; a new 520-byte BTT starts with its data area punched out and is
    not mistaken for one, before or after a write."""
    e = engine(media, BTT_V1_1, 520)
    a = e.arenas[0]
    e.close()
    for k in range(3):  # what the old in-place write path left
        media.pwrite(bytes([k + 1]) * 520, e.base + a.dataoff + k * a.internal_lbasize)
    with pytest.raises(BttError) as info:
        engine(media, BTT_V1_1, 520)
    assert info.value.errno == errno.ENXIO and "older vnvdimm" in str(info.value)
    media.zero(NS_OFFSET + 4096, 4096)  # ndctl's reconfiguration wipes the info block
    e = engine(media, BTT_V1_1, 520)  # a new BTT over it
    try:
        assert read(e, 0) == bytes(512)
    finally:
        e.close()
    e = engine(media, BTT_V1_1, 520)  # found again, unwritten
    write(e, 5, b"w" * 512)
    e.close()
    e = engine(media, BTT_V1_1, 520)  # found again, written
    try:
        assert read(e, 5) == b"w" * 512
    finally:
        e.close()


def test_an_older_vnvdimm_in_place_4096_byte_layout_reads_as_it_was(media: Media) -> None:
    """For 512 and 4096 the old in-place layout is a BTT with an identity map: used as is."""
    e = engine(media, BTT_V1_1, 4096)
    a = e.arenas[0]
    e.close()
    media.pwrite(b"k" * 4096, e.base + a.dataoff + 7 * 4096)
    e = engine(media, BTT_V1_1, 4096)
    try:
        assert read(e, 7) == b"k" * 4096
        write(e, 7, b"n" * 4096)
        assert read(e, 7) == b"n" * 4096
    finally:
        e.close()


@pytest.mark.parametrize("lbasize", [512, 4096])
def test_an_older_vnvdimm_v1_1_is_converted_to_v2_0_in_place(media: Media, lbasize: int) -> None:
    """The BTT 1.1 at 4 KiB an older vnvdimm wrote in place on a v1.2-labelled namespace
    becomes a BTT 2.0 at offset 0 whose map finds every old sector where it was; a crash
    before the last step converts again; the result is a consistent BTT."""
    e = engine(media, BTT_V1_1, lbasize)  # the old layout: info blocks, zero map, fresh flog
    a = e.arenas[0]
    e.close()
    rng = random.Random(lbasize)
    old = {k: rng.randbytes(lbasize) for k in rng.sample(range(a.external_nlba), 200)}
    old[a.external_nlba - 1] = b"L" * lbasize
    for k, data in old.items():  # in place, as the old write path did
        media.pwrite(data, e.base + a.dataoff + k * a.internal_lbasize)
    old_info = media.pread(4096, NS_OFFSET + 4096)
    convert_in_place_v1_1(media, NS_OFFSET, SIZE, lbasize, U_BTT, U_NS)
    sb = K.decode_btt_sb(media.pread(4096, NS_OFFSET))
    assert sb is not None and (sb["version_major"], sb["version_minor"]) == (2, 0) and sb["uuid"] == U_BTT
    assert media.pread(4096, NS_OFFSET + 4096) == bytes(4096)  # no BTT 1.1 left to find
    # a crash before the info block at 0 was written: the old BTT 1.1 is still the valid one
    media.zero(NS_OFFSET, 4096)
    media.pwrite(old_info, NS_OFFSET + 4096)
    convert_in_place_v1_1(media, NS_OFFSET, SIZE, lbasize, U_BTT, U_NS)
    # a crash after it, before the old info block was zeroed: the next start zeroes it
    media.pwrite(old_info, NS_OFFSET + 4096)
    e = engine(media, BTT_V2_0, lbasize)
    e.drop_stale_v1_1_info()
    assert media.pread(4096, NS_OFFSET + 4096) == bytes(4096)
    try:
        assert e.nlba >= a.external_nlba
        for k, data in old.items():
            assert read(e, k) == data, k
        assert read(e, e.nlba - 1) == bytes(lbasize)  # a sector the old disk did not have
        check_invariants(media, e)
        for k in list(old)[:50]:  # the lanes' free blocks are really free
            write(e, k, b"n" * lbasize)
        for k, data in list(old.items())[50:]:
            assert read(e, k) == data, k
        check_invariants(media, e)
    finally:
        e.close()


def test_an_older_vnvdimm_v1_1_of_520_byte_sectors_is_not_converted(media: Media) -> None:
    e = engine(media, BTT_V1_1, 520)
    e.close()
    with pytest.raises(BttError) as info:
        convert_in_place_v1_1(media, NS_OFFSET, SIZE, 520, U_BTT, U_NS)
    assert info.value.errno == errno.ENXIO and "refusing" in str(info.value)
    assert media.pread(4096, NS_OFFSET) == bytes(4096)


@pytest.mark.parametrize("lbasize", [512, 520, 4096])
def test_a_long_read_equals_its_sectors(media: Media, lbasize: int) -> None:
    """A read of many sectors (blocks that follow each other on the media are read together)
    returns what each sector reads on its own, at any alignment."""
    rng = random.Random(lbasize)
    e = engine(media, BTT_V1_1, lbasize)
    try:
        ss = e.sector_size
        media.pwrite(rng.randbytes(64 * ss), e.base + e.arenas[0].dataoff)  # identity-mapped blocks
        for lba in rng.sample(range(64), 20):  # remapped ones in between
            write(e, lba, rng.randbytes(ss))
        whole = b"".join(read(e, lba) for lba in range(64))
        for start, length in ((0, 64 * ss), (ss, 10 * ss), (100, 40 * ss + 7), (3 * ss - 1, 2)):
            buf = bytearray(length)
            e.read(start, memoryview(buf))
            assert bytes(buf) == whole[start: start + length], (start, length)
    finally:
        e.close()


def test_an_info_block_whose_data_area_overlaps_the_map_is_refused(media: Media) -> None:
    """A damaged (yet checksummed) info block whose internal_nlba runs the data area into the
    map would let a write land on the map: the BTT does not start, and nothing is written."""
    from vnvdimm.model.infoblock import sb_checksum

    e = engine(media)
    e.close()
    for off in (0, e.arenas[0].info2off):
        block = bytearray(media.pread(4096, e.base + off))
        struct.pack_into("<I", block, 68, struct.unpack_from("<I", block, 68)[0] + 64)  # internal_nlba
        block[4088:] = struct.pack("<Q", sb_checksum(bytes(block)))
        media.pwrite(bytes(block), e.base + off)
    before = media.pread(SIZE, NS_OFFSET)
    with pytest.raises(BttError) as info:
        engine(media)
    assert info.value.errno == errno.ENODEV
    assert media.pread(SIZE, NS_OFFSET) == before


def test_an_existing_arena_keeps_its_geometry_whatever_the_sector_size(media: Media) -> None:
    """discover_arenas(): a valid info block is taken as it is; a BTT enabled with another
    sector size runs over the arena laid out for the first one (libndctl's check_btt_size()
    expects exactly this: nlba of the 512-byte arena times 4096 for a 4096-byte BTT)."""
    first = engine(media, BTT_V1_1, 512)
    nlba = first.arenas[0].external_nlba
    info = media.pread(4096, first.base)
    first.close()

    big = engine(media, BTT_V1_1, 4096)
    try:
        a = big.arenas[0]
        assert (a.external_lbasize, a.internal_lbasize, a.external_nlba) == (512, 512, nlba)
        assert (big.sector_size, big.size) == (4096, nlba * 4096)  # more than the namespace holds
        data = bytes(range(256)) * 16
        write(big, 0, data)
        assert read(big, 0) == data
    finally:
        big.close()
    assert media.pread(4096, NS_OFFSET + 4096) == info  # nothing re-created

    # the sector went whole into lane 0's free block and the seven blocks after it: a BTT of
    # 512-byte sectors over the same arena reads its first 512 bytes at lba 0
    again = engine(media, BTT_V1_1, 520)
    try:
        assert (again.sector_size, again.size) == (512, nlba * 512)
        assert read(again, 0) == data[:512]
    finally:
        again.close()
