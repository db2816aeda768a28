"""NVDIMMs (drivers/nvdimm/dimm_devs.c, plus the acpi/nfit attribute group)."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnvdimm.model.base import Device, DevNode, Entry, Group, fail, ro
from vnvdimm.model.label_format import DimmLabelData
from vnvdimm.model.nd import ND_BUS, NMEM_MAJOR, NdDeviceType

ND_CMD_GET_CONFIG_SIZE = 4
ND_CMD_GET_CONFIG_DATA = 5

if TYPE_CHECKING:
    from vnvdimm.model.bus import NvdimmBus
    from vnvdimm.model.label_area import LabelArea
    from vnvdimm.model.security import DimmSecurity
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm.model")

# ACPI NFIT memory-device state flags, and the words acpi/nfit's flags_show() prints for them
NFIT_MEM_FLAG_WORDS = ((1 << 0, "save_fail"), (1 << 1, "restore_fail"), (1 << 2, "flush_fail"),
                       (1 << 3, "not_armed"), (1 << 4, "smart_event"), (1 << 6, "map_fail"),
                       (1 << 5, "smart_notify"))
ACPI_NFIT_MEM_NOT_ARMED = 1 << 3


def c_hex(value: int) -> str:
    """printf("%#x"): no 0x prefix for zero."""
    return f"{value:#x}" if value else "0"


@dataclass(frozen=True)
class NfitIdentity:
    """What the NFIT says about a DIMM beyond its handle: the control region's fields as
    acpi/nfit shows them (be16/be32_to_cpu of the table values), the interface format code and
    the memory-device state flags (the OR of the DIMM's memory-device entries)."""

    vendor: int = 0x8089
    device: int = 0x0979
    revision: int = 0x0001
    subsystem_vendor: int | None = None  # None: same as vendor/device/revision
    subsystem_device: int | None = None
    subsystem_revision: int | None = None
    mfg_location: int = 0xA2
    mfg_date: int = 0x1740
    format: int = 0x0301
    flags: int = 0

    @property
    def armed(self) -> bool:
        return not self.flags & ACPI_NFIT_MEM_NOT_ARMED


class Nvdimm(Device):
    bus_name = ND_BUS
    devtype = "nvdimm"
    nd_type = NdDeviceType.DIMM

    def __init__(self, system: System, bus: NvdimmBus, dimm_id: int, size: int, handle: int, phys_id: int,
                 serial: int, identity: NfitIdentity | None = None) -> None:
        super().__init__(system, f"nmem{dimm_id}", bus)
        self.bus = bus
        self.id = dimm_id
        self.size = size
        self.handle = handle
        self.phys_id = phys_id
        self.serial = serial
        self.identity = identity or NfitIdentity()
        self.devt: tuple[int, int] = (NMEM_MAJOR, system.minors[NMEM_MAJOR].get())
        # What the platform firmware answers (vnvdimm.model.commands.platform): the nd
        # commands by name, the family's functions as a mask. None without firmware (e820).
        self.commands: tuple[str, ...] = ()
        # The label storage area (size, max_xfer, read, write), on DIMMs of labelled platforms.
        self.label_area: LabelArea | None = None
        # nvdimm_drvdata: the label area as the nvdimm driver read it at probe (None unbound)
        self.label_data: DimmLabelData | None = None
        # NDD_LABELING: the DIMM's labels decide its regions' namespaces. Given by the bus when
        # it creates the DIMM (cxl_nvdimm: always; acpi_nfit: for PM capacity aliased by BLK
        # windows, and vnvdimm's ACPI.NFIT platform presents its DIMMs so), which is why it
        # starts set; a bus that creates a DIMM without it clears it before the first probe,
        # after which only a probe that finds a valid label index sets it (nfit_test.1).
        self.labeling = True
        self.dsm_mask = 0
        # nfit/dirty_shutdown: the shutdown count the Intel SMART command reported when the
        # bus registered the DIMM (nfit_intel_shutdown_status()); None: no such attribute
        self.dirty_shutdown: int | None = None
        # nvdimm->sec, on DIMMs whose firmware has the security functions (None: `security`
        # reads "disabled" and takes no writes)
        self.security: DimmSecurity | None = None
        # NDD_LOCKED: a label command failed with EACCES at the last probe (the DIMM's
        # capacity is locked: its namespaces do not probe)
        self.locked = False
        # what the firmware's ctl returns for the kernel's own label command (0, or an error
        # nfit_test's fail_cmd makes it return); None: the command always succeeds
        self.label_command: Callable[[int], int] | None = None

    def devnode(self) -> DevNode:
        return DevNode(self.name, self.devt, control=True)  # /dev/nmemN: ioctls only

    def unique_id(self) -> str:
        """nvdimm->dimm_id (acpi_nfit's nfit_mem->id): vendor-location-date-serial."""
        ident = self.identity
        return f"{ident.vendor:04x}-{ident.mfg_location:02x}-{ident.mfg_date:04x}-{self.serial:08x}"

    def probe(self) -> None:
        """nvdimm_probe(): unlock a locked DIMM with the writer's key (a failure is only
        logged, as the kernel does), then read and validate the label area
        (nd_label_data_init())."""
        if self.security is not None:
            try:
                self.security.unlock()
            except OSError as e:
                log.info("%s: failed to unlock dimm: %s", self.name, e)
        self.locked = False  # nvdimm_clear_locked(): revalidated at each probe
        if self.label_area is not None:
            # EACCES on the label-area properties: the capacity is locked, the labels are
            # still read (nfit_test fills the answer before it overrides the return code)
            self._label_command(ND_CMD_GET_CONFIG_SIZE, locked_is_fatal=False)
            # EACCES on the label data: the label area is locked too, and the probe fails
            self._label_command(ND_CMD_GET_CONFIG_DATA, locked_is_fatal=True)
        self.label_data = DimmLabelData(self.label_area, self.name) if self.label_area is not None else None
        # NDD_LABELING (nvdimm_set_labeling()): the probe found a valid namespace index; set
        # at probe only, so labels initialized later show after the next enable, and never
        # cleared (a DIMM whose labels are zeroed stays labelling)
        if self.label_data is not None and self.label_data.ns_current >= 0:
            self.labeling = True

    def _label_command(self, cmd: int, locked_is_fatal: bool) -> None:
        rc = self.label_command(cmd) if self.label_command is not None else 0
        if rc == -errno.EACCES:
            self.locked = True
            if not locked_is_fatal:
                return
        if rc:
            raise fail(-rc if rc < 0 else errno.ENXIO, f"{self.name}: label command {cmd} failed ({rc})")

    def remove(self) -> None:
        self.label_data = None

    def _available_slots(self) -> str:
        """available_slots_show(): free label slots, less the one an update needs."""
        if self.label_data is None:
            raise fail(errno.ENXIO, f"{self.name} is not enabled")
        return f"{max(self.label_data.nfree() - 1, 0)}\n"

    def _nfit_flags(self) -> str:
        return "".join(f"{word} " for bit, word in NFIT_MEM_FLAG_WORDS if self.identity.flags & bit) + "\n"

    def entries(self) -> list[Entry]:
        ident = self.identity
        sub_vendor = ident.vendor if ident.subsystem_vendor is None else ident.subsystem_vendor
        sub_device = ident.device if ident.subsystem_device is None else ident.subsystem_device
        sub_rev = ident.revision if ident.subsystem_revision is None else ident.subsystem_revision
        nfit = Group("nfit", [
            ro("handle", lambda: f"{c_hex(self.handle)}\n"),
            ro("phys_id", lambda: f"{c_hex(self.phys_id)}\n"),
            ro("vendor", lambda: f"0x{ident.vendor:04x}\n"),
            ro("device", lambda: f"0x{ident.device:04x}\n"),
            ro("rev_id", lambda: f"0x{ident.revision:04x}\n"),
            ro("subsystem_vendor", lambda: f"0x{sub_vendor:04x}\n"),
            ro("subsystem_device", lambda: f"0x{sub_device:04x}\n"),
            ro("subsystem_rev_id", lambda: f"0x{sub_rev:04x}\n"),
            ro("format", lambda: f"0x{ident.format:04x}\n"),
            ro("formats", lambda: "1\n"),
            ro("serial", lambda: f"0x{self.serial:08x}\n"),
            ro("family", lambda: "0\n"),
            ro("dsm_mask", lambda: f"{self.dsm_mask:#x}\n"),
            ro("flags", self._nfit_flags),
            ro("id", lambda: f"{self.unique_id()}\n"),
            *([ro("dirty_shutdown", lambda: f"{self.dirty_shutdown}\n")] if self.dirty_shutdown is not None else []),
        ])
        return [*super().entries(),
            ro("dev", lambda: f"{self.devt[0]}:{self.devt[1]}\n"),
            ro("commands", lambda: "".join(f"{c} " for c in self.commands) + "\n"),
            ro("state", lambda: "active\n" if self.busy() else "idle\n"),
            ro("flags", lambda: ("label " if self.labeling else "") + ("lock " if self.locked else "") + "\n"),
            ro("available_slots", self._available_slots),
            *(self.security.entries() if self.security is not None
              else [ro("security", lambda: "disabled\n"), ro("frozen", lambda: "0\n")]),
            nfit,
            *self.firmware_groups(),
        ]

    def firmware_groups(self) -> list[Entry]:
        """firmware/ (activate, result) when the bus's platform can activate this DIMM's firmware."""
        platform = self.bus.firmware
        fw = platform.of(self) if platform is not None else None
        if fw is None or platform.activation is None or not fw.activatable:
            return []
        return [platform.activation.dimm_group(fw)]

    def busy(self) -> bool:
        """nvdimm->busy: an enabled region maps this DIMM."""
        return any(r.driver is not None and any(m.dimm is self for m in r.mappings)
                   for r in self.bus.regions)
