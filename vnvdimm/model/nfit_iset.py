"""Interleave-set cookies, computed from NFIT table fields as drivers/acpi/nfit/core.c
(acpi_nfit_init_interleave_set()) does, so that labels written by a kernel on the same
platform carry the cookie vnvdimm expects (and the other way round).

For every DIMM of a PM region the kernel takes the memory-device-map entry of that SPA range
(its `region_offset`) and the DIMM's control region (serial number, vendor id, manufacturing
date and location, as the raw little-endian table fields), then:

    cookie1   (v1.1 labels)  fletcher64 of {u64 region_offset, u32 serial, u32 pad}[],
                             sorted by region_offset as a number
    cookie2   (v1.2 labels)  fletcher64 of {u64 region_offset, u32 serial, u16 vendor_id,
                             u16 manufacturing_date, u8 manufacturing_location, u8 reserved[31]}[],
                             sorted the same way
    altcookie (old v1.1)     the cookie1 records sorted by memcmp() of the little-endian
                             region_offset bytes (the sort order of kernels before 4.11)

and gives each mapping its position: its index in the cookie2 sort order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vnvdimm.model.infoblock import fletcher64
from vnvdimm.model.label_format import InterleaveSet
from vnvdimm.model.label_layout import UUID_PERSISTENT_MEMORY

SET_INFO = struct.Struct("<QII")  # struct nfit_set_info
SET_INFO2 = struct.Struct("<QIHHB31s")  # struct nfit_set_info2


@dataclass(frozen=True)
class DcrIdentity:
    """The identity fields of a DIMM's NFIT control region, as the raw table values
    (vendor_id and manufacturing_date as u16 read little-endian from the table bytes)."""

    vendor_id: int
    serial_number: int
    manufacturing_date: int
    manufacturing_location: int
    device_id: int = 0
    revision_id: int = 0
    valid_fields: int = 1  # ACPI_NFIT_CONTROL_MFG_INFO_VALID

    @property
    def nfit_id(self) -> str:
        """The DIMM's `nfit/id` (and ndctl's "id"): the big-endian view of the fields."""
        vendor = _swab16(self.vendor_id)
        serial = int.from_bytes(self.serial_number.to_bytes(4, "little"), "big")
        if self.valid_fields & 1:
            return f"{vendor:04x}-{self.manufacturing_location:02x}-{_swab16(self.manufacturing_date):04x}-{serial:08x}"
        return f"{vendor:04x}-{serial:08x}"


def _swab16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


@dataclass(frozen=True)
class SetMember:
    """One DIMM's share of a PM SPA range, as the memory-device-map entry records it."""

    region_offset: int
    dcr: DcrIdentity


def interleave_set(members: Sequence[SetMember]) -> tuple[InterleaveSet, list[int]]:
    """The interleave set of a region and the position of each member (in `members` order)."""
    info = [(m.region_offset, m.dcr.serial_number) for m in members]

    def pack1(entries: list[tuple[int, int]]) -> bytes:
        return b"".join(SET_INFO.pack(off & (2**64 - 1), serial & 0xFFFF_FFFF, 0) for off, serial in entries)

    cookie1 = fletcher64(pack1(sorted(info, key=lambda e: e[0])))
    altcookie = fletcher64(pack1(sorted(info, key=lambda e: struct.pack("<Q", e[0]))))
    order = sorted(range(len(members)), key=lambda i: members[i].region_offset)
    cookie2 = fletcher64(b"".join(
        SET_INFO2.pack(members[i].region_offset, members[i].dcr.serial_number & 0xFFFF_FFFF,
                       members[i].dcr.vendor_id, members[i].dcr.manufacturing_date,
                       members[i].dcr.manufacturing_location, bytes(31))
        for i in order))
    positions = [0] * len(members)
    for pos, i in enumerate(order):
        # the kernel matches the sorted record back to a mapping by DCR identity (first match)
        ident = members[i].dcr
        first = next(j for j, m in enumerate(members)
                     if (m.dcr.serial_number, m.dcr.vendor_id, m.dcr.manufacturing_date,
                         m.dcr.manufacturing_location) == (ident.serial_number, ident.vendor_id,
                                                           ident.manufacturing_date, ident.manufacturing_location))
        positions[first] = pos
    return InterleaveSet(cookie1, cookie2, altcookie, UUID_PERSISTENT_MEMORY), positions
