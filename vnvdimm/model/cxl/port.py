"""struct cxl_port (drivers/cxl/core/port.c) and one cxl_test instance's topology: the root
port cxl_acpi registers with its root decoders, host-bridge, switch and endpoint ports."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from vnvdimm.model.base import (
    Device,
    Entry,
    Ida,
    Link,
    ro,
)
from vnvdimm.model.cxl.common import (
    CXL_DEVICE_PORT,
    CXL_DEVICE_ROOT,
    CxlDev,
    PlatformDev,
    Window,
)
from vnvdimm.model.cxl.decoder import CxlDecoder
from vnvdimm.model.cxl.memdev import CxlMemdev

if TYPE_CHECKING:
    from vnvdimm.model.system import System

class CxlPort(CxlDev):
    """struct cxl_port: the root port (rootN), a host-bridge or switch port (portN), or an
    endpoint port (endpointN), below its parent port in sysfs."""

    devtype = "cxl_port"

    def __init__(self, topo: CxlTopology, kind: str, parent: Device, uport: Device,
                 dports: dict[int, PlatformDev] | None = None) -> None:
        port_id = topo.port_ida.get()
        prefix = {"root": "root", "endpoint": "endpoint"}.get(kind, "port")
        super().__init__(topo.system, f"{prefix}{port_id}", parent)
        self.topo = topo
        self.id = port_id
        self.kind = kind  # "root", "host_bridge", "switch", "endpoint"
        self.cxl_type = CXL_DEVICE_ROOT if kind == "root" else CXL_DEVICE_PORT
        self.uport = uport
        self.dports = dports or {}
        self.decoders: list[CxlDecoder] = []
        self.ports: list[CxlPort] = []
        self.hdm_end = -1  # the last decoder with DPA (allocation is in decoder order)
        self.commit_end = -1  # the last committed decoder (commit is in decoder order)
        self.parent_port = parent if isinstance(parent, CxlPort) else None
        self.bridge: Device | None = None  # root ports: the nvdimm-bridgeN cxl_pmem hangs below

    def entries(self) -> list[Entry]:
        out: list[Entry] = [*super().entries(), Link("uport", self.uport)]
        out += [Link(f"dport{i}", dev) for i, dev in sorted(self.dports.items())]
        if self.kind != "root":
            out.append(ro("decoders_committed", lambda: f"{self.commit_end + 1}\n"))
        return out

    def children(self) -> Iterable[Device]:
        return [*self.decoders, *self.ports, *([self.bridge] if self.bridge is not None else [])]

    def endpoints(self) -> list[CxlPort]:
        return [p for p in self.ports if p.kind == "endpoint"]

    def walk(self) -> Iterator[CxlPort]:
        yield self
        for child in self.ports:
            yield from child.walk()




# ---------------------------------------------------------------- the topology


DecoderPlan = Callable[[CxlPort], list[CxlDecoder]]


class CxlTopology:
    """One cxl_test instance: its platform devices and the cxl devices the drivers register.
    `layout` (vnvdimm.topology.cxl_test) says what the module creates."""

    def __init__(self, system: System, acpi: PlatformDev, host_bridges: list[PlatformDev],
                 windows: list[Window], decoders_per_port: int, xormaps: tuple[int, ...] = ()) -> None:
        self.system = system
        self.xormaps = xormaps  # the CXIMS of XOR windows
        self.acpi = acpi
        self.host_bridges = host_bridges
        self.windows = windows
        self.decoders_per_port = decoders_per_port
        self.port_ida = Ida()
        self.memdevs: list[CxlMemdev] = []
        self.root: CxlPort | None = None
        self.window_base = 0
        # nd bus and nmem ids below these are the platform's own (nfit_test's buses and DIMMs
        # come back with their fixed ids when that module is reloaded): cxl_pmem's start here
        self.nd_bus_floor = 0
        self.nmem_floor = 0
        self.region_floor = 0  # likewise the region ids of the platform's own nd regions

    def memregion_alloc(self) -> int:
        """memregion_alloc(): the lowest free region id at or above the platform's own."""
        ida = self.system.region_ida
        below: list[int] = []
        region_id = ida.get()
        while region_id < self.region_floor:
            below.append(region_id)
            region_id = ida.get()
        for i in below:
            ida.put(i)
        return region_id

    # -- what cxl_acpi's probe does
    def add_root(self) -> None:
        root = CxlPort(self, "root", self.acpi, self.acpi, {hb.pdev_id: hb for hb in self.host_bridges})
        self.acpi.kids.append(root)
        self.root = root
        start = self.window_base
        for i, window in enumerate(self.windows):
            decoder = CxlDecoder(root, i, "root", window, start)
            decoder.region_id = self.memregion_alloc()  # the next region's id
            root.decoders.append(decoder)
            start += -(-window.size // (256 << 20)) * (256 << 20)
        self.system.device_add(root)
        for decoder in root.decoders:
            self.system.device_add(decoder)
        for hb in self.host_bridges:
            rps = {k.pdev_id: k for k in hb.kids if isinstance(k, PlatformDev)}
            port = CxlPort(self, "host_bridge", root, hb, rps)
            root.ports.append(port)
            self.system.device_add(port)

    def remove_root(self) -> None:
        root = self.root
        if root is None:
            return
        for memdev in self.memdevs:
            self.system.driver_detach(memdev)
        for port in list(root.ports):
            self.unregister_port(port)
        for decoder in root.decoders:
            for region in list(decoder.regions):
                region.unregister()
            self.system.region_ida.put(decoder.region_id)
        self.acpi.kids.remove(root)
        self.root = None
        self.port_ida.put(root.id)
        self.system.changed()

    def unregister_port(self, port: CxlPort) -> None:
        for child in list(port.ports):
            self.unregister_port(child)
        self.system.driver_detach(port)
        assert port.parent_port is not None
        port.parent_port.ports.remove(port)
        self.port_ida.put(port.id)
        self.system.changed()

    def port_of(self, uport: Device) -> CxlPort | None:
        if self.root is None:
            return None
        return next((p for p in self.root.walk() if p.uport is uport), None)

    def memdevs_below(self, port: CxlPort) -> list[CxlMemdev]:
        """The memdevs whose platform device hangs below one of the port's dports."""
        def below(dev: Device | None) -> bool:
            while dev is not None:
                if any(dev is d for d in port.dports.values()):
                    return True
                dev = dev.parent
            return False
        if port.kind == "endpoint":
            return [m for m in self.memdevs if m.endpoint is port]
        return [m for m in self.memdevs if below(m.pdev)]


