"""The topology config file (TOML): parsing and validation with messages that name the
file, the key and what is wrong. docs/config.md lists the public keys."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vnvdimm.model.base import SUPPORTED_ALIGNMENTS
from vnvdimm.model.host_memory import HostMemory, format_bytes
from vnvdimm.model.infoblock import ARENA_MIN_SIZE, BTT_SECTOR_SIZES, PFN_MODE_PMEM, PFN_MODE_RAM, pfn_geometry
from vnvdimm.model.label_area import NFIT_TEST_LABEL_SIZE
from vnvdimm.model.label_layout import num_label_slots
from vnvdimm.model.region import default_align
from vnvdimm.model.system import MemmapSettings

MODES = ("raw", "fsdax", "devdax", "sector")
MAPS = ("mem", "dev")
MIN_REGION = 32 << 20
REGION_GRANULE = 16 << 20
# The ranges below are the one source for the config's validation, the platform record's
# (Platform.validate) and docs/config.md (tested against them).
# Worker slots the memmap engine's block map can name (its MAX_WORKERS; a test holds the two
# equal: importing the engine here would load numpy into every command, umount included).
MAX_WORKERS = 251
MAX_NUMA_NODE = 1023  # MAX_NUMNODES - 1 (NODES_SHIFT 10)
MAX_NS_PER_PAGE = 10**9  # one second a page
SPA_BASE = 16 << 30  # where the first region sits in the physical address space
SPA_ALIGN = 1 << 30  # regions start 1 GiB apart
# x86_64's physical address space with 4-level paging (MAX_PHYSMEM_BITS 46): every region must
# end below it, so the largest single region is 64 TiB - 16 GiB.
SPA_LIMIT = 1 << 46
# soft-reserved memory ([[hmem]]) lies above the pmem's address space, 1 GiB-aligned
HMEM_BASE = SPA_LIMIT
HMEM_GRANULE = 2 << 20  # PMD_SIZE: the dax region's alignment
MAX_HMEM = 1 << 40
MAX_REGION = SPA_LIMIT - SPA_BASE  # also the largest DIMM
MAX_DIMMS = 1024
# A namespace takes one label on each DIMM of its region. A fresh label area (128K) is given
# v1.2 labels of 256 bytes: 510 slots, one of which must stay free, since an update writes the
# new label before it frees the old one (the kernel's -ENXIO "no free label slot" otherwise).
LABEL_AREA_SIZE = NFIT_TEST_LABEL_SIZE
MAX_NAMESPACES_PER_DIMM = num_label_slots(LABEL_AREA_SIZE, 256) - 1


class ConfigError(ValueError):
    """A config (or state dir) that cannot be used; the message says where and why."""


KERNEL_SPACE = " \t\n\v\f\r"  # isspace() of the kernel's ctype

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: object) -> int:
    """'8G', '512M', '2MiB', '4k' or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"a size like '8G', not {type(value).__name__}")
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtTpP]?)(?:i?[bB])?\s*", value)
    if not m:
        raise ValueError(f"{value!r} is not a size like '8G' or '512M'")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size and size % _UNITS[unit.lower()] == 0:
            return f"{size // _UNITS[unit.lower()]}{unit}"
    return str(size)


@dataclass(frozen=True)
class NamespaceConfig:
    mode: str = "raw"
    map: str = "dev"
    align: int = 2 << 20
    sector_size: int = 4096
    size: int = 0  # nfit only
    name: str = ""


@dataclass(frozen=True)
class RegionConfig:
    size: int
    numa_node: int = 0
    dimms: tuple[int, ...] = ()
    namespaces: tuple[NamespaceConfig, ...] = ()


@dataclass(frozen=True)
class HmemConfig:
    """[[hmem]]: a range of soft-reserved memory (dax_hmem), any template."""

    size: int
    numa_node: int = 0


@dataclass(frozen=True)
class TopologyConfig:
    template: str
    regions: tuple[RegionConfig, ...]
    dimms: tuple[int, ...] = ()
    memmap: MemmapSettings = field(default_factory=MemmapSettings)
    source: str = "<built-in default>"
    hmem: tuple[HmemConfig, ...] = ()


