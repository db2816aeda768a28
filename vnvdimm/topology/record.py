"""The platform record: what firmware tables are to a real machine (the buses, DIMMs,
regions and soft-reserved ranges, and the memmap defaults), made from a config or read
from platform.json, and `Platform.validate`, which refuses one no machine can have."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from vnvdimm.model.base import align_up
from vnvdimm.model.dimm import NfitIdentity
from vnvdimm.model.nfit_iset import DcrIdentity, SetMember, interleave_set
from vnvdimm.model.system import MemmapSettings
from vnvdimm.topology import nfit_test
from vnvdimm.topology.config import (
    HMEM_BASE,
    HMEM_GRANULE,
    MAX_DIMMS,
    MAX_HMEM,
    MAX_NS_PER_PAGE,
    MAX_NUMA_NODE,
    MAX_REGION,
    MAX_WORKERS,
    MIN_REGION,
    REGION_GRANULE,
    SPA_ALIGN,
    SPA_BASE,
    SPA_LIMIT,
    ConfigError,
    TopologyConfig,
)

TEMPLATES = ("e820", "nfit", "nfit_test", "cxl_test")
MODULE_TEMPLATES = ("nfit_test", "cxl_test")  # the module tables of nfit_test (cxl_test: and cxl_test's)
PERSISTENCE_DOMAINS = (None, "", "memory_controller", "cpu_cache")  # None: the template's default
U8, U16, U32, U64 = (1 << 8) - 1, (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


@dataclass(frozen=True)
class BusRecord:
    """An nvdimm bus and the platform device that provides it."""

    provider: str  # the bus's `provider` ("e820", "ACPI.NFIT", "nfit_test.0")
    platform_path: str  # its parent under /sys/devices ("platform/nfit_test.0")
    nfit: bool  # an ACPI NFIT bus: nfit/ attribute groups, commands, labelled PM regions
    module: str = ""  # the module whose loading creates it (reloadable: "nfit_test")
    test_dimms: tuple[int, ...] = ()  # nfit_test_dimm class devices (test_dimmN) under it


E820_BUS = BusRecord("e820", "platform/e820_pmem", False)
ACPI_NFIT_BUS = BusRecord("ACPI.NFIT", "LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00", True)


@dataclass(frozen=True)
class DimmRecord:
    """A DIMM as the NFIT describes it: memory-device entry and control region, the latter
    with the values its sysfs attributes show (big-endian table fields as the kernel prints
    them)."""

    size: int
    handle: int
    phys_id: int
    serial: int
    bus: int = 0
    # the NFIT's identity of a DIMM: the model's defaults (an Intel DIMM, as nfit_test's)
    vendor: int = NfitIdentity.vendor
    device: int = NfitIdentity.device
    revision: int = NfitIdentity.revision
    mfg_location: int = NfitIdentity.mfg_location
    mfg_date: int = NfitIdentity.mfg_date
    format: int = NfitIdentity.format
    flags: int = 0  # ACPI_NFIT_MEM_*: the OR of every memory-device entry of this DIMM
    label_fill: str = ""  # initial content of the label area (nfit_test: "label<i>")

    @property
    def dcr(self) -> DcrIdentity:
        """The raw control-region fields (what interleave-set cookies are made of)."""
        return DcrIdentity(vendor_id=swab16(self.vendor), serial_number=swab32(self.serial),
                           manufacturing_date=swab16(self.mfg_date), manufacturing_location=self.mfg_location)


@dataclass(frozen=True)
class HmemRecord:
    """A range of soft-reserved memory: dax_hmem's hmem.N."""

    start: int
    size: int
    numa_node: int = 0


@dataclass(frozen=True)
class RegionRecord:
    start: int
    size: int
    numa_node: int
    dimms: tuple[tuple[int, int], ...] = ()  # (dimm index, dpa)
    set_cookie: int = 0  # cookie1 (v1.1 labels)
    bus: int = 0
    cookie2: int = 0  # v1.2 labels
    altcookie: int = 0  # v1.1 labels of kernels before 4.11
    range_index: int = -1  # the SPA range's index in the NFIT (-1: region id + 1)
    region_offsets: tuple[int, ...] = ()  # per member, from its memory-device entry
    flush_hints: bool = False
    persistence: str | None = None  # None: the template's default
    json_label_cookie: int = 0  # the isetcookie of labels/nmemN.json files (state dirs of old)


def swab16(value: int) -> int:
    return int.from_bytes((value & 0xFFFF).to_bytes(2, "little"), "big")


