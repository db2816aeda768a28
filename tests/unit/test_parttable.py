"""The partition tables the daemon reads for a host kernel without parsers: what the kernel's
efi and msdos parsers would find, nothing from a damaged table."""

from __future__ import annotations

import struct
import zlib

from vnvdimm.parttable import TablePartition, read_table

MIB = 1 << 20


def disk_reader(image: bytearray):  # type: ignore[no-untyped-def]
    def read(offset: int, length: int) -> bytes:
        return bytes(image[offset:offset + length])
    return read


def mbr(entries: list[tuple[int, int, int]]) -> bytes:
    """A boot sector with (type, first sector, sectors) entries."""
    sector = bytearray(512)
    for i, (kind, first, count) in enumerate(entries):
        struct.pack_into("<B3xBxxxII", sector, 446 + 16 * i, 0, kind, first, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def gpt_image(size: int, parts: list[tuple[int, int, int]], sector: int = 512) -> bytearray:
    """A GPT disk: protective MBR, header at LBA 1, 128 entries from LBA 2; parts are
    (entry index, first LBA, last LBA)."""
    image = bytearray(size)
    image[0:512] = mbr([(0xEE, 1, size // 512 - 1)])
    entries = bytearray(128 * 128)
    for index, first, last in parts:
        struct.pack_into("<16s16sQQ", entries, index * 128, b"\x11" * 16, b"\x22" * 16, first, last)
    header = bytearray(92)
    header[:8] = b"EFI PART"
    struct.pack_into("<IIIIQQQQ16sQIII", header, 8, 0x10000, 92, 0, 0, 1, size // sector - 1, 34,
                     size // sector - 34, b"\x33" * 16, 2, 128, 128, zlib.crc32(entries))
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header)))
    image[sector:sector + 92] = header
    image[2 * sector:2 * sector + len(entries)] = entries
    return image


def test_gpt_partitions_by_their_entry_number() -> None:
    image = gpt_image(64 * MIB, [(0, 2048, 18431), (2, 18432, 83967)])
    assert read_table(disk_reader(image), len(image), 512) == [
        TablePartition(1, MIB, 8 * MIB), TablePartition(3, 9 * MIB, 32 * MIB)]


def test_a_gpt_whose_crc_does_not_match_has_no_partitions() -> None:
    image = gpt_image(64 * MIB, [(0, 2048, 18431)])
    image[2 * 512 + 40] ^= 1  # an entry changed behind the header's CRC
    assert read_table(disk_reader(image), len(image), 512) == []


def test_partitions_past_the_disk_end_are_left_out() -> None:
    image = gpt_image(16 * MIB, [(0, 2048, 40959), (1, 2048, 4095)])
    assert read_table(disk_reader(image), len(image), 512) == [TablePartition(2, MIB, MIB)]


def test_mbr_primary_extended_and_logical_partitions() -> None:
    image = bytearray(64 * MIB)
    image[0:512] = mbr([(0x83, 2048, 8192), (0x05, 10240, 40960)])
    # the chain of extended boot records: each its partition (relative to itself) and the next
    image[10240 * 512:10241 * 512] = mbr([(0x83, 2048, 4096), (0x05, 8192, 8192)])
    image[(10240 + 8192) * 512:(10240 + 8193) * 512] = mbr([(0x83, 2048, 2048)])
    assert read_table(disk_reader(image), len(image), 512) == [
        TablePartition(1, MIB, 4 * MIB),
        TablePartition(2, 5 * MIB, 1024),  # the extended partition: a 1 KiB stub, as the kernel shows it
        TablePartition(5, (10240 + 2048) * 512, 2 * MIB),
        TablePartition(6, (10240 + 8192 + 2048) * 512, MIB)]


def test_no_signature_no_table_and_unreadable_sectors_no_table() -> None:
    image = bytearray(MIB)
    assert read_table(disk_reader(image), len(image), 512) == []

    def bad(offset: int, length: int) -> bytes:
        raise OSError(5, "media error")
    assert read_table(bad, MIB, 512) == []
