"""Address range scrub, error injection and clearing: the bus side of nfit_test's firmware.

Two lists of media errors, as on a real platform:

* the platform's (`PlatformErrors`, nfit_test's `t->badrange`): what the memory really has.
  ARS_INJECT_SET adds to it, ARS_INJECT_CLEAR and CLEAR_ERROR remove from it, ARS_INJECT_GET
  lists it, and an ARS run (ARS_START, then ARS_STATUS) reports what it holds in the range;
* the kernel's (the region media's bad sectors, `regionN/badblocks`, EIO on reads): only what
  a scrub found. A scrub (`nfit/scrub`, or an injection with the notify option, which raises the
  platform's "uncorrectable memory error" notification) copies the platform's errors into it;
  a write over a bad sector or CLEAR_ERROR clears both.

Addresses are system physical addresses (the regions' `resource`); lengths are bytes.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vnvdimm.model.commands.envelope import CommandError

if TYPE_CHECKING:
    from vnvdimm.model.region import Region

log = logging.getLogger("vnvdimm.model")

SECTOR = 512
CLEAR_ERR_UNIT = 256  # NFIT_TEST_CLEAR_ERR_UNIT: what one CLEAR_ERROR clears at least
ND_ARS_VOLATILE, ND_ARS_PERSISTENT = 1, 2
NFIT_ARS_INJECT_INVALID = 2
ND_ARS_ERR_INJ_OPT_NOTIFY = 0
ARS_RECORD = struct.Struct("<IIQQ")  # handle, reserved, err_address, length
ARS_STATUS_HEADER = struct.Struct("<IIQQQQHHI")  # 48 bytes
MAX_ARS_RECORDS = 4096 // ARS_RECORD.size
INJECT_RECORD = struct.Struct("<QQ")
MAX_INJECT_RECORDS = 4096 // INJECT_RECORD.size
MAX_PLATFORM_ERRORS = 4096  # injected error ranges the platform keeps (a caller cannot grow it without end)

NFIT_CMD_TRANSLATE_SPA = 5
NFIT_CMD_ARS_INJECT_SET = 7
NFIT_CMD_ARS_INJECT_CLEAR = 8
NFIT_CMD_ARS_INJECT_GET = 9


class PlatformErrors:
    """drivers/nvdimm/badrange.c semantics: entries in insertion order, an add at an existing
    start replaces that entry's length, a forget trims or splits the entries it overlaps."""

    def __init__(self) -> None:
        self.entries: list[list[int]] = []  # [start, length]

    def add(self, start: int, length: int) -> None:
        for entry in self.entries:
            if entry[0] == start:
                entry[1] = length
                return
        if len(self.entries) >= MAX_PLATFORM_ERRORS:
            # the kernel's badrange list is bounded by the memory it can allocate; ours by this
            raise CommandError(errno.ENOMEM, f"{len(self.entries)} injected errors already")
        self.entries.append([start, length])

    def forget(self, start: int, length: int) -> None:
        end = start + length
        kept: list[list[int]] = []
        for s, n in self.entries:
            e = s + n
            if e <= start or s >= end:
                kept.append([s, n])
                continue
            if s < start:
                kept.append([s, start - s])
            if e > end:
                kept.append([end, e - end])
        self.entries = kept

    def within(self, start: int, length: int) -> Iterator[tuple[int, int]]:
        """The parts of the entries inside [start, start + length)."""
        end = start + length
        for s, n in self.entries:
            lo, hi = max(s, start), min(s + n, end)
            if lo < hi:
                yield lo, hi - lo


@dataclass
class ArsState:
    """The last ARS run's result (nfit_test's ars_state->ars_status)."""

    address: int = 0
    length: int = 0
    records: list[tuple[int, int]] = field(default_factory=list)


