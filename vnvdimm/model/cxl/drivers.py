"""The cxl and platform bus types and the CXL drivers (drivers/cxl/acpi.c, port.c, mem.c,
core/region.c), and register(), which plugs them into a System.

What binds what, as in the kernel:
* `cxl_acpi` (platform bus) binds the ACPI0017 stand-in: it registers the root port with its
  dports (the host bridges) and its root decoders (one per CFMWS window), and one port per
  host bridge.
* `cxl_port` binds host-bridge, switch and endpoint ports: its probe enumerates the port's HDM
  decoders; its removal takes them away and detaches every memdev below the port.
* `cxl_mem` binds a memdev: its probe finds (or registers) the switch port above the device
  and registers the endpoint port; its removal unregisters the endpoint, and a switch port
  left without endpoints is unregistered too (cxl_detach_ep()).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from vnvdimm.model.base import (
    Attr,
    BusType,
    Device,
    Driver,
    Entry,
    fail,
    sysfs_streq,
)
from vnvdimm.model.cxl.common import (
    CXL_BUS,
    CXL_CONFIG_COMMIT,
    CXL_DEVICE_MEMORY_EXPANSION,
    CXL_DEVICE_NONE,
    CXL_DEVICE_PORT,
    CXL_DEVICE_REGION,
    PLATFORM_BUS,
    CxlDev,
    PlatformDev,
)
from vnvdimm.model.cxl.decoder import CxlDecoder
from vnvdimm.model.cxl.memdev import CxlMemdev
from vnvdimm.model.cxl.pmem import (
    CXL_DEVICE_NVDIMM,
    CXL_DEVICE_NVDIMM_BRIDGE,
    CXL_DEVICE_PMEM_REGION,
    CxlNvdimm,
    CxlNvdimmBridge,
    CxlPmemRegion,
    create_nd_region,
    create_nmem,
    lowest_free,
    register_nvdimm_bus,
    remove_nd_region,
    remove_nmem,
    unregister_nvdimm_bus,
)
from vnvdimm.model.cxl.port import CxlPort, CxlTopology
from vnvdimm.model.cxl.region import CxlRegion
from vnvdimm.model.drivers import BusDriver

if TYPE_CHECKING:
    from vnvdimm.model.system import System

# ---------------------------------------------------------------- drivers


class CxlBusType(BusType):
    """cxl_bus_type: cxl_bus_match() compares the device's CXL_DEVICE_* with the driver's id."""

    def __init__(self) -> None:
        super().__init__(CXL_BUS)

    def match(self, dev: Device, drv: Driver) -> bool:
        return isinstance(dev, CxlDev) and isinstance(drv, CxlDriver) and dev.cxl_type == drv.cxl_id

    def bus_attrs(self) -> list[Attr]:
        return [Attr("flush", 0o200, store=self._flush_store)]

    @staticmethod
    def _flush_store(buf: bytes) -> None:
        """flush_store(): "1" waits for the cxl bus's queued work; nothing is ever queued
        here (probes run inside the store that triggers them)."""
        if not sysfs_streq(buf, "1"):
            raise fail(errno.EINVAL, "write 1")


class PlatformBusType(BusType):
    """The platform bus, for the cxl_test devices' drivers: matched by the device's name."""

    def __init__(self) -> None:
        super().__init__(PLATFORM_BUS)

    def match(self, dev: Device, drv: Driver) -> bool:
        return isinstance(dev, PlatformDev) and isinstance(drv, CxlAcpiDriver) and dev.kind == "cxl_acpi"


class CxlDriver(BusDriver):
    cxl_id = CXL_DEVICE_NONE


class CxlAcpiDriver(BusDriver):
    """cxl_acpi: binds the ACPI0017 device (cxl_acpi.0 under cxl_test)."""

    module = "cxl_acpi"

    def __init__(self, system: System, topologies: Callable[[], list[CxlTopology]]) -> None:
        super().__init__(system, "cxl_acpi", PLATFORM_BUS)
        self.topologies = topologies

    def _topology(self, dev: Device) -> CxlTopology:
        topo = next((t for t in self.topologies() if t.acpi is dev), None)
        if topo is None:
            raise fail(errno.ENODEV, f"{dev.name} is no ACPI0017 device")
        return topo

    def probe(self, dev: Device) -> None:
        topo = self._topology(dev)
        topo.add_root()
        root = topo.root
        assert root is not None
        if any(not w.ram for w in topo.windows):
            # add_root_nvdimm_bridge(): a root with a pmem window gets a bridge for cxl_pmem
            used = (t.root.bridge.id for t in self.topologies()
                    if t.root is not None and isinstance(t.root.bridge, CxlNvdimmBridge))
            bridge = CxlNvdimmBridge(root, lowest_free(used))
            root.bridge = bridge
            self.system.device_add(bridge)

    def remove(self, dev: Device) -> None:
        topo = self._topology(dev)
        bridge = topo.root.bridge if topo.root is not None else None
        topo.remove_root()
        if bridge is not None:
            self.system.driver_detach(bridge)
            assert isinstance(bridge.parent, CxlPort)
            bridge.parent.bridge = None


class CxlPortDriver(CxlDriver):
    """cxl_port: enumerates the HDM decoders of host-bridge, switch and endpoint ports."""

    module = "cxl_port"
    cxl_id = CXL_DEVICE_PORT

    def probe(self, dev: Device) -> None:
        assert isinstance(dev, CxlPort)
        kind = "endpoint" if dev.kind == "endpoint" else "switch"
        dev.decoders = [CxlDecoder(dev, i, kind) for i in range(dev.topo.decoders_per_port)]
        for decoder in dev.decoders:
            self.system.device_add(decoder)

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, CxlPort)
        topo = dev.topo
        if dev.kind != "endpoint":
            # the memdevs below lose their endpoint (and a switch left empty goes with it)
            for memdev in topo.memdevs_below(dev):
                if memdev.endpoint is not None:
                    self.system.driver_detach(memdev)
        dev.decoders = []
        self.system.changed()


class CxlMemDriver(CxlDriver):
    """cxl_mem: attaches a memdev to the port hierarchy (devm_cxl_enumerate_ports(),
    devm_cxl_add_endpoint())."""

    module = "cxl_mem"
    cxl_id = CXL_DEVICE_MEMORY_EXPANSION

    def probe(self, dev: Device) -> None:
        assert isinstance(dev, CxlMemdev)
        topo = dev.topo
        switch_dport = dev.pdev.parent
        switch_uport = switch_dport.parent if switch_dport else None
        root_port = switch_uport.parent if switch_uport else None
        host_bridge = root_port.parent if root_port else None
        if host_bridge is None or not isinstance(switch_uport, PlatformDev):
            raise fail(errno.ENXIO, f"{dev.name}: no CXL port above it")
        hb_port = topo.port_of(host_bridge)
        if hb_port is None or hb_port.driver is None:
            raise fail(errno.ENXIO, f"{dev.name}: host bridge port disabled, failed to enumerate CXL.mem")
        switch = topo.port_of(switch_uport)
        if switch is None:
            dports = {k.pdev_id: k for k in switch_uport.kids if isinstance(k, PlatformDev)}
            switch = CxlPort(topo, "switch", hb_port, switch_uport, dports)
            hb_port.ports.append(switch)
            self.system.device_add(switch)
        if switch.driver is None:
            raise fail(errno.ENXIO, f"{dev.name}: port {switch.name} disabled, failed to enumerate CXL.mem")
        endpoint = CxlPort(topo, "endpoint", switch, dev, {})
        switch.ports.append(endpoint)
        dev.endpoint = endpoint
        self.system.device_add(endpoint)
        if dev.pmem_size:
            # devm_cxl_add_nvdimm(): pmemN for the memdev's nmem; no bridge, no probe
            root = topo.root
            bridge = root.bridge if root is not None else None
            if not isinstance(bridge, CxlNvdimmBridge):
                raise fail(errno.ENODEV, f"{dev.name}: PMEM disabled by platform")
            dev.cxl_nvd = CxlNvdimm(dev, bridge)
            self.system.device_add(dev.cxl_nvd)

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, CxlMemdev)
        if dev.cxl_nvd is not None:
            self.system.driver_detach(dev.cxl_nvd)
            dev.cxl_nvd = None
            self.system.changed()
        endpoint, dev.endpoint = dev.endpoint, None
        if endpoint is None:
            return
        topo = dev.topo
        switch = endpoint.parent_port
        for decoder in endpoint.decoders:
            decoder.kill_region()
        topo.unregister_port(endpoint)
        if switch is not None and switch.kind == "switch" and not switch.endpoints():
            topo.unregister_port(switch)  # cxl_detach_ep(): the last endpoint takes the switch


class CxlRegionDriver(CxlDriver):
    """cxl_region: a region binds once its decoders are committed (cxl_region_probe())."""

    module = "cxl_core"
    cxl_id = CXL_DEVICE_REGION

    def probe(self, dev: Device) -> None:
        assert isinstance(dev, CxlRegion)
        if dev.state < CXL_CONFIG_COMMIT:
            raise fail(errno.ENXIO, f"{dev.name}: config state {dev.state}")
        if dev.mode == "pmem":
            # devm_cxl_add_pmem_region(): pmem_regionN, for cxl_pmem to make an nd region of
            bridge = dev.root_decoder.port.bridge
            if not isinstance(bridge, CxlNvdimmBridge):
                raise fail(errno.ENODEV, f"{dev.name}: no nvdimm bridge")
            dev.pmem_region = CxlPmemRegion(dev, bridge)
            self.system.device_add(dev.pmem_region)

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, CxlRegion)
        if dev.pmem_region is not None:
            self.system.driver_detach(dev.pmem_region)
            dev.pmem_region = None
            self.system.changed()


class CxlPmemDriver(CxlDriver):
    """A driver of cxl_pmem: suppress_bind_attrs, no bind or unbind files."""

    module = "cxl_pmem"

    def entries(self) -> list[Entry]:
        return [e for e in super().entries() if e.name not in ("bind", "unbind")]


class CxlNvdimmBridgeDriver(CxlPmemDriver):
    """cxl_nvdimm_bridge: registers the nvdimm bus below the bridge."""

    cxl_id = CXL_DEVICE_NVDIMM_BRIDGE

    def probe(self, dev: Device) -> None:
        assert isinstance(dev, CxlNvdimmBridge)
        register_nvdimm_bus(dev)

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, CxlNvdimmBridge)
        unregister_nvdimm_bus(dev)


class CxlNvdimmDriver(CxlPmemDriver):
    """cxl_nvdimm: creates the memdev's nmem on the bridge's bus."""

    cxl_id = CXL_DEVICE_NVDIMM

    def probe(self, dev: Device) -> None:
        assert isinstance(dev, CxlNvdimm)
        create_nmem(dev)

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, CxlNvdimm)
        remove_nmem(dev)


class CxlPmemRegionDriver(CxlPmemDriver):
    """cxl_pmem_region: creates the nd region of an enabled pmem region."""

    cxl_id = CXL_DEVICE_PMEM_REGION

    def probe(self, dev: Device) -> None:
        assert isinstance(dev, CxlPmemRegion)
        create_nd_region(dev)

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, CxlPmemRegion)
        remove_nd_region(dev)


def register(system: System, topologies: Callable[[], list[CxlTopology]]) -> None:
    """Register the cxl and platform buses and the cxl drivers on `system` (once)."""
    if CXL_BUS in system.bus_types:
        return
    system.register_bus_type(CxlBusType())
    system.register_bus_type(PlatformBusType())
    system.register_driver(CxlAcpiDriver(system, topologies))
    for drv in (CxlMemDriver(system, "cxl_mem", CXL_BUS), CxlPortDriver(system, "cxl_port", CXL_BUS),
                CxlRegionDriver(system, "cxl_region", CXL_BUS),
                CxlNvdimmBridgeDriver(system, "cxl_nvdimm_bridge", CXL_BUS),
                CxlNvdimmDriver(system, "cxl_nvdimm", CXL_BUS),
                CxlPmemRegionDriver(system, "cxl_pmem_region", CXL_BUS)):
        system.register_driver(drv)
