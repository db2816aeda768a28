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

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vnvdimm import safe_files
from vnvdimm.model import drivers
from vnvdimm.model.base import Attr, Device, Driver, align_up
from vnvdimm.model.bus import NFIT_BUS_COMMANDS, NvdimmBus
from vnvdimm.model.commands import platform as firmware
from vnvdimm.model.dimm import NfitIdentity, Nvdimm
from vnvdimm.model.hmem import HmemRegion
from vnvdimm.model.label_area import NFIT_TEST_LABEL_SIZE, NFIT_TEST_MAX_XFER, LabelArea
from vnvdimm.model.label_format import DimmLabelData, InterleaveSet, InterleaveSetLabels, LabelMapping, ScannedNamespace
from vnvdimm.model.labels import DimmLabels, InterleaveLabels
from vnvdimm.model.media import Media
from vnvdimm.model.namespace import Namespace
from vnvdimm.model.nfit_iset import DcrIdentity, SetMember, interleave_set
from vnvdimm.model.nfit_test_dimm import NfitTestDimm
from vnvdimm.model.region import Mapping, Region
from vnvdimm.model.system import MemmapSettings, System
from vnvdimm.safe_files import write_atomically
from vnvdimm.topology import cxl_test, nfit_test
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
    NamespaceConfig,
    TopologyConfig,
    default_config,
    format_size,
)

if TYPE_CHECKING:
    from vnvdimm.memmap import MemmapEngine

log = logging.getLogger("vnvdimm.topology")