def swab32(value: int) -> int:
    return int.from_bytes((value & 0xFFFF_FFFF).to_bytes(4, "little"), "big")


def with_cookies(region: RegionRecord, dimms: tuple[DimmRecord, ...]) -> RegionRecord:
    """The region with the cookies acpi_nfit_init_interleave_set() computes for it."""
    if not region.dimms:
        return region
    offsets = region.region_offsets or tuple(pos << 8 for pos in range(len(region.dimms)))
    iset, _ = interleave_set([SetMember(off, dimms[d].dcr) for (d, _), off in zip(region.dimms, offsets, strict=True)])
    return replace(region, set_cookie=iset.cookie1, cookie2=iset.cookie2, altcookie=iset.altcookie,
                   region_offsets=offsets)


def nfit_test_platform() -> tuple[tuple[BusRecord, ...], tuple[DimmRecord, ...], tuple[RegionRecord, ...]]:
    """The buses, DIMMs and regions of the nfit_test module."""
    buses = tuple(BusRecord(name, f"platform/{name}", True, nfit_test.MODULE, nfit_test.TEST_DIMM_DEVICES[i])
                  for i, name in enumerate(nfit_test.BUSES))
    dimms = tuple(DimmRecord(size=nfit_test.DIMM_SIZE, handle=nfit_test.HANDLES[d.index], phys_id=d.phys_id,
                             serial=nfit_test.serial(nfit_test.HANDLES[d.index]), bus=d.bus, vendor=nfit_test.VENDOR,
                             device=nfit_test.DEVICE, revision=nfit_test.REVISION,
                             mfg_location=nfit_test.MFG_LOCATION, mfg_date=nfit_test.MFG_DATE, format=d.format,
                             flags=d.flags, label_fill=f"label{d.label_index}")
                  for d in nfit_test.DIMMS)
    index_of = {d.index: i for i, d in enumerate(nfit_test.DIMMS)}
    regions = tuple(with_cookies(RegionRecord(
        start=r.start, size=r.size, numa_node=0, dimms=tuple((index_of[t], dpa) for t, dpa, _ in r.members),
        bus=r.bus, range_index=r.range_index, region_offsets=tuple(off for _, _, off in r.members),
        flush_hints=r.flush_hints, persistence=r.persistence), dimms) for r in nfit_test.REGIONS)
    return buses, dimms, regions


