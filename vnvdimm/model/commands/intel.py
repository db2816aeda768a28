"""The Intel DIMM command family (NVDIMM_FAMILY_INTEL) as nfit_test's firmware answers it:
health (SMART, thresholds, injection), latch-shutdown-status, and the firmware update state
machine. Payloads are the packed structs of ndctl's intel.h, answered in place."""

from __future__ import annotations

import errno
import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum

from vnvdimm.model.commands.envelope import CommandError

ND_INTEL_SMART = 1
ND_INTEL_SMART_THRESHOLD = 2
ND_INTEL_ENABLE_LSS_STATUS = 10
ND_INTEL_FW_GET_INFO = 12
ND_INTEL_FW_START_UPDATE = 13
ND_INTEL_FW_SEND_DATA = 14
ND_INTEL_FW_FINISH_UPDATE = 15
ND_INTEL_FW_FINISH_QUERY = 16
ND_INTEL_SMART_SET_THRESHOLD = 17
ND_INTEL_SMART_INJECT = 18

SMART_HEALTH_VALID, SMART_SPARES_VALID, SMART_USED_VALID = 1 << 0, 1 << 1, 1 << 2
SMART_MTEMP_VALID, SMART_CTEMP_VALID, SMART_SHUTDOWN_COUNT_VALID = 1 << 3, 1 << 4, 1 << 5
SMART_ALARM_VALID, SMART_SHUTDOWN_VALID = 1 << 9, 1 << 10
SMART_SPARE_TRIP, SMART_TEMP_TRIP, SMART_CTEMP_TRIP = 1 << 0, 1 << 1, 1 << 2
HEALTH_NON_CRITICAL, HEALTH_FATAL = 1 << 0, 1 << 2
INJECT_MTEMP, INJECT_SPARE, INJECT_FATAL, INJECT_SHUTDOWN = 1 << 0, 1 << 1, 1 << 2, 1 << 3

# struct nd_intel_smart after its status word: flags, reserved0[4], health, spares, life_used,
# alarm_flags, media_temperature, ctrl_temperature, shutdown_count, ait_status,
# pmic_temperature, reserved1[8], shutdown_state, vendor_size, vendor_data[92]
SMART = struct.Struct("<I4xBBBBHHIBH8xBI92x")
THRESHOLD = struct.Struct("<HBHHx")  # alarm_control, spares, media_temperature, ctrl_temperature
SET_THRESHOLD_SIZE = 11
INJECT = struct.Struct("<QBHBBBBI")  # flags, mtemp_enable, media_temperature, spare_enable, spares, ...

FW_STORAGE_SIZE = 0x100000
FW_MAX_SEND_LEN = 16
FW_QUERY_INTERVAL_US = 250000
FW_QUERY_MAX_TIME_US = 3000000
FW_FIS_VERSION = 0x0105
FW_FAKE_VERSION = 0xFFFFFFFFABCD
FW_VERIFY_SECONDS = 1.0  # the time nfit_test's firmware takes to "verify" an image
FW_INFO = struct.Struct("<IIIIIB3xIQQ")


@dataclass
class Smart:
    """The health a DIMM reports (nfit_test's smart_def), with degrees in 1/16 °C."""

    flags: int = (SMART_HEALTH_VALID | SMART_SPARES_VALID | SMART_ALARM_VALID | SMART_USED_VALID
                  | SMART_SHUTDOWN_VALID | SMART_SHUTDOWN_COUNT_VALID | SMART_MTEMP_VALID | SMART_CTEMP_VALID)
    health: int = HEALTH_NON_CRITICAL
    spares: int = 75
    life_used: int = 5
    alarm_flags: int = SMART_SPARE_TRIP | SMART_TEMP_TRIP
    media_temperature: int = 23 * 16
    ctrl_temperature: int = 25 * 16
    shutdown_count: int = 42
    ait_status: int = 1
    pmic_temperature: int = 40 * 16
    shutdown_state: int = 0

    def pack(self) -> bytes:
        return SMART.pack(self.flags, self.health, self.spares, self.life_used, self.alarm_flags,
                          self.media_temperature, self.ctrl_temperature, self.shutdown_count, self.ait_status,
                          self.pmic_temperature, self.shutdown_state, 0)


