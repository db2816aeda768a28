"""NVDIMMs (drivers/nvdimm/dimm_devs.c, plus the acpi/nfit attribute group)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vnvdimm.model.base import Device, Entry, Group, ro
from vnvdimm.model.system import NMEM_MAJOR

if TYPE_CHECKING:
    from vnvdimm.model.bus import NvdimmBus
    from vnvdimm.model.label_area import LabelArea
    from vnvdimm.model.system import System

ND_DEVICE_DIMM = 1


class Nvdimm(Device):
    bus_name = "nd"
    devtype = "nvdimm"
    nd_type = ND_DEVICE_DIMM

    def __init__(self, system: System, bus: NvdimmBus, dimm_id: int, size: int, handle: int, phys_id: int,
                 serial: int) -> None:
        super().__init__(system, f"nmem{dimm_id}", bus)
        self.id = dimm_id
        self.size = size
        self.handle = handle
        self.phys_id = phys_id
        self.serial = serial
        self.devt = (NMEM_MAJOR, system.minors[NMEM_MAJOR].get())
        # Label-area commands (get_size get_data set_data) and smart are ioctl-only: advertising
        # them would make ndctl try ioctls that a file system cannot answer (contract §6).
        self.commands: tuple[str, ...] = ()
        # The label storage area (size, max_xfer, read, write), on DIMMs of labelled platforms.
        self.label_area: LabelArea | None = None

    def entries(self) -> list[Entry]:
        vendor, device, rev = 0x8089, 0x0979, 0x0001
        nfit = Group("nfit", [
            ro("handle", lambda: f"{self.handle:#x}\n"),
            ro("phys_id", lambda: f"{self.phys_id:#x}\n"),
            ro("vendor", lambda: f"0x{vendor:04x}\n"),
            ro("device", lambda: f"0x{device:04x}\n"),
            ro("rev_id", lambda: f"0x{rev:04x}\n"),
            ro("subsystem_vendor", lambda: f"0x{vendor:04x}\n"),
            ro("subsystem_device", lambda: f"0x{device:04x}\n"),
            ro("subsystem_rev_id", lambda: f"0x{rev:04x}\n"),
            ro("format", lambda: "0x0301\n"),
            ro("formats", lambda: "1\n"),
            ro("serial", lambda: f"0x{self.serial:08x}\n"),
            ro("family", lambda: "0\n"),
            ro("dsm_mask", lambda: "0x0\n"),
            ro("flags", lambda: "\n"),
            ro("id", lambda: f"{vendor:04x}-{0xa2:02x}-{0x1740:04x}-{self.serial:08x}\n"),
            ro("dirty_shutdown", lambda: "0\n"),
        ])
        return [*super().entries(),
            ro("dev", lambda: f"{self.devt[0]}:{self.devt[1]}\n"),
            ro("commands", lambda: "".join(f"{c} " for c in self.commands) + "\n"),
            ro("state", lambda: "active\n" if self._busy() else "idle\n"),
            ro("flags", lambda: "\n"),
            ro("available_slots", lambda: "254\n"),
            ro("security", lambda: "disabled\n"),
            ro("frozen", lambda: "0\n"),
            nfit,
        ]

    def _busy(self) -> bool:
        bus = self.parent
        assert bus is not None
        return any(r.driver is not None and any(m.dimm is self for m in r.mappings)
                   for r in bus.regions)  # type: ignore[attr-defined]
