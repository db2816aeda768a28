"""The bridge from CXL to libnvdimm (drivers/cxl/core/pmem.c, drivers/cxl/pmem.c): the devices
the CXL core registers for persistent memory and what cxl_pmem's drivers make of them.

* `nvdimm-bridgeN` (cxl_nvdimm_bridge), below the root port of a CXL root with a pmem window:
  its driver registers an nvdimm bus, `ndbusN`, below it. cxl_test's mock renames the bus's
  provider to "cxl_test" (its __wrap_nvdimm_bus_register()); the kernel's own is "CXL".
* `pmemN` (cxl_nvdimm), below each memdev with pmem capacity: its driver registers an nmem on
  that bus whose label area is the memdev's label storage area, reached through the memdev's
  mailbox (GET_LSA / SET_LSA), with the nmem's `cxl/` attributes (id, provider).
* `pmem_regionN` (cxl_pmem_region), below each enabled pmem region: its driver registers an
  nd region `regionN` (the CXL region's id) on the bus, one mapping per endpoint decoder in
  position order, with the interleave-set cookie of cxl_pmem_region_probe().

The nmem answers the three label commands of its provider (cxl_pmem_nvdimm_ctl()) through
/dev/ndctlN and /dev/nmemN; the bus answers none.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vnvdimm.model.base import NULL_UUID, Device, Entry, Group, fail, ro
from vnvdimm.model.bus import NvdimmBus
from vnvdimm.model.commands.envelope import (
    ND_CMD_GET_CONFIG_DATA,
    ND_CMD_GET_CONFIG_SIZE,
    ND_CMD_SET_CONFIG_DATA,
    CommandError,
    Request,
)
from vnvdimm.model.commands.platform import config_command
from vnvdimm.model.cxl.common import CxlDev
from vnvdimm.model.cxl.security import CxlSecurityOps
from vnvdimm.model.cxl_mailbox import NVDIMM_EXCLUSIVE_COMMANDS, MockMemdevFirmware
from vnvdimm.model.dimm import Nvdimm
from vnvdimm.model.infoblock import fletcher64
from vnvdimm.model.label_format import InterleaveSet
from vnvdimm.model.media import Media
from vnvdimm.model.region import Mapping, Region
from vnvdimm.model.security import DimmSecurity, WipeTarget

if TYPE_CHECKING:
    from vnvdimm.model.cxl.memdev import CxlMemdev
    from vnvdimm.model.cxl.port import CxlPort
    from vnvdimm.model.cxl.region import CxlRegion
    from vnvdimm.model.system import System

# drivers/cxl/cxl.h
CXL_DEVICE_NVDIMM_BRIDGE = 1
CXL_DEVICE_NVDIMM = 2
CXL_DEVICE_PMEM_REGION = 7

CXL_TEST_PROVIDER = "cxl_test"  # the mock's provider_name for a bridge below its cxl_acpi.0
MBOX_OP_GET_LSA = 0x4102
MBOX_OP_SET_LSA = 0x4103
SET_LSA_HEADER = struct.Struct("<II")  # struct cxl_mbox_set_lsa: offset, reserved
GET_LSA_REQUEST = struct.Struct("<II")  # struct cxl_mbox_get_lsa: offset, length
PMEM_CMD_MASK = (1 << ND_CMD_GET_CONFIG_SIZE) | (1 << ND_CMD_GET_CONFIG_DATA) | (1 << ND_CMD_SET_CONFIG_DATA)
PMEM_PERSISTENCE = "memory_controller"  # ND_REGION_PERSIST_MEMCTRL


class MailboxLabelArea:
    """A memdev's label storage area as libnvdimm reaches it through cxl_pmem: size and
    max_xfer as cxl_pmem_get_config_size() reports them, reads and writes as GET_LSA and
    SET_LSA mailbox commands of at most one payload each (the bytes `cxl read-labels` sees)."""

    def __init__(self, firmware: MockMemdevFirmware, lsa_size: int) -> None:
        self.firmware = firmware
        self.size = lsa_size
        self.max_xfer = firmware.payload_size - SET_LSA_HEADER.size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise fail(errno.EINVAL, f"[{offset}, +{length}) outside the {self.size}-byte label area")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        out = bytearray()
        while len(out) < length:
            n = min(self.max_xfer, length - len(out))
            data, _ = self.firmware.execute(MBOX_OP_GET_LSA, GET_LSA_REQUEST.pack(offset + len(out), n), n)
            out += data[:n]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        done = 0
        while done < len(data):
            chunk = data[done:done + self.max_xfer]
            self.firmware.execute(MBOX_OP_SET_LSA, SET_LSA_HEADER.pack(offset + done, 0) + chunk, 0)
            done += len(chunk)

    def close(self) -> None:
        """Nothing to close: the bytes live in the memdev (they go with cxl_test)."""


@dataclass
class _Target:
    """What the ioctl envelope checks a command against: the DIMM's command mask, no family."""

    is_dimm: bool
    mask: int

    def cmd_mask(self) -> int:
        return self.mask

    def family_mask(self) -> int:
        return 0


