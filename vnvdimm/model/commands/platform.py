"""The platform firmware behind an NFIT bus: which commands it advertises and how it answers
them (nfit_test's nfit_test_ctl(), with acpi_nfit's command masks).

What is advertised is derived the way acpi_nfit derives it:

* bus `commands`: the bus command mask (ARS_CAP..CLEAR_ERROR, CALL); `nfit/dsm_mask`: the NFIT
  family functions of ND_CMD_CALL (TRANSLATE_SPA, ARS_INJECT_SET/CLEAR/GET);
* DIMM `nfit/family` 0 (Intel), `nfit/dsm_mask` the Intel functions the DIMM answers, and
  `commands` = ND_CMD_CALL plus those functions that are standard ND_CMD_* commands
  (acpi_nfit_register_dimms()).
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vnvdimm.model.commands import intel
from vnvdimm.model.commands.activate import Activation
from vnvdimm.model.commands.ars import (
    NFIT_CMD_ARS_INJECT_CLEAR,
    NFIT_CMD_ARS_INJECT_GET,
    NFIT_CMD_ARS_INJECT_SET,
    NFIT_CMD_TRANSLATE_SPA,
    BusFirmware,
)
from vnvdimm.model.commands.envelope import (
    BUS_COMMAND_NAMES,
    DIMM_COMMAND_NAMES,
    ND_CMD_ARS_CAP,
    ND_CMD_ARS_START,
    ND_CMD_ARS_STATUS,
    ND_CMD_CALL,
    ND_CMD_CLEAR_ERROR,
    ND_CMD_GET_CONFIG_DATA,
    ND_CMD_GET_CONFIG_SIZE,
    ND_CMD_PKG_SIZE,
    ND_CMD_SET_CONFIG_DATA,
    CommandError,
    Request,
)
from vnvdimm.model.commands.intel_security import IntelSecurity, IntelSecurityOps
from vnvdimm.model.extensions import media_errors_changed
from vnvdimm.model.security import DimmSecurity, WipeTarget

if TYPE_CHECKING:
    from vnvdimm.model.bus import NvdimmBus
    from vnvdimm.model.dimm import Nvdimm
    from vnvdimm.model.region import Region

log = logging.getLogger("vnvdimm.model")

NVDIMM_FAMILY_INTEL = 0
NVDIMM_BUS_FAMILY_NFIT = 0
NVDIMM_STANDARD_CMDMASK = 0x3FE  # ND_CMD_SMART .. ND_CMD_VENDOR

BUS_CMD_MASK = sum(1 << c for c in (ND_CMD_ARS_CAP, ND_CMD_ARS_START, ND_CMD_ARS_STATUS, ND_CMD_CLEAR_ERROR,
                                    ND_CMD_CALL))
BUS_NFIT_FUNCS = sum(1 << f for f in (NFIT_CMD_TRANSLATE_SPA, NFIT_CMD_ARS_INJECT_SET, NFIT_CMD_ARS_INJECT_CLEAR,
                                      NFIT_CMD_ARS_INJECT_GET))
LABEL_FUNCS = sum(1 << f for f in (ND_CMD_GET_CONFIG_SIZE, ND_CMD_GET_CONFIG_DATA, ND_CMD_SET_CONFIG_DATA))
HEALTH_FUNCS = sum(1 << f for f in (intel.ND_INTEL_SMART, intel.ND_INTEL_SMART_THRESHOLD,
                                    intel.ND_INTEL_SMART_SET_THRESHOLD, intel.ND_INTEL_SMART_INJECT))
FIRMWARE_FUNCS = sum(1 << f for f in range(intel.ND_INTEL_FW_GET_INFO, intel.ND_INTEL_FW_FINISH_QUERY + 1))
LSS_FUNCS = 1 << intel.ND_INTEL_ENABLE_LSS_STATUS
FW_ACTIVATE_FUNCS = 1 << 29 | 1 << 30  # NVDIMM_INTEL_FW_ACTIVATE_DIMMINFO, _ARM
SECURITY_FUNCS = sum(1 << f for f in range(19, 29))  # NVDIMM_INTEL_GET_SECURITY_STATE..MASTER_SECURE_ERASE
# acpi_nfit_clear_to_send(): what the kernel keeps for itself (sysfs drives these)
INTEL_DENY_FUNCS = SECURITY_FUNCS | FW_ACTIVATE_FUNCS
NVDIMM_BUS_FAMILY_INTEL = 1


def command_names(mask: int, names: dict[int, str]) -> str:
    """commands_show(): each supported command's name followed by a space."""
    return "".join(f"{names[c]} " for c in sorted(names) if mask >> c & 1) + "\n"


