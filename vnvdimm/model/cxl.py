"""The CXL core's device model (drivers/cxl/core/port.c, memdev.c; drivers/cxl/port.c, mem.c,
acpi.c) as the kernel's cxl_test module exercises it: platform devices standing in for the
ACPI0017 object, host bridges, root ports and switch ports; the cxl bus with its root port
(`rootN`), host-bridge and switch ports (`portN`), endpoint ports (`endpointN`), HDM decoders
(`decoderP.D`) and memory devices (`memN`), and the drivers that bind them.

What binds what, as in the kernel:
* `cxl_acpi` (platform bus) binds the ACPI0017 stand-in: it registers the root port with its
  dports (the host bridges) and its root decoders (one per CFMWS window), and one port per
  host bridge.
* `cxl_port` binds host-bridge, switch and endpoint ports: its probe enumerates the port's HDM
  decoders; its removal takes them away and detaches every memdev below the port.
* `cxl_mem` binds a memdev: its probe finds (or registers) the switch port above the device
  and registers the endpoint port; its removal unregisters the endpoint, and a switch port
  left without endpoints is unregistered too (cxl_detach_ep()).

Errors are OSError(errno) where the kernel returns -errno.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnvdimm.model.base import BusType, Device, Driver, Entry, Group, Ida, Link, fail, ro
from vnvdimm.model.drivers import BusDriver

if TYPE_CHECKING:
    from vnvdimm.model.system import System

CXL_BUS = "cxl"
PLATFORM_BUS = "platform"
# Modules whose /sys/module/<name> exists while cxl_test is loaded (libkmod finds them live
# instead of inserting the host's).
CXL_MODULES = ("cxl_core", "cxl_acpi", "cxl_port", "cxl_mem", "cxl_pmem", "cxl_mock", "cxl_mock_mem")
CXL_MEM_MAJOR = 250  # the memdevs' char major (dynamic in the kernel; fixed here)

# drivers/cxl/cxl.h: CXL_DEVICE_*, what cxl drivers match (modalias "cxl:t%d")
CXL_DEVICE_NONE = 0
CXL_DEVICE_PORT = 3
CXL_DEVICE_ROOT = 4
CXL_DEVICE_MEMORY_EXPANSION = 5


def granularity(eig: int) -> int:
    """eig_to_granularity(): the CFMWS encoding 0..6 -> 256 B..16 KiB."""
    return 256 << eig


def ways(eiw: int) -> int:
    """eiw_to_ways(): 0..4 -> 1, 2, 4, 8, 16; 8..10 -> 3, 6, 12."""
    return 1 << eiw if eiw <= 4 else 3 << (eiw - 8)


@dataclass(frozen=True)
class Window:
    """A CFMWS window: what a root decoder decodes."""

    eiw: int  # encoded interleave ways
    eig: int  # encoded granularity
    ram: bool  # ACPI_CEDT_CFMWS_RESTRICT_VOLATILE, else _PMEM
    size: int
    targets: tuple[int, ...]  # host-bridge uids
    xor: bool = False


# ---------------------------------------------------------------- the platform devices


class PlatformDev(Device):
    """A platform device of cxl_test (cxl_acpi.0, cxl_host_bridge.N, ...): where the cxl
    devices hang in /sys/devices/platform."""

    bus_name = PLATFORM_BUS

    def __init__(self, system: System, kind: str, pdev_id: int, parent: PlatformDev | None,
                 numa_node: int = -1, physical_node: bool = False) -> None:
        super().__init__(system, f"{kind}.{pdev_id}", parent)
        self.kind = kind
        self.pdev_id = pdev_id
        self.numa_node = numa_node
        self.physical_node = physical_node  # cxl_test links host bridges to themselves
        self.kids: list[Device] = []
        if parent is not None:
            parent.kids.append(self)

    @property
    def sysfs_dir(self) -> str:
        return f"/devices/platform/{self.name}"

    def entries(self) -> list[Entry]:
        out: list[Entry] = [
            ro("modalias", lambda: f"platform:{self.kind}\n"),
            ro("numa_node", lambda: f"{self.numa_node}\n"),
            ro("driver_override", lambda: "(null)\n"),
        ]
        if self.physical_node:
            out.append(Link("physical_node", self))
        return super().entries() + out

    def uevent(self) -> str:
        driver = f"DRIVER={self.driver.name}\n" if self.driver else ""
        return f"{driver}MODALIAS=platform:{self.kind}\n"

    def children(self) -> Iterable[Device]:
        return list(self.kids)


# ---------------------------------------------------------------- cxl bus devices


class CxlDev(Device):
    bus_name = CXL_BUS
    cxl_type = CXL_DEVICE_NONE

    def entries(self) -> list[Entry]:
        return [
            ro("devtype", lambda: f"{self.devtype}\n"),
            ro("modalias", lambda: f"cxl:t{self.cxl_type}\n"),
            *[e for e in super().entries() if getattr(e, "name", "") == "uevent"],
        ]

    def uevent(self) -> str:
        driver = f"DRIVER={self.driver.name}\n" if self.driver else ""
        return f"DEVTYPE={self.devtype}\n{driver}MODALIAS=cxl:t{self.cxl_type}\n"


class CxlDecoder(CxlDev):
    """struct cxl_decoder: a root (CFMWS), switch or endpoint HDM decoder."""

    def __init__(self, port: CxlPort, index: int, kind: str, window: Window | None = None,
                 start: int = 0) -> None:
        super().__init__(port.system, f"decoder{port.id}.{index}", port)
        self.port = port
        self.index = index
        self.kind = kind  # "root", "switch", "endpoint"
        self.devtype = f"cxl_decoder_{kind}"
        self.window = window
        self.start = start if window else 0
        self.size = window.size if window else 0  # hpa_range 0..-1: range_len() 0
        self.interleave_ways = ways(window.eiw) if window else 1
        self.interleave_granularity = granularity(window.eig) if window else 256
        self.mode = "none"  # endpoint decoders: the partition their DPA comes from
        self.dpa_resource = 0
        self.dpa_size = 0
        # switch decoders target the port's dports (cxlsd->target[] from the target map)
        self.targets: list[int] = list(window.targets) if window else sorted(port.dports)[:1]

    def entries(self) -> list[Entry]:
        out: list[Entry] = [
            *super().entries(),
            ro("start", lambda: f"{self.start:#x}\n"),
            ro("size", lambda: f"{self.size:#x}\n"),
            ro("locked", lambda: "0\n"),
            ro("interleave_granularity", lambda: f"{self.interleave_granularity}\n"),
            ro("interleave_ways", lambda: f"{self.interleave_ways}\n"),
        ]
        if self.kind == "root":
            ram = self.window is not None and self.window.ram
            out += [
                ro("cap_pmem", lambda: f"{int(not ram)}\n"),
                ro("cap_ram", lambda: f"{int(ram)}\n"),
                ro("cap_type2", lambda: "0\n"),
                ro("cap_type3", lambda: "1\n"),
                ro("target_list", self._target_list),
            ]
            if self.window is not None and self.window.xor:
                out.append(ro("interleave_arithmetic", lambda: "1\n"))
        else:
            out += [ro("target_type", lambda: "expander\n"), ro("region", lambda: "\n")]
            if self.kind == "switch":
                out.append(ro("target_list", self._target_list))
            else:
                out += [
                    ro("mode", lambda: f"{self.mode}\n"),
                    ro("dpa_resource", lambda: f"{self.dpa_resource:#x}\n"),
                    ro("dpa_size", lambda: f"{self.dpa_size:#x}\n"),
                ]
        return out

    def _target_list(self) -> str:
        # emit_target_list(): the first interleave_ways targets, comma separated
        return ",".join(str(t) for t in self.targets[:self.interleave_ways]) + "\n"


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
        self.parent_port = parent if isinstance(parent, CxlPort) else None

    def entries(self) -> list[Entry]:
        out: list[Entry] = [*super().entries(), Link("uport", self.uport)]
        out += [Link(f"dport{i}", dev) for i, dev in sorted(self.dports.items())]
        if self.kind != "root":
            out.append(ro("decoders_committed", lambda: "0\n"))
        return out

    def children(self) -> Iterable[Device]:
        return [*self.decoders, *self.ports]

    def endpoints(self) -> list[CxlPort]:
        return [p for p in self.ports if p.kind == "endpoint"]

    def walk(self) -> Iterator[CxlPort]:
        yield self
        for child in self.ports:
            yield from child.walk()


class CxlMemdev(CxlDev):
    """struct cxl_memdev memN, below its cxl_mem.N platform device; /dev/cxl/memN."""

    devtype = "cxl_memdev"
    cxl_type = CXL_DEVICE_MEMORY_EXPANSION

    def __init__(self, topo: CxlTopology, memdev_id: int, pdev: PlatformDev, serial: int, ram_size: int,
                 pmem_size: int, lsa_size: int, payload_max: int, firmware_version: str) -> None:
        super().__init__(topo.system, f"mem{memdev_id}", pdev)
        self.topo = topo
        self.id = memdev_id
        self.pdev = pdev
        self.serial = serial
        self.ram_size = ram_size
        self.pmem_size = pmem_size
        self.lsa_size = lsa_size
        self.payload_max = payload_max
        self.firmware_version = firmware_version
        self.devt = (CXL_MEM_MAJOR, memdev_id)
        self.endpoint: CxlPort | None = None
        pdev.kids.append(self)

    def entries(self) -> list[Entry]:
        return [
            *super().entries(),
            ro("dev", lambda: f"{self.devt[0]}:{self.devt[1]}\n"),
            ro("firmware_version", lambda: f"{self.firmware_version[:16]}\n"),
            ro("payload_max", lambda: f"{self.payload_max}\n"),
            ro("label_storage_size", lambda: f"{self.lsa_size}\n"),
            ro("serial", lambda: f"{self.serial:#x}\n"),
            ro("numa_node", lambda: f"{self.pdev.numa_node}\n"),
            Group("ram", [ro("size", lambda: f"{self.ram_size:#x}\n")]),
            Group("pmem", [ro("size", lambda: f"{self.pmem_size:#x}\n")]),
        ]

    def uevent(self) -> str:
        return f"MAJOR={self.devt[0]}\nMINOR={self.devt[1]}\nDEVNAME=cxl/{self.name}\n" + super().uevent()


# ---------------------------------------------------------------- the topology


DecoderPlan = Callable[[CxlPort], list[CxlDecoder]]


class CxlTopology:
    """One cxl_test instance: its platform devices and the cxl devices the drivers register.
    `layout` (vnvdimm.topology.cxl_test) says what the module creates."""

    def __init__(self, system: System, acpi: PlatformDev, host_bridges: list[PlatformDev],
                 windows: list[Window], decoders_per_port: int) -> None:
        self.system = system
        self.acpi = acpi
        self.host_bridges = host_bridges
        self.windows = windows
        self.decoders_per_port = decoders_per_port
        self.port_ida = Ida()
        self.memdevs: list[CxlMemdev] = []
        self.root: CxlPort | None = None
        self.window_base = 0

    # -- what cxl_acpi's probe does
    def add_root(self) -> None:
        root = CxlPort(self, "root", self.acpi, self.acpi, {hb.pdev_id: hb for hb in self.host_bridges})
        self.acpi.kids.append(root)
        self.root = root
        start = self.window_base
        for i, window in enumerate(self.windows):
            root.decoders.append(CxlDecoder(root, i, "root", window, start))
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


# ---------------------------------------------------------------- drivers


class CxlBusType(BusType):
    """cxl_bus_type: cxl_bus_match() compares the device's CXL_DEVICE_* with the driver's id."""

    def __init__(self) -> None:
        super().__init__(CXL_BUS)

    def match(self, dev: Device, drv: Driver) -> bool:
        return isinstance(dev, CxlDev) and isinstance(drv, CxlDriver) and dev.cxl_type == drv.cxl_id


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
        self._topology(dev).add_root()

    def remove(self, dev: Device) -> None:
        self._topology(dev).remove_root()


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

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, CxlMemdev)
        endpoint, dev.endpoint = dev.endpoint, None
        if endpoint is None:
            return
        topo = dev.topo
        switch = endpoint.parent_port
        topo.unregister_port(endpoint)
        if switch is not None and switch.kind == "switch" and not switch.endpoints():
            topo.unregister_port(switch)  # cxl_detach_ep(): the last endpoint takes the switch


def register(system: System, topologies: Callable[[], list[CxlTopology]]) -> None:
    """Register the cxl and platform buses and the cxl drivers on `system` (once)."""
    if CXL_BUS in system.bus_types:
        return
    system.register_bus_type(CxlBusType())
    system.register_bus_type(PlatformBusType())
    system.register_driver(CxlAcpiDriver(system, topologies))
    for drv in (CxlMemDriver(system, "cxl_mem", CXL_BUS), CxlPortDriver(system, "cxl_port", CXL_BUS)):
        system.register_driver(drv)
