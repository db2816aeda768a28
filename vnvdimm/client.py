"""Reading a mounted vnvdimm (or any sysfs root with the libnvdimm layout) through its files,
the way ndctl reads it: the buses, regions, namespaces and memmaps as plain records. Used by
`vnvdimm status`, `wait`, `inject-error` and the test bed; nothing is imported from the
daemon or the model, so it works on ``/sys`` inside ``with-vnvdimm`` too.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vnvdimm.mounts import DEAD_ERRNOS, daemon_errno, mount_entry, trusted_vnvdimm_dev

PAGE_SIZE = 4096


class NotAMount(RuntimeError):
    """The path given is not a vnvdimm mount (nor a sysfs root with the nd bus)."""


class GoneError(RuntimeError):
    """The mount went away while it was being read."""


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def unreadable_mount_reason(path: Path, error: OSError) -> str:
    """Why `path` (or what is below it) cannot be read, and what to do: a FUSE mount of
    another user without allow_other is closed to everyone else, root included."""
    entry = None
    for candidate in (path, *path.parents):
        entry = mount_entry(candidate)
        if entry is not None:
            break
    owner = next((int(o.split("=", 1)[1]) for o in (entry.options if entry else ()) if o.startswith("user_id=")),
                 None)
    if entry is not None and entry.is_fuse and owner is not None and owner != os.geteuid() \
            and "allow_other" not in entry.options:
        try:
            import pwd

            who = f"{pwd.getpwuid(owner).pw_name} (uid {owner})"
        except (KeyError, ImportError):
            who = f"uid {owner}"
        return (f"{path}: permission denied: {entry.mountpoint} is mounted by {who} without --allow-other, so no "
                "one else can read it, root included; run this as that user (or have them mount with "
                "--allow-other)")
    return f"{path}: {error.strerror or 'permission denied'}; run this as a user who can read it"


@dataclass(frozen=True)
class Root:
    """Where the sysfs tree and the device files of a platform are."""

    sys: Path
    dev: Path

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> Root:
        # Absolute (not resolved: a stuck mount must not hang us), so every path shown is one
        # a user can paste anywhere.
        p = Path(os.path.abspath(path))
        try:
            root = cls._of(p)
            sys_dev = os.stat(root.sys).st_dev
        except PermissionError as e:
            raise NotAMount(unreadable_mount_reason(p, e)) from None
        # What is read here is printed, followed and written to (inject-error): a tree
        # someone else made (another user's file system, or a directory that merely looks
        # like a mount) would choose it, escape sequences for the terminal included.
        if not trusted_vnvdimm_dev(sys_dev):
            raise NotAMount(f"{p}: not a vnvdimm mount of root's or yours (vnvdimm's tools read only those)")
        return root

    @classmethod
    def _of(cls, p: Path) -> Root:
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


def read_status_checked(root: Root) -> Status:
    """read_status(), or GoneError if the mount is gone (rather than an empty platform)."""
    err = daemon_errno(root.nd_devices)
    if err is not None:
        what = "the mount is gone" if err in (*DEAD_ERRNOS, errno.ENOENT) else os.strerror(err)
        raise GoneError(f"{root.sys}: {what}")
    return read_status(root)
