"""Device-model primitives shared by every libnvdimm object: attributes, devices, drivers,
and the kernel's little input parsers (sysfs_streq, kstrtoul, kstrtobool, uuid).

Errors are raised as OSError(errno) at the point where the kernel would return -errno.
"""

from __future__ import annotations

import errno
import re
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vnvdimm.model.nd import NdDeviceType

if TYPE_CHECKING:
    from vnvdimm.model.disk import DataPath, Disk
    from vnvdimm.model.system import System

PAGE_SIZE = 4096
SZ_4K = 4096
SZ_8K = 8192
SZ_16M = 16 << 20
SZ_2M = 2 << 20
SZ_1G = 1 << 30
# The mapping alignments the kernel supports: PAGE_SIZE and, where transparent huge pages of
# those sizes exist (x86_64), PMD and PUD (nd_pfn_supported_alignments(), dax_align_valid())
SUPPORTED_ALIGNMENTS = (PAGE_SIZE, SZ_2M, SZ_1G)


def fail(code: int, message: str) -> OSError:
    """An OSError carrying the kernel's errno and a human-readable reason (for logs)."""
    return OSError(code, f"{message} ({errno.errorcode.get(code, code)})")


class ProbingAnswer(OSError):
    """A refused `bind` that is the driver core's normal probing, not a mistake of the writer:
    ndctl enables a device by writing its name to every driver's `bind` until one takes it,
    so the drivers that do not match answer ENODEV, one already bound EBUSY, and nd_pmem ENXIO
    for a namespace that a personality found on its media claims. Logged at debug level."""


def probing(code: int, message: str) -> ProbingAnswer:
    return ProbingAnswer(code, f"{message} ({errno.errorcode.get(code, code)})")


# ---------------------------------------------------------------- attributes


@dataclass(frozen=True)
class Attr:
    """A sysfs attribute as the kernel declares it (DEVICE_ATTR_*): name, mode, show, store.

    `show()` returns the whole file content (with its trailing newline) or raises OSError.
    `store(buf)` receives exactly the bytes of one write(2) and raises OSError to reject it.
    `blocking` attributes may sleep (memmap sync, wait_probe); the sysfs layer calls them
    without holding the model lock. `volatile` ones change value on their own (progress
    counters, clocks), with no store, ioctl or notification to tell: a server caching
    attribute contents must not keep theirs.
    """

    name: str
    mode: int
    show: Callable[[], str] | None = None
    store: Callable[[bytes], None] | None = None
    blocking: bool = False
    volatile: bool = False


@dataclass(frozen=True)
class BinAttr:
    """A binary attribute (BIN_ATTR_RO): a fixed-size window read at an offset."""

    name: str
    mode: int
    size: Callable[[], int]
    read: Callable[[int, int], bytes]


@dataclass(frozen=True)
class Group:
    """A named attribute group: a subdirectory of the device (nfit/, memmap/, dax_region/)."""

    name: str
    entries: list[Attr | BinAttr | Group] = field(default_factory=list)


@dataclass(frozen=True)
class Link:
    """An extra symlink inside a device directory, pointing at another device's directory
    (or at a fixed absolute sysfs path when `target` is a str)."""

    name: str
    target: Device | str


Entry = Attr | BinAttr | Group | Link


def ro(name: str, show: Callable[[], str], mode: int = 0o444, volatile: bool = False) -> Attr:
    return Attr(name, mode, show=show, volatile=volatile)


def rw(name: str, show: Callable[[], str], store: Callable[[bytes], None], mode: int = 0o644) -> Attr:
    return Attr(name, mode, show=show, store=store)


# ---------------------------------------------------------------- parsers (lib/string.c, lib/kstrtox.c)


def cstring(buf: bytes) -> bytes:
    """What a C store function sees of the buffer: everything up to the first NUL."""
    end = buf.find(b"\0")
    return buf if end < 0 else buf[:end]


def sysfs_streq(buf: bytes, word: str) -> bool:
    """sysfs_streq(): equal, ignoring one trailing newline on either side."""
    text = cstring(buf)
    if text.endswith(b"\n"):
        text = text[:-1]
    return text == word.encode()


