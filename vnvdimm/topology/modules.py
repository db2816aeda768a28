"""Loading and removing the kernel module that provides a platform's buses (nfit_test), the
way `modprobe` / `modprobe -r` do it to a kernel.

Removing nfit_test unregisters its buses with everything below them (regions, namespaces,
DIMMs: drivers unbound, device numbers released); loading it registers them again as the
module's probe does, with memory allocated anew: every DIMM's label area back to its initial
content and every region's media zeroed. Buses that no module provides (e820, ACPI.NFIT) are
the platform's firmware: they are always there.

The emulated sysfs offers this as vnvdimm's extension /sys/module/vnvdimm/: `modules` lists
the modules the platform can load, `modprobe` takes "load NAME" or "remove NAME"; the modprobe
shim of with-vnvdimm writes there. /sys/module/NAME exists while NAME is loaded.
"""

from __future__ import annotations

import errno
import logging

from vnvdimm.model.base import cstring, fail
from vnvdimm.model.system import System
from vnvdimm.topology import cxl_test
from vnvdimm.topology.boot import build_system
from vnvdimm.topology.record import Platform
from vnvdimm.topology.statedir import StateDir

log = logging.getLogger("vnvdimm.topology")


class PlatformModules:
    def __init__(self, platform: Platform, state: StateDir, system: System) -> None:
        self.platform = platform
        self.state = state
        self.system = system

    def names(self) -> list[str]:
        names = {b.module for b in self.platform.buses if b.module}
        if self.platform.template == "cxl_test":
            names.add(cxl_test.MODULE)
        return sorted(names)

    def _buses(self, name: str) -> set[int]:
        return {i for i, b in enumerate(self.platform.buses) if b.module == name}

    def loaded(self, name: str) -> bool:
        if name == cxl_test.MODULE:
            return bool(self.system.cxl_topologies)
        ids = self._buses(name)
        return bool(ids) and any(bus.id in ids for bus in self.system.buses)

    def store(self, buf: bytes) -> None:
        """The /sys/module/vnvdimm/modprobe store: "load NAME" or "remove NAME"."""
        words = cstring(buf).decode("latin-1").split()
        if len(words) < 2 or words[0] not in ("load", "remove") or (len(words) > 2 and words[0] != "load"):
            raise fail(errno.EINVAL, 'write "load NAME [param=value...]" or "remove NAME"')
        verb, name, params = words[0], words[1], words[2:]
        if name not in self.names():
            raise fail(errno.ENOENT, f"the platform has no module {name!r}")
        if verb == "load":
            self.load(name, self._params(name, params))
        else:
            self.remove(name)

    def remove(self, name: str) -> None:
        if name == cxl_test.MODULE:
            for topo in list(self.system.cxl_topologies):
                cxl_test.remove(self.system, topo)
            log.info("module %s removed", name)
            return
        with self.system.lock:
            ids = self._buses(name)
            gone = [bus for bus in self.system.buses if bus.id in ids]
            for bus in gone:
                bus.shutdown()
                for dimm in bus.dimms:
                    self.system.driver_detach(dimm)
                    if dimm.label_area is not None:
                        dimm.label_area.close()
                for region in bus.regions:
                    region.media.fsync()
                    region.media.close()
                    self.system.region_ida.put(region.id)
                self.system.release(bus)
            self.system.buses[:] = [bus for bus in self.system.buses if bus.id not in ids]
            self.system.changed()
        if gone:
            log.info("module %s removed: %s", name, ", ".join(b.provider for b in gone))

    @staticmethod
    def _params(name: str, params: list[str]) -> dict[str, int]:
        """The module parameters a load names: cxl_test's interleave_arithmetic (0 or 1);
        any other is refused (EINVAL), as an unknown parameter fails the kernel's load."""
        known = {cxl_test.MODULE: ("interleave_arithmetic",)}.get(name, ())
        out = {}
        for param in params:
            key, _, value = param.partition("=")
            if key not in known or value not in ("0", "1"):
                raise fail(errno.EINVAL, f"{name}: unknown parameter or value {param!r}")
            out[key] = int(value)
        return out

    def load(self, name: str, params: dict[str, int] | None = None) -> None:
        if name == cxl_test.MODULE:
            with self.system.lock:
                if not self.loaded(name):
                    cxl_test.build(self.system, **(params or {}))
            log.info("module %s loaded", name)
            return
        with self.system.lock:
            if self.loaded(name):
                return
            build_system(self.platform, self.state, self.system, only=self._buses(name), fresh=True)
        log.info("module %s loaded", name)