@dataclass
class DimmFirmware:
    """One DIMM's firmware: its Intel state, the commands it answers, and nfit_test's
    fail_cmd / fail_cmd_code (commands made to fail on demand)."""

    dimm: Nvdimm
    dsm_mask: int
    intel: intel.IntelDimm = field(default_factory=intel.IntelDimm)
    fail_cmd: int = 0
    fail_cmd_code: int = 0
    # firmware activation (activate.py): armed for the next activation, the activation that
    # last covered this DIMM, and whether it had no staged image then
    armed: bool = False
    activated: int = 0
    missed_activate: bool = False
    knobs: Any = None
    # the security state (nfit_test's dimm_sec_info[], shared with test_dimmN's lock_dimm)
    security: IntelSecurity = field(default_factory=IntelSecurity)

    @property
    def activatable(self) -> bool:
        return bool(self.dsm_mask & FW_ACTIVATE_FUNCS)

    def cmd_mask(self) -> int:
        return 1 << ND_CMD_CALL | self.dsm_mask & NVDIMM_STANDARD_CMDMASK

    def commands(self) -> str:
        return command_names(self.cmd_mask(), DIMM_COMMAND_NAMES)

    def override(self, func: int, rc: int) -> int:
        """override_return_code(): the test knobs (nfit_test's test_dimmN when the bus has
        them, else this DIMM's own) make a function fail with fail_cmd_code, or EIO."""
        source = self.knobs if self.knobs is not None else self
        fail_cmd, code = source.fail_cmd, source.fail_cmd_code
        if func < 64 and fail_cmd >> func & 1:
            if code:
                if code < 0:
                    raise CommandError(-code, f"fail_cmd for function {func}")
                return code
            raise CommandError(errno.EIO, f"fail_cmd for function {func}")
        return rc


    def label_command_rc(self, func: int) -> int:
        """What nfit_test_ctl() returns to the kernel for its own label command (the DIMM
        driver's probe): 0, or the fail_cmd override (the answer is filled in either way)."""
        try:
            return self.override(func, 0)
        except CommandError as e:
            return -(e.errno or errno.EIO)


