"""The platform record and the state dir: what firmware tables and DIMMs are to a real machine.

State dir layout:
    platform.json        the platform as created (template, regions, DIMMs, memmap defaults)
    region<N>.media      sparse media of region N (its SPA range, byte for byte)
    labels/nmem<N>.json  the namespaces of DIMM N (nfit)
    labels/nmem<N>.lsa   the label storage area of DIMM N, raw bytes (nfit)
    lock                 flock'ed by the daemon that serves this state dir
    vnvdimm.log          the daemon's log

A config provisions: a region whose media file is missing is created and formatted as the
config says (through the same model calls ndctl's create-namespace makes); everything else
is brought back from the media and labels, exactly as a kernel finds it at boot.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import uuid as uuidlib
from dataclasses import asdict, dataclass
from pathlib import Path

from vnvdimm.model.base import SZ_1G, Attr, Device, align_up
from vnvdimm.model.bus import NFIT_BUS_COMMANDS, NvdimmBus
from vnvdimm.model.dimm import Nvdimm
from vnvdimm.model.label_area import NFIT_TEST_LABEL_SIZE, NFIT_TEST_MAX_XFER, LabelArea
from vnvdimm.model.labels import DimmLabels, InterleaveLabels, write_atomically
from vnvdimm.model.media import Media
from vnvdimm.model.region import Mapping, Region
from vnvdimm.model.system import System
from vnvdimm.topology.config import ConfigError, NamespaceConfig, TopologyConfig, default_config, format_size

log = logging.getLogger("vnvdimm.topology")

SPA_BASE = 16 << 30  # where the first region sits in the physical address space
PLATFORM_FILE = "platform.json"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "vnvdimm"


@dataclass(frozen=True)
class DimmRecord:
    size: int
    handle: int
    phys_id: int
    serial: int


@dataclass(frozen=True)
class RegionRecord:
    start: int
    size: int
    numa_node: int
    dimms: tuple[tuple[int, int], ...] = ()  # (dimm index, dpa)
    set_cookie: int = 0


@dataclass(frozen=True)
class Platform:
    template: str
    regions: tuple[RegionRecord, ...]
    dimms: tuple[DimmRecord, ...] = ()
    memmap_mode: str = "async"
    memmap_workers: int | None = None
    ns_per_page: int = 0

    @classmethod
    def from_config(cls, cfg: TopologyConfig) -> Platform:
        dimms = tuple(DimmRecord(size, handle=((i // 4) << 8) | ((i // 2 % 2) << 4) | (i % 2), phys_id=0x10 + i,
                                 serial=0x1000 + i) for i, size in enumerate(cfg.dimms))
        used = [0] * len(dimms)
        regions, start = [], SPA_BASE
        for r in cfg.regions:
            members = []
            for d in r.dimms:
                members.append((d, used[d]))
                used[d] += r.size // len(r.dimms)
            cookie = 0
            if members:
                digest = hashlib.sha256(repr((members, [dimms[d].serial for d, _ in members])).encode()).digest()
                cookie = int.from_bytes(digest[:8], "little") & ~0xFFFF
            regions.append(RegionRecord(start, r.size, r.numa_node, tuple(members), cookie))
            start = align_up(start + r.size, SZ_1G)
        return cls(cfg.template, tuple(regions), dimms, cfg.memmap.mode, cfg.memmap.workers, cfg.memmap.ns_per_page)

    def shape(self) -> tuple[object, ...]:
        """What a config must agree with to be used on existing media."""
        return (self.template, [(r.size, r.numa_node, r.dimms) for r in self.regions], [d.size for d in self.dimms])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Platform:
        try:
            doc = json.loads(text)
            return cls(
                template=doc["template"],
                regions=tuple(RegionRecord(r["start"], r["size"], r["numa_node"],
                                           tuple(tuple(m) for m in r.get("dimms", ())),  # type: ignore[misc]
                                           r.get("set_cookie", 0)) for r in doc["regions"]),
                dimms=tuple(DimmRecord(**d) for d in doc.get("dimms", ())),
                memmap_mode=doc.get("memmap_mode", "async"),
                memmap_workers=doc.get("memmap_workers"),
                ns_per_page=doc.get("ns_per_page", 0),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{source}: damaged platform record ({e!r}); move it away to start afresh") from None


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def media_path(self, index: int) -> Path:
        return self.path / f"region{index}.media"

    def label_path(self, dimm: int) -> Path:
        return self.path / "labels" / f"nmem{dimm}.json"

    def label_area_path(self, dimm: int) -> Path:
        return self.path / "labels" / f"nmem{dimm}.lsa"

    def label_area(self, dimm: int, size: int, max_xfer: int, fill: bytes = b"") -> LabelArea:
        """DIMM `dimm`'s label storage area, created (`fill`, then zeroes) on first use."""
        path = self.label_area_path(dimm)
        if not path.exists():
            return LabelArea.create(path, size, max_xfer, fill)
        return LabelArea(path, size, max_xfer)

    @property
    def platform_path(self) -> Path:
        return self.path / PLATFORM_FILE

    def open(self, config: TopologyConfig | None) -> tuple[Platform, TopologyConfig | None]:
        """The platform of this state dir, created from `config` (or the default) on first use.
        Returns the platform and the config to provision missing media with."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "labels").mkdir(exist_ok=True)
        if self.platform_path.exists():
            platform = Platform.from_json(self.platform_path.read_text(), str(self.platform_path))
            if config is not None:
                wanted = Platform.from_config(config)
                if wanted.shape() != platform.shape():
                    raise ConfigError(
                        f"{config.source}: does not match the platform already in {self.path} "
                        f"({describe(platform)} there, {describe(wanted)} in the config); "
                        "use another --state-dir, or remove that one to start afresh")
                # Memmap settings are run-time knobs: the config's win.
                platform = wanted
                write_atomically(self.platform_path, platform.to_json().encode())
            return platform, config
        config = config or default_config()
        platform = Platform.from_config(config)
        write_atomically(self.platform_path, platform.to_json().encode())
        return platform, config


def describe(p: Platform) -> str:
    regions = ", ".join(format_size(r.size) for r in p.regions)
    return f"{p.template} with regions of {regions}"


# ---------------------------------------------------------------- building the machine


def build_system(platform: Platform, state: StateDir, system: System) -> None:
    """Plug the platform into `system` and let the drivers probe it, as at boot."""
    nfit = platform.template == "nfit"
    if nfit:
        bus = NvdimmBus(system, 0, "ACPI.NFIT", "LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00", NFIT_BUS_COMMANDS, nfit=True)
    else:
        bus = NvdimmBus(system, 0, "e820", "platform/e820_pmem")
    system.buses.append(bus)
    for i, d in enumerate(platform.dimms):
        dimm = Nvdimm(system, bus, i, d.size, d.handle, d.phys_id, d.serial)
        if nfit:
            dimm.label_area = state.label_area(i, NFIT_TEST_LABEL_SIZE, NFIT_TEST_MAX_XFER)
        bus.dimms.append(dimm)
    for i, r in enumerate(platform.regions):
        media_path = state.media_path(i)
        try:
            media = Media(media_path, r.size)
        except FileNotFoundError:
            raise ConfigError(f"{media_path}: media file missing; the platform record says region{i} "
                              f"has {format_size(r.size)} of pmem") from None
        except OSError as e:
            raise ConfigError(f"{media_path}: {e.strerror}") from None
        labels = None
        mappings = []
        if nfit:
            ways = len(r.dimms)
            for pos, (d, dpa) in enumerate(r.dimms):
                mappings.append(Mapping(bus.dimms[d], dpa, r.size // ways, pos))
            labels = InterleaveLabels([(DimmLabels(state.label_path(d)), dpa) for d, dpa in r.dimms], r.set_cookie)
        system.region_ida.take(i)
        bus.regions.append(Region(bus, i, r.start, r.size, media, numa_node=r.numa_node, mappings=mappings,
                                  labels=labels, set_cookie=r.set_cookie, pagemap=not nfit,
                                  persistence="memory_controller" if nfit else ""))
    with system.lock:
        system.device_add(bus)
        for dimm in bus.dimms:
            system.device_add(dimm)
        for region in bus.regions:
            system.device_add(region)


def provision(platform: Platform, state: StateDir, config: TopologyConfig) -> list[int]:
    """Create the media of regions that have none and format them as `config` says.
    Returns the indexes of the regions it created."""
    created = []
    for i, r in enumerate(platform.regions):
        path = state.media_path(i)
        if not path.exists():
            Media.create(path, r.size)
            created.append(i)
    if not created:
        return []
    system = System()  # the "installer" boot: no memmap engine, nothing served
    build_system(platform, state, system)
    try:
        with system.lock:
            bus = system.buses[0]
            for i in created:
                region = bus.regions[i]
                rcfg = config.regions[i]
                if region.labels is None:
                    apply_mode(region.namespaces[0], rcfg.namespaces[0])
                else:
                    for nscfg in rcfg.namespaces:
                        ns = create_labelled_namespace(region, nscfg)
                        apply_mode(ns, nscfg)
                log.info("provisioned %s (%s)", region.name, format_size(region.size))
    finally:
        system.shutdown()
        for region in system.buses[0].regions:
            region.media.fsync()
            region.media.close()
        for dimm in system.buses[0].dimms:
            if dimm.label_area is not None:
                dimm.label_area.close()
    return created


def store(dev: Device, name: str, value: str) -> None:
    """Write an attribute as ndctl does: the value plus a NUL, in one write."""
    for entry in dev.entries():
        if isinstance(entry, Attr) and entry.name == name and entry.store is not None:
            entry.store(value.encode() + b"\0")
            return
    raise OSError(errno.EACCES, f"{dev.name}/{name} is not writable")


def create_labelled_namespace(region: Region, cfg: NamespaceConfig) -> Device:
    seed = region.ns_seed
    assert seed is not None
    store(seed, "uuid", str(uuidlib.uuid4()))
    store(seed, "alt_name", cfg.name)
    store(seed, "size", str(cfg.size))
    system = region.system
    system.bind(system.nd_drivers["nd_pmem"], seed.name.encode())
    return seed


def apply_mode(ns: Device, cfg: NamespaceConfig) -> None:
    """What `ndctl create-namespace -e <ns> -m <mode> -f` does, minus the info-block wipe
    (the media is fresh)."""
    from vnvdimm.model.namespace import Namespace

    assert isinstance(ns, Namespace)
    if cfg.mode == "raw":
        return
    system = ns.system
    region = ns.region
    if ns.driver is not None:
        system.driver_detach(ns)
    if cfg.mode == "sector":
        store(ns, "holder_class", "btt")
        dev: Device | None = region.btt_seed
        assert dev is not None
        store(dev, "uuid", str(uuidlib.uuid4()))
        store(dev, "sector_size", str(cfg.sector_size))
    else:
        klass = "pfn" if cfg.mode == "fsdax" else "dax"
        store(ns, "holder_class", klass)
        dev = region.pfn_seed if klass == "pfn" else region.dax_seed
        assert dev is not None
        store(dev, "uuid", str(uuidlib.uuid4()))
        store(dev, "mode", "pmem" if cfg.map == "dev" else "ram")
        store(dev, "align", str(cfg.align))
    store(dev, "namespace", ns.name)
    driver = system.nd_drivers["dax_pmem" if cfg.mode == "devdax" else "nd_pmem"]
    system.bind(driver, dev.name.encode())
