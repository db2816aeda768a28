"""`vnvdimm status`: the emulated platform as a tree, with a progress bar per active memmap.

Everything here is read from the mounted sysfs tree (``MNT/sys``), the way ndctl reads it,
so it also works on any sysfs root that has the libnvdimm layout (``vnvdimm status /`` inside
``with-vnvdimm``). Nothing is imported from the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PAGE_SIZE = 4096


class NotAMount(RuntimeError):
    """The path given is not a vnvdimm mount (nor a sysfs root with the nd bus)."""


# ---------------------------------------------------------------- reading sysfs


@dataclass(frozen=True)
class Root:
    """Where the sysfs tree and the device files of a platform are."""

    sys: Path
    dev: Path

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> Root:
        p = Path(path)
        if (p / "sys" / "bus" / "nd").is_dir():
            return cls(p / "sys", p / "dev")
        if (p / "bus" / "nd").is_dir():  # a sysfs root itself, e.g. /sys inside with-vnvdimm
            return cls(p, p.parent / "dev" if p.name == "sys" else Path("/dev"))
        if (p / "sys").is_dir() and p != Path("/"):
            raise NotAMount(f"{p}: not a vnvdimm mount (no {p / 'sys' / 'bus' / 'nd'}); is it mounted?")
        raise NotAMount(f"{p}: not a vnvdimm mount (no sys/bus/nd below it)")

    @property
    def nd_devices(self) -> Path:
        return self.sys / "bus" / "nd" / "devices"


def read_attr(path: Path) -> str | None:
    """One attribute, without its trailing newline; None if it cannot be read (ENXIO...)."""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read(4096).decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    text = read_attr(path)
    if text is None or text == "":
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def _numbered(path: Path, prefix: str) -> list[str]:
    pattern = re.compile(rf"{prefix}(\d+)(?:\.(\d+))?")
    try:
        names = [n for n in os.listdir(path) if pattern.fullmatch(n)]
    except OSError:
        return []

    def key(name: str) -> tuple[int, int]:
        m = pattern.fullmatch(name)
        assert m is not None
        return int(m.group(1)), int(m.group(2) or 0)

    return sorted(names, key=key)


def _enabled(dev_dir: Path) -> bool:
    return os.path.islink(dev_dir / "driver")


def badblock_count(text: str | None) -> int:
    count = 0
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            count += int(parts[1])
    return count


@dataclass
class Memmap:
    device: str
    state: str  # active | idle
    pages_done: int
    pages_total: int
    pages_per_sec: int
    elapsed_us: int
    workers: int
    ns_per_page: int
    pause_at: int | None
    state_path: str

    @property
    def active(self) -> bool:
        return self.state == "active"

    @property
    def eta_s(self) -> float | None:
        if not self.active or self.pages_per_sec <= 0:
            return None
        return max(0, self.pages_total - self.pages_done) / self.pages_per_sec

    @property
    def fraction(self) -> float:
        return self.pages_done / self.pages_total if self.pages_total else 1.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("state_path")
        out["eta_s"] = None if self.eta_s is None else round(self.eta_s, 3)
        return out


def read_memmap(dev_dir: Path) -> Memmap | None:
    """The memmap of a pfn/dax device directory, or None if it has none."""
    state = read_attr(dev_dir / "memmap_state")
    if state is None:
        return None
    mm = dev_dir / "memmap"

    def num(name: str) -> int:
        return read_int(mm / name) or 0

    return Memmap(device=dev_dir.name, state=state, pages_done=num("pages_done"), pages_total=num("pages_total"),
                  pages_per_sec=num("pages_per_sec"), elapsed_us=num("elapsed_us"), workers=num("workers"),
                  ns_per_page=num("ns_per_page"), pause_at=read_int(mm / "pause_at"),
                  state_path=str(dev_dir / "memmap_state"))


@dataclass
class NamespaceInfo:
    dev: str
    mode: str  # raw | fsdax | devdax | sector
    size: int | None
    enabled: bool
    map: str | None = None
    holder: str | None = None
    blockdev: str | None = None
    chardev: str | None = None
    path: str | None = None  # the device file under MNT/dev
    badblock_count: int = 0
    memmap: Memmap | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dev": self.dev, "mode": self.mode}
        if self.map:
            out["map"] = self.map
        out["size"] = self.size
        for key in ("holder", "blockdev", "chardev", "path"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        out["enabled"] = self.enabled
        if self.badblock_count:
            out["badblock_count"] = self.badblock_count
        if self.memmap is not None:
            out["memmap"] = self.memmap.to_json()
        return out


@dataclass
class RegionInfo:
    dev: str
    size: int | None
    enabled: bool
    numa_node: int | None
    badblock_count: int = 0
    namespaces: list[NamespaceInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dev": self.dev, "size": self.size, "enabled": self.enabled,
                               "numa_node": self.numa_node}
        if self.badblock_count:
            out["badblock_count"] = self.badblock_count
        out["namespaces"] = [ns.to_json() for ns in self.namespaces]
        return out


@dataclass
class BusInfo:
    dev: str
    provider: str | None
    dimms: list[str] = field(default_factory=list)
    regions: list[RegionInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dev": self.dev, "provider": self.provider}
        if self.dimms:
            out["dimms"] = self.dimms
        out["regions"] = [r.to_json() for r in self.regions]
        return out


@dataclass
class Status:
    root: Root
    buses: list[BusInfo]

    def memmaps(self) -> list[Memmap]:
        return [ns.memmap for b in self.buses for r in b.regions for ns in r.namespaces if ns.memmap is not None]

    def to_json(self) -> dict[str, Any]:
        return {"sysfs": str(self.root.sys), "buses": [b.to_json() for b in self.buses]}


MODE_NAMES = {"raw": "raw", "memory": "fsdax", "dax": "devdax", "safe": "sector"}
MAP_NAMES = {"ram": "mem", "pmem": "dev"}


def read_namespace(root: Root, region_dir: Path, name: str) -> NamespaceInfo | None:
    ns_dir = region_dir / name
    size = read_int(ns_dir / "size")
    if not size:
        return None  # a label seed: nothing there yet (ndctl hides it too)
    holder = read_attr(ns_dir / "holder") or None
    raw_mode = read_attr(ns_dir / "mode") or "raw"
    info = NamespaceInfo(dev=name, mode=MODE_NAMES.get(raw_mode, raw_mode), size=size, enabled=_enabled(ns_dir),
                         holder=holder)
    dev_dir = ns_dir
    if holder:
        dev_dir = region_dir / holder
        info.enabled = _enabled(dev_dir)
        if holder.startswith(("pfn", "dax")):
            info.map = MAP_NAMES.get(read_attr(dev_dir / "mode") or "")
            info.size = read_int(dev_dir / "size") if info.enabled else None
            info.memmap = read_memmap(dev_dir)
        elif holder.startswith("btt"):
            info.size = read_int(dev_dir / "size") if info.enabled else None
    elif info.mode == "fsdax":
        info.map = "mem"  # a legacy (e820 "memory") namespace: its memmap lives in RAM
    try:
        blocks = sorted(os.listdir(dev_dir / "block"))
    except OSError:
        blocks = []
    if blocks:
        info.blockdev = blocks[0]
        info.path = str(root.dev / blocks[0])
        info.badblock_count = badblock_count(read_attr(dev_dir / "block" / blocks[0] / "badblocks"))
    instances = _numbered(dev_dir, "dax") if holder and holder.startswith("dax") else []
    if instances:
        info.chardev = instances[0]
        info.path = str(root.dev / instances[0])
        info.badblock_count = _window_badblocks(region_dir, dev_dir)
    return info


def _window_badblocks(region_dir: Path, dev_dir: Path) -> int:
    """Bad sectors of the region inside a device's [resource, resource + size) (a devdax
    namespace has no block device to list them; ndctl computes them the same way). The
    resource files are root-only: 0 when they cannot be read."""
    begin, size, region_begin = read_int(dev_dir / "resource"), read_int(dev_dir / "size"), \
        read_int(region_dir / "resource")
    if begin is None or size is None or region_begin is None:
        return 0
    first, last = (begin - region_begin) // 512, (begin - region_begin + size) // 512
    count = 0
    for line in (read_attr(region_dir / "badblocks") or "").splitlines():
        start, n = (int(x) for x in line.split()[:2])
        count += max(0, min(start + n, last) - max(start, first))
    return count


def read_status(root: Root) -> Status:
    buses = []
    for bus_name in _numbered(root.nd_devices, "ndbus"):
        bus_dir = Path(os.path.realpath(root.nd_devices / bus_name))
        bus = BusInfo(dev=bus_name, provider=read_attr(bus_dir / "provider"), dimms=_numbered(bus_dir, "nmem"))
        for region_name in _numbered(bus_dir, "region"):
            region_dir = bus_dir / region_name
            region = RegionInfo(dev=region_name, size=read_int(region_dir / "size"), enabled=_enabled(region_dir),
                                numa_node=read_int(region_dir / "numa_node"),
                                badblock_count=badblock_count(read_attr(region_dir / "badblocks")))
            for ns_name in _numbered(region_dir, "namespace"):
                ns = read_namespace(root, region_dir, ns_name)
                if ns is not None:
                    region.namespaces.append(ns)
            bus.regions.append(region)
        buses.append(bus)
    return Status(root, buses)


# ---------------------------------------------------------------- rendering (rich)


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def human_rate(pages_per_sec: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if pages_per_sec >= scale:
            return f"{pages_per_sec / scale:.1f}{unit} pages/s"
    return f"{pages_per_sec:.0f} pages/s"


def human_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    seconds = int(seconds + 0.999)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def memmap_renderable(mm: Memmap, bar_width: int = 24) -> Any:
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    if not mm.active:
        rate = human_rate(mm.pages_per_sec)
        return Text.assemble(("memmap ", "dim"), (mm.device, "bold"), " ", ("idle", "green"),
                             f"  {mm.pages_done}/{mm.pages_total} pages in {mm.elapsed_us / 1e6:.2f} s ({rate})")
    label = Text.assemble(("memmap ", "dim"), (mm.device, "bold"), " ", ("active", "yellow"))
    detail = Text(f"{mm.fraction * 100:5.1f}%  {mm.pages_done}/{mm.pages_total} pages  "
                  f"{human_rate(mm.pages_per_sec)}  ETA {human_eta(mm.eta_s)}")
    if mm.pause_at is not None and mm.pause_at < 1000:
        detail.append(f" (pause at {mm.pause_at / 10:g}%)", "dim")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, min_width=len(label.plain))
    grid.add_column(width=bar_width, no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(label, ProgressBar(total=max(1, mm.pages_total), completed=mm.pages_done, width=bar_width), detail)
    return grid


def namespace_label(ns: NamespaceInfo) -> Any:
    from rich.text import Text

    text = Text.assemble((ns.dev, "bold cyan"), "  ", (ns.mode, "magenta"))
    if ns.map:
        text.append(f" map={ns.map}")
    text.append(f"  {human_size(ns.size)}")
    if ns.path:
        text.append(f"  {ns.path}", "blue")
    if ns.holder:
        text.append(f"  ({ns.holder})", "dim")
    if not ns.enabled:
        text.append("  disabled", "red")
    if ns.badblock_count:
        text.append(f"  {ns.badblock_count} bad blocks", "bold red")
    return text


def status_renderable(status: Status) -> Any:
    from rich.console import Group
    from rich.text import Text
    from rich.tree import Tree

    if not status.buses:
        return Text(f"{status.root.sys}: no nvdimm bus")
    trees = []
    for bus in status.buses:
        label = Text.assemble((bus.dev, "bold"), f"  provider {bus.provider}")
        if bus.dimms:
            label.append(f"  dimms {' '.join(bus.dimms)}", "dim")
        tree = Tree(label)
        for region in bus.regions:
            rlabel = Text.assemble((region.dev, "bold green" if region.enabled else "bold red"),
                                   f"  {human_size(region.size)}")
            if region.numa_node is not None:
                rlabel.append(f"  node {region.numa_node}", "dim")
            if not region.enabled:
                rlabel.append("  disabled", "red")
            if region.badblock_count:
                rlabel.append(f"  {region.badblock_count} bad blocks", "bold red")
            rnode = tree.add(rlabel)
            if not region.namespaces:
                rnode.add(Text("no namespaces", "dim"))
            for ns in region.namespaces:
                nnode = rnode.add(namespace_label(ns))
                if ns.memmap is not None:
                    nnode.add(memmap_renderable(ns.memmap))
        trees.append(tree)
    return Group(*trees)


# ---------------------------------------------------------------- the command


def make_console(file: Any = None) -> Any:
    """A rich console: colours and live redraws on a terminal, plain text (no escape codes,
    no wrapping at 80 columns) into a pipe or file."""
    from rich.console import Console

    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    width = None if tty or os.environ.get("COLUMNS") else 200
    return Console(file=file, highlight=False, soft_wrap=False, width=width)


def run(mountpoint: str, as_json: bool = False, watch: bool = False, interval: float = 1.0) -> int:
    try:
        root = Root.of(mountpoint)
    except NotAMount as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        return 2
    try:
        if not watch:
            show_once(root, as_json)
        elif as_json or not sys.stdout.isatty():
            watch_lines(root, as_json, interval)
        else:
            watch_live(root)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except GoneError as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        return 1
    return 0


class GoneError(RuntimeError):
    pass


def _read_checked(root: Root) -> Status:
    try:
        os.statvfs(root.nd_devices)  # reaches the daemon (stat() may be answered from the cache)
    except OSError as e:
        what = "the mount is gone" if e.errno in (errno.ENOTCONN, errno.ENOENT) else e.strerror
        raise GoneError(f"{root.sys}: {what}") from None
    return read_status(root)


def show_once(root: Root, as_json: bool) -> None:
    status = _read_checked(root)
    if as_json:
        print(json.dumps(status.to_json(), indent=2))
        return
    make_console().print(status_renderable(status))


def watch_lines(root: Root, as_json: bool, interval: float) -> None:
    """Not a terminal: one snapshot per interval (JSON lines with --json)."""
    console = None if as_json else make_console()
    while True:
        status = _read_checked(root)
        if as_json:
            print(json.dumps(status.to_json()), flush=True)
        else:
            assert console is not None
            console.print(status_renderable(status))
            console.print(f"-- {time.strftime('%H:%M:%S')}")
            console.file.flush()
        time.sleep(interval)


def watch_live(root: Root) -> None:
    """On a terminal: the tree redrawn in place (rich Live) four times a second, until ^C."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    console = make_console()

    def frame() -> Any:
        status = _read_checked(root)
        active = sum(1 for mm in status.memmaps() if mm.active)
        footer = Text(f"{time.strftime('%H:%M:%S')}  {active} active memmap(s)  (Ctrl-C to quit)", "dim")
        return Group(status_renderable(status), footer)

    with Live(frame(), console=console, auto_refresh=False, transient=False) as live:
        while True:
            time.sleep(0.25)
            live.update(frame(), refresh=True)