def streq_text(buf: bytes) -> str:
    """The C string with one trailing newline dropped: what sysfs_streq() compares."""
    text = cstring(buf)
    if text.endswith(b"\n"):
        text = text[:-1]
    return text.decode("latin-1")


# isspace() of lib/ctype.c: \t \n \v \f \r, space, and 0xa0 (NBSP in latin-1).
KERNEL_SPACE = " \t\n\v\f\r\xa0"


def strim(buf: bytes) -> str:
    """strim()'s result: the C string with leading and trailing isspace() removed."""
    return cstring(buf).decode("latin-1").strip(KERNEL_SPACE)


def rstrim(buf: bytes) -> str:
    """strim() called for its side effect only (its return value ignored, as
    nd_namespace_store() does): trailing whitespace goes, leading whitespace stays."""
    return cstring(buf).decode("latin-1").rstrip(KERNEL_SPACE)


_U64 = 1 << 64


def _parse_integer(s: bytes, base: int) -> tuple[int, int, bool]:
    """_parse_integer(): (value, digits read, overflowed) of the longest digit prefix."""
    value, n, overflow = 0, 0, False
    for c in s:
        if 0x30 <= c <= 0x39:
            d = c - 0x30
        elif 0x61 <= (c | 0x20) <= 0x66:
            d = (c | 0x20) - 0x61 + 10
        else:
            break
        if d >= base:
            break
        value = value * base + d
        if value >= _U64:
            overflow = True
            value &= _U64 - 1
        n += 1
    return value, n, overflow


def _kstrtoull(s: bytes, base: int) -> int:
    if base == 0:
        if s[:1] == b"0":
            base = 16 if s[1:2] in (b"x", b"X") and s[2:3] and s[2:3] in b"0123456789abcdefABCDEF" else 8
        else:
            base = 10
    if base == 16 and s[:1] == b"0" and s[1:2] in (b"x", b"X"):
        s = s[2:]
    value, n, overflow = _parse_integer(s, base)
    if overflow:
        raise fail(errno.ERANGE, "number out of range")
    if n == 0:
        raise fail(errno.EINVAL, "not a number")
    rest = s[n:]
    if rest[:1] == b"\n":
        rest = rest[1:]
    if rest:
        raise fail(errno.EINVAL, "garbage after the number")
    return value


def kstrtoull(buf: bytes, base: int = 0) -> int:
    """kstrtoull() on the C string: an optional '+', digits (0x/0 prefixes pick the base when
    base is 0), at most one newline. EINVAL for anything else; ERANGE as soon as the digits
    overflow 64 bits (even if garbage follows them, as _parse_integer() reports it first)."""
    s = cstring(buf)
    if s[:1] == b"+":
        s = s[1:]
    return _kstrtoull(s, base)


def nd_size_select_show(current: int, supported: Sequence[int]) -> str:
    """nd_size_select_show(): the supported sizes, the current one in brackets."""
    return "".join(f"[{s}] " if s == current else f"{s} " for s in supported) + "\n"


def nd_size_select_store(dev: Device, buf: bytes, supported: Sequence[int], what: str) -> int:
    """nd_size_select_store(): EBUSY while a driver holds `dev`, then the value (kstrtoul,
    any base) if it is one of `supported`, else EINVAL. Returns it; the caller stores it."""
    if dev.driver is not None:
        raise fail(errno.EBUSY, f"{dev.name} is active")
    value = kstrtoull(buf)
    if value not in supported:
        raise fail(errno.EINVAL, f"unsupported {what} {value}")
    return value


def kstrtol(buf: bytes, base: int = 0) -> int:
    """kstrtol() (kstrtoll() on 64-bit): kstrtoull() with an optional '-' and a signed range."""
    s = cstring(buf)
    if s[:1] == b"-":
        value = _kstrtoull(s[1:], base)
        if value > 1 << 63:
            raise fail(errno.ERANGE, "number out of range")
        return -value
    value = kstrtoull(s, base)
    if value >= 1 << 63:
        raise fail(errno.ERANGE, "number out of range")
    return value


