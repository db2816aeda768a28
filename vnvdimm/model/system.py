"""The emulated machine: buses, the driver core (drivers/base/bus.c + dd.c) and the
device-number allocators. One `System` per daemon; every model call runs under `lock`
(the kernel's device_lock + nvdimm_bus_lock rolled into one).

The System knows no driver: the topology registers the bus types and their drivers at boot
(`vnvdimm.model.drivers.register()`), as module init does on a real kernel.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from vnvdimm.model.base import (
    Attr,
    BusType,
    Device,
    DevNode,
    Driver,
    Ida,
    fail,
    probing,
    streq_text,
    sysfs_streq,
    uevent_store,
)
from vnvdimm.model.host_memory import HostMemory, read_host_memory
from vnvdimm.model.memmap_pause import PauseController
from vnvdimm.model.nd import BLKEXT_MAJOR, DAX_MAJOR, ND_BUS, NDCTL_MAJOR, NMEM_MAJOR

if TYPE_CHECKING:
    from vnvdimm.memmap import MemmapEngine
    from vnvdimm.model.bus import NvdimmBus
    from vnvdimm.model.cxl import CxlTopology

log = logging.getLogger("vnvdimm.model")

Notifier = Callable[[Device, str], None]


class ModuleControl(Protocol):
    """The modules that provide some of the platform's buses (nfit_test): what modprobe
    loads and removes."""

    def names(self) -> list[str]: ...
    def loaded(self, name: str) -> bool: ...
    def store(self, buf: bytes) -> None: ...


@dataclass(frozen=True)
class MemmapSettings:
    """How enabling a pfn/dax device initializes its memmap: the one shape of the `[memmap]`
    config table, of the platform record's `memmap` and of what the System runs with.

    mode: "async" (enabling returns at once) or "sync" (enabling waits, as before the series);
    workers: the engine's worker processes (None: one per CPU); ns_per_page: a floor on the
    time one page init takes; pause_at: the bus-level memmap_pause_at at boot (per mille,
    1000: none; 0 holds every memmap from its start, memmap_pause.py)."""

    mode: str = "async"
    workers: int | None = None
    ns_per_page: int = 0
    pause_at: int = 1000


class _LockDepth(threading.local):
    """Per thread: how deep it holds the model lock, and the work deferred until it lets go."""

    def __init__(self) -> None:
        self.depth = 0
        self.work: list[Callable[[], None]] = []


class ModelLock:
    """A re-entrant lock whose outermost release runs the work deferred while it was held.

    Some effects of a store must happen after the model is unlocked (sync-mode memmap waits:
    the pre-series kernel blocked the enabling writer, not every reader of sysfs)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._local = _LockDepth()

    def __enter__(self) -> ModelLock:
        self._lock.acquire()
        self._local.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._local.depth -= 1
        outermost = self._local.depth == 0
        work: list[Callable[[], None]] = []
        if outermost:
            work, self._local.work = self._local.work, []
        self._lock.release()
        for item in work:
            item()

    def defer(self, work: Callable[[], None]) -> None:
        self._local.work.append(work)


#: drivers/base/memory.c online_type_to_str[], in MMOP_* order: what auto_online_blocks takes
MEMORY_ONLINE_TYPES = ("offline", "online", "online_kernel", "online_movable")


