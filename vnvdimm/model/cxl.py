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
import re
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnvdimm.model.base import (
    NULL_UUID,
    Attr,
    BusType,
    Device,
    Driver,
    Entry,
    Group,
    Ida,
    Link,
    cstring,
    fail,
    kstrtobool,
    kstrtol,
    kstrtoull,
    ro,
    rw,
    streq_text,
    sysfs_streq,
)
from vnvdimm.model.cxl_mailbox import MockMemdevFirmware
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


SZ_256M = 256 << 20

# region.c's enum cxl_config_state
CXL_CONFIG_IDLE = 0
CXL_CONFIG_INTERLEAVE_ACTIVE = 1
CXL_CONFIG_ACTIVE = 2
CXL_CONFIG_RESET_PENDING = 3
CXL_CONFIG_COMMIT = 4
CXL_DEVICE_REGION = 6
MAX_REGION_TARGETS = 16  # CXL_DECODER_MAX_INTERLEAVE


def eig_of(gran: int) -> int:
    """granularity_to_eig(): 256 B..16 KiB, powers of 2; EINVAL otherwise."""
    if gran < 256 or gran > 16384 or gran & (gran - 1):
        raise fail(errno.EINVAL, f"granularity {gran}")
    return gran.bit_length() - 9


def eiw_of(iw: int) -> int:
    """ways_to_eiw(): 1, 2, 4, 8, 16, 3, 6, 12; EINVAL otherwise."""
    table = {1: 0, 2: 1, 4: 2, 8: 3, 16: 4, 3: 8, 6: 9, 12: 10}
    if iw not in table:
        raise fail(errno.EINVAL, f"interleave ways {iw}")
    return table[iw]


def c_hex(value: int) -> str:
    """printf("%#llx"): 0x-prefixed, except zero, which prints as "0"."""
    return f"{value:#x}" if value else "0"


def c_phys(value: int) -> str:
    """printk's "%pa" of a resource_size_t: 0x and 16 zero-padded hex digits."""
    return f"0x{value:016x}"


