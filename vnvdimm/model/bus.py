"""The nvdimm bus (drivers/nvdimm/bus.c, core.c) and its control device ndctlN."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from vnvdimm.model.base import Attr, Device, DevNode, Entry, Group, Link, fail, kstrtol, ro, uevent_store
from vnvdimm.model.extensions import bus_extension_group
from vnvdimm.model.nd import ND_BUS, NDCTL_MAJOR, UuidIndex

if TYPE_CHECKING:
    from vnvdimm.model.commands.activate import Activation
    from vnvdimm.model.commands.envelope import Request, Target
    from vnvdimm.model.commands.platform import DimmFirmware, PlatformFirmware
    from vnvdimm.model.dimm import Nvdimm
    from vnvdimm.model.nfit_test_dimm import NfitTestDimm
    from vnvdimm.model.region import Region
    from vnvdimm.model.system import System

# The bus commands an NFIT provider advertises (ND_CMD_ARS_CAP..ND_CMD_CLEAR_ERROR). e820 has none.
NFIT_BUS_COMMANDS = ("ars_cap", "ars_start", "ars_status", "clear_error")


class BusFirmware(Protocol):
    """What libnvdimm asks of a bus's provider (struct nvdimm_bus_descriptor): the command
    masks the ioctl envelope checks, ndctl() for the bus and its DIMMs, the provider's own
    refusals, and firmware activation where the provider has it."""

    activation: Activation | None

    def bus_target(self) -> Target: ...

    def dimm_target(self, dimm: Nvdimm) -> Target: ...

    def of(self, dimm: Nvdimm) -> DimmFirmware | None: ...

    def clear_to_send(self, dimm: Nvdimm | None, req: Request) -> None: ...

    def ctl_bus(self, req: Request) -> int: ...

    def ctl_dimm(self, dimm: Nvdimm, req: Request) -> int: ...


class NvdimmBus(Device):
    bus_name = ND_BUS  # the bus device itself sits on the nd bus and binds to nd_bus
    devtype = "nvdimm_bus"

    def __init__(self, system: System, bus_id: int, provider: str, platform_path: str,
                 commands: Iterable[str] = (), nfit: bool = False) -> None:
        super().__init__(system, f"ndbus{bus_id}", None)
        self.id = bus_id
        self.provider = provider
        self.platform_path = platform_path  # e.g. "platform/e820_pmem"
        self.commands = tuple(commands)
        self.nfit = nfit
        self.dimms: list[Nvdimm] = []
        self.regions: list[Region] = []
        self.test_dimms: list[NfitTestDimm] = []  # nfit_test's test_dimmN beside the bus
        # the provider behind the bus's ioctls; None: e820, whose bus has no commands (set by
        # the topology once the DIMMs are registered, or by cxl_pmem)
        self.firmware: BusFirmware | None = None
        # an NFIT platform's firmware (acpi_nfit_desc: ARS, error injection, scrub), which is
        # also its `firmware`; None on e820 and on a CXL bridge's bus
        self.platform: PlatformFirmware | None = None
        # The uuids the namespaces, pfn, dax and btt devices of this bus hold now (see UuidIndex)
        self.uuids_given = UuidIndex()
        self.ctl = NdCtl(system, self)

    @property
    def sysfs_dir(self) -> str:
        return f"/devices/{self.platform_path}/{self.name}"

    def entries(self) -> list[Entry]:
        out: list[Entry] = [
            ro("provider", lambda: f"{self.provider}\n"),
            ro("commands", lambda: "".join(f"{c} " for c in self.commands) + "\n"),
            Attr("wait_probe", 0o444, show=self._wait_probe, blocking=True),
        ]
        if self.nfit:
            out.append(Group("nfit", [
                ro("revision", lambda: "1\n"),
                ro("dsm_mask", lambda: "0x3bf\n"),
                Attr("scrub", 0o644, show=lambda: f"{self.scrub_count}\n", store=self._scrub_store),
                Attr("hw_error_scrub", 0o644, show=lambda: f"{self.hw_error_scrub}\n",
                     store=self._hw_error_scrub_store),
            ]))
        if self.firmware is not None and self.firmware.activation is not None:
            out.append(self.firmware.activation.bus_group())  # firmware/: capability, activate
        return super().entries() + out + bus_extension_group(self)

    def _wait_probe(self) -> str:
        # Probes run synchronously inside the store that triggers them, so once the model
        # lock can be taken every pending probe has finished (nd_synchronize()).
        with self.system.lock:
            pass
        return "1\n"

    scrub_count = 0
    hw_error_scrub = 1  # HW_ERROR_SCRUB_ON

    def _scrub_store(self, buf: bytes) -> None:
        """acpi/nfit scrub_store(): kstrtol(), anything but 1 is EINVAL. An ARS run completes
        at once here, so the count of completed scrubs goes up and nothing stays busy ('+')."""
        if kstrtol(buf) != 1:
            raise fail(errno.EINVAL, "only 1 starts a scrub")
        if self.platform is not None:
            with self.system.lock:
                self.platform.bus.scrub()  # what the platform reports becomes the kernel's poison list
        self.scrub_count += 1

    def _hw_error_scrub_store(self, buf: bytes) -> None:
        """acpi/nfit hw_error_scrub_store(): 0 (off) or 1 (on), EINVAL otherwise."""
        value = kstrtol(buf)
        if value not in (0, 1):
            raise fail(errno.EINVAL, "hw_error_scrub is 0 or 1")
        self.hw_error_scrub = value

    def children(self) -> Iterable[Device]:
        yield self.ctl
        yield from self.dimms
        yield from self.regions

    def shutdown(self) -> None:
        for region in self.regions:
            if region.driver is not None:
                self.system.driver_detach(region)
        for dimm in self.dimms:
            if dimm.security is not None:
                dimm.security.cancel()  # nvdimm_delete(): no overwrite query after this


class NdCtl(Device):
    """The bus's control character device (/dev/ndctlN, class nd)."""

    def __init__(self, system: System, bus: NvdimmBus) -> None:
        super().__init__(system, f"ndctl{bus.id}", bus)
        self.devt: tuple[int, int] = (NDCTL_MAJOR, system.minors[NDCTL_MAJOR].get())

    def devnode(self) -> DevNode:
        return DevNode(self.name, self.devt, control=True)  # /dev/ndctlN: ioctls only

    def entries(self) -> list[Entry]:
        return [
            ro("dev", lambda: f"{self.devt[0]}:{self.devt[1]}\n"),
            Attr("uevent", 0o644, show=lambda: f"MAJOR={self.devt[0]}\nMINOR={self.devt[1]}\nDEVNAME={self.name}\n",
                 store=uevent_store),
            Link("device", self.parent) if self.parent else Link("device", "/devices"),
            Link("subsystem", "/class/nd"),
        ]