PLATFORM_FILE = "platform.json"
TEMPLATES = ("e820", "nfit", "nfit_test", "cxl_test")
MODULE_TEMPLATES = ("nfit_test", "cxl_test")  # the module tables of nfit_test (cxl_test: and cxl_test's)
PERSISTENCE_DOMAINS = (None, "", "memory_controller", "cpu_cache")  # None: the template's default
U8, U16, U32, U64 = (1 << 8) - 1, (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "vnvdimm"


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
    vendor: int = 0x8089
    device: int = 0x0979
    revision: int = 0x0001
    mfg_location: int = 0xA2
    mfg_date: int = 0x1740
    format: int = 0x0301
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


def damaged(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path}: damaged platform record ({what}); move it away to start afresh")


class StateDir:
    """The state dir, and every file in it opened relative to one directory descriptor.

    The descriptor comes from a walk from / that checks every ancestor (safe_files: owned by
    root or the user, not writable by others, no symbolic link met); after it, no name of the
    state dir is looked up from / again, so renaming or swapping a directory above it (for a
    symbolic link, say) changes nothing: the lock, the platform record, the media, the label
    areas, .provisioning and the log are the ones in the directory that was checked. The
    `*_path` properties are for messages."""

    def __init__(self, path: Path, *, sync_each_label_write: bool = True, dir_fd: int | None = None) -> None:
        """`sync_each_label_write` False: label areas reach the disk when the machine closes
        them (an installer's state dir, used by nothing until it is complete). `dir_fd`: the
        directory, already open (a subdirectory of a state dir)."""
        self.path = path
        self.sync_each_label_write = sync_each_label_write
        self._fd = dir_fd
        self._labels_fd: int | None = None

    @property
    def fd(self) -> int:
        """The state dir's descriptor, opened by a checked walk on first use (see safe_files)."""
        if self._fd is None:
            try:
                self._fd, _ = safe_files.open_checked_dir(safe_files.canonical(self.path), "state dir", create=True)
            except safe_files.UnsafeStateDir as e:
                raise ConfigError(str(e)) from None
            except OSError as e:
                raise ConfigError(f"{self.path}: cannot create the state dir: {e.strerror}") from None
        return self._fd

    @property
    def labels_fd(self) -> int:
        """labels/, opened relative to the state dir (created 0700 if missing)."""
        if self._labels_fd is None:
            self._labels_fd = _subdir(self.fd, "labels")
        return self._labels_fd

    def subdir(self, name: str, *, sync_each_label_write: bool = True) -> StateDir:
        """A directory inside this one (created 0700 if missing) as a StateDir of its own."""
        return StateDir(self.path / name, sync_each_label_write=sync_each_label_write,
                        dir_fd=_subdir(self.fd, name))

    def close(self) -> None:
        for fd in (self._labels_fd, self._fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._labels_fd = None

    # The descriptors are this object's alone (a subdir's too): a StateDir that is dropped
    # closes them, so a process that opens many (the test bed, provisioning's work dir, a
    # test suite) does not run out of descriptors.
    __del__ = close

    def has(self, name: str, dir_fd: int | None = None) -> bool:
        """Whether `name` exists in the state dir (or in `dir_fd`), a link included."""
        try:
            os.stat(name, dir_fd=self.fd if dir_fd is None else dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def media_path(self, index: int) -> Path:
        return self.path / f"region{index}.media"

    def label_path(self, dimm: int) -> Path:
        return self.path / "labels" / f"nmem{dimm}.json"

    def label_area_path(self, dimm: int) -> Path:
        return self.path / "labels" / f"nmem{dimm}.lsa"

    def open_media(self, index: int, size: int) -> Media:
        return Media(self.media_path(index), size, dir_fd=self.fd)

    def dimm_labels(self, dimm: int) -> DimmLabels:
        """DIMM `dimm`'s namespaces as the JSON of old state dirs."""
        return DimmLabels(self.label_path(dimm), dir_fd=self.labels_fd)

    def label_area(self, dimm: int, size: int, max_xfer: int, fill: bytes = b"") -> LabelArea:
        """DIMM `dimm`'s label storage area, created (`fill`, then zeroes) on first use."""
        path = self.label_area_path(dimm)
        try:
            if not self.has(path.name, self.labels_fd):
                return LabelArea.create(path, size, max_xfer, fill, sync_each_write=self.sync_each_label_write,
                                        dir_fd=self.labels_fd)
            return LabelArea(path, size, max_xfer, sync_each_write=self.sync_each_label_write, dir_fd=self.labels_fd)
        except ValueError as e:
            raise ConfigError(f"{e}: move it away to start that DIMM's labels afresh") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot open the label area: {e.strerror}") from None

    def open_file(self, path: Path, flags: int) -> int:
        """os.open of a file at the top of the state dir (the lock, the log): relative to its
        descriptor, never through a symbolic link, created 0600."""
        return safe_files.open_private(path, flags, self.fd)

    def write_platform(self, platform: Platform) -> None:
        write_atomically(self.platform_path, platform.to_json().encode(), dir_fd=self.fd)

    @property
    def platform_path(self) -> Path:
        return self.path / PLATFORM_FILE

    @property
    def log_path(self) -> Path:
        return self.path / "vnvdimm.log"

    @property
    def provisioning_path(self) -> Path:
        return self.path / PROVISIONING_DIR

    def ensure(self) -> None:
        """Create the state dir (0700) or check that it is private (see safe_files), and finish
        or undo a provisioning that was interrupted."""
        try:
            safe_files.check_private_tree(self.path, self.fd)
        except safe_files.UnsafeStateDir as e:
            raise ConfigError(str(e)) from None
        self.labels_fd  # noqa: B018 (created if missing)
        if self.has(PROVISIONING_DIR):
            work = self.subdir(PROVISIONING_DIR)
            try:
                complete = self.has(PROVISIONING_COMPLETE, work.fd)
            finally:
                work.close()
            if complete:
                log.info("%s: finishing an interrupted provisioning", self.path)
                self.install_provisioned()
            else:
                log.info("%s: discarding an interrupted provisioning", self.path)
                shutil.rmtree(PROVISIONING_DIR, dir_fd=self.fd)

    def open(self, config: TopologyConfig | None) -> tuple[Platform, TopologyConfig | None]:
        """The platform of this state dir, or a new one from `config` (or the default) on first
        use. Returns the platform and the config to provision missing media with; a new
        platform's record is written by `provision`, with its media, all or nothing."""
        self.ensure()
        if self.has(PLATFORM_FILE):
            platform = self.read_platform()
            if config is not None:
                wanted = checked(Platform.from_config(config), config)
                if wanted.shape() != platform.shape():
                    raise ConfigError(
                        f"{config.source}: does not match the platform already in {self.path} "
                        f"({describe(platform)} there, {describe(wanted)} in the config); "
                        "use another --state-dir, or remove that one to start afresh")
                # Memmap settings are run-time knobs: the config's win.
                platform = wanted
                self.write_platform(platform)
            return platform, config
        leftovers = sorted(n for n in os.listdir(self.fd) if re.fullmatch(r"region.*\.media", n)) + sorted(
            f"labels/{n}" for n in os.listdir(self.labels_fd))
        if leftovers:
            raise ConfigError(f"{self.path}: has {', '.join(leftovers[:4])}{' ...' if len(leftovers) > 4 else ''} "
                              f"but no {PLATFORM_FILE} to say what they are; put the record back, or move "
                              "them away too to start afresh")
        config = config or default_config()
        return checked(Platform.from_config(config), config), config

    def read_platform(self) -> Platform:
        """The platform record, refused with a message naming it if it cannot describe a machine."""
        try:
            text = safe_files.read_private(self.platform_path, self.fd).decode()
        except UnicodeDecodeError:
            raise damaged(self.platform_path, "not text") from None
        except OSError as e:
            raise ConfigError(f"{self.platform_path}: cannot read the platform record: {e.strerror}") from None
        platform = Platform.from_json(text, str(self.platform_path))
        try:
            platform.validate()
        except InvalidPlatform as e:
            raise damaged(self.platform_path, str(e)) from None
        return platform

    def install_provisioned(self) -> None:
        """Move a complete provisioning into place: labels, then media, the record last (its
        presence says the platform is whole). Renaming again after a crash is harmless, and a
        hard link of media that already existed renames onto itself: nothing happens."""
        work = self.subdir(PROVISIONING_DIR)
        try:
            if self.has("labels", work.fd):
                for label in sorted(os.listdir(work.labels_fd)):
                    os.rename(label, label, src_dir_fd=work.labels_fd, dst_dir_fd=self.labels_fd)
                    if label.endswith(MIGRATED):  # the boot moved JSON labels into the label areas
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(label.removesuffix(MIGRATED), dir_fd=self.labels_fd)
                safe_files.fsync_dir(self.path / "labels", self.labels_fd)
            for media in sorted(n for n in os.listdir(work.fd) if re.fullmatch(r"region.*\.media", n)):
                os.rename(media, media, src_dir_fd=work.fd, dst_dir_fd=self.fd)
            if self.has(PLATFORM_FILE, work.fd):
                os.rename(PLATFORM_FILE, PLATFORM_FILE, src_dir_fd=work.fd, dst_dir_fd=self.fd)
        finally:
            work.close()
        safe_files.fsync_dir(self.path, self.fd)
        shutil.rmtree(PROVISIONING_DIR, dir_fd=self.fd)
        safe_files.fsync_dir(self.path, self.fd)


def _subdir(dir_fd: int, name: str) -> int:
    """Open directory `name` in `dir_fd` (made 0700 if missing), never through a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, safe_files.DIR_MODE, dir_fd=dir_fd)
    return os.open(name, safe_files.DIR_FLAGS, dir_fd=dir_fd)


PROVISIONING_DIR = ".provisioning"
PROVISIONING_COMPLETE = "complete"
MIGRATED = ".migrated"  # the suffix JSON label files of old state dirs keep once migrated


def checked(platform: Platform, config: TopologyConfig) -> Platform:
    """A platform made from a config that passed validation is valid; should the two ever
    disagree, the mount stops here with a message instead of writing a record no later mount
    accepts."""
    try:
        platform.validate()
    except InvalidPlatform as e:
        raise ConfigError(f"{config.source}: cannot be laid out as a platform ({e})") from None
    return platform


def describe(p: Platform) -> str:
    regions = ", ".join(format_size(r.size) for r in p.regions)
    return f"{p.template} with regions of {regions}"


# ---------------------------------------------------------------- building the machine


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


def migrate_json_labels(platform: Platform, state: StateDir, dimms: list[Nvdimm]) -> None:
    """State dirs of vnvdimm before label areas kept each DIMM's namespaces as JSON
    (labels/nmemN.json). Their namespaces are written into the label areas as the kernel
    writes labels, then the JSON files are kept as nmemN.json.migrated."""
    paths = [state.label_path(i) for i in range(len(dimms))]
    if not any(state.has(p.name, state.labels_fd) for p in paths):
        return
    data = {i: DimmLabelData(d.label_area) for i, d in enumerate(dimms) if d.label_area is not None}
    for r in platform.regions:
        if not r.dimms:
            continue
        old = InterleaveLabels([(state.dimm_labels(d), dpa) for d, dpa in r.dimms], r.json_label_cookie).load()
        if not old:
            continue
        share = r.size // len(r.dimms)
        labels = InterleaveSetLabels([LabelMapping(data[d], dpa, share) for d, dpa in r.dimms],
                                     InterleaveSet(r.set_cookie, r.cookie2, r.altcookie))
        for ns in old:
            labels.update(ScannedNamespace(ns.uuid, ns.name.encode("utf-8", "surrogateescape"), ns.offset, ns.size,
                                           ns.lbasize, ""))
            log.info("migrated namespace %s (%s) into the label areas", ns.uuid, format_size(ns.size))
    for p in paths:
        if state.has(p.name, state.labels_fd):
            os.replace(p.name, p.name + MIGRATED, src_dir_fd=state.labels_fd, dst_dir_fd=state.labels_fd)


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


def provision(platform: Platform, state: StateDir, config: TopologyConfig) -> list[int]:
    """Create the media of regions that have none (every region of a new platform) and format
    them as `config` says. All or nothing: the work happens in a directory of its own inside
    the state dir and moves into place once complete, so a failed or interrupted provisioning
    leaves nothing a later mount would take for a platform (see StateDir.ensure).
    Returns the indexes of the regions it created."""
    new_record = not state.has(PLATFORM_FILE)
    created = [i for i in range(len(platform.regions))
               if new_record or not state.has(state.media_path(i).name)]
    if not created:
        return []
    # Label writes are made durable once, when the installer's machine closes (before the
    # completion mark), not one by one: nothing sees them before they are installed, and a
    # crash throws the whole work away. (One fdatasync per label write was most of the time.)
    work = state.subdir(PROVISIONING_DIR, sync_each_label_write=False)
    try:
        for i, r in enumerate(platform.regions):
            name = state.media_path(i).name
            if i in created:
                create_media(work.media_path(i), r.size, work.fd)
            else:  # read by the boot, not written
                os.link(name, name, src_dir_fd=state.fd, dst_dir_fd=work.fd, follow_symlinks=False)
        # The label areas of DIMMs that exist are copied: a new region's namespaces are written
        # into them beside those of the regions already there.
        for d in range(len(platform.dimms)):
            for path, copy in ((state.label_area_path(d), work.label_area_path(d)),
                               (state.label_path(d), work.label_path(d))):
                if state.has(path.name, state.labels_fd):
                    write_atomically(copy, safe_files.read_private(path, state.labels_fd), dir_fd=work.labels_fd)
        format_regions(platform, work, config, created)
        safe_files.fsync_dir(work.path / "labels", work.labels_fd)  # the label areas it created
        if new_record:
            work.write_platform(platform)
        write_atomically(work.path / PROVISIONING_COMPLETE, b"", dir_fd=work.fd)
    except BaseException:
        shutil.rmtree(PROVISIONING_DIR, dir_fd=state.fd, ignore_errors=True)
        raise
    finally:
        work.close()
    state.install_provisioned()
    return created


def create_media(path: Path, size: int, dir_fd: int | None = None) -> None:
    try:
        Media.create(path, size, dir_fd=dir_fd)
    except OSError as e:
        hint = {errno.EFBIG: "the file system of the state dir cannot hold a file that large (ext4: 16T); "
                             "put the state dir on one that can (xfs, btrfs, tmpfs) or use smaller regions",
                errno.ENOSPC: "the file system of the state dir is full",
                errno.EDQUOT: "your disk quota is used up"}.get(e.errno or 0, "")
        raise ConfigError(f"{path.parent.parent / path.name}: cannot create {format_size(size)} of media: "
                          f"{e.strerror}{'; ' + hint if hint else ''}") from None


def format_regions(platform: Platform, state: StateDir, config: TopologyConfig, created: list[int]) -> None:
    """Boot the platform without serving it (the installer's boot: no memmap engine) and make
    the namespaces `config` asks for in the regions in `created`."""
    with boot(platform, state) as system, system.lock:
        regions = [r for bus in system.buses for r in bus.regions]
        for i in created:
            region = regions[i]
            if i >= len(config.regions):
                continue  # a template's region (nfit_test): fresh media, nothing on it
            rcfg = config.regions[i]
            if region.iset is None:
                with refused(config, f"region[{i}].namespace"):
                    apply_mode(region.namespaces[0], rcfg.namespaces[0])
            else:
                for j, nscfg in enumerate(rcfg.namespaces):
                    with refused(config, f"region[{i}].namespaces[{j}]"):
                        ns = create_labelled_namespace(region, nscfg)
                        apply_mode(ns, nscfg)
            log.info("provisioned %s (%s)", region.name, format_size(region.size))


@contextlib.contextmanager
def refused(config: TopologyConfig, key: str) -> Iterator[None]:
    """A namespace the model refuses (as the kernel would refuse ndctl) is an error in the
    config, naming the key, not a traceback. (Validation rules out what it can foresee.)"""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        raise ConfigError(f"{config.source}: {key}: cannot be created: "
                          f"{reason if name in reason else f'{reason} ({name})'}") from None


def attach(dev: Device, driver: Driver) -> None:
    """bind_store() for a device in hand (no lookup by name through every device)."""
    if not dev.system.match(driver, dev):
        raise OSError(errno.ENODEV, f"{driver.name} does not match {dev.name}")
    dev.system.driver_attach(driver, dev)


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
    attach(seed, system.nd_drivers["nd_pmem"])
    return seed


def apply_mode(ns: Device, cfg: NamespaceConfig) -> None:
    """What `ndctl create-namespace -e <ns> -m <mode> -f` does, minus the info-block wipe
    (the media is fresh)."""
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
    attach(dev, driver)