class CxlPmemFirmware:
    """cxl_pmem_ctl(): the bus answers nothing (ENOTTY), an nmem its three label commands,
    each turned into mailbox commands of its memdev. No family, no activation."""

    activation = None

    def bus_target(self) -> _Target:
        return _Target(False, 0)

    def dimm_target(self, dimm: Nvdimm) -> _Target:
        return _Target(True, PMEM_CMD_MASK)

    def of(self, dimm: Nvdimm) -> None:
        return None  # no firmware activation for CXL nmems

    def clear_to_send(self, dimm: Nvdimm | None, req: Request) -> None:
        return None

    def ctl_bus(self, req: Request) -> int:
        raise CommandError(errno.ENOTTY, "the CXL nvdimm bus has no commands")

    def ctl_dimm(self, dimm: Nvdimm, req: Request) -> int:
        if req.cmd >= 64 or not PMEM_CMD_MASK >> req.cmd & 1 or dimm.label_area is None:
            raise CommandError(errno.ENOTTY, f"command {req.cmd} on {dimm.name}")
        return config_command(dimm.label_area, req.cmd, req.buf)


class CxlNvdimmBus(NvdimmBus):
    """The nvdimm bus cxl_nvdimm_bridge_probe() registers below its bridge."""

    def __init__(self, system: System, bus_id: int, bridge: CxlNvdimmBridge) -> None:
        super().__init__(system, bus_id, CXL_TEST_PROVIDER, "")
        self.parent = bridge
        self.bridge = bridge
        self.firmware = CxlPmemFirmware()

    @property
    def sysfs_dir(self) -> str:
        parts = [self.name]
        dev: Device | None = self.bridge
        while dev is not None and dev.sysfs_dir is None:
            parts.append(dev.name)
            dev = dev.parent
        base = dev.sysfs_dir if dev is not None and dev.sysfs_dir is not None else "/devices"
        return "/".join([base, *reversed(parts)])


class CxlNmem(Nvdimm):
    """The nmem cxl_nvdimm_probe() creates: NDD_LABELING from the start, the label commands,
    and the `cxl/` group (id: the memdev's serial, provider: the pmemN device) instead of
    `nfit/`."""

    def __init__(self, bus: CxlNvdimmBus, dimm_id: int, cxl_nvd: CxlNvdimm) -> None:
        memdev = cxl_nvd.memdev
        super().__init__(bus.system, bus, dimm_id, memdev.pmem_size, 0, 0, memdev.serial)
        self.cxl_nvd = cxl_nvd
        self.label_area = MailboxLabelArea(memdev.firmware, memdev.lsa_size)  # type: ignore[assignment]
        self.commands = ("get_size", "get_data", "set_data")

    def unique_id(self) -> str:
        """nvdimm->dimm_id: cxl_nvd->dev_id, the serial in hex (the key is nvdimm:<it>)."""
        return f"{self.cxl_nvd.memdev.serial:x}"

    def probe(self) -> None:
        super().probe()
        self.labeling = True  # set by the provider at creation, whatever the labels hold

    def entries(self) -> list[Entry]:
        out = [e for e in super().entries() if not (isinstance(e, Group) and e.name == "nfit")]
        memdev = self.cxl_nvd.memdev
        return [*out, Group("cxl", [
            ro("id", lambda: f"{memdev.serial}\n"),
            ro("provider", lambda: f"{self.cxl_nvd.name}\n"),
        ])]