@dataclass
class Threshold:
    alarm_control: int = SMART_SPARE_TRIP | SMART_TEMP_TRIP
    spares: int = 5
    media_temperature: int = 40 * 16
    ctrl_temperature: int = 30 * 16

    def pack(self) -> bytes:
        return THRESHOLD.pack(self.alarm_control, self.spares, self.media_temperature, self.ctrl_temperature)


class FwState(IntEnum):
    NEW = 0
    IN_PROGRESS = 1
    VERIFY = 2
    UPDATED = 3


@dataclass
class Firmware:
    state: FwState = FwState.NEW
    context: int = 0
    version: int = 0
    size_received: int = 0
    end_time: float = 0.0


@dataclass
class IntelDimm:
    """What one DIMM's firmware holds."""

    smart: Smart = field(default_factory=Smart)
    threshold: Threshold = field(default_factory=Threshold)
    fw: Firmware = field(default_factory=Firmware)

    def alarm(self) -> bool:
        """smart_notify(): the conditions that make the DIMM raise a health event."""
        s, t = self.smart, self.threshold
        return bool((t.alarm_control & SMART_SPARE_TRIP and s.spares <= t.spares)
                    or (t.alarm_control & SMART_TEMP_TRIP and s.media_temperature >= t.media_temperature)
                    or (t.alarm_control & SMART_CTEMP_TRIP and s.ctrl_temperature >= t.ctrl_temperature)
                    or s.health != HEALTH_NON_CRITICAL or s.shutdown_state != 0)


def _status(buf: memoryview, offset: int, value: int) -> None:
    struct.pack_into("<I", buf, offset, value)


def _need(buf: memoryview, size: int) -> None:
    if len(buf) < size:
        raise CommandError(errno.EINVAL, f"payload of {len(buf)} bytes, {size} needed")


def call(dimm: IntelDimm, func: int, buf: memoryview) -> tuple[int, bool]:
    """One ND_CMD_CALL of the Intel family on `buf` (the payload, nd_size_in + nd_size_out
    bytes). Returns (rc, notify): notify when the DIMM raises its health event."""
    if func == ND_INTEL_SMART:
        _need(buf, 4 + SMART.size)
        buf[:4 + SMART.size] = struct.pack("<I", 0) + dimm.smart.pack()
        return 0, False
    if func == ND_INTEL_SMART_THRESHOLD:
        _need(buf, 4 + THRESHOLD.size)
        buf[:4 + THRESHOLD.size] = struct.pack("<I", 0) + dimm.threshold.pack()
        return 0, False
    if func == ND_INTEL_SMART_SET_THRESHOLD:
        _need(buf, SET_THRESHOLD_SIZE - 4)
        t = dimm.threshold
        t.alarm_control, t.spares, t.media_temperature, t.ctrl_temperature = struct.unpack_from("<HBHH", buf, 0)
        if len(buf) >= SET_THRESHOLD_SIZE:
            _status(buf, 7, 0)
        return 0, dimm.alarm()
    if func == ND_INTEL_SMART_INJECT:
        if len(buf) != INJECT.size:
            raise CommandError(errno.EINVAL, f"inject payload of {len(buf)} bytes")
        flags, mtemp_on, mtemp, spare_on, spares, fatal_on, unsafe_on, _ = INJECT.unpack_from(buf, 0)
        s, default = dimm.smart, Smart()
        if flags & INJECT_MTEMP:
            s.media_temperature = mtemp if mtemp_on else default.media_temperature
        if flags & INJECT_SPARE:
            s.spares = spares if spare_on else default.spares
        if flags & INJECT_FATAL:
            s.health = HEALTH_FATAL if fatal_on else HEALTH_NON_CRITICAL
        if flags & INJECT_SHUTDOWN:
            if unsafe_on:
                s.shutdown_state = 1
                s.shutdown_count += 1
            else:
                s.shutdown_state = 0
        _status(buf, INJECT.size - 4, 0)
        return 0, dimm.alarm()
    if func == ND_INTEL_ENABLE_LSS_STATUS:
        _need(buf, 5)
        _status(buf, 1, 0 if buf[0] in (0, 1) else 3)
        return 0, False
    return _firmware(dimm.fw, func, buf), False