DEFAULT_TOML = """\
template = "e820"

[[region]]
size = "8G"
numa_node = 0
namespace = { mode = "fsdax", map = "dev", align = "2M" }

[[region]]
size = "8G"
numa_node = 0
namespace = { mode = "devdax", map = "mem", align = "2M" }
"""


def default_config() -> TopologyConfig:
    return parse_config(tomllib.loads(DEFAULT_TOML), "<built-in default>")


def load_config(path: str | os.PathLike[str]) -> TopologyConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: not UTF-8 text (byte {e.start})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(doc, str(p))


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def table(self, value: object, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, not {type(value).__name__}")
        return value

    def unknown(self, table: dict[str, Any], allowed: set[str], key: str) -> None:
        extra = sorted(set(table) - allowed)
        if extra:
            prefix = f"{key}." if key else ""
            raise self.fail(f"{prefix}{extra[0]}", f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def size(self, value: object, key: str) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            raise self.fail(key, str(e)) from None

    def int_(self, value: object, key: str, lo: int = 0, hi: int = 1 << 62) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(key, f"must be an integer from {lo} to {hi}, not {value!r}")
        return value

    def choice(self, value: object, key: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    def namespace(self, value: object, key: str, nfit: bool) -> NamespaceConfig:
        t = self.table(value, key)
        allowed = {"mode", "map", "align", "sector_size", "name"} | ({"size"} if nfit else set())
        self.unknown(t, allowed, key)
        mode = self.choice(t.get("mode", "raw"), f"{key}.mode", MODES)
        nsmap = self.choice(t.get("map", "dev"), f"{key}.map", MAPS)
        align = self.size(t.get("align", "2M"), f"{key}.align")
        if align not in SUPPORTED_ALIGNMENTS:
            raise self.fail(f"{key}.align", "must be 4K, 2M or 1G")
        sector = self.int_(t.get("sector_size", 4096), f"{key}.sector_size", 0)
        if sector not in BTT_SECTOR_SIZES:
            raise self.fail(f"{key}.sector_size", f"must be one of {', '.join(map(str, BTT_SECTOR_SIZES))}")
        size = self.size(t["size"], f"{key}.size") if "size" in t else 0
        if nfit and (size == 0 or size % REGION_GRANULE):
            raise self.fail(f"{key}.size", "must be a non-zero multiple of 16M")
        name = t.get("name", "")
        if not isinstance(name, str) or len(name.encode()) > 63:
            raise self.fail(f"{key}.name", "must be a string of at most 63 bytes")
        if "\0" in name or name != name.strip(KERNEL_SPACE):
            # the label keeps a C string and alt_name_store() strips the ends (strim())
            raise self.fail(f"{key}.name", "must not hold a NUL or begin or end with white space")
        return NamespaceConfig(mode, nsmap, align, sector, size, name)


    def fits(self, ns: NamespaceConfig, size: int, key: str) -> None:
        """Whether the model can lay the mode out in `size` bytes (its own arithmetic, the
        kernel's): a pfn/dax info block, memmap and alignment padding, or a BTT arena."""
        if ns.mode == "sector" and size - BTT_INFO_OFFSET < ARENA_MIN_SIZE:
            raise self.fail(key, f"too small for sector mode (a BTT arena needs {format_size(ARENA_MIN_SIZE)} "
                                 "after its 4K info block)")
        if ns.mode in ("fsdax", "devdax"):
            mode = PFN_MODE_PMEM if ns.map == "dev" else PFN_MODE_RAM
            if pfn_geometry(SPA_BASE, size, mode, ns.align) is None:
                raise self.fail(key, f"{format_size(size)} cannot hold a {ns.mode} device with align "
                                     f"{format_size(ns.align)} (info block, memmap and padding): use a smaller "
                                     "align or a larger size")


BTT_INFO_OFFSET = 4096  # the BTT arena starts after the first 4 KiB of the namespace


def parse_config(doc: dict[str, Any], source: str) -> TopologyConfig:
    c = _Checker(source)
    c.unknown(doc, {"template", "memmap", "region", "dimm", "hmem"}, "")
    template = c.choice(doc.get("template", "e820"), "template", ("e820", "nfit", "nfit_test", "cxl_test"))
    nfit = template == "nfit"

    mm = c.table(doc.get("memmap", {}), "memmap")
    c.unknown(mm, {"mode", "workers", "ns_per_page", "pause_at"}, "memmap")
    memmap = MemmapSettings(
        mode=c.choice(mm.get("mode", "async"), "memmap.mode", ("async", "sync")),
        workers=c.int_(mm["workers"], "memmap.workers", 0, MAX_WORKERS) if "workers" in mm else None,
        ns_per_page=c.int_(mm.get("ns_per_page", 0), "memmap.ns_per_page", 0, MAX_NS_PER_PAGE),
        pause_at=c.int_(mm.get("pause_at", 1000), "memmap.pause_at", 0, 1000),
    )
    if memmap.pause_at < 1000 and memmap.mode == "sync":
        raise c.fail("memmap.pause_at", "holds the background init, which mode = \"sync\" does not have "
                                        "(enabling would never return): use mode = \"async\"")

    raw_hmem = doc.get("hmem", [])
    if not isinstance(raw_hmem, list):
        raise c.fail("hmem", "must be an array of tables ([[hmem]])")
    hmem: list[HmemConfig] = []
    for i, h in enumerate(raw_hmem):
        t = c.table(h, f"hmem[{i}]")
        c.unknown(t, {"size", "numa_node"}, f"hmem[{i}]")
        size = c.size(t.get("size"), f"hmem[{i}].size")
        if size < MIN_REGION or size % HMEM_GRANULE or size > MAX_HMEM:
            raise c.fail(f"hmem[{i}].size", f"must be a multiple of 2M from 32M to {format_size(MAX_HMEM)}")
        hmem.append(HmemConfig(size, c.int_(t.get("numa_node", 0), f"hmem[{i}].numa_node", 0, MAX_NUMA_NODE)))

    if template in ("nfit_test", "cxl_test"):
        # the platform of the kernel's nfit_test module (cxl_test: and of its cxl_test module
        # beside it): their tables say what is there
        for key in ("region", "dimm"):
            if key in doc:
                raise c.fail(key, f"template = \"{template}\" has the modules' fixed DIMMs and regions")
        return TopologyConfig(template, (), (), memmap, source, tuple(hmem))

    dimms: list[int] = []
    raw_dimms = doc.get("dimm", [])
    if not isinstance(raw_dimms, list):
        raise c.fail("dimm", "must be an array of tables ([[dimm]])")
    if raw_dimms and not nfit:
        raise c.fail("dimm", "DIMMs exist only with template = \"nfit\"")
    if len(raw_dimms) > MAX_DIMMS:
        raise c.fail("dimm", f"at most {MAX_DIMMS} DIMMs, not {len(raw_dimms)}")
    for i, d in enumerate(raw_dimms):
        t = c.table(d, f"dimm[{i}]")
        c.unknown(t, {"size"}, f"dimm[{i}]")
        size = c.size(t.get("size"), f"dimm[{i}].size")
        if size < MIN_REGION or size % REGION_GRANULE or size > MAX_REGION:
            raise c.fail(f"dimm[{i}].size", f"must be a multiple of 16M from 32M to {format_size(MAX_REGION)}")
        dimms.append(size)

    raw_regions = doc.get("region", [])
    if not isinstance(raw_regions, list) or not raw_regions:
        raise c.fail("region", "at least one [[region]] is needed")
    regions: list[RegionConfig] = []
    used = [0] * len(dimms)
    labels = [0] * len(dimms)
    spa = SPA_BASE
    for i, r in enumerate(raw_regions):
        key = f"region[{i}]"
        t = c.table(r, key)
        if nfit:
            c.unknown(t, {"size", "numa_node", "dimms", "namespaces"}, key)
            members = t.get("dimms", list(range(len(dimms))))
            if not isinstance(members, list) or not members or any(
                    isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < len(dimms) for m in members):
                raise c.fail(f"{key}.dimms", f"must list DIMM indexes from 0 to {len(dimms) - 1}")
            if len(set(members)) != len(members):
                raise c.fail(f"{key}.dimms", "lists a DIMM twice")
            free = min(dimms[m] - used[m] for m in members)
            share = c.size(t["size"], f"{key}.size") // len(members) if "size" in t else free
            if share <= 0 or share > free or share % REGION_GRANULE:
                raise c.fail(f"{key}.size",
                             f"each DIMM's share must be a multiple of 16M and fit ({format_size(free)} free)")
            for m in members:
                used[m] += share
            size = share * len(members)
            raw_ns = t.get("namespaces", [])
            if not isinstance(raw_ns, list):
                raise c.fail(f"{key}.namespaces", "must be an array of tables")
            nss = tuple(c.namespace(n, f"{key}.namespaces[{j}]", True) for j, n in enumerate(raw_ns))
            if sum(n.size for n in nss) > size:
                raise c.fail(f"{key}.namespaces", f"need more than the region's {format_size(size)}")
            align = default_align(size, len(members))
            for j, n in enumerate(nss):
                c.fits(n, n.size, f"{key}.namespaces[{j}]")
                if n.size % align:
                    raise c.fail(f"{key}.namespaces[{j}].size",
                                 f"must be a multiple of the region's alignment, {format_size(align)} (16M, times "
                                 f"the number of DIMMs, {len(members)}, when they do not divide it)")
            for m in members:
                labels[m] += len(nss)
                if labels[m] > MAX_NAMESPACES_PER_DIMM:
                    raise c.fail(f"{key}.namespaces", f"DIMM {m} would hold {labels[m]} namespace labels; its label "
                                                      f"area has room for {MAX_NAMESPACES_PER_DIMM}: spread them over "
                                                      "more DIMMs")
            regions.append(RegionConfig(size, c.int_(t.get("numa_node", 0), f"{key}.numa_node", 0, MAX_NUMA_NODE),
                                        tuple(members), nss))
        else:
            c.unknown(t, {"size", "numa_node", "namespace"}, key)
            if "size" not in t:
                raise c.fail(f"{key}.size", 'missing: an e820 region needs a size, like "8G"')
            size = c.size(t["size"], f"{key}.size")
            if size < MIN_REGION or size % REGION_GRANULE:
                raise c.fail(f"{key}.size", "must be a multiple of 16M and at least 32M")
            ns = c.namespace(t.get("namespace", {}), f"{key}.namespace", False)
            c.fits(ns, size, f"{key}.namespace")
            regions.append(RegionConfig(size, c.int_(t.get("numa_node", 0), f"{key}.numa_node", 0, MAX_NUMA_NODE),
                                        (), (ns,)))
        # Laid out as Platform.from_config lays them out.
        end = spa + regions[-1].size
        if end > SPA_LIMIT:
            raise c.fail(f"{key}.size", f"the regions up to this one need {format_size(end - SPA_BASE)} of "
                                        f"physical address space; the platform has {format_size(MAX_REGION)}")
        spa = -(-end // SPA_ALIGN) * SPA_ALIGN
    return TopologyConfig(template, tuple(regions), tuple(dimms), memmap, source, tuple(hmem))


def ram_memmap_bytes(config: TopologyConfig) -> int:
    """The host memory the config's `map = "mem"` namespaces take once enabled: 64 bytes of
    struct page per 4 KiB page (1/64 of each namespace), as devm_memremap_pages() takes RAM."""
    total = 0
    for region in config.regions:
        for ns in region.namespaces:
            if ns.mode in ("fsdax", "devdax") and ns.map == "mem":
                total += (ns.size or region.size) // 64
    return total


def host_memory_warnings(config: TopologyConfig, host: HostMemory) -> list[str]:
    """What the config check says about the host's memory: the map=mem memmaps together
    cannot all be enabled on this host (each enable that does not fit fails with ENOMEM)."""
    need = ram_memmap_bytes(config)
    if need <= host.total:
        return []
    return [f"{config.source}: the map = \"mem\" namespaces need {format_bytes(need)} of host memory for their "
            f"memmaps (1/64 of their size) and this host has {format_bytes(host.total)}: the enables that do not "
            "fit will fail with ENOMEM; use map = \"dev\" (the memmap on the media) or smaller namespaces"]