def kstrtobool(buf: bytes) -> bool:
    """kstrtobool(): the first character y/Y/t/T/1 or n/N/f/F/0, or o/O followed by n/N or
    f/F (on/off). Everything after that is ignored."""
    text = cstring(buf)
    first, second = text[:1], text[1:2]
    if first and first in b"yYtT1":
        return True
    if first and first in b"nNfF0":
        return False
    if first and first in b"oO" and second:
        if second in b"nN":
            return True
        if second in b"fF":
            return False
    raise fail(errno.EINVAL, "not a boolean")


_HEX = b"0123456789abcdefABCDEF"


def parse_uuid(buf: bytes) -> uuidlib.UUID:
    """nd_uuid_parse(): 16 pairs of hex digits, each optionally followed by one separator
    ('-', ':', newline or NUL). Whatever follows the 16th pair is ignored, as in the kernel."""
    s = buf + b"\0"  # kernfs NUL-terminates the buffer
    out = bytearray()
    i = 0
    for _ in range(16):
        pair = s[i:i + 2]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise fail(errno.EINVAL, "malformed uuid")
        out.append(int(pair, 16))
        i += 2
        if s[i:i + 1] and s[i] in b"-:\n\0":
            i += 1
    return uuidlib.UUID(bytes=bytes(out))


UEVENT_ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")
_ALNUM = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_UUID_TEXT = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def synth_uevent(buf: bytes) -> str:
    """kobject_synth_uevent(): what a write to a `uevent` attribute accepts. An action name
    (one trailing newline or NUL dropped), optionally followed by ' <uuid>' and ' KEY=VALUE'
    words of alphanumerics. Returns the action; EINVAL otherwise. (No udev listens here, so
    accepting is all a synthetic event does.)"""
    count = len(buf)
    if count and buf[count - 1] in b"\n\0":
        count -= 1
    if not count:
        raise fail(errno.EINVAL, "unknown uevent action string")
    space = buf.find(b" ", 0, count)
    first = buf[:space] if space >= 0 else buf[:count]
    action = next((a for a in UEVENT_ACTIONS if a.encode() == first), None)
    if action is None:
        raise fail(errno.EINVAL, "unknown uevent action string")
    if space < 0:
        return action
    args = buf[space + 1:]  # kobject_action_args() gets the original length
    if args and args[-1] in b"\n\0":
        args = args[:-1]
    if len(args) < 36 or not _UUID_TEXT.match(args):
        raise fail(errno.EINVAL, "incorrect uevent action arguments")
    rest = args[36:]
    while rest:
        m = re.match(rb" ([0-9a-zA-Z]+)=([0-9a-zA-Z]+)", rest)
        if m is None:
            raise fail(errno.EINVAL, "incorrect uevent action arguments")
        rest = rest[m.end():]
    return action


def uevent_store(buf: bytes) -> None:
    """The store of every `uevent` attribute (devices, drivers, buses): kobject_synth_uevent()."""
    synth_uevent(buf)


NULL_UUID = uuidlib.UUID(int=0)


# ---------------------------------------------------------------- devices and drivers


@dataclass(frozen=True)
class DevNode:
    """A device's node in /dev, as devtmpfs makes it at device_add() for a device with a
    devt: its name there, "c" or "b", and what opening it reaches. `data` None: the node
    exists but cannot be opened (a dax instance without device_dax), unless it is a `control`
    node (ndctl, nmem), which opens but has only ioctls; `align` is a device-dax instance's
    mapping alignment (the preload library reports and enforces it)."""

    name: str
    devt: tuple[int, int]
    kind: str = "c"
    data: DataPath | None = None
    control: bool = False
    align: int = 0