class System:
    def __init__(self, engine: MemmapEngine | None = None, memmap: MemmapSettings | None = None) -> None:
        self.lock = ModelLock()
        self.generation = 0  # bumped on every change of the device tree's shape
        self.engine = engine
        self.memmap = memmap or MemmapSettings()
        self.buses: list[NvdimmBus] = []
        # devices outside the nd buses at the root of the tree: dax_hmem's hmem.N platform
        # devices (vnvdimm.model.hmem)
        self.platform_devices: list[Device] = []
        # Devices at the top of /sys/devices that are no nvdimm bus (cxl_test's platform
        # devices); each has a `sysfs_dir`.
        self.roots: list[Device] = []
        self.cxl_topologies: list[CxlTopology] = []  # cxl_test instances (their drivers find them here)
        self.bus_types: dict[str, BusType] = {}
        self.drivers: dict[str, dict[str, Driver]] = {}  # per bus, in registration (= readdir) order
        self.autoprobe: dict[str, bool] = {}  # /sys/bus/<bus>/drivers_autoprobe
        self.region_ida = Ida()
        self.minors = {NDCTL_MAJOR: Ida(), NMEM_MAJOR: Ida(), DAX_MAJOR: Ida(), BLKEXT_MAJOR: Ida()}
        self.memmap_pause = PauseController(self)
        self.memmap_pause.default_mark = self.memmap.pause_at  # before any device is enabled
        self._notifiers: list[Notifier] = []
        self.modules: ModuleControl | None = None
        # /sys/devices/system/memory/auto_online_blocks (mhp_default_online_type)
        self.memory_auto_online = "offline"
        # What a map=mem memmap may take of the host (replaced by tests that need a small host)
        self.host_memory: Callable[[], HostMemory] = read_host_memory

    # ------------------------------------------------------------ registration (module init)

    def register_bus_type(self, bus_type: BusType) -> None:
        """bus_register(): the bus appears in /sys/bus with autoprobe on and no drivers."""
        self.bus_types[bus_type.name] = bus_type
        self.drivers.setdefault(bus_type.name, {})
        self.autoprobe.setdefault(bus_type.name, True)

    def register_driver(self, drv: Driver) -> None:
        """driver_register() on a registered bus."""
        self.drivers[drv.bus_name][drv.name] = drv

    @property
    def nd_drivers(self) -> dict[str, Driver]:
        return self.drivers_of(ND_BUS)

    # ------------------------------------------------------------ change notification

    def changed(self) -> None:
        self.generation += 1

    def subscribe(self, notifier: Notifier) -> None:
        self._notifiers.append(notifier)

    def notify(self, dev: Device, attr: str) -> None:
        """sysfs_notify(): an attribute's value changed; pollers wake. Callable from any thread."""
        for notifier in list(self._notifiers):
            notifier(dev, attr)

    def defer(self, work: Callable[[], None]) -> None:
        """Run `work` once the model lock is released by this thread."""
        self.lock.defer(work)

    # ------------------------------------------------------------ device lookup

    def all_devices(self) -> Iterator[Device]:
        def walk(dev: Device) -> Iterator[Device]:
            yield dev
            for child in dev.children():
                yield from walk(child)

        for bus in self.buses:
            yield from walk(bus)
        for dev in self.platform_devices:
            yield from walk(dev)
        for root in self.roots:
            yield from walk(root)

    def device_nodes(self) -> Iterator[tuple[Device, DevNode]]:
        """Every /dev node the devices have now, with its device: theirs and their disks'."""
        for dev in self.all_devices():
            node = dev.devnode()
            if node is not None:
                yield dev, node
            if dev.disk is not None:
                yield dev.disk, dev.disk.devnode()

    def bus_devices(self, bus_name: str) -> Iterator[Device]:
        return (d for d in self.all_devices() if d.bus_name == bus_name)

    def find_device(self, bus_name: str, buf: bytes) -> Device | None:
        """bus_find_device_by_name(): sysfs_streq on the device name."""
        name = streq_text(buf)
        for dev in self.bus_devices(bus_name):
            if dev.name == name:
                return dev
        return None

    def drivers_of(self, bus_name: str) -> dict[str, Driver]:
        return self.drivers.get(bus_name, {})

    # ------------------------------------------------------------ driver core

    def match(self, drv: Driver, dev: Device) -> bool:
        """driver_match_device(): the device is on the driver's bus and the bus matches them."""
        bus_type = self.bus_types.get(drv.bus_name)
        return dev.bus_name == drv.bus_name and bus_type is not None and bus_type.match(dev, drv)

    def device_add(self, dev: Device) -> None:
        """device_add() + bus_probe_device(): a new device is tried against its bus's drivers."""
        self.changed()
        if dev.bus_name is None or not self.autoprobe.get(dev.bus_name, True):
            return
        for drv in self.drivers_of(dev.bus_name).values():
            if self.match(drv, dev):
                try:
                    self.driver_attach(drv, dev)
                except OSError as e:
                    dev.probe_errno = e.errno
                    log.debug("%s: probe by %s failed: %s", dev.name, drv.name, e)
                return

    def driver_attach(self, drv: Driver, dev: Device) -> None:
        """device_driver_attach(): EBUSY if bound; the probe's errno otherwise."""
        if dev.driver is not None:
            raise probing(errno.EBUSY, f"{dev.name} is already bound to {dev.driver.name}")
        self.bus_types[drv.bus_name].probe(drv, dev)
        dev.driver = drv
        self.changed()
        log.info("%s: bound to %s", dev.name, drv.name)

    def driver_detach(self, dev: Device) -> None:
        drv = dev.driver
        if drv is None:
            return
        drv.remove(dev)
        dev.driver = None
        self.changed()
        log.info("%s: unbound from %s", dev.name, drv.name)

    def bind(self, drv: Driver, buf: bytes) -> None:
        """bind_store(): ENODEV unless the named device exists on the bus and matches."""
        dev = self.find_device(drv.bus_name, buf)
        if dev is None:
            # not the driver core's probing (ndctl names devices that exist): the writer's mistake
            raise fail(errno.ENODEV, f"{drv.name}: no device {streq_text(buf)[:64]!r} on the {drv.bus_name} bus")
        if not self.match(drv, dev):
            raise probing(errno.ENODEV, f"{drv.name} does not match {dev.name}")
        self.driver_attach(drv, dev)

    def unbind(self, drv: Driver, buf: bytes) -> None:
        """unbind_store(): ENODEV unless the named device is bound to this driver."""
        dev = self.find_device(drv.bus_name, buf)
        if dev is None or dev.driver is not drv:
            raise fail(errno.ENODEV, f"{buf!r} is not bound to {drv.name}")
        self.driver_detach(dev)

    def rescan(self, bus_name: str, buf: bytes) -> None:
        """drivers_probe_store(): ENODEV unless the named device is on the bus; then
        bus_rescan_devices_helper(): an unbound device is offered to the drivers that match
        it (a probe that refuses is not the writer's error)."""
        with self.lock:
            dev = self.find_device(bus_name, buf)
            if dev is None:
                raise fail(errno.ENODEV, f"no device {streq_text(buf)!r} on the {bus_name} bus")
            if dev.driver is not None:
                return
            for drv in self.drivers_of(bus_name).values():
                if self.match(drv, dev):
                    try:
                        self.driver_attach(drv, dev)
                        return
                    except OSError as e:
                        log.debug("%s: probe by %s failed: %s", dev.name, drv.name, e)

    def bus_attrs(self, bus_name: str) -> list[Attr]:
        """The driver-core attributes of /sys/bus/<bus>/ (bus.c's bus_attrs)."""

        def autoprobe_store(buf: bytes) -> None:
            # drivers_autoprobe_store(): '0' as the first byte turns it off, anything else on
            self.autoprobe[bus_name] = buf[:1] != b"0"

        return [
            Attr("drivers_autoprobe", 0o644, show=lambda: f"{int(self.autoprobe[bus_name])}\n",
                 store=autoprobe_store),
            Attr("uevent", 0o200, store=uevent_store),
            Attr("drivers_probe", 0o200, store=lambda buf: self.rescan(bus_name, buf), blocking=True),
            *(bus_type.bus_attrs() if (bus_type := self.bus_types.get(bus_name)) is not None else []),
        ]

    def memory_attrs(self) -> list[Attr]:
        """The attributes of /sys/devices/system/memory/ that daxctl reads and writes."""

        def auto_online_store(buf: bytes) -> None:
            # auto_online_blocks_store(): mhp_online_type_from_str() or EINVAL
            for name in MEMORY_ONLINE_TYPES:
                if sysfs_streq(buf, name):
                    self.memory_auto_online = name
                    return
            raise fail(errno.EINVAL, f"auto_online_blocks takes one of {', '.join(MEMORY_ONLINE_TYPES)}")

        return [
            Attr("block_size_bytes", 0o444, show=lambda: "8000000\n"),
            Attr("auto_online_blocks", 0o644, show=lambda: f"{self.memory_auto_online}\n", store=auto_online_store),
        ]

    # ------------------------------------------------------------ lifetime

    def release(self, bus: NvdimmBus) -> None:
        """Give back the device numbers of a bus that goes away (its ndctl and nmem devices)."""
        self.driver_detach(bus)
        self.minors[NDCTL_MAJOR].put(bus.ctl.devt[1])
        for dimm in bus.dimms:
            self.minors[NMEM_MAJOR].put(dimm.devt[1])  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        """Unbind everything, deepest first: jobs are cancelled, disks closed, media closed."""
        with self.lock:
            for dev in self.platform_devices:
                dev.shutdown()  # type: ignore[attr-defined]
            for bus in self.buses:
                bus.shutdown()