def _firmware(fw: Firmware, func: int, buf: memoryview) -> int:
    if func == ND_INTEL_FW_GET_INFO:
        _need(buf, FW_INFO.size)
        buf[:FW_INFO.size] = FW_INFO.pack(0, FW_STORAGE_SIZE, FW_MAX_SEND_LEN, FW_QUERY_INTERVAL_US,
                                          FW_QUERY_MAX_TIME_US, 0, FW_FIS_VERSION, 0, fw.version)
        return 0
    if func == ND_INTEL_FW_START_UPDATE:
        _need(buf, 8)
        if fw.state != FwState.NEW:
            _status(buf, 0, 0x10007)  # an update is in progress
            return 0
        fw.state, fw.context, fw.size_received = FwState.IN_PROGRESS, (fw.context + 1) & 0xFFFFFFFF, 0
        buf[:8] = struct.pack("<II", 0, fw.context)
        return 0
    if func == ND_INTEL_FW_SEND_DATA:
        _need(buf, 12)
        context, offset, length = struct.unpack_from("<III", buf, 0)
        status_at = 12 + length
        if status_at + 4 > len(buf):
            raise CommandError(errno.EINVAL, f"send_data of {length} bytes in a {len(buf)} byte payload")
        if fw.state != FwState.IN_PROGRESS:
            status = 5
        elif context != fw.context:
            status = 0x10007
        elif offset + length > FW_STORAGE_SIZE or length > FW_MAX_SEND_LEN:
            status = 3
        else:
            fw.size_received += length
            status = 0
        _status(buf, status_at, status)
        return 0
    if func == ND_INTEL_FW_FINISH_UPDATE:
        _need(buf, 12)
        ctrl_flags, context = buf[0], struct.unpack_from("<I", buf, 4)[0]
        if fw.state == FwState.UPDATED:
            _status(buf, 8, 0x20007)  # done already: needs a cold boot
            return 0
        if ctrl_flags == 0:
            if context != fw.context:
                _status(buf, 8, 0x10007)
                return 0
            fw.state, fw.end_time = FwState.VERIFY, time.monotonic() + FW_VERIFY_SECONDS
            _status(buf, 8, 0)
        elif ctrl_flags == 1:
            fw.size_received, fw.state = 0, FwState.NEW
            _status(buf, 8, 0x40007)  # aborted
        else:
            raise CommandError(errno.EINVAL, f"finish_update control flags {ctrl_flags:#x}")
        return 0
    if func == ND_INTEL_FW_FINISH_QUERY:
        _need(buf, 16)
        context = struct.unpack_from("<I", buf, 0)[0]
        if context != fw.context:
            _status(buf, 4, 0x10007)
            return 0
        if fw.state == FwState.VERIFY and time.monotonic() < fw.end_time:
            struct.pack_into("<IQ", buf, 4, 0x20007, 0)  # still verifying
            return 0
        if fw.state in (FwState.VERIFY, FwState.UPDATED):
            fw.state = FwState.UPDATED
            fw.version = FW_FAKE_VERSION
            struct.pack_into("<IQ", buf, 4, 0, fw.version)
        elif fw.state == FwState.IN_PROGRESS:
            struct.pack_into("<IQ", buf, 4, 0x40007, 0)  # sequencing error
        else:
            struct.pack_into("<IQ", buf, 4, 0, 0)
        return 0
    raise CommandError(errno.ENOTTY, f"Intel function {func}")