class Device:
    """A struct device: a named node with a parent, a bus, maybe a driver and a devt.

    Subclasses list their sysfs entries in `entries()` and their child devices in
    `children()`; both are read under the model lock whenever the sysfs view is rebuilt.
    """

    bus_name: str | None = None  # "nd" or "dax": gives the subsystem link and /sys/bus/<bus>/devices
    devtype: str | None = None  # the kernel's device_type name, shown in `devtype`
    nd_type: NdDeviceType | None = None  # to_nd_device_type(): modalias "nd:t%d", what nd drivers match
    probe_errno: int | None = None  # the errno of its last failed probe (set by the driver core)
    devt: tuple[int, int] | None = None  # (major, minor) of a device with a node: /sys/dev, `dev`
    subdir: str | None = None  # the directory of its parent's it lives in ("block" for a gendisk)
    # where a device at the top of the tree (no parent: a bus, a platform device) is, below /sys
    sysfs_dir: str | None = None
    # the gendisk a block driver added for it (nd_pmem on a namespace or pfn, nd_btt); a disk
    # is not a child of the device model's walk: it comes and goes with the driver
    disk: Disk | None = None

    def __init__(self, system: System, name: str, parent: Device | None) -> None:
        self.system = system
        self.name = name
        self.parent = parent
        self.driver: Driver | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # -- sysfs
    def entries(self) -> list[Entry]:
        base: list[Entry] = []
        if self.nd_type is not None:
            base.append(ro("modalias", lambda: f"nd:t{self.nd_type}\n"))
        if self.devtype is not None:
            base.append(ro("devtype", lambda: f"{self.devtype}\n"))
        base.append(rw("uevent", self.uevent, self._uevent_store))
        return base

    def uevent(self) -> str:
        lines = []
        if self.devtype:
            lines.append(f"DEVTYPE={self.devtype}")
        if self.driver:
            lines.append(f"DRIVER={self.driver.name}")
        if self.nd_type is not None:
            lines.append(f"MODALIAS=nd:t{self.nd_type}")
        return "".join(line + "\n" for line in lines)

    def _uevent_store(self, buf: bytes) -> None:
        # Writing an action ("add", "change") to uevent synthesizes an event; there is no udev here.
        uevent_store(buf)

    def children(self) -> Iterable[Device]:
        return ()

    def devnode(self) -> DevNode | None:
        """Its node in /dev, if it has one (the one rule for what /dev shows and what an
        ioctl can be sent to)."""
        return None

    # -- driver model
    @property
    def bound(self) -> bool:
        return self.driver is not None


class Driver:
    """A device driver on a bus: `probe()` / `remove()` as the kernel's nd_device_driver
    callbacks (probe raises OSError to refuse). `types` is the set of nd device types it
    binds (the kernel's nd_device_driver.type), which the bus's match tests."""

    types: frozenset[NdDeviceType] = frozenset()

    def __init__(self, system: System, name: str, bus_name: str) -> None:
        self.system = system
        self.name = name
        self.bus_name = bus_name

    def probe(self, dev: Device) -> None:
        raise NotImplementedError

    def remove(self, dev: Device) -> None:
        pass

    def __repr__(self) -> str:
        return f"<Driver {self.name}>"


class BusType:
    """A struct bus_type: how the driver core matches a device with a driver of the bus, and
    how it probes. The buses' own rules (nvdimm_bus_match(), dax_bus_match()) live with their
    drivers; the topology registers them on the System at boot."""

    def __init__(self, name: str) -> None:
        self.name = name

    def match(self, dev: Device, drv: Driver) -> bool:
        raise NotImplementedError

    def probe(self, drv: Driver, dev: Device) -> None:
        """The bus's probe: the driver's, by default. Raises OSError to refuse."""
        drv.probe(dev)

    def bus_attrs(self) -> list[Attr]:
        """The bus's own attributes in /sys/bus/<bus>/ (its bus_groups), beside the driver core's."""
        return []


class Ida:
    """The kernel's ida: the lowest free id, ids reused once released."""

    def __init__(self) -> None:
        self._used: set[int] = set()
        self._lowest_maybe_free = 0  # every id below it is in use (so n gets cost n, not n²)

    def get(self) -> int:
        i = self._lowest_maybe_free
        while i in self._used:
            i += 1
        self._used.add(i)
        self._lowest_maybe_free = i + 1
        return i

    def take(self, i: int) -> None:
        self._used.add(i)

    def put(self, i: int) -> None:
        self._used.discard(i)
        self._lowest_maybe_free = min(self._lowest_maybe_free, i)


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align