@dataclass(frozen=True)
class Platform:
    template: str
    regions: tuple[RegionRecord, ...]
    dimms: tuple[DimmRecord, ...] = ()
    memmap: MemmapSettings = field(default_factory=MemmapSettings)  # run-time knobs: a config's win
    buses: tuple[BusRecord, ...] = ()
    hmem: tuple[HmemRecord, ...] = ()

    def __post_init__(self) -> None:
        if not self.buses:  # records written before buses were recorded: one bus per template
            object.__setattr__(self, "buses", (ACPI_NFIT_BUS if self.template == "nfit" else E820_BUS,))

    @property
    def labelled(self) -> bool:
        return self.template in ("nfit", *MODULE_TEMPLATES)

    @classmethod
    def from_config(cls, cfg: TopologyConfig) -> Platform:
        hmem, start = [], HMEM_BASE
        for h in cfg.hmem:
            hmem.append(HmemRecord(start, h.size, h.numa_node))
            start = align_up(start + h.size, SPA_ALIGN)
        if cfg.template in MODULE_TEMPLATES:
            buses, nt_dimms, nt_regions = nfit_test_platform()
            return cls(cfg.template, nt_regions, nt_dimms, cfg.memmap, buses=buses, hmem=tuple(hmem))
        dimms = tuple(DimmRecord(size, handle=((i // 4) << 8) | ((i // 2 % 2) << 4) | (i % 2), phys_id=0x10 + i,
                                 serial=0x1000 + i) for i, size in enumerate(cfg.dimms))
        used = [0] * len(dimms)
        regions, start = [], SPA_BASE
        for r in cfg.regions:
            members = []
            for d in r.dimms:
                members.append((d, used[d]))
                used[d] += r.size // len(r.dimms)
            regions.append(with_cookies(RegionRecord(start, r.size, r.numa_node, tuple(members)), dimms))
            start = align_up(start + r.size, SPA_ALIGN)
        return cls(cfg.template, tuple(regions), dimms, cfg.memmap, hmem=tuple(hmem))

    def validate(self) -> None:
        """Raise InvalidPlatform if this record cannot describe a machine vnvdimm can run (a
        damaged or hand-edited platform.json). A config is held to the same ranges when it is
        parsed, so one that passes always makes a valid record. An nfit_test record is the
        module's tables (they are what a load builds), and those are held to the same checks."""

        def count(value: object, what: str, hi: int, lo: int = 0) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise InvalidPlatform(f"{what} = {value!r}")
            return value

        end = HMEM_BASE
        for i, h in enumerate(self.hmem):
            count(h.size, f"hmem[{i}].size", MAX_HMEM, MIN_REGION)
            count(h.numa_node, f"hmem[{i}].numa_node", MAX_NUMA_NODE)
            if h.size % HMEM_GRANULE or count(h.start, f"hmem[{i}].start", 1 << 52, end) % SPA_ALIGN:
                raise InvalidPlatform(f"hmem[{i}] = {h!r}")
            end = h.start + h.size

        def text(value: object, what: str, limit: int) -> str:
            if not isinstance(value, str) or len(value.encode("utf-8", "surrogateescape")) > limit:
                raise InvalidPlatform(f"{what} = {value!r}")
            return value

        if self.template not in TEMPLATES:
            raise InvalidPlatform(f"template = {self.template!r}")
        if self.template in MODULE_TEMPLATES:
            buses, dimms, regions = nfit_test_platform()
            if (self.buses, self.dimms, self.regions) != (buses, dimms, regions):
                raise InvalidPlatform("buses, DIMMs or regions other than the nfit_test module's")
            # the module's own layout: 4 KiB granules from its 4 GiB pool, a region without DIMMs
            granule, smallest, base = 4096, 4096, 0
        else:
            if self.buses != ((ACPI_NFIT_BUS,) if self.template == "nfit" else (E820_BUS,)):
                raise InvalidPlatform(f"buses = {self.buses!r}")
            granule, smallest, base = REGION_GRANULE, MIN_REGION, SPA_BASE
        nfit = self.template == "nfit"
        if not isinstance(self.buses, tuple) or not self.buses:
            raise InvalidPlatform("no bus")
        for i, b in enumerate(self.buses):
            if not isinstance(b, BusRecord) or not isinstance(b.nfit, bool) or not isinstance(b.test_dimms, tuple):
                raise InvalidPlatform(f"bus[{i}] = {b!r}")
            text(b.provider, f"bus[{i}].provider", 64)
            text(b.platform_path, f"bus[{i}].platform_path", 256)
            text(b.module, f"bus[{i}].module", 64)
            for t in b.test_dimms:
                count(t, f"bus[{i}].test_dimms", len(nfit_test.HANDLES) - 1)
        if not isinstance(self.regions, tuple) or not self.regions:
            raise InvalidPlatform("no region")
        if not isinstance(self.dimms, tuple) or len(self.dimms) > MAX_DIMMS or (self.dimms and not self.labelled):
            raise InvalidPlatform(f"{len(self.dimms)} DIMMs")
        for i, d in enumerate(self.dimms):
            if count(d.size, f"dimm[{i}].size", MAX_REGION) < smallest or d.size % granule:
                raise InvalidPlatform(f"dimm[{i}].size = {d.size!r}")
            for name in ("handle", "phys_id", "serial"):
                count(getattr(d, name), f"dimm[{i}].{name}", U32)
            for name in ("vendor", "device", "revision", "mfg_date", "format", "flags"):
                count(getattr(d, name), f"dimm[{i}].{name}", U16)
            count(d.mfg_location, f"dimm[{i}].mfg_location", U8)
            count(d.bus, f"dimm[{i}].bus", len(self.buses) - 1)
            text(d.label_fill, f"dimm[{i}].label_fill", 63)
        used = [0] * len(self.dimms)
        end = base
        for i, r in enumerate(self.regions):
            start, size = count(r.start, f"region[{i}].start", SPA_LIMIT), count(r.size, f"region[{i}].size", SPA_LIMIT)
            if size < smallest or size % granule or start % granule or start < end:
                raise InvalidPlatform(f"region[{i}] at {start:#x}, size {size:#x}")
            end = start + size
            if end > SPA_LIMIT:
                raise InvalidPlatform(f"region[{i}] ends at {end:#x}, beyond the physical address space")
            count(r.numa_node, f"region[{i}].numa_node", MAX_NUMA_NODE)
            for name in ("set_cookie", "cookie2", "altcookie", "json_label_cookie"):
                count(getattr(r, name), f"region[{i}].{name}", U64)
            count(r.bus, f"region[{i}].bus", len(self.buses) - 1)
            count(r.range_index, f"region[{i}].range_index", U16, lo=-1)
            if not isinstance(r.flush_hints, bool):
                raise InvalidPlatform(f"region[{i}].flush_hints = {r.flush_hints!r}")
            if r.persistence not in PERSISTENCE_DOMAINS:
                raise InvalidPlatform(f"region[{i}].persistence = {r.persistence!r}")
            if not isinstance(r.dimms, tuple) or (nfit and not r.dimms) or (r.dimms and not self.labelled):
                raise InvalidPlatform(f"region[{i}].dimms = {r.dimms!r}")
            if not isinstance(r.region_offsets, tuple) or len(r.region_offsets) != len(r.dimms):
                raise InvalidPlatform(f"region[{i}].region_offsets = {r.region_offsets!r}")
            for offset in r.region_offsets:
                count(offset, f"region[{i}].region_offsets", U64)
            for member in r.dimms:
                if not isinstance(member, tuple) or len(member) != 2:
                    raise InvalidPlatform(f"region[{i}].dimms = {r.dimms!r}")
                d = count(member[0], f"region[{i}] dimm", len(used) - 1)
                dpa = count(member[1], f"region[{i}] dpa", SPA_LIMIT)
                share = size // len(r.dimms)
                if dpa < used[d] or dpa + share > self.dimms[d].size:
                    raise InvalidPlatform(f"region[{i}] overlaps another on dimm {d}")
                if self.dimms[d].bus != r.bus:
                    raise InvalidPlatform(f"region[{i}] on bus {r.bus} has dimm {d} of bus {self.dimms[d].bus}")
                used[d] = dpa + share
        mm = self.memmap
        if not isinstance(mm, MemmapSettings) or mm.mode not in ("async", "sync"):
            raise InvalidPlatform(f"memmap = {mm!r}")
        if mm.workers is not None:
            count(mm.workers, "memmap.workers", MAX_WORKERS)
        count(mm.ns_per_page, "memmap.ns_per_page", MAX_NS_PER_PAGE)
        count(mm.pause_at, "memmap.pause_at", 1000)
        if mm.pause_at < 1000 and mm.mode == "sync":
            raise InvalidPlatform("memmap.pause_at with mode sync")

    def shape(self) -> tuple[object, ...]:
        """What a config must agree with to be used on existing media."""
        return (self.template, [(r.size, r.numa_node, r.dimms) for r in self.regions], [d.size for d in self.dimms],
                [(h.size, h.numa_node) for h in self.hmem])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Platform:
        try:
            doc = json.loads(text)
            mm = memmap_record(doc)
            hmem = tuple(HmemRecord(**h) for h in doc.get("hmem", ()))
            if doc["template"] in MODULE_TEMPLATES:
                # the module's tables are fixed: only the run-time settings come from the record
                buses, nt_dimms, nt_regions = nfit_test_platform()
                return cls(doc["template"], nt_regions, nt_dimms, mm, buses=buses, hmem=hmem)
            dimms = tuple(DimmRecord(**d) for d in doc.get("dimms", ()))
            regions = []
            for r in doc["regions"]:
                fields = dict(r)
                fields["dimms"] = tuple(tuple(m) for m in r.get("dimms", ()))
                fields["region_offsets"] = tuple(r.get("region_offsets", ()))
                record = RegionRecord(**fields)
                if "cookie2" not in r:  # written before the NFIT cookies: compute them, and keep
                    # the cookie the JSON label files of that time carry (to migrate them)
                    record = replace(with_cookies(record, dimms), json_label_cookie=record.set_cookie)
                regions.append(record)
            buses = tuple(BusRecord(**{**b, "test_dimms": tuple(b.get("test_dimms", ()))})
                          for b in doc.get("buses", ()))
            return cls(doc["template"], tuple(regions), dimms, mm, buses=buses, hmem=hmem)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{source}: damaged platform record ({e!r}); move it away to start afresh") from None


def memmap_record(doc: dict[str, object]) -> MemmapSettings:
    """The memmap settings of a platform record: its "memmap" object. Records written before
    it existed hold them as top-level keys, read as memmap_mode -> mode, memmap_workers ->
    workers, ns_per_page -> ns_per_page."""
    memmap = doc.get("memmap")
    if memmap is None:
        memmap = {"mode": doc.get("memmap_mode", "async"), "workers": doc.get("memmap_workers"),
                  "ns_per_page": doc.get("ns_per_page", 0)}
    if not isinstance(memmap, dict):
        raise TypeError(f"memmap is {type(memmap).__name__}, not an object")
    return MemmapSettings(**memmap)


class InvalidPlatform(ValueError):
    """A platform record that cannot describe a machine; the message says which field."""