def kstrtoint(buf: bytes) -> int:
    value = kstrtol(buf, 0)
    if not -(1 << 31) <= value < 1 << 31:
        raise fail(errno.ERANGE, "number out of range")
    return value


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
        self.enabled = window is not None  # CXL_DECODER_F_ENABLE (root decoders: the firmware's)
        self.region: CxlRegion | None = None
        self.regions: list[CxlRegion] = []  # root decoders: the regions below them
        self.region_id = -1  # root decoders: cxlrd->region_id, the next region's name
        # endpoint decoders: the partition their DPA comes from and the DPA range
        self.mode = "none"
        self.dpa_resource = 0
        self.dpa_size = 0
        self.skip = 0
        self.pos = -1
        # switch decoders target the port's dports (cxlsd->target[] from the target map)
        self.targets: list[int] = list(window.targets) if window else sorted(port.dports)[:1]
        self.nr_targets = len(window.targets) if window else len(port.dports)

    def reset_range(self) -> None:
        self.start, self.size = 0, 0

    def children(self) -> Iterable[Device]:
        return list(self.regions)

    def kill_region(self) -> None:
        """cxl_decoder_kill_region(): the decoder goes away, its region loses it."""
        if self.region is not None and self.kind == "endpoint":
            self.region.detach(self.pos)

    def entries(self) -> list[Entry]:
        out: list[Entry] = [
            *super().entries(),
            ro("start", lambda: f"{c_hex(self.start)}\n"),
            ro("size", lambda: f"{c_hex(self.size)}\n"),
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
                rw("create_ram_region" if ram else "create_pmem_region", lambda: f"region{self.region_id}\n",
                   self._create_region_store),
                Attr("delete_region", 0o200, store=self._delete_region_store),
            ]
            if self.window is not None and self.window.xor:
                out.append(ro("interleave_arithmetic", lambda: "1\n"))
        else:
            out += [ro("target_type", lambda: "expander\n"),
                    ro("region", lambda: f"{self.region.name if self.region else ''}\n")]
            if self.kind == "switch":
                out.append(ro("target_list", self._target_list))
            else:
                out += [
                    rw("mode", lambda: f"{self.mode}\n", self._mode_store),
                    ro("dpa_resource", lambda: f"{c_hex(self.dpa_resource)}\n"),
                    rw("dpa_size", lambda: f"{c_phys(self.dpa_size)}\n", self._dpa_size_store),
                ]
        return out

    def _target_list(self) -> str:
        # emit_target_list(): the first interleave_ways targets, comma separated
        return ",".join(str(t) for t in self.targets[:self.interleave_ways]) + "\n"

    # -- root decoders: regions (region.c create_pmem_region_store(), delete_region_store())
    def _create_region_store(self, buf: bytes) -> None:
        m = re.fullmatch(rb"region(\d+)\n?", cstring(buf))
        if m is None:
            raise fail(errno.EINVAL, "expected regionN")
        region_id = int(m.group(1))
        if region_id != self.region_id:
            raise fail(errno.EBUSY, f"region{region_id} is not the next region of {self.name}")
        self.region_id = self.system.region_ida.get()
        assert self.window is not None
        region = CxlRegion(self, region_id, "ram" if self.window.ram else "pmem")
        self.regions.append(region)
        self.system.device_add(region)

    def _delete_region_store(self, buf: bytes) -> None:
        name = streq_text(buf)
        region = next((r for r in self.regions if r.name == name), None)
        if region is None:
            raise fail(errno.ENODEV, f"no {name} below {self.name}")
        region.unregister()

    # -- endpoint decoders: DPA (hdm.c cxl_dpa_set_mode(), cxl_dpa_alloc(), cxl_dpa_free())
    @property
    def memdev(self) -> CxlMemdev:
        assert isinstance(self.port.uport, CxlMemdev)
        return self.port.uport

    def _mode_store(self, buf: bytes) -> None:
        if sysfs_streq(buf, "ram"):
            mode = "ram"
        elif sysfs_streq(buf, "pmem"):
            mode = "pmem"
        else:
            raise fail(errno.EINVAL, "mode is ram or pmem")
        if self.enabled or self.dpa_size:
            raise fail(errno.EBUSY, f"{self.name} is enabled or has DPA")
        if not (self.memdev.pmem_size if mode == "pmem" else self.memdev.ram_size):
            raise fail(errno.ENXIO, f"{self.memdev.name} has no {mode} capacity")
        self.mode = mode

    def _dpa_size_store(self, buf: bytes) -> None:
        try:
            size = kstrtoull(buf, 0)
        except OSError:
            raise fail(errno.EINVAL, "not a size") from None
        if size % SZ_256M:
            raise fail(errno.EINVAL, "DPA size must be 256 MiB aligned")
        self.dpa_free()
        if size:
            self.dpa_alloc(size)

    def dpa_free(self) -> None:
        if not self.dpa_size:
            return
        if self.region is not None:
            raise fail(errno.EBUSY, f"{self.name} is assigned to {self.region.name}")
        if self.enabled:
            raise fail(errno.EBUSY, f"{self.name} is enabled")
        if self.index != self.port.hdm_end:
            raise fail(errno.EBUSY, f"expected decoder{self.port.id}.{self.port.hdm_end}")
        self.dpa_resource = self.dpa_size = self.skip = 0
        self.port.hdm_end -= 1

    def dpa_alloc(self, size: int) -> None:
        if self.region is not None or self.enabled:
            raise fail(errno.EBUSY, f"{self.name} is busy")
        mem = self.memdev
        allocated = [d for d in self.port.decoders if d.dpa_size]
        ram_end = max((d.dpa_resource + d.dpa_size for d in allocated if d.mode == "ram"), default=0)
        pmem_allocs = [d for d in allocated if d.mode == "pmem"]
        pmem_end = max((d.dpa_resource + d.dpa_size for d in pmem_allocs), default=mem.ram_size)
        if self.mode == "ram":
            start, avail, skip = ram_end, mem.ram_size - ram_end, 0
        elif self.mode == "pmem":
            start, avail = pmem_end, mem.ram_size + mem.pmem_size - pmem_end
            skip = 0 if pmem_allocs else start - ram_end
        else:
            raise fail(errno.EINVAL, "mode not set")
        if size > avail:
            raise fail(errno.ENOSPC, f"{self.name}: {size:#x} exceeds the free {self.mode} capacity {avail:#x}")
        if self.port.hdm_end + 1 != self.index:
            raise fail(errno.EBUSY, f"expected decoder{self.port.id}.{self.port.hdm_end + 1}")
        self.dpa_resource, self.dpa_size, self.skip = start, size, skip
        self.port.hdm_end = self.index

    # -- commit (mock_decoder_commit(), mock_decoder_reset())
    def commit(self) -> None:
        if self.enabled:
            return
        if self.port.commit_end + 1 != self.index:
            raise fail(errno.EBUSY, f"{self.name}: out of order commit, expected "
                                    f"decoder{self.port.id}.{self.port.commit_end + 1}")
        self.port.commit_end += 1
        self.enabled = True

    def reset(self) -> None:
        if not self.enabled:
            return
        if self.port.commit_end == self.index:
            self.port.commit_end -= 1
        self.enabled = False


