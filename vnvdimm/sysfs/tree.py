"""The /sys and /dev views of the model, as the kernel lays them out.

The tree is rebuilt from the model whenever the model's generation changes (a bind, an
unbind, a claim...), and looked up by path in O(1) otherwise. Attribute *values* are never
cached here: they are produced by the model's show() on every read.

Every rebuild is compared with the tree it replaces: each path that vanished, or whose kind,
mode, size, link target or device changed, is published on the tree's change feed, so that a
server letting its clients cache lookups and attributes can invalidate exactly those.

A server that lets its clients cache attribute *contents* too (the /sys connection) follows
the value feed: ALL_VALUES is published whenever attribute values may have changed (a store,
a rebuild, a sysfs_notify(), an ioctl that is not a pure query: see `values_changed`), and a
store or ioctl returns only once it was delivered. Volatile attributes (KAttr.volatile) are
never announced: such a server must not keep their contents at all.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from vnvdimm.model import kmod
from vnvdimm.model.base import Attr, BinAttr, Device, DevNode, Group, Link, fail, uevent_store
from vnvdimm.model.bus import NdCtl, NvdimmBus
from vnvdimm.model.cxl import CXL_MODULES
from vnvdimm.model.disk import DataPath, Disk
from vnvdimm.model.drivers import BusDriver
from vnvdimm.model.memory import soft_offline_page
from vnvdimm.model.personality import Btt
from vnvdimm.model.system import System
from vnvdimm.sysfs.changes import ChangeFeed
from vnvdimm.sysfs.kernfs import Events, KAttr, KBin, KDir, KLink, KNode

#: On the value feed: every attribute's value may have changed.
ALL_VALUES = "*"

log = logging.getLogger("vnvdimm.sysfs")

# Modules whose /sys/module/<name>/initstate reads "live": libkmod (daxctl) checks them
# instead of loading anything.
MODULES = ("libnvdimm", "nd_pmem", "nd_btt", "nd_e820", "nfit", "dax", "dax_pmem", "device_dax", "kmem",
           "dax_hmem", "device_hmem")


def _refuse_store(buf: bytes) -> None:
    """bind/unbind of the ACPI nfit driver: there is no ACPI device for it here."""
    raise fail(errno.ENODEV, "no ACPI device to bind or unbind")


BTT_DEBUGFS = "/sys/kernel/debug/btt"  # debugfs, which with-vnvdimm shows mounted at /sys/kernel/debug

# Directories of the host's /sys that with-vnvdimm mounts over the emulated tree's empty ones
# (vnvdimm has nothing to say there: hugepages, cgroups, cpus, firmware, ...).
HOST_SYSFS_DIRS = ("kernel/mm", "kernel/security", "kernel/tracing", "fs", "firmware", "power",
                   "hypervisor", "devices/system/cpu")


@dataclass(slots=True)
class KChar(KNode):
    """A character device node served as such (/dev/null...): opens go to the host driver."""

    rdev: tuple[int, int]
    mode: int = 0o666


@dataclass(slots=True)
class KDevFile(KNode):
    """An emulated device node (pmem, dax, ndctl, nmem): a regular file whose bytes are the
    device's. `data` None means the node exists but cannot be opened, unless it is a `control`
    node (ndctl, nmem), which opens but has only ioctls. `kind` is what the kernel's node is
    ("c" or "b"), `align` a device-dax instance's mapping alignment: the preload library
    reports and enforces them (vnvdimm/preload)."""

    data: DataPath | None
    rdev: tuple[int, int] | None = None
    mode: int = 0o600
    kind: str = "c"
    align: int = 0
    control: bool = False


def dev_file(node: DevNode) -> KDevFile:
    return KDevFile(node.data, node.devt, kind=node.kind, align=node.align, control=node.control)


@dataclass(slots=True)
class KBlock(KNode):
    """A block device node served as such (/dev/pmemN while a with-vnvdimm command runs as
    root): the kernel opens the host's block device of that number (the loop device that
    stands for the disk), never this file system."""

    rdev: tuple[int, int]
    mode: int = 0o660


@dataclass(slots=True)
class KSession(KNode):
    """/.blockdev/session: while a handle of it is open, the disks are served as block devices
    (vnvdimm.loopdisks.LoopDisks; `vnvdimm blockdevs` holds it for a with-vnvdimm command)."""

    mode: int = 0o600


@dataclass(frozen=True, slots=True)
class Partition:
    """A partition of a disk as the host kernel holds it (of the loop device behind the disk):
    its name as the kernel names a partition of the disk, its device and the host's sysfs
    directory of it (where start, size... are read live)."""

    name: str
    disk: str
    number: int
    rdev: tuple[int, int]
    host_dir: str


class BlockDevices(Protocol):
    """The real block devices behind the disks (vnvdimm.loopdisks.LoopDisks)."""

    def disk_rdev(self, name: str) -> tuple[int, int] | None: ...

    def partitions(self) -> list[Partition]: ...

    def proc_partitions(self) -> str: ...

    def session_opened(self) -> None: ...

    def session_closed(self) -> None: ...

    def write_back(self) -> None: ...

    def reconcile(self) -> None: ...


# The files the attributes of a partition directory read live from the host's.
PARTITION_ATTRS = ("start", "size", "ro", "alignment_offset", "discard_alignment", "stat", "inflight")
BLOCKDEV_DIR = "/.blockdev"  # the loop devices' backing files and the session node


STANDARD_CHAR_NODES = {
    "null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
    "tty": (5, 0), "ptmx": (5, 2),
}
STANDARD_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
                  "stderr": "/proc/self/fd/2"}


def cached_identity(node: KNode) -> Hashable:
    """Everything about a node a client may cache between two requests (what stat() and
    readlink() answer, not attribute contents): two nodes with the same identity can be
    served from the same cache entry. Called with the model lock held."""
    if isinstance(node, KDir):
        return ("dir", node.mode)
    if isinstance(node, KAttr):
        return ("attr", node.mode)
    if isinstance(node, KBin):
        return ("bin", node.mode, node.attr.size())
    if isinstance(node, KLink):
        return ("link", node.target)
    if isinstance(node, KDevFile):
        data = node.data
        return ("devfile", node.mode, node.rdev, None if data is None else (data.serial, data.size))
    if isinstance(node, KChar):
        return ("chr", node.mode, node.rdev)
    if isinstance(node, KBlock):
        return ("blk", node.mode, node.rdev)
    if isinstance(node, KSession):
        return ("session", node.mode)
    raise TypeError(node)


class Snapshot:
    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.nodes: dict[str, KNode] = {"/": KDir()}
        self.notify_paths: dict[tuple[int, str], str] = {}
        # What was served from this snapshot, taken when it was built (a bin attribute's
        # size is read live from the model: asked later, an old node answers today's size).
        self.identities: dict[str, Hashable] = {}

    def seal(self) -> None:
        """Record the identities once every node is in (model lock held)."""
        self.identities = {path: cached_identity(node) for path, node in self.nodes.items()}

    def stale_since(self, before: Snapshot) -> list[str]:
        """Paths of `before` that vanished or changed identity in this snapshot."""
        now = self.identities
        return [path for path, ident in before.identities.items() if now.get(path) != ident]

    def add(self, path: str, node: KNode) -> KNode:
        existing = self.nodes.get(path)
        if existing is not None:
            if isinstance(existing, KDir) and isinstance(node, KDir):
                return existing
            raise ValueError(f"duplicate sysfs path {path}")
        parent_path, name = posixpath.split(path)
        parent = self.nodes.get(parent_path)
        if parent is None:
            parent = self.add(parent_path, KDir())
        assert isinstance(parent, KDir), parent_path
        parent.children[name] = node
        self.nodes[path] = node
        if isinstance(node, KAttr):
            node.path = path
        return node

    def dir(self, path: str) -> KDir:
        node = self.add(path, KDir())
        assert isinstance(node, KDir)
        return node

    def link(self, path: str, target: str) -> None:
        """A relative symlink at `path` to the absolute tree path `target`."""
        self.add(path, KLink(posixpath.relpath(target, posixpath.dirname(path))))


class TreeBuilder:
    def __init__(self, system: System) -> None:
        self.system = system
        self.block_devices: BlockDevices | None = None
        self.lock = system.lock

    # -- paths
    def device_dir(self, dev: Device) -> str:
        if dev.parent is None:
            assert dev.sysfs_dir is not None, dev
            return "/sys" + dev.sysfs_dir
        parent = self.device_dir(dev.parent)
        return f"{parent}/{dev.subdir}/{dev.name}" if dev.subdir else f"{parent}/{dev.name}"

    # -- build
    def build(self) -> Snapshot:
        s = Snapshot(self.system.generation)
        for top in ("block", "bus", "class", "dev/char", "dev/block", "devices/system", "firmware", "fs", "kernel",
                    "module", "class/nd", "class/block", "class/dax", "devices/virtual"):
            s.dir(f"/sys/{top}")
        self._system_dirs(s)
        for host_dir in HOST_SYSFS_DIRS:
            s.dir(f"/sys/{host_dir}")
        s.dir(BTT_DEBUGFS)  # nd_btt_init(): the module's debugfs root
        for bus_name, drivers in self.system.drivers.items():
            base = f"/sys/bus/{bus_name}"
            s.dir(f"{base}/devices")
            for attr in self.system.bus_attrs(bus_name):
                s.add(f"{base}/{attr.name}", KAttr(attr, self.lock))
            for drv in drivers.values():
                self._driver(s, f"{base}/drivers/{drv.name}", drv)  # type: ignore[arg-type]
        modules = self.system.modules
        self._kernel_modules(s)
        if modules is not None and modules.names():  # vnvdimm extension: what the modprobe shim talks to
            s.add("/sys/module/vnvdimm/modules", KAttr(Attr(
                "modules", 0o444, show=lambda: "".join(f"{n}\n" for n in modules.names())), self.lock))
            s.add("/sys/module/vnvdimm/modprobe", KAttr(Attr("modprobe", 0o200, store=modules.store), self.lock))
        self._devfile_rdev(s)
        for bus in self.system.buses:
            if bus.platform_path:  # (a CXL bus hangs below its bridge, a cxl device)
                self._platform_dirs(s, bus)
            self._device(s, bus)
        for dev in self.system.platform_devices:  # dax_hmem's hmem.N
            self._platform_bus_links(s, f"platform/{dev.name}")
            self._device(s, dev)
        for root in self.system.roots:
            self._device(s, root)
        self._dev(s)
        s.seal()
        return s

    def _kernel_modules(self, s: Snapshot) -> None:
        """/sys/module/NAME of each loaded module (initstate, refcnt, taint, holders/), the
        ACPI bus the nfit driver registers on, and the platform's /lib/modules/$(uname -r)
        index (with-vnvdimm lays it over the host's), from which libkmod resolves a module's
        path."""
        modules = self.system.modules
        loadable = modules.names() if modules is not None else []
        loaded = [name for name in loadable if modules is not None and modules.loaded(name)]
        installed = kmod.installed_modules(kmod.TEST_MODULE in loadable)
        live = {*MODULES, *loaded}
        if self.system.cxl_topologies:
            live.update(CXL_MODULES)
        if kmod.TEST_MODULE in loadable:  # the mocked modules keep nfit_test_iomap loaded
            live.add(kmod.IOMAP)
        for mod in sorted(live):
            info = installed.get(mod)
            users = kmod.holders(installed, live, mod) if info is not None else []
            base = f"/sys/module/{mod}"
            s.add(f"{base}/initstate", KAttr(Attr("initstate", 0o444, show=lambda: "live\n"), self.lock))
            refcnt = f"{len(users)}\n"
            s.add(f"{base}/refcnt", KAttr(Attr("refcnt", 0o444, show=lambda r=refcnt: r), self.lock))
            taint = info.taint if info is not None else ""
            s.add(f"{base}/taint", KAttr(Attr("taint", 0o444, show=lambda t=taint: f"{t}\n"), self.lock))
            s.dir(f"{base}/holders")
            for user in users:
                s.link(f"{base}/holders/{user}", f"/sys/module/{user}")
        # drivers/acpi/nfit registers its ACPI driver when it loads, whether or not the
        # firmware has an NFIT (ACPI0012) device for it to bind
        s.dir("/sys/bus/acpi/devices")
        s.link("/sys/bus/acpi/drivers/nfit/module", "/sys/module/nfit")
        for name in ("bind", "unbind", "uevent"):
            s.add(f"/sys/bus/acpi/drivers/nfit/{name}",
                  KAttr(Attr(name, 0o200, store=uevent_store if name == "uevent" else _refuse_store), self.lock))
        release = f"/lib/modules/{os.uname().release}"
        dep_text = kmod.modules_dep(installed).encode()
        dep_bin = kmod.dep_index(installed)
        image = kmod.module_file()
        files = [("modules.dep", dep_text), ("modules.dep.bin", dep_bin),
                 *((m.path, image) for m in installed.values())]
        for name, data in files:
            s.add(f"{release}/{name}", KBin(BinAttr(name, 0o444, size=lambda d=data: len(d),
                                                    read=lambda off, size, d=data: d[off:off + size]), self.lock))

    def _system_dirs(self, s: Snapshot) -> None:
        nodes = sorted({0} | {r.numa_node for b in self.system.buses for r in b.regions})
        node_list = ",".join(map(str, nodes))
        for name in ("online", "possible", "has_memory", "has_normal_memory", "has_cpu"):
            s.add(f"/sys/devices/system/node/{name}",
                  KAttr(Attr(name, 0o444, show=lambda node_list=node_list: f"{node_list}\n"), self.lock))
        for n in nodes:
            s.dir(f"/sys/devices/system/node/node{n}")
        for attr in self.system.memory_attrs():
            s.add(f"/sys/devices/system/memory/{attr.name}", KAttr(attr, self.lock))
        s.add("/sys/devices/system/memory/soft_offline_page", KAttr(Attr(
            "soft_offline_page", 0o200, store=lambda buf: soft_offline_page(self.system, buf)), self.lock))

    def _devfile_rdev(self, s: Snapshot) -> None:
        """vnvdimm's device files are regular files, so stat() reports st_rdev 0:0 for them
        (FUSE keeps i_rdev for device nodes only). daxctl resolves /sys/dev/char/<rdev>/subsystem
        to pick its device model; this entry makes that lookup succeed quietly and land outside
        /sys/bus/dax, i.e. on the "dax-class" model it would pick anyway (see README limits)."""
        path = "/sys/devices/virtual/vnvdimm/devfile"
        s.add(f"{path}/uevent", KAttr(Attr("uevent", 0o644, show=lambda: "DEVNAME=vnvdimm-devfile\n",
                                          store=uevent_store), self.lock))
        s.dir("/sys/class/vnvdimm")
        s.link(f"{path}/subsystem", "/sys/class/vnvdimm")
        s.link("/sys/class/vnvdimm/devfile", path)
        s.link("/sys/dev/char/0:0", path)

    def _platform_dirs(self, s: Snapshot, bus: NvdimmBus) -> None:
        path = "/sys/devices"
        for part in bus.platform_path.split("/"):
            path = f"{path}/{part}"
            if f"{path}/uevent" in s.nodes:  # shared with another bus's platform device
                continue
            s.dir(path)
            s.add(f"{path}/uevent", KAttr(Attr("uevent", 0o644, show=lambda: "", store=uevent_store),
                                          self.lock))
        if bus.provider == "e820":
            modalias = "platform:e820_pmem"
        elif bus.platform_path.startswith("platform/"):  # a platform device: nfit_test.N
            modalias = "platform:" + bus.platform_path.removeprefix("platform/").split(".")[0]
        else:
            modalias = "acpi:ACPI0012:"
        s.add(f"{path}/modalias", KAttr(Attr("modalias", 0o444, show=lambda: f"{modalias}\n"), self.lock))
        self._platform_bus_links(s, bus.platform_path)
        for test_dimm in bus.test_dimms:  # the nfit_test_dimm class devices of the module
            dimm_path = f"{path}/nfit_test_dimm/{test_dimm.name}"
            for entry in test_dimm.entries():
                assert isinstance(entry, Attr)
                s.add(f"{dimm_path}/{entry.name}", KAttr(entry, self.lock))
            s.link(f"{dimm_path}/subsystem", "/sys/class/nfit_test_dimm")
            s.link(f"/sys/class/nfit_test_dimm/{test_dimm.name}", dimm_path)

    def _platform_bus_links(self, s: Snapshot, platform_path: str) -> None:
        """The devices above the nd bus on their own buses, as the driver core links every
        device: a platform device (nfit_test.N, e820_pmem) in /sys/bus/platform/devices, each
        ACPI device of the NFIT's path (LNXSYSTM:00, LNXSYBUS:00, ACPI0012:00) in
        /sys/bus/acpi/devices; each has its `subsystem` link back."""
        parts = platform_path.split("/")
        if parts[0] == "platform":  # /sys/devices/platform itself is the bus's root, on no bus
            on_bus = [("platform", "/".join(parts[:2]))] if len(parts) > 1 else []
        else:
            on_bus = [("acpi", "/".join(parts[:i + 1])) for i in range(len(parts))]
        for bus_name, rel in on_bus:
            dev_path = f"/sys/devices/{rel}"
            if f"{dev_path}/subsystem" in s.nodes:  # shared with another nd bus
                continue
            s.link(f"{dev_path}/subsystem", f"/sys/bus/{bus_name}")
            s.link(f"/sys/bus/{bus_name}/devices/{rel.rsplit('/', 1)[-1]}", dev_path)

    def _driver(self, s: Snapshot, path: str, drv: BusDriver) -> None:
        s.dir(path)
        for entry in drv.entries():
            assert isinstance(entry, Attr)
            s.add(f"{path}/{entry.name}", KAttr(entry, self.lock))
        s.link(f"{path}/module", f"/sys/module/{drv.module}")
        for dev in drv.bound_devices():
            s.link(f"{path}/{dev.name}", self.device_dir(dev))

    def _entries(self, s: Snapshot, path: str, dev: Device, entries: list) -> None:  # type: ignore[type-arg]
        for entry in entries:
            if isinstance(entry, Attr):
                s.add(f"{path}/{entry.name}", KAttr(entry, self.lock))
                s.notify_paths[(id(dev), entry.name)] = f"{path}/{entry.name}"
            elif isinstance(entry, BinAttr):
                s.add(f"{path}/{entry.name}", KBin(entry, self.lock))
            elif isinstance(entry, Group):
                s.dir(f"{path}/{entry.name}")
                self._entries(s, f"{path}/{entry.name}", dev, entry.entries)
            elif isinstance(entry, Link):
                target = entry.target if isinstance(entry.target, str) else None
                target_path = "/sys" + target if target else self.device_dir(entry.target)  # type: ignore[arg-type]
                s.link(f"{path}/{entry.name}", target_path)

    def _device(self, s: Snapshot, dev: Device) -> None:
        path = self.device_dir(dev)
        s.dir(path)
        self._entries(s, path, dev, dev.entries())
        if dev.bus_name is not None:
            s.link(f"{path}/subsystem", f"/sys/bus/{dev.bus_name}")
            s.link(f"/sys/bus/{dev.bus_name}/devices/{dev.name}", path)
        if dev.driver is not None:
            s.link(f"{path}/driver", f"/sys/bus/{dev.driver.bus_name}/drivers/{dev.driver.name}")
        devt = dev.devt
        if isinstance(dev, Disk) and self.block_devices is not None:
            devt = self.block_devices.disk_rdev(dev.name) or devt
        if devt is not None:
            kind = "block" if isinstance(dev, Disk) else "char"
            if f"/sys/dev/{kind}/{devt[0]}:{devt[1]}" not in s.nodes:  # (a partition of the host's may have it)
                s.link(f"/sys/dev/{kind}/{devt[0]}:{devt[1]}", path)
        if isinstance(dev, Disk):
            s.link(f"/sys/block/{dev.name}", path)
            s.link(f"/sys/class/block/{dev.name}", path)
            self._host_block_device(s, dev, path)
        if isinstance(dev, NdCtl):
            s.link(f"/sys/class/nd/{dev.name}", path)
        for child in dev.children():
            self._device(s, child)
        if dev.disk is not None:
            self._device(s, dev.disk)
        if isinstance(dev, Btt) and dev.engine is not None:
            self._btt_debugfs(s, dev)

    def _btt_debugfs(self, s: Snapshot, btt: Btt) -> None:
        """btt_debugfs_init(): btt/<device>/arena<N>/<field>, read-only, while the BTT is up."""
        assert btt.engine is not None
        for index, arena in enumerate(btt.engine.arenas):
            for name, _ in arena.debugfs():
                show = partial(arena.debugfs_value, name)
                # (volatile: the flog and map move with every write)
                s.add(f"{BTT_DEBUGFS}/{btt.name}/arena{index}/{name}",
                      KAttr(Attr(name, 0o444, show=show, volatile=True), self.lock))

    def _dev(self, s: Snapshot) -> None:
        s.dir("/dev")
        for name, rdev in STANDARD_CHAR_NODES.items():
            s.add(f"/dev/{name}", KChar(rdev))
        for name, target in STANDARD_LINKS.items():
            s.add(f"/dev/{name}", KLink(target))
        s.dir("/dev/pts")
        s.dir("/dev/shm")
        for _, node in self.system.device_nodes():
            rdev = None
            if node.kind == "b" and self.block_devices is not None:
                rdev = self.block_devices.disk_rdev(node.name)
            s.add(f"/dev/{node.name}", KBlock(rdev) if rdev is not None else dev_file(node))
            if node.kind == "b" and self.block_devices is not None:
                s.add(f"{BLOCKDEV_DIR}/{node.name}", dev_file(node))
        if self.block_devices is not None:
            s.add(f"{BLOCKDEV_DIR}/session", KSession())
            bd = self.block_devices
            s.add("/proc/partitions", KAttr(Attr("partitions", 0o444, show=bd.proc_partitions, blocking=True),
                                            self.lock))
            for part in bd.partitions():
                if isinstance(s.nodes.get(f"/dev/{part.disk}"), KBlock):
                    s.add(f"/dev/{part.name}", KBlock(part.rdev))

    def _host_block_device(self, s: Snapshot, disk: Disk, path: str) -> None:
        """What the host kernel has of the block device behind a disk: its device number
        (/sys/dev/block/<loop's MAJOR:MINOR>, what lsblk and blkid look up from a stat of the
        node) and its partitions, each a directory of the disk as the kernel makes it."""
        bd = self.block_devices
        rdev = bd.disk_rdev(disk.name) if bd is not None else None
        if bd is None or rdev is None:
            return
        # The disk's device number is the loop device's, as stat() of /dev/<disk> reports it.
        uevent = f"MAJOR={rdev[0]}\nMINOR={rdev[1]}\nDEVNAME={disk.name}\nDEVTYPE=disk\n"
        for name, text in (("dev", f"{rdev[0]}:{rdev[1]}\n"), ("uevent", uevent)):
            attr = KAttr(Attr(name, 0o644 if name == "uevent" else 0o444, show=lambda t=text: t,
                              store=uevent_store if name == "uevent" else None), self.lock)
            attr.path = f"{path}/{name}"
            s.nodes[attr.path] = attr
            parent = s.nodes[path]
            assert isinstance(parent, KDir)
            parent.children[name] = attr
        for part in bd.partitions():
            if part.disk != disk.name:
                continue
            part_path = f"{path}/{part.name}"
            s.dir(part_path)
            major, minor = part.rdev
            for name in PARTITION_ATTRS:
                show = partial(_read_host, f"{part.host_dir}/{name}")
                # (stat and inflight move with every I/O: volatile)
                s.add(f"{part_path}/{name}", KAttr(Attr(name, 0o444, show=show, blocking=True,
                                                        volatile=name in ("stat", "inflight")), self.lock))
            s.add(f"{part_path}/partition", KAttr(Attr("partition", 0o444, show=lambda n=part.number: f"{n}\n"),
                                                  self.lock))
            s.add(f"{part_path}/dev", KAttr(Attr("dev", 0o444, show=lambda d=f"{major}:{minor}\n": d), self.lock))
            uevent = f"MAJOR={major}\nMINOR={minor}\nDEVNAME={part.name}\nDEVTYPE=partition\nPARTN={part.number}\n"
            s.add(f"{part_path}/uevent", KAttr(Attr("uevent", 0o644, show=lambda u=uevent: u, store=uevent_store),
                                               self.lock))
            s.link(f"{part_path}/subsystem", "/sys/class/block")
            s.dir(f"{part_path}/holders")
            s.link(f"/sys/class/block/{part.name}", part_path)
            if f"/sys/dev/block/{major}:{minor}" not in s.nodes:
                s.link(f"/sys/dev/block/{major}:{minor}", part_path)


def _read_host(path: str) -> str:
    with open(path) as f:
        return f.read()


class Tree:
    """The live view: a snapshot rebuilt when the model changed, the poll events, and the
    change feed of paths whose cached metadata went stale."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.builder = TreeBuilder(system)
        self.events = Events()
        self.changes = ChangeFeed()
        self.values = ChangeFeed("vnvdimm-sysfs-values")
        self._snapshot: Snapshot | None = None
        self._build_lock = threading.Lock()
        system.subscribe(self._on_notify)

    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is not None and snap.generation == self.system.generation:
            return snap
        with self.system.lock, self._build_lock:
            snap = self._snapshot
            if snap is None or snap.generation != self.system.generation:
                before, snap = snap, self.builder.build()
                self._snapshot = snap
                if before is not None:
                    # Published under the build lock: batches reach the feed in the order
                    # the snapshots replaced each other, none skipped.
                    self.changes.publish(snap.stale_since(before))
                    self.values.publish([ALL_VALUES])
            return snap

    @property
    def block_devices(self) -> BlockDevices | None:
        return self.builder.block_devices

    @block_devices.setter
    def block_devices(self, value: BlockDevices | None) -> None:
        self.builder.block_devices = value

    def lookup(self, path: str) -> KNode | None:
        return self.snapshot().nodes.get(path)

    def store(self, node: KAttr, data: bytes) -> int:
        """A write to an attribute: the store, then (like a kernfs store, which returns once
        the devices it added or removed are in sysfs) the tree brought up to date and every
        stale path delivered to the change feed's sink before the writer is answered."""
        if self.builder.block_devices is not None:
            # What was written through a block device reaches the media before a store can
            # take the disk away (see LoopDisks.write_back).
            try:
                self.builder.block_devices.write_back()
            except Exception:  # never the store's business
                log.exception("writing back the block devices failed")
        try:
            return node.store(data)
        finally:
            if self._snapshot is None or self._snapshot.generation != self.system.generation:
                self.snapshot()
            self.changes.flush()
            self.values_changed()
            # A disk that came or went with this store has (or no longer has) its block
            # device before the writer is answered, as devtmpfs has its node by then.
            if self.builder.block_devices is not None:
                self.builder.block_devices.reconcile()

    def values_changed(self) -> None:
        """Attribute values may have changed (a store, an ioctl): returns once the value
        feed's sinks have heard of it."""
        self.values.publish([ALL_VALUES])
        self.values.flush()

    def refresh(self) -> None:
        """Rebuild after a change the model does not know of (a block device attached or
        detached, a partition added) and deliver the stale paths."""
        with self.system.lock:
            self.system.changed()
        self.snapshot()
        self.changes.flush()

    def _on_notify(self, dev: Device, attr: str) -> None:
        # Called from engine threads too: never take the model lock here (a job being
        # cancelled under the model lock may be waiting for this very thread).
        snap = self._snapshot
        path = snap.notify_paths.get((id(dev), attr)) if snap is not None else None
        if path is not None:
            self.events.notify(path)
        self.values.publish([ALL_VALUES])  # (never blocks: engine threads call this)

