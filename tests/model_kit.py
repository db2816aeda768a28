"""The booted-machine helper of every test layer: a state dir (provisioned from a TOML config,
or an existing one), booted into a `System` without a mount (and without a memmap engine),
with attribute access by path the way kernfs does it (one store call per write, the model
lock held unless the attribute blocks)."""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

from topologies import four_modes, nfit

from vnvdimm.model.base import Attr, BinAttr, Device, Group
from vnvdimm.model.system import System
from vnvdimm.topology.boot import Machine as BootedMachine
from vnvdimm.topology.boot import boot
from vnvdimm.topology.config import parse_config
from vnvdimm.topology.modules import PlatformModules
from vnvdimm.topology.provision import provision
from vnvdimm.topology.statedir import StateDir

E820_FOUR = four_modes()

NFIT_TWO = nfit("128M 128M 128M 128M", "0,1: 64M fsdax mem name=first", "2,3", workers=None)


class Machine:
    """A state dir and the System booted from it (boot again to see what persisted)."""

    def __init__(self, state_dir: Path, config_text: str | None = None) -> None:
        self.state = StateDir(state_dir)
        config = parse_config(tomllib.loads(config_text), "test.toml") if config_text else None
        self.platform, provision_config = self.state.open(config)
        if provision_config is not None:
            provision(self.platform, self.state, provision_config)
        self.system: System | None = None
        self._booted: BootedMachine | None = None

    def boot(self) -> System:
        self.shutdown()
        self._booted = boot(self.platform, self.state)
        self.system = self._booted.system
        self.system.modules = PlatformModules(self.platform, self.state, self.system)
        return self.system

    def shutdown(self) -> None:
        if self._booted is None:
            return
        self._booted.close()
        self._booted = self.system = None

    # -- lookup
    @property
    def sys(self) -> System:
        assert self.system is not None, "boot() first"
        return self.system

    def dev(self, name: str) -> Device:
        for dev in self.sys.all_devices():
            if dev.name == name:
                return dev
            disk = getattr(dev, "disk", None)
            if disk is not None and disk.name == name:
                return disk
        raise KeyError(name)

    def devdax(self, name: str) -> Device:
        """A device-dax instance (named like the nd dax seed of its region: look on the dax bus)."""
        return next(d for d in self.sys.bus_devices("dax") if d.name == name)

    def has(self, name: str) -> bool:
        try:
            self.dev(name)
        except KeyError:
            return False
        return True

    def attr(self, path: str) -> Attr:
        """'pfn0.0/mode', 'ndbus0/nfit/scrub', 'drivers/nd_pmem/bind', 'dax/drivers/kmem/new_id',
        'daxdev/dax1.0/align' (a device-dax instance)."""
        parts = path.split("/")
        if parts[0] == "drivers" or parts[:2] == ["dax", "drivers"]:
            bus = "dax" if parts[0] == "dax" else "nd"
            parts = parts[1:] if bus == "dax" else parts
            drv = self.sys.drivers_of(bus)[parts[1]]
            entries: list = drv.entries()  # type: ignore[attr-defined]
            rest = parts[2:]
        elif parts[0] == "daxdev":
            entries = self.devdax(parts[1]).entries()
            rest = parts[2:]
        else:
            entries = self.dev(parts[0]).entries()
            rest = parts[1:]
        for i, name in enumerate(rest):
            found = next((e for e in entries if getattr(e, "name", None) == name), None)
            if found is None:
                raise KeyError(path)
            if isinstance(found, Group):
                entries = found.entries
                continue
            if i != len(rest) - 1 or not isinstance(found, Attr):
                raise KeyError(path)
            return found
        raise KeyError(path)

    def exists(self, path: str) -> bool:
        try:
            self.attr(path)
        except KeyError:
            return False
        return True

    def read(self, path: str) -> str:
        a = self.attr(path)
        assert a.show is not None, f"{path} is write-only"
        with nullcontext() if a.blocking else self.sys.lock:
            return a.show()

    def write(self, path: str, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode() + b"\0"  # as ndctl writes: the value plus a NUL
        a = self.attr(path)
        assert a.store is not None, f"{path} is read-only"
        with nullcontext() if a.blocking else self.sys.lock:
            a.store(data)

    def errno_of(self, path: str, data: bytes | str) -> int | None:
        try:
            self.write(path, data)
        except OSError as e:
            return e.errno
        return None

    def readable(self) -> Iterator[tuple[str, Attr]]:
        """Every readable attribute of every device, by path."""
        def walk(prefix: str, entries: list) -> Iterator[tuple[str, Attr]]:  # type: ignore[type-arg]
            for e in entries:
                if isinstance(e, Group):
                    yield from walk(f"{prefix}/{e.name}", e.entries)
                elif isinstance(e, Attr) and e.show is not None and not e.blocking:
                    yield f"{prefix}/{e.name}", e
                elif isinstance(e, BinAttr):
                    continue

        for dev in list(self.sys.all_devices()):
            yield from walk(dev.name, dev.entries())
            disk = getattr(dev, "disk", None)
            if disk is not None:
                yield from walk(disk.name, disk.entries())

    def snapshot(self) -> dict[str, str]:
        """Every readable value (or its errno): what a rejected store must leave unchanged."""
        out: dict[str, str] = {}
        with self.sys.lock:
            for path, a in self.readable():
                try:
                    out[path] = a.show()  # type: ignore[misc]
                except OSError as e:
                    out[path] = f"<errno {e.errno}>"
        return out


@contextlib.contextmanager
def machine(tmp_path: Path, config_text: str | None = E820_FOUR, name: str = "state") -> Iterator[Machine]:
    m = Machine(tmp_path / name, config_text)
    m.boot()
    try:
        yield m
    finally:
        m.shutdown()