class CxlNvdimmBridge(CxlDev):
    """struct cxl_nvdimm_bridge nvdimm-bridgeN below the root port."""

    devtype = "cxl_nvdimm_bridge"
    cxl_type = CXL_DEVICE_NVDIMM_BRIDGE

    def __init__(self, root: CxlPort, bridge_id: int) -> None:
        super().__init__(root.system, f"nvdimm-bridge{bridge_id}", root)
        self.id = bridge_id
        self.root = root
        self.nvdimm_bus: CxlNvdimmBus | None = None


class CxlNvdimm(CxlDev):
    """struct cxl_nvdimm pmemN below memN."""

    devtype = "cxl_nvdimm"
    cxl_type = CXL_DEVICE_NVDIMM

    def __init__(self, memdev: CxlMemdev, bridge: CxlNvdimmBridge) -> None:
        super().__init__(memdev.system, f"pmem{memdev.id}", memdev)
        self.memdev = memdev
        self.bridge = bridge
        self.nvdimm: CxlNmem | None = None


class CxlPmemRegion(CxlDev):
    """struct cxl_pmem_region pmem_regionN below regionN."""

    devtype = "cxl_pmem_region"
    cxl_type = CXL_DEVICE_PMEM_REGION

    def __init__(self, region: CxlRegion, bridge: CxlNvdimmBridge) -> None:
        super().__init__(region.system, f"pmem_region{region.id}", region)
        self.region = region
        self.bridge = bridge
        self.nd_region: Region | None = None


# ---------------------------------------------------------------- what the drivers do


def lowest_free(used: Iterable[int], floor: int = 0) -> int:
    taken = set(used)
    return next(i for i in range(floor, floor + len(taken) + 1) if i not in taken)


def register_nvdimm_bus(bridge: CxlNvdimmBridge) -> None:
    """cxl_nvdimm_bridge_probe(): nvdimm_bus_register() below the bridge."""
    system = bridge.system
    bus = CxlNvdimmBus(system, lowest_free((b.id for b in system.buses), bridge.root.topo.nd_bus_floor), bridge)
    bridge.nvdimm_bus = bus
    system.buses.append(bus)
    system.buses.sort(key=lambda b: b.id)
    system.device_add(bus)


def unregister_nvdimm_bus(bridge: CxlNvdimmBridge) -> None:
    """unregister_nvdimm_bus(): its regions and nmems go first, then the bus."""
    bus, bridge.nvdimm_bus = bridge.nvdimm_bus, None
    if bus is None:
        return
    system = bridge.system
    for region in list(bus.regions):
        delete_nd_region(bus, region)
    for dimm in list(bus.dimms):
        delete_nmem(bus, dimm)
    system.release(bus)
    system.buses.remove(bus)
    system.changed()


def create_nmem(cxl_nvd: CxlNvdimm) -> None:
    """cxl_nvdimm_probe(): __nvdimm_create() on the bridge's bus (the nvdimm ida is global)."""
    bus = cxl_nvd.bridge.nvdimm_bus
    if bus is None:
        raise fail(errno.ENXIO, f"{cxl_nvd.name}: {cxl_nvd.bridge.name} has no nvdimm bus")
    system = cxl_nvd.system
    dimm_id = lowest_free((d.id for b in system.buses for d in b.dimms), cxl_nvd.bridge.root.topo.nmem_floor)
    nmem = CxlNmem(bus, dimm_id, cxl_nvd)
    # cxl_security_ops over the memdev's security commands; a kernel built for cxl_test
    # (CONFIG_NVDIMM_SECURITY_TEST) asks the device again on each read of `security`
    nmem.security = DimmSecurity(nmem, CxlSecurityOps(cxl_nvd.memdev.mock_security), poll_on_show=True)
    nmem.security.wipe = WipeTarget(nmem)
    cxl_nvd.nvdimm = nmem
    bus.dimms.append(nmem)
    system.device_add(nmem)
    # set_exclusive_cxl_commands(): user space loses the label and shutdown-state writes
    cxl_nvd.memdev.firmware.exclusive_commands.update(NVDIMM_EXCLUSIVE_COMMANDS)