class PlatformFirmware:
    """The firmware of one NFIT bus. `health_event(dimm)` raises a DIMM's health
    notification (acpi_nvdimm_notify: pollers of nmemN/nfit/flags wake); `changed()` tells
    the model that the kernel's media errors changed."""

    def __init__(self, bus: BusFirmware, bus_cmd_mask: int, bus_dsm_mask: int,
                 health_event: Callable[[Nvdimm], None], notify_error: Callable[[], None]) -> None:
        self.bus = bus
        self.bus_cmd_mask = bus_cmd_mask
        self.bus_dsm_mask = bus_dsm_mask
        self.health_event = health_event
        self.notify_error = notify_error  # NFIT_NOTIFY_UC_MEMORY_ERROR: the kernel rescans
        self.dimms: dict[int, DimmFirmware] = {}
        self.activation: Activation | None = None

    def add_dimm(self, dimm: Nvdimm, dsm_mask: int) -> DimmFirmware:
        fw = DimmFirmware(dimm, dsm_mask)
        self.dimms[id(dimm)] = fw
        return fw

    def of(self, dimm: Nvdimm) -> DimmFirmware | None:
        return self.dimms.get(id(dimm))

    # ------------------------------------------------------------ the envelope's view

    def bus_commands(self) -> str:
        return command_names(self.bus_cmd_mask, BUS_COMMAND_NAMES)

    def bus_target(self) -> _Target:
        families = 1 << NVDIMM_BUS_FAMILY_NFIT | (1 << NVDIMM_BUS_FAMILY_INTEL if self.activation else 0)
        return _Target(False, self.bus_cmd_mask, families)

    def clear_to_send(self, dimm: Nvdimm | None, req: Request) -> None:
        """acpi_nfit_clear_to_send(): security and firmware activation commands, and every
        bus command outside the NFIT family, are the kernel's own (EOPNOTSUPP)."""
        if req.cmd != ND_CMD_CALL:
            return
        if dimm is not None and req.family == NVDIMM_FAMILY_INTEL and (
                req.func >= 64 or INTEL_DENY_FUNCS >> req.func & 1):
            raise CommandError(errno.EOPNOTSUPP, f"Intel function {req.func} is the kernel's")
        if dimm is None and req.family != NVDIMM_BUS_FAMILY_NFIT:
            raise CommandError(errno.EOPNOTSUPP, f"bus family {req.family} is the kernel's")

    def dimm_target(self, dimm: Nvdimm) -> _Target:
        fw = self.of(dimm)
        return _Target(True, fw.cmd_mask() if fw else 0, 1 << NVDIMM_FAMILY_INTEL)

    # ------------------------------------------------------------ nfit_test_ctl()

    def ctl_bus(self, req: Request) -> int:
        if req.cmd == ND_CMD_CALL:
            size_in, size_out = struct.unpack_from("<II", req.buf, 16)
            if req.func >= 64 or not self.bus_dsm_mask >> req.func & 1:
                raise CommandError(errno.ENOTTY, f"bus function {req.func} not advertised")
            payload = memoryview(req.buf)[ND_CMD_PKG_SIZE:ND_CMD_PKG_SIZE + size_in + size_out]
            rc, notify = self.bus.call(req.func, payload)
            if notify:
                self.notify_error()
            return rc
        handlers = {ND_CMD_ARS_CAP: self.bus.ars_cap, ND_CMD_ARS_START: self.bus.ars_start,
                    ND_CMD_ARS_STATUS: self.bus.ars_status, ND_CMD_CLEAR_ERROR: self.bus.clear_error}
        handler = handlers.get(req.cmd)
        if handler is None:
            raise CommandError(errno.ENOTTY, f"bus command {req.cmd}")
        return handler(req.buf)

    def ctl_dimm(self, dimm: Nvdimm, req: Request) -> int:
        fw = self.of(dimm)
        if fw is None:
            raise CommandError(errno.ENOTTY, f"{dimm.name} has no firmware commands")
        if req.cmd == ND_CMD_CALL:
            if req.family != NVDIMM_FAMILY_INTEL:
                raise CommandError(errno.ENOTTY, f"family {req.family}")
            if req.func >= 64 or not fw.dsm_mask >> req.func & 1:
                raise CommandError(errno.ENOTTY, f"function {req.func} not advertised by {dimm.name}")
            size_in, size_out = struct.unpack_from("<II", req.buf, 16)
            payload = memoryview(req.buf)[ND_CMD_PKG_SIZE:ND_CMD_PKG_SIZE + size_in + size_out]
            rc, notify = intel.call(fw.intel, req.func, payload)
            if notify:
                self.health_event(dimm)
            return fw.override(req.func, rc)
        if not fw.cmd_mask() >> req.cmd & 1 or not fw.dsm_mask >> req.func & 1:
            raise CommandError(errno.ENOTTY, f"command {req.cmd} not advertised by {dimm.name}")
        area = dimm.label_area
        if area is None or req.cmd not in (ND_CMD_GET_CONFIG_SIZE, ND_CMD_GET_CONFIG_DATA, ND_CMD_SET_CONFIG_DATA):
            raise CommandError(errno.ENOTTY, f"command {req.cmd} on {dimm.name}")
        return fw.override(req.func, config_command(area, req.cmd, req.buf))


@dataclass
class _Target:
    is_dimm: bool
    mask: int
    families: int

    def cmd_mask(self) -> int:
        return self.mask

    def family_mask(self) -> int:
        return self.families


def config_command(area: object, cmd: int, buf: bytearray) -> int:
    """GET_CONFIG_SIZE / GET_CONFIG_DATA / SET_CONFIG_DATA on a label storage area (an object
    with size, max_xfer, read(offset, length) and write(offset, data)), as nfit_test answers
    them: the return value is what is left of the buffer after the answer."""
    size: int = area.size  # type: ignore[attr-defined]
    if cmd == ND_CMD_GET_CONFIG_SIZE:
        if len(buf) < 12:
            raise CommandError(errno.EINVAL, "get_config_size buffer too small")
        struct.pack_into("<III", buf, 0, 0, size, area.max_xfer)  # type: ignore[attr-defined]
        return 0
    if len(buf) < 8 + (4 if cmd == ND_CMD_GET_CONFIG_DATA else 0):
        raise CommandError(errno.EINVAL, "config data header too small")
    offset, length = struct.unpack_from("<II", buf, 0)
    if offset >= size:
        raise CommandError(errno.EINVAL, f"label offset {offset} beyond {size}")
    n = min(length, size - offset)
    if cmd == ND_CMD_GET_CONFIG_DATA:
        if length + 12 > len(buf):
            raise CommandError(errno.EINVAL, "get_config_data length beyond the buffer")
        struct.pack_into("<I", buf, 8, 0)
        buf[12:12 + n] = area.read(offset, n)  # type: ignore[attr-defined]
        return len(buf) - 12 - n
    if length + 12 > len(buf):
        raise CommandError(errno.EINVAL, "set_config_data length beyond the buffer")
    area.write(offset, bytes(buf[8:8 + n]))  # type: ignore[attr-defined]
    struct.pack_into("<I", buf, 8 + length, 0)
    return len(buf) - 8 - (n + 4)