class CxlRegion(CxlDev):
    """struct cxl_region regionN below its root decoder (drivers/cxl/core/region.c)."""

    devtype = "cxl_region"
    cxl_type = CXL_DEVICE_REGION

    def __init__(self, root_decoder: CxlDecoder, region_id: int, mode: str) -> None:
        super().__init__(root_decoder.system, f"region{region_id}", root_decoder)
        self.root_decoder = root_decoder
        self.id = region_id
        self.mode = mode
        self.uuid = NULL_UUID
        self.interleave_ways = 0
        self.interleave_granularity = 0
        self.res: tuple[int, int] | None = None  # (start, size)
        self.state = CXL_CONFIG_IDLE
        self.targets: list[CxlDecoder | None] = [None] * MAX_REGION_TARGETS
        self.port_decoders: dict[int, CxlDecoder] = {}  # id(port) -> the switch decoder it gave

    @property
    def nr_targets(self) -> int:
        return sum(t is not None for t in self.targets)

    def entries(self) -> list[Entry]:
        out: list[Entry] = [
            *super().entries(),
            rw("commit", lambda: f"{int(self.state == CXL_CONFIG_COMMIT)}\n", self._commit_store),
            rw("interleave_ways", lambda: f"{self.interleave_ways}\n", self._ways_store),
            rw("interleave_granularity", lambda: f"{self.interleave_granularity}\n", self._granularity_store),
            ro("resource", lambda: f"{c_hex(self.res[0] if self.res else (1 << 64) - 1)}\n"),
            rw("size", lambda: f"{c_hex(self.res[1] if self.res else 0)}\n", self._size_store),
            ro("mode", lambda: f"{self.mode}\n"),
        ]
        if self.mode == "pmem":
            out.append(rw("uuid", lambda: f"{self.uuid}\n", self._uuid_store))
        for pos in range(min(self.interleave_ways, MAX_REGION_TARGETS)):
            out.append(rw(f"target{pos}", lambda pos=pos: self._target_show(pos),
                          lambda buf, pos=pos: self._target_store(pos, buf)))
        return out

    # -- attributes
    def _uuid_store(self, buf: bytes) -> None:
        text = cstring(buf)
        if not re.fullmatch(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                            text[:36]):
            raise fail(errno.EINVAL, "malformed uuid")
        value = uuidlib.UUID(text[:36].decode())
        if value == NULL_UUID:
            raise fail(errno.EINVAL, "null uuid")
        if value == self.uuid:
            return
        if self.state >= CXL_CONFIG_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} is active")
        for topo in self.system.cxl_topologies:
            if topo.root is not None and any(r.uuid == value for d in topo.root.decoders for r in d.regions):
                raise fail(errno.EBUSY, f"uuid {value} is another region's")
        self.uuid = value

    def _ways_store(self, buf: bytes) -> None:
        val = kstrtoint(buf)
        eiw_of(val)
        root_ways = self.root_decoder.interleave_ways
        if val % root_ways or (val // root_ways) & (val // root_ways - 1):
            raise fail(errno.EINVAL, f"invalid interleave: {val}")
        if self.state >= CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} has its size")
        self.interleave_ways = val
        self.system.changed()  # the targetN attributes follow the ways

    def _granularity_store(self, buf: bytes) -> None:
        val = kstrtoint(buf)
        eig_of(val)
        root = self.root_decoder
        if root.interleave_ways > 1 and val != root.interleave_granularity:
            raise fail(errno.EINVAL, f"granularity {val} differs from the interleaved root's")
        if self.state >= CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} has its size")
        self.interleave_granularity = val

    def _size_store(self, buf: bytes) -> None:
        size = kstrtoull(buf, 0)
        if size:
            self.alloc_hpa(size)
        else:
            self.free_hpa()

    def alloc_hpa(self, size: int) -> None:
        if self.res is not None and self.res[1] == size:
            return
        if self.res is not None or self.state >= CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} has its size")
        if not self.interleave_ways or not self.interleave_granularity or (
                self.mode == "pmem" and self.uuid == NULL_UUID):
            raise fail(errno.ENXIO, "ways, granularity and uuid come before the size")
        if size % (SZ_256M * self.interleave_ways):
            raise fail(errno.EINVAL, f"size {size:#x} is no multiple of 256 MiB x {self.interleave_ways}")
        root = self.root_decoder
        taken = sorted(r.res for r in root.regions if r.res is not None)
        start = root.start
        for t_start, t_size in taken:  # first fit, 256 MiB aligned
            if start + size <= t_start:
                break
            start = max(start, -(-(t_start + t_size) // SZ_256M) * SZ_256M)
        if start + size > root.start + root.size:
            raise fail(errno.ENOSPC, f"no {size:#x} free in {root.name}")
        self.res = (start, size)
        self.state = CXL_CONFIG_INTERLEAVE_ACTIVE

    def free_hpa(self) -> None:
        if self.res is None:
            return
        if self.state >= CXL_CONFIG_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} is active")
        self.res = None
        self.state = CXL_CONFIG_IDLE

    def _target_show(self, pos: int) -> str:
        target = self.targets[pos]
        return f"{target.name if target else ''}\n"

    def _target_store(self, pos: int, buf: bytes) -> None:
        if sysfs_streq(buf, ""):
            self.detach(pos)
            return
        dev = self.system.find_device(CXL_BUS, buf)
        if dev is None:
            raise fail(errno.ENODEV, f"no {streq_text(buf)} on the cxl bus")
        if not isinstance(dev, CxlDecoder) or dev.kind != "endpoint":
            raise fail(errno.EINVAL, f"{dev.name} is no endpoint decoder")
        self.attach(dev, pos)

    def _commit_store(self, buf: bytes) -> None:
        commit = kstrtobool(buf)
        if commit == (self.state >= CXL_CONFIG_COMMIT):  # already in the requested state
            return
        if commit and self.state < CXL_CONFIG_ACTIVE:
            raise fail(errno.ENXIO, f"{self.name} is not ready to commit")
        if commit:
            self.decode_commit()
            self.state = CXL_CONFIG_COMMIT
        else:
            self.system.driver_detach(self)
            self.decode_reset()
            self.state = CXL_CONFIG_ACTIVE

    # -- the decoders of the region's path
    def path(self, cxled: CxlDecoder) -> list[CxlPort]:
        """The ports from the endpoint's up to (not including) the root."""
        ports, port = [], cxled.port
        while port is not None and port.kind != "root":
            ports.append(port)
            port = port.parent_port
        return ports

    def decoder_of(self, port: CxlPort, cxled: CxlDecoder) -> CxlDecoder:
        return cxled if port.kind == "endpoint" else self.port_decoders[id(port)]

    def decode_commit(self) -> None:
        done: list[CxlDecoder] = []
        try:
            for cxled in self.targets[:self.interleave_ways]:
                assert cxled is not None
                for port in self.path(cxled):
                    decoder = self.decoder_of(port, cxled)
                    if not decoder.enabled:
                        decoder.commit()
                        done.append(decoder)
        except OSError:
            for decoder in reversed(done):
                decoder.reset()
            raise

    def decode_reset(self) -> None:
        for cxled in self.targets[:self.interleave_ways]:
            if cxled is not None:
                for port in self.path(cxled):
                    self.decoder_of(port, cxled).reset()

    # -- attach and detach (cxl_region_attach(), cxl_region_detach())
    def ep_dport(self, port: CxlPort, cxled: CxlDecoder) -> int:
        """The id of the port's dport the endpoint's memdev is below (cxl_ep_load()->dport)."""
        dev: Device | None = cxled.memdev.pdev
        while dev is not None:
            for dport_id, dport in port.dports.items():
                if dport is dev:
                    return dport_id
            dev = dev.parent
        raise fail(errno.ENXIO, f"{cxled.memdev.name} is not below {port.name}")

    def attach(self, cxled: CxlDecoder, pos: int) -> None:
        if cxled.mode != self.mode:
            raise fail(errno.EINVAL, f"{cxled.name} mode {cxled.mode} differs from {self.mode}")
        if self.state > CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.EBUSY, f"{self.name} is active")
        if self.state < CXL_CONFIG_INTERLEAVE_ACTIVE:
            raise fail(errno.ENXIO, f"{self.name}: interleave config missing")
        if not 0 <= pos < self.interleave_ways:
            raise fail(errno.ENXIO, f"position {pos} out of range {self.interleave_ways}")
        if self.targets[pos] is cxled:
            return
        if self.targets[pos] is not None:
            raise fail(errno.EBUSY, f"position {pos} already assigned")
        if any(t is not None and t.memdev is cxled.memdev for t in self.targets):
            raise fail(errno.EBUSY, f"{cxled.memdev.name} already has a position")
        if self.nr_targets >= self.interleave_ways:
            raise fail(errno.EINVAL, f"{self.name} already has its endpoints")
        if cxled.region is not None:
            raise fail(errno.EBUSY, f"{cxled.name} is in {cxled.region.name}")
        root_port = self.root_decoder.port
        hb_port = self.path(cxled)[-1]
        dport = next((i for i, d in root_port.dports.items() if d is hb_port.uport), None)
        if dport is None or dport not in self.root_decoder.targets:
            raise fail(errno.ENXIO, f"{cxled.name}: invalid target for {self.root_decoder.name}")
        if not cxled.dpa_size:
            raise fail(errno.ENXIO, f"{cxled.name}: missing DPA allocation")
        assert self.res is not None
        if cxled.dpa_size * self.interleave_ways != self.res[1]:
            raise fail(errno.EINVAL, f"{cxled.name}: decoder size {cxled.dpa_size:#x} x {self.interleave_ways} "
                                     f"!= region size {self.res[1]:#x}")
        root = self.root_decoder
        if dport != self.calc_hb(pos):
            raise fail(errno.ENXIO, f"{cxled.name}: invalid target position for {root.name}")
        # cxl_port_attach_region(): each switch port on the way gives the region a decoder
        taken: list[CxlPort] = []
        for port in self.path(cxled)[1:]:
            if id(port) in self.port_decoders:
                continue
            free = next((d for d in port.decoders if d.region is None and not d.enabled), None)
            if free is None:
                for p in taken:
                    self.port_decoders.pop(id(p)).region = None
                raise fail(errno.EBUSY, f"{port.name} has no free decoder")
            free.region = self
            self.port_decoders[id(port)] = free
            taken.append(port)
        self.targets[pos] = cxled
        cxled.pos = pos
        cxled.region = self
        if self.nr_targets == self.interleave_ways:
            try:
                self.setup_targets()
            except OSError:
                self.targets[pos] = None
                cxled.region, cxled.pos = None, -1
                self.release_port_decoders()
                raise
            self.state = CXL_CONFIG_ACTIVE
        cxled.interleave_ways = self.interleave_ways
        cxled.interleave_granularity = self.interleave_granularity
        cxled.start, cxled.size = self.res

    def calc_hb(self, pos: int) -> int:
        """The host bridge (root dport id) a region position must be below: cxl_hb_modulo()
        or, for an XOR window, cxl_hb_xor() (the parity of the position's HPA under each xormap)."""
        root = self.root_decoder
        iw = root.interleave_ways
        if root.window is None or not root.window.xor:
            return root.targets[pos % iw]
        hpa = root.start + pos * root.interleave_granularity
        n = 0
        if iw != 3:
            for i, xormap in enumerate(root.port.topo.xormaps):
                n |= (bin(hpa & xormap).count("1") & 1) << i
        if iw & (iw - 1):  # x3, x6, x12: a modulo on top
            eiw = eiw_of(iw)
            if eiw == 8:
                n = (hpa // root.interleave_granularity) % 3
            else:
                n |= ((hpa >> (eiw - 8 + eig_of(root.interleave_granularity) + 8)) % 3) << (eiw - 8)
        return root.targets[n]

    def release_port_decoders(self) -> None:
        """Give back the switch decoders no attached endpoint goes through any more."""
        used = {id(p) for t in self.targets if t is not None for p in self.path(t)[1:]}
        for key in [k for k in self.port_decoders if k not in used]:
            decoder = self.port_decoders.pop(key)
            decoder.region = None
            decoder.reset_range()

    def setup_targets(self) -> None:
        """cxl_region_setup_targets(): program each switch decoder's ways, granularity, range
        and targets, walking the endpoints in position order, each from the top port down,
        refusing positions a port cannot route (check_last_peer())."""
        root = self.root_decoder
        eps = [t for t in self.targets[:self.interleave_ways] if t is not None]
        ports: dict[int, CxlPort] = {}
        dports_used: dict[int, set[int]] = {}
        for cxled in eps:
            for port in self.path(cxled)[1:]:
                ports[id(port)] = port
                dports_used.setdefault(id(port), set()).add(self.ep_dport(port, cxled))
        nr_targets = {k: len(v) for k, v in dports_used.items()}
        targets_set: dict[int, list[int]] = {k: [] for k in ports}
        programmed: dict[int, tuple[int, int]] = {}
        try:
            for cxled in eps:
                for port in reversed(self.path(cxled)[1:]):
                    key = id(port)
                    decoder = self.port_decoders[key]
                    nr = nr_targets[key]
                    if nr & (nr - 1):
                        raise fail(errno.EINVAL, f"{port.name}: invalid target count {nr}")
                    dport = self.ep_dport(port, cxled)
                    if targets_set[key]:
                        distance, it = 1, port
                        while it is not None and it.kind != "root":
                            distance *= nr_targets[id(it)]
                            it = it.parent_port
                        distance *= root.interleave_ways
                        if dport in targets_set[key]:
                            pos = cxled.pos
                            peer = self.targets[pos - distance] if pos >= distance else None
                            if peer is None or self.ep_dport(port, peer) != dport:
                                raise fail(errno.ENXIO, f"{port.name}: {cxled.memdev.name} cannot take position {pos}")
                            continue
                    else:
                        parent = port.parent_port
                        if parent is None or parent.kind == "root":
                            parent_ig, parent_iw = self.interleave_granularity, root.interleave_ways
                            if parent_iw & (parent_iw - 1):
                                parent_iw //= 3
                        else:
                            parent_iw, parent_ig = programmed[id(parent)]
                        eiw_of(nr)
                        ig = 256 << eig_of(parent_ig * parent_iw)
                        if nr > 8 or nr > decoder.nr_targets:
                            raise fail(errno.ENXIO, f"{decoder.name}: ways {nr} overflow targets {decoder.nr_targets}")
                        decoder.interleave_ways, decoder.interleave_granularity = nr, ig
                        assert self.res is not None
                        decoder.start, decoder.size = self.res
                        programmed[key] = (nr, ig)
                    if len(targets_set[key]) == nr:
                        raise fail(errno.ENXIO, f"{port.name}: targets full")
                    targets_set[key].append(dport)
                    decoder.targets = list(targets_set[key])
        except OSError:
            for key in ports:
                self.port_decoders[key].reset_range()
            raise

    def detach(self, pos: int) -> None:
        if pos >= self.interleave_ways:
            raise fail(errno.ENXIO, f"position {pos} out of range")
        cxled = self.targets[pos]
        if cxled is None:
            return
        self.system.driver_detach(self)  # the region driver loses a target
        if self.state > CXL_CONFIG_ACTIVE:
            self.decode_reset()
            self.state = CXL_CONFIG_ACTIVE
        if self.state == CXL_CONFIG_ACTIVE:
            self.state = CXL_CONFIG_INTERLEAVE_ACTIVE
            for decoder in self.port_decoders.values():
                decoder.reset_range()
        self.targets[pos] = None
        cxled.region, cxled.pos = None, -1
        cxled.reset_range()
        self.release_port_decoders()

    def unregister(self) -> None:
        """unregister_region(): every target detached, the HPA freed, the device gone."""
        self.system.driver_detach(self)
        for pos in range(self.interleave_ways):
            self.detach(pos)
        self.res = None
        self.state = CXL_CONFIG_IDLE
        self.root_decoder.regions.remove(self)
        self.system.region_ida.put(self.id)
        self.system.changed()


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

    def entries(self) -> list[Entry]:
        out: list[Entry] = [*super().entries(), Link("uport", self.uport)]
        out += [Link(f"dport{i}", dev) for i, dev in sorted(self.dports.items())]
        if self.kind != "root":
            out.append(ro("decoders_committed", lambda: f"{self.commit_end + 1}\n"))
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
        # the device behind the mailbox (mem.c's mock): the label area lives there
        self.firmware = MockMemdevFirmware(ram_size, pmem_size, lsa_size, payload_max, firmware_version)
        pdev.kids.append(self)

    def entries(self) -> list[Entry]:
        return [
            *super().entries(),
            ro("dev", lambda: f"{self.devt[0]}:{self.devt[1]}\n"),
            ro("firmware_version", lambda: f"{self.firmware_version[:16]}\n"),
            ro("payload_max", lambda: f"{self.payload_max}\n"),
            ro("label_storage_size", lambda: f"{self.lsa_size}\n"),
            ro("serial", lambda: f"{c_hex(self.serial)}\n"),
            ro("numa_node", lambda: f"{self.pdev.numa_node}\n"),
            Group("ram", [ro("size", lambda: f"{c_hex(self.ram_size)}\n")]),
            Group("pmem", [ro("size", lambda: f"{c_hex(self.pmem_size)}\n")]),
        ]

    def uevent(self) -> str:
        return f"MAJOR={self.devt[0]}\nMINOR={self.devt[1]}\nDEVNAME=cxl/{self.name}\n" + super().uevent()


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

    # -- what cxl_acpi's probe does
    def add_root(self) -> None:
        root = CxlPort(self, "root", self.acpi, self.acpi, {hb.pdev_id: hb for hb in self.host_bridges})
        self.acpi.kids.append(root)
        self.root = root
        start = self.window_base
        for i, window in enumerate(self.windows):
            decoder = CxlDecoder(root, i, "root", window, start)
            decoder.region_id = self.system.region_ida.get()  # memregion_alloc(): the next region's id
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


def register(system: System, topologies: Callable[[], list[CxlTopology]]) -> None:
    """Register the cxl and platform buses and the cxl drivers on `system` (once)."""
    if CXL_BUS in system.bus_types:
        return
    system.register_bus_type(CxlBusType())
    system.register_bus_type(PlatformBusType())
    system.register_driver(CxlAcpiDriver(system, topologies))
    for drv in (CxlMemDriver(system, "cxl_mem", CXL_BUS), CxlPortDriver(system, "cxl_port", CXL_BUS),
                CxlRegionDriver(system, "cxl_region", CXL_BUS)):
        system.register_driver(drv)
