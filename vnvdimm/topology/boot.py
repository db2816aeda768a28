"""Booting a platform: the System built from its record and state dir (drivers loaded,
buses, DIMMs and regions added and probed), the Machine that owns what the boot opened,
and power_off."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from vnvdimm.model import drivers
from vnvdimm.model.bus import NFIT_BUS_COMMANDS, NvdimmBus
from vnvdimm.model.commands import platform as firmware
from vnvdimm.model.dimm import NfitIdentity, Nvdimm
from vnvdimm.model.hmem import HmemRegion
from vnvdimm.model.label_area import NFIT_TEST_LABEL_SIZE, NFIT_TEST_MAX_XFER
from vnvdimm.model.label_format import InterleaveSet
from vnvdimm.model.media import Media
from vnvdimm.model.nfit_test_dimm import NfitTestDimm
from vnvdimm.model.region import Mapping, Region
from vnvdimm.model.system import MemmapSettings, System
from vnvdimm.topology import cxl_test, nfit_test
from vnvdimm.topology.config import ConfigError, format_size
from vnvdimm.topology.legacy_labels import migrate_json_labels
from vnvdimm.topology.record import MODULE_TEMPLATES, Platform
from vnvdimm.topology.statedir import StateDir

if TYPE_CHECKING:
    from vnvdimm.memmap import MemmapEngine


def build_system(platform: Platform, state: StateDir, system: System, only: set[int] | None = None,
                 fresh: bool = False) -> None:
    """Plug the platform into `system` and let the drivers probe it, as at boot. `only`: the
    indexes of the buses to plug (a module load); `fresh`: their label areas and media start
    over, as the memory a module allocates anew. The drivers are loaded first (once)."""
    drivers.register(system)
    wanted = set(range(len(platform.buses))) if only is None else only
    buses = {i: NvdimmBus(system, i, b.provider, b.platform_path, NFIT_BUS_COMMANDS if b.nfit else (), nfit=b.nfit)
             for i, b in enumerate(platform.buses) if i in wanted}
    for i, bus in buses.items():
        bus.test_dimms = [NfitTestDimm(bus, index, nfit_test.HANDLES[index]) for index in platform.buses[i].test_dimms]
    system.buses.extend(buses.values())
    system.buses.sort(key=lambda bus: bus.id)
    dimms: dict[int, Nvdimm] = {}
    for i, d in enumerate(platform.dimms):
        if d.bus not in buses:
            continue
        bus = buses[d.bus]
        dimm = Nvdimm(system, bus, i, d.size, d.handle, d.phys_id, d.serial, NfitIdentity(
            vendor=d.vendor, device=d.device, revision=d.revision, mfg_location=d.mfg_location, mfg_date=d.mfg_date,
            format=d.format, flags=d.flags, **({"subsystem_vendor": 0, "subsystem_device": 0, "subsystem_revision": 0}
                                               if d.label_fill else {})))
        # NDD_LABELING from the DIMM's creation: not for nfit_test.1's (no BLK windows)
        if platform.template in MODULE_TEMPLATES and d.handle in nfit_test.LABELLED_BY_PROBE_ONLY:
            dimm.labeling = False
        if platform.labelled:
            fill = d.label_fill.encode() + b"\0" if d.label_fill else b""
            dimm.label_area = state.label_area(i, NFIT_TEST_LABEL_SIZE, NFIT_TEST_MAX_XFER, fill)
            if fresh:
                dimm.label_area.reset(fill)
        bus.dimms.append(dimm)
        dimms[i] = dimm
    if platform.labelled and only is None:
        migrate_json_labels(platform, state, list(dimms.values()))
    for i, r in enumerate(platform.regions):
        if r.bus not in buses:
            continue
        bus = buses[r.bus]
        nfit = platform.buses[r.bus].nfit
        media_path = state.media_path(i)
        try:
            media = state.open_media(i, r.size)
        except FileNotFoundError:
            raise ConfigError(f"{media_path}: media file missing; the platform record says region{i} "
                              f"has {format_size(r.size)} of pmem: put it back, or mount with --config to "
                              "make that region afresh (empty)") from None
        except OSError as e:
            raise ConfigError(f"{media_path}: {e.strerror}") from None
        if fresh:
            media.zero(0, r.size)
        ways = len(r.dimms)
        mappings = [Mapping(dimms[d], dpa, r.size // ways, pos) for pos, (d, dpa) in enumerate(r.dimms)]
        iset = InterleaveSet(r.set_cookie, r.cookie2, r.altcookie) if r.dimms and platform.labelled else None
        persistence = r.persistence if r.persistence is not None else "memory_controller" if nfit else ""
        system.region_ida.take(i)
        bus.regions.append(Region(bus, i, r.start, r.size, media, numa_node=r.numa_node, mappings=mappings,
                                  iset=iset, pagemap=not nfit, persistence=persistence,
                                  range_index=r.range_index if r.range_index >= 0 else None,
                                  flush_hints=r.flush_hints))
    # each NFIT bus has its own platform firmware (its DSMs, its ARS error list)
    for i, bus in buses.items():
        if platform.buses[i].nfit:
            firmware.attach(bus)
    if only is None:  # dax_hmem: soft-reserved memory, found at boot (no module reload brings it)
        with system.lock:
            for i, h in enumerate(platform.hmem):
                hmem = HmemRegion(system, i, h.start, h.size, Media.anonymous(f"hmem.{i}", h.size), h.numa_node)
                system.platform_devices.append(hmem)
                system.device_add(hmem)
                hmem.create_device(h.size)  # dax_hmem_probe(): one instance with the whole range
    with system.lock:
        for bus in buses.values():
            system.device_add(bus)
            for dimm in bus.dimms:
                system.device_add(dimm)
            for region in bus.regions:
                system.device_add(region)


class Machine:
    """A System booted from a platform, with the media it opened: what `boot()` returns.

    `with boot(platform, state) as system: ...` stops the machine on exit; or keep the
    Machine and call `close()`."""

    def __init__(self, system: System) -> None:
        self.system = system
        self._closed = False

    def __enter__(self) -> System:
        return self.system

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """power_off(), then close the media. Once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        power_off(self.system)
        for dev in self.system.platform_devices:
            if isinstance(dev, HmemRegion):
                dev.media.close()
        for bus in self.system.buses:
            for region in bus.regions:
                region.media.close()
            for dimm in bus.dimms:
                if dimm.label_area is not None:
                    dimm.label_area.close()


def boot(platform: Platform, state: StateDir, engine: MemmapEngine | None = None,
         memmap: MemmapSettings | None = None) -> Machine:
    """Boot a System from the platform: drivers loaded, buses, DIMMs and regions added and
    probed. The Machine owns what the boot opened (and the engine, if one is given): closing
    it cancels every memmap job, unbinds every device, syncs and closes the media. A boot that
    fails closes what it opened before raising."""
    machine = Machine(System(engine, memmap))
    try:
        build_system(platform, state, machine.system)
        if platform.template == "cxl_test":
            cxl_test.build(machine.system)
    except BaseException:
        machine.close()
        raise
    return machine


def power_off(system: System) -> None:
    """Stop every device and make the media durable, in the order that never waits long: the
    engine first (every memmap job cancelled at once: cancelling job after job would wait, per
    job, for workers busy elsewhere), then every device unbound, then every media file synced
    (map=dev records included). Safe to call again."""
    if system.engine is not None:
        system.engine.close()
    system.shutdown()
    sync_media(system)


def sync_media(system: System) -> None:
    """fsync every media file of the machine (one already closed is skipped)."""
    for bus in system.buses:
        for region in bus.regions:
            with contextlib.suppress(OSError):
                region.media.fsync()
