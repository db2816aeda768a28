"""`vnvdimm status --map`: each region's capacity drawn in the terminal.

One bar per region over its address range, a cell per 1/WIDTH of it: each namespace's extent
in the glyph of its mode, starting with a `|` where it is wide enough, free extents as dots;
under it, for the namespaces whose memmap is being initialized, how far it got over the same
range. Then a legend (glyph, namespace, mode, size,
offset in the region, memmap progress), the free extents, and the region's seeds: the idle
devices the next `ndctl create-namespace` configures. Read through the mounted sysfs tree
(client.py), like the rest of `status`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vnvdimm.client import NamespaceInfo, RegionInfo, Root, Status, human_size, read_attr, read_int

MODE_GLYPHS = {"fsdax": "█", "devdax": "▓", "sector": "▒", "raw": "░"}
BOUNDARY_GLYPH = "|"
FREE_GLYPH = "·"
DONE_GLYPH = "━"
PENDING_GLYPH = "╌"
SEEDS = ("namespace_seed", "pfn_seed", "dax_seed", "btt_seed")


@dataclass
class Extent:
    start: int  # offset in the region, bytes
    size: int
    namespace: NamespaceInfo | None  # None: free


def region_dir(root: Root, region: str) -> Path:
    return Path(os.path.realpath(root.nd_devices / region))


def extents(root: Root, region: RegionInfo) -> list[Extent]:
    """The region's namespaces by their address (`resource`), and the gaps between them."""
    rdir = region_dir(root, region.dev)
    base = read_int(rdir / "resource") or 0
    size = region.size or 0
    placed = []
    for ns in region.namespaces:
        start = read_int(rdir / ns.dev / "resource")
        size_on_media = read_int(rdir / ns.dev / "size")  # the whole extent (ns.size: what its mode makes usable)
        if start is None or not size_on_media:
            continue
        placed.append(Extent(start - base, size_on_media, ns))
    placed.sort(key=lambda e: e.start)
    out, at = [], 0
    for e in placed:
        if e.start > at:
            out.append(Extent(at, e.start - at, None))
        out.append(e)
        at = max(at, e.start + e.size)
    if at < size:
        out.append(Extent(at, size - at, None))
    return out


def _cells(start: int, size: int, total: int, width: int) -> tuple[int, int]:
    """The cells [a, b) an extent covers (at least one, so a small namespace is still seen)."""
    a = start * width // total
    b = max(a + 1, -(-(start + size) * width // total))
    return a, min(b, width)


def region_map(root: Root, region: RegionInfo, width: int) -> list[str]:
    total = region.size or 0
    rdir = region_dir(root, region.dev)
    base = read_int(rdir / "resource")
    where = f"  {base:#x}-{base + total - 1:#x}" if base is not None and total else ""
    head = f"{region.dev}  {human_size(total)}{where}"
    if region.numa_node is not None:
        head += f"  node {region.numa_node}"
    if not total:
        return [head, "  (no capacity)"]
    bar = [FREE_GLYPH] * width
    progress = [" "] * width
    legend, free = [], []
    for e in extents(root, region):
        a, b = _cells(e.start, e.size, total, width)
        if e.namespace is None:
            free.append(f"{human_size(e.size)} at +{e.start:#x}")
            continue
        ns = e.namespace
        glyph = MODE_GLYPHS.get(ns.mode, "#")
        for i in range(a, b):
            bar[i] = glyph
        if b - a >= 2:
            bar[a] = BOUNDARY_GLYPH
        line = f"  {glyph} {ns.dev}  {ns.mode}{f' map={ns.map}' if ns.map else ''}  {human_size(e.size)}  " \
               f"at +{e.start:#x}"
        mm = ns.memmap
        if mm is not None and mm.pages_total:
            done = a + (b - a) * mm.pages_done // mm.pages_total
            if mm.active:
                for i in range(a, b):
                    progress[i] = DONE_GLYPH if i < done else PENDING_GLYPH
            line += f"  memmap {mm.device} {mm.state} {mm.fraction * 100:.1f}%"
        legend.append(line)
    used = sorted({g for g in bar if g in MODE_GLYPHS.values()}, key=list(MODE_GLYPHS.values()).index)
    modes = {g: m for m, g in MODE_GLYPHS.items()}
    lines = [head, "  " + "".join(bar) + "   " + "  ".join(f"{g} {modes[g]}" for g in used)]
    if any(c != " " for c in progress):
        lines.append("  " + "".join(progress).rstrip() + f"   memmap {DONE_GLYPH} done {PENDING_GLYPH} to go")
    lines += legend
    if free:
        lines.append(f"  {FREE_GLYPH} free: " + ", ".join(free))
    seeds = [s for s in (read_attr(rdir / name) for name in SEEDS) if s]
    if seeds:
        lines.append("  seeds: " + " ".join(seeds))
    return lines


def status_map(status: Status, width: int = 64) -> str:
    out = []
    for bus in status.buses:
        out.append(f"{bus.dev}  provider {bus.provider}")
        for region in bus.regions:
            out += region_map(status.root, region, width)
    return "\n".join(out) + "\n"