class BusFirmware:
    """The bus's answers to ARS and the NFIT family's ND_CMD_CALLs. `regions` yields the
    bus's regions; `poison` is the kernel's side: poison(region, first sector, count, add)."""

    def __init__(self, regions: Callable[[], list[Region]],
                 poison: Callable[[Region, int, int, bool], None], handle_of: Callable[[Region], int]) -> None:
        self.regions = regions
        self.poison = poison
        self.handle_of = handle_of
        self.errors = PlatformErrors()
        self.ars = ArsState()
        self.scrub_count = 0

    # ------------------------------------------------------------ the kernel's scrub

    def scrub(self) -> int:
        """acpi_nfit_ars_rescan() run to completion: every region is scrubbed and what the
        platform reports becomes known poison. Returns the number of new bad ranges."""
        found = 0
        for region in self.regions():
            self.ars = ArsState(region.start, region.size, list(self.errors.within(region.start, region.size)))
            for address, length in self.ars.records:
                first = (address - region.start) // SECTOR
                last = -(-(address + length - region.start) // SECTOR)
                self.poison(region, first, last - first, True)
                found += 1
        self.scrub_count += 1
        log.info("scrub %d: %d error range(s) found", self.scrub_count, found)
        return found

    def forget_poison(self, address: int, length: int) -> None:
        """nvdimm_account_cleared_poison(): cleared bytes leave the kernel's lists too
        (whole sectors only: a partly cleared sector stays bad)."""
        for region in self.regions():
            lo, hi = max(address, region.start), min(address + length, region.start + region.size)
            if lo < hi:
                first = -(-(lo - region.start) // SECTOR)
                last = (hi - region.start) // SECTOR
                if last > first:
                    self.poison(region, first, last - first, False)

    def media_written(self, region: Region, offset: int, length: int) -> None:
        """pmem_clear_poison() after a write: the platform forgets the whole clear units the
        write covered (it sends CLEAR_ERROR for them)."""
        start = region.start + offset
        lo = -(-start // CLEAR_ERR_UNIT) * CLEAR_ERR_UNIT
        hi = (start + length) // CLEAR_ERR_UNIT * CLEAR_ERR_UNIT
        if hi > lo:
            self.errors.forget(lo, hi - lo)

    # ------------------------------------------------------------ ND_CMD_ARS_*

    def ars_cap(self, buf: bytearray) -> int:
        if len(buf) < 32:
            raise CommandError(errno.EINVAL, "ars_cap buffer too small")
        max_ars_out = ARS_STATUS_HEADER.size + MAX_ARS_RECORDS * ARS_RECORD.size
        struct.pack_into("<IIIHH", buf, 16, (ND_ARS_PERSISTENT | ND_ARS_VOLATILE) << 16, max_ars_out,
                         CLEAR_ERR_UNIT, 0, 0)
        return 0

    def ars_start(self, buf: bytearray) -> int:
        if len(buf) < 32:
            raise CommandError(errno.EINVAL, "ars_start buffer too small")
        address, length = struct.unpack_from("<QQ", buf, 0)
        records = list(self.errors.within(address, length))[:MAX_ARS_RECORDS]
        self.ars = ArsState(address, length, records)
        struct.pack_into("<II", buf, 24, 0, 1)  # status, scrub_time: done at once
        return 0

    def ars_status(self, buf: bytearray) -> int:
        out_length = ARS_STATUS_HEADER.size + len(self.ars.records) * ARS_RECORD.size
        if len(buf) < out_length:
            raise CommandError(errno.EINVAL, f"ars_status buffer of {len(buf)} bytes, {out_length} needed")
        ARS_STATUS_HEADER.pack_into(buf, 0, 0, out_length, self.ars.address, self.ars.length, 0, 0,
                                    ND_ARS_PERSISTENT, 0, len(self.ars.records))
        for i, (address, length) in enumerate(self.ars.records):
            ARS_RECORD.pack_into(buf, ARS_STATUS_HEADER.size + i * ARS_RECORD.size, 0, 0, address, length)
        return 0

    def clear_error(self, buf: bytearray) -> int:
        if len(buf) < 32:
            raise CommandError(errno.EINVAL, "clear_error buffer too small")
        address, length = struct.unpack_from("<QQ", buf, 0)
        mask = CLEAR_ERR_UNIT - 1
        if address & mask or length & mask:
            raise CommandError(errno.EINVAL, f"clear_error of [{address:#x}, +{length:#x}) not in {CLEAR_ERR_UNIT}s")
        self.errors.forget(address, length)
        struct.pack_into("<I4xQ", buf, 16, 0, length)
        self.forget_poison(address, length)
        return 0

    # ------------------------------------------------------------ ND_CMD_CALL, NFIT family

    def call(self, func: int, buf: memoryview) -> tuple[int, bool]:
        """Returns (rc, notify): notify when the platform raises its memory error event."""
        if func == NFIT_CMD_ARS_INJECT_SET:
            if len(buf) != 21:
                if len(buf) >= 21:
                    struct.pack_into("<I", buf, 17, NFIT_ARS_INJECT_INVALID)
                raise CommandError(errno.EINVAL, f"inject payload of {len(buf)} bytes")
            base, length, options = struct.unpack_from("<QQB", buf, 0)
            if length == 0:
                struct.pack_into("<I", buf, 17, NFIT_ARS_INJECT_INVALID)
                raise CommandError(errno.EINVAL, "inject of 0 bytes")
            try:
                self.errors.add(base, length)
            except CommandError:
                struct.pack_into("<I", buf, 17, NFIT_ARS_INJECT_INVALID)
                raise
            struct.pack_into("<I", buf, 17, 0)
            log.info("platform error injected at %#x, %d bytes", base, length)
            return 0, bool(options >> ND_ARS_ERR_INJ_OPT_NOTIFY & 1)
        if func == NFIT_CMD_ARS_INJECT_CLEAR:
            if len(buf) != 20:
                if len(buf) >= 20:
                    struct.pack_into("<I", buf, 16, NFIT_ARS_INJECT_INVALID)
                raise CommandError(errno.EINVAL, f"inject clear payload of {len(buf)} bytes")
            base, length = struct.unpack_from("<QQ", buf, 0)
            if length == 0:
                struct.pack_into("<I", buf, 16, NFIT_ARS_INJECT_INVALID)
                raise CommandError(errno.EINVAL, "inject clear of 0 bytes")
            self.errors.forget(base, length)
            struct.pack_into("<I", buf, 16, 0)
            return 0, False
        if func == NFIT_CMD_ARS_INJECT_GET:
            if len(buf) < 8:
                raise CommandError(errno.EINVAL, "inject status payload too small")
            room = (len(buf) - 8) // INJECT_RECORD.size
            records = self.errors.entries[:min(room, MAX_INJECT_RECORDS)]
            struct.pack_into("<II", buf, 0, 0, len(records))
            for i, (start, length) in enumerate(records):
                INJECT_RECORD.pack_into(buf, 8 + i * INJECT_RECORD.size, start, length)
            return 0, False
        if func == NFIT_CMD_TRANSLATE_SPA:
            return self.translate_spa(buf), False
        raise CommandError(errno.ENOTTY, f"NFIT bus function {func}")

    def translate_spa(self, buf: memoryview) -> int:
        """nfit_test_search_spa(): the region holding the address answers with its last DIMM
        and the offset into the region as the DPA."""
        if len(buf) < 28:
            raise CommandError(errno.EINVAL, "translate_spa payload too small")
        spa, = struct.unpack_from("<Q", buf, 0)
        translate_length, = struct.unpack_from("<Q", buf, 16)
        if len(buf) < translate_length:
            raise CommandError(errno.EINVAL, "translate_spa payload shorter than its translate_length")
        for region in self.regions():
            if region.start <= spa < region.start + region.size and region.mappings and len(buf) >= 44:
                struct.pack_into("<I", buf, 24, 1)
                struct.pack_into("<IIQ", buf, 28, self.handle_of(region), 0, spa - region.start)
                return 0
        struct.pack_into("<I", buf, 8, 2)  # ND_TRANSLATE_SPA_STATUS_INVALID_SPA
        return 0
