"""The emulated machine: buses, the driver core (drivers/base/bus.c + dd.c) and the
device-number allocators. One `System` per daemon; every model call runs under `lock`
(the kernel's device_lock + nvdimm_bus_lock rolled into one).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from vnvdimm.model.base import Device, Driver, Ida, fail, streq_text

if TYPE_CHECKING:
    from vnvdimm.memmap import MemmapEngine
    from vnvdimm.model.bus import NvdimmBus

log = logging.getLogger("vnvdimm.model")

# Character/block majors. The kernel allocates the nd ones dynamically; these are the values
# a typical x86_64 machine ends up with (the contract's examples use them).
NDCTL_MAJOR = 240
NMEM_MAJOR = 241
DAX_MAJOR = 242
BLKEXT_MAJOR = 259

Notifier = Callable[[Device, str], None]


class ModuleControl(Protocol):
    """The modules that provide some of the platform's buses (nfit_test): what modprobe
    loads and removes."""

    def names(self) -> list[str]: ...
    def loaded(self, name: str) -> bool: ...
    def store(self, buf: bytes) -> None: ...


class MemmapSettings:
    """The [memmap] config section: how enabling a pfn/dax device initializes its memmap."""

    def __init__(self, mode: str = "async", ns_per_page: int = 0) -> None:
        self.mode = mode
        self.ns_per_page = ns_per_page


class ModelLock:
    """A re-entrant lock whose outermost release runs the work deferred while it was held.

    Some effects of a store must happen after the model is unlocked (sync-mode memmap waits:
    the pre-series kernel blocked the enabling writer, not every reader of sysfs)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._local = threading.local()

    def __enter__(self) -> ModelLock:
        self._lock.acquire()
        self._local.depth = getattr(self._local, "depth", 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._local.depth -= 1
        outermost = self._local.depth == 0
        work: list[Callable[[], None]] = []
        if outermost:
            work, self._local.work = getattr(self._local, "work", []), []
        self._lock.release()
        for item in work:
            item()

    def defer(self, work: Callable[[], None]) -> None:
        if not hasattr(self._local, "work"):
            self._local.work = []
        self._local.work.append(work)


class System:
    def __init__(self, engine: MemmapEngine | None = None, memmap: MemmapSettings | None = None) -> None:
        self.lock = ModelLock()
        self.generation = 0  # bumped on every change of the device tree's shape
        self.engine = engine
        self.memmap = memmap or MemmapSettings()
        self.buses: list[NvdimmBus] = []
        self.nd_drivers: dict[str, Driver] = {}
        self.dax_drivers: dict[str, Driver] = {}
        self.region_ida = Ida()
        self.autoprobe = {"nd": True, "dax": True}  # /sys/bus/<bus>/drivers_autoprobe
        self.minors = {NDCTL_MAJOR: Ida(), NMEM_MAJOR: Ida(), DAX_MAJOR: Ida(), BLKEXT_MAJOR: Ida()}
        self._notifiers: list[Notifier] = []
        self.modules: ModuleControl | None = None

        from vnvdimm.model import drivers

        for drv in drivers.nd_bus_drivers(self):
            self.nd_drivers[drv.name] = drv
        for drv in drivers.dax_bus_drivers(self):
            self.dax_drivers[drv.name] = drv

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
        return self.nd_drivers if bus_name == "nd" else self.dax_drivers

    # ------------------------------------------------------------ driver core

    def device_add(self, dev: Device) -> None:
        """device_add() + bus_probe_device(): a new device is tried against its bus's drivers."""
        self.changed()
        if dev.bus_name is None or not self.autoprobe.get(dev.bus_name, True):
            return
        for drv in self.drivers_of(dev.bus_name).values():
            if drv.matches(dev):
                try:
                    self.driver_attach(drv, dev)
                except OSError as e:
                    dev.probe_errno = e.errno
                    log.debug("%s: probe by %s failed: %s", dev.name, drv.name, e)
                return

    def driver_attach(self, drv: Driver, dev: Device) -> None:
        """device_driver_attach(): EBUSY if bound; the probe's errno otherwise."""
        if dev.driver is not None:
            raise fail(errno.EBUSY, f"{dev.name} is already bound to {dev.driver.name}")
        drv.probe(dev)
        dev.driver = drv
        self.changed()
        after_probe = getattr(dev, "after_probe", None)
        if after_probe is not None:
            after_probe()
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
        if dev is None or not drv.matches(dev):
            raise fail(errno.ENODEV, f"{drv.name} does not match {buf!r}")
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
                if drv.matches(dev):
                    try:
                        self.driver_attach(drv, dev)
                        return
                    except OSError as e:
                        log.debug("%s: probe by %s failed: %s", dev.name, drv.name, e)

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
            for bus in self.buses:
                bus.shutdown()