# ------------------------------------------------------------------ wiring a bus

ACPI_BUS_DSM_MASK = 0x3BF  # what a real NFIT's root device answers (bit 0: "functions exist")
FULL_DIMM_FUNCS = LSS_FUNCS | HEALTH_FUNCS | FIRMWARE_FUNCS | FW_ACTIVATE_FUNCS | SECURITY_FUNCS


@dataclass(frozen=True)
class Flavor:
    """What a platform's firmware implements: the bus commands, the NFIT-family functions, the
    Intel functions of its DIMMs (label commands come with a DIMM's label area) and whether it
    activates firmware."""

    bus_cmd_mask: int
    bus_dsm_mask: int
    dimm_funcs: int
    activation: bool


FLAVORS = {
    "ACPI.NFIT": Flavor(BUS_CMD_MASK, ACPI_BUS_DSM_MASK, FULL_DIMM_FUNCS, True),
    # nfit_test0_setup()/nfit_test1_setup(): the *_cmd_force_en bits
    "nfit_test.0": Flavor(BUS_CMD_MASK, BUS_NFIT_FUNCS, FULL_DIMM_FUNCS, True),
    "nfit_test.1": Flavor(BUS_CMD_MASK & ~(1 << ND_CMD_CALL), 0, LSS_FUNCS, False),
}


def attach(bus: NvdimmBus) -> PlatformFirmware:
    """Give an NFIT bus the firmware its provider has (an ACPI platform's unless the bus is
    one of nfit_test's)."""
    flavor = FLAVORS.get(bus.provider, FLAVORS["ACPI.NFIT"])
    bus_fw = BusFirmware(lambda: list(bus.regions), _poison, _last_dimm_handle)

    def uc_memory_error() -> None:
        bus.scrub_count += 1
        bus_fw.scrub()

    firmware = PlatformFirmware(bus_fw, flavor.bus_cmd_mask, flavor.bus_dsm_mask,
                                lambda dimm: bus.system.notify(dimm, "flags"), uc_memory_error)
    knobs = {t.handle: t for t in bus.test_dimms}
    for dimm in bus.dimms:
        mask = flavor.dimm_funcs | (LABEL_FUNCS if dimm.label_area is not None else 0)
        fw = firmware.add_dimm(dimm, mask)
        fw.knobs = knobs.get(dimm.handle)  # nfit_test's test_dimmN: fail_cmd, fail_cmd_code, lock_dimm
        if fw.knobs is not None:
            fw.knobs.security = fw.security
        if mask & SECURITY_FUNCS:
            # libnvdimm's side; a kernel built for nfit_test (CONFIG_NVDIMM_SECURITY_TEST)
            # asks the firmware again on each read of `security`
            dimm.security = DimmSecurity(dimm, IntelSecurityOps(fw), poll_on_show=bus.provider.startswith("nfit_test"))
            dimm.security.wipe = WipeTarget(dimm)
        dimm.label_command = fw.label_command_rc
        dimm.commands = tuple(fw.commands().split())
        dimm.dsm_mask = mask
        smart = fw.intel.smart
        if mask >> intel.ND_INTEL_SMART & 1 and smart.flags & intel.SMART_SHUTDOWN_COUNT_VALID:
            dimm.dirty_shutdown = smart.shutdown_count  # read once, at registration
    for region in bus.regions:
        region.media.badblocks.on_cleared = lambda offset, length, region=region: bus_fw.media_written(
            region, offset, length)
    if flavor.activation:
        firmware.activation = Activation(firmware, lambda: bus.system.notify(bus, "activate"))
    bus.commands = tuple(firmware.bus_commands().split())
    bus.firmware = bus.platform = firmware
    return firmware


def _last_dimm_handle(region: Region) -> int:
    return region.mappings[-1].dimm.handle if region.mappings else 0


def _poison(region: Region, first: int, count: int, add: bool) -> None:
    bb = region.media.badblocks
    if add:
        bb.set(first, count)
    elif not bb.clear(first, count):
        return
    media_errors_changed(region)