def remove_nmem(cxl_nvd: CxlNvdimm) -> None:
    """nvdimm_delete() of the nmem: the nd regions that map it go with it."""
    nmem, cxl_nvd.nvdimm = cxl_nvd.nvdimm, None
    cxl_nvd.memdev.firmware.exclusive_commands.difference_update(NVDIMM_EXCLUSIVE_COMMANDS)
    bus = cxl_nvd.bridge.nvdimm_bus
    if nmem is None or bus is None or nmem not in bus.dimms:
        return
    for region in [r for r in bus.regions if any(m.dimm is nmem for m in r.mappings)]:
        delete_nd_region(bus, region)
    delete_nmem(bus, nmem)


def delete_nmem(bus: NvdimmBus, nmem: Nvdimm) -> None:
    system = bus.system
    if nmem.security is not None:
        nmem.security.cancel()
    system.driver_detach(nmem)
    bus.dimms.remove(nmem)
    system.minors[nmem.devt[0]].put(nmem.devt[1])
    system.changed()


def interleave_set(nmems: list[CxlNmem], dpa_starts: list[int]) -> InterleaveSet:
    """cxl_pmem_region_probe()'s nd_set: cookie1 = cookie2 = the fletcher64 of {u64 DPA
    offset, u64 serial} per mapping in position order; no altcookie, no type GUID."""
    info = b"".join(struct.pack("<QQ", dpa, nmem.cxl_nvd.memdev.serial) for nmem, dpa in zip(nmems, dpa_starts,
                                                                                          strict=True))
    cookie = fletcher64(info)
    return InterleaveSet(cookie, cookie, 0, NULL_UUID)


def create_nd_region(pmem_region: CxlPmemRegion) -> None:
    """cxl_pmem_region_probe(): nvdimm_pmem_region_create() with one mapping per target,
    in position order, each its endpoint decoder's DPA range on its memdev's nmem."""
    cxlr = pmem_region.region
    bus = pmem_region.bridge.nvdimm_bus
    if bus is None or cxlr.res is None:
        raise fail(errno.ENXIO, f"{pmem_region.name}: no nvdimm bus or no HPA range")
    mappings: list[Mapping] = []
    nmems: list[CxlNmem] = []
    for pos, cxled in enumerate(cxlr.targets[:cxlr.interleave_ways]):
        assert cxled is not None
        cxl_nvd = cxled.memdev.cxl_nvd
        nmem = cxl_nvd.nvdimm if isinstance(cxl_nvd, CxlNvdimm) else None
        if nmem is None:
            raise fail(errno.ENODEV, f"{pmem_region.name}: [{pos}]: {cxled.memdev.name}: no nvdimm found")
        mappings.append(Mapping(nmem, cxled.dpa_resource, cxled.dpa_size, pos))
        nmems.append(nmem)
    start, size = cxlr.res
    iset = interleave_set(nmems, [m.dpa for m in mappings])
    if cxlr.media is None:
        media = Media.anonymous(f"cxl-{cxlr.name}", size)
        # the memmap workers (other processes) open a map=dev memmap's media by path:
        # /proc/self/fd/N would be theirs, so name this process's descriptor
        media.path = Path(f"/proc/{os.getpid()}/fd/{media.fd}")
        cxlr.media = media
    media = cxlr.media
    region = Region(bus, cxlr.id, start, size, media, numa_node=0, mappings=mappings, iset=iset,
                    persistence=PMEM_PERSISTENCE)
    pmem_region.nd_region = region
    bus.regions.append(region)
    bus.regions.sort(key=lambda r: r.id)
    pmem_region.system.device_add(region)


def remove_nd_region(pmem_region: CxlPmemRegion) -> None:
    """unregister_nvdimm_region(): nvdimm_region_delete()."""
    region, pmem_region.nd_region = pmem_region.nd_region, None
    bus = pmem_region.bridge.nvdimm_bus
    if region is not None and bus is not None and region in bus.regions:
        delete_nd_region(bus, region)


def delete_nd_region(bus: NvdimmBus, region: Region) -> None:
    system = bus.system
    system.driver_detach(region)
    bus.regions.remove(region)  # (its media is the CXL region's: it stays while the region has its range)
    system.changed()
