"""Device-model primitives shared by every libnvdimm object: attributes, devices, drivers,
and the kernel's little input parsers (sysfs_streq, kstrtoul, kstrtobool, uuid).

Errors are raised as OSError(errno) at the point where the kernel would return -errno.
"""

from __future__ import annotations

import errno
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vnvdimm.model.system import System

PAGE_SIZE = 4096
SZ_4K = 4096
SZ_8K = 8192
SZ_16M = 16 << 20
SZ_2M = 2 << 20
SZ_1G = 1 << 30


def fail(code: int, message: str) -> OSError:
    """An OSError carrying the kernel's errno and a human-readable reason (for logs)."""
    return OSError(code, f"{message} ({errno.errorcode.get(code, code)})")


# ---------------------------------------------------------------- attributes


@dataclass(frozen=True)
class Attr:
    """A sysfs attribute as the kernel declares it (DEVICE_ATTR_*): name, mode, show, store.

    `show()` returns the whole file content (with its trailing newline) or raises OSError.
    `store(buf)` receives exactly the bytes of one write(2) and raises OSError to reject it.
    `blocking` attributes may sleep (memmap sync, wait_probe); the sysfs layer calls them
    without holding the model lock.
    """

    name: str
    mode: int
    show: Callable[[], str] | None = None
    store: Callable[[bytes], None] | None = None
    blocking: bool = False


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


def ro(name: str, show: Callable[[], str], mode: int = 0o444) -> Attr:
    return Attr(name, mode, show=show)


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


def strim(buf: bytes) -> str:
    """strim(): the C string with leading and trailing whitespace removed."""
    return cstring(buf).decode("latin-1").strip(" \t\n\r\v\f")


def kstrtoull(buf: bytes, base: int = 0) -> int:
    """kstrtoull(): an unsigned integer, optionally followed by one newline; 0x/0 prefixes
    when base is 0. Anything else is EINVAL, overflow is ERANGE."""
    text = cstring(buf)
    if text.endswith(b"\n"):
        text = text[:-1]
    if text.startswith(b"+"):
        text = text[1:]
    if not text:
        raise fail(errno.EINVAL, "empty number")
    try:
        s = text.decode("ascii")
    except UnicodeDecodeError:
        raise fail(errno.EINVAL, "not a number") from None
    if base == 0:
        if s[:2].lower() == "0x":
            base, s = 16, s[2:]
        elif len(s) > 1 and s[0] == "0":
            base, s = 8, s[1:]
        else:
            base = 10
    digits = "0123456789abcdef"[:base]
    if not s or any(c not in digits for c in s.lower()):
        raise fail(errno.EINVAL, f"not a base-{base} number")
    value = int(s, base)
    if value >= 1 << 64:
        raise fail(errno.ERANGE, "number out of range")
    return value


def kstrtobool(buf: bytes) -> bool:
    """kstrtobool(): y/Y/1/n/N/0 on the first character, or on/off."""
    text = cstring(buf)
    if not text:
        raise fail(errno.EINVAL, "empty boolean")
    first = text[:1]
    if first in (b"y", b"Y", b"1"):
        return True
    if first in (b"n", b"N", b"0"):
        return False
    if first in (b"o", b"O") and len(text) > 1:
        if text[1:2] in (b"n", b"N"):
            return True
        if text[1:2] in (b"f", b"F"):
            return False
    raise fail(errno.EINVAL, "not a boolean")


def parse_uuid(buf: bytes) -> uuidlib.UUID:
    """nd_uuid_parse(): 16 hex byte pairs, optionally separated by '-' or ':', then at most a
    newline. (The kernel ignores trailing garbage; we refuse it so a typo changes nothing.)"""
    text = cstring(buf)
    if text.endswith(b"\n"):
        text = text[:-1]
    hexdigits = text.replace(b"-", b"").replace(b":", b"")
    try:
        if len(hexdigits) != 32:
            raise ValueError
        return uuidlib.UUID(hex=hexdigits.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise fail(errno.EINVAL, "malformed uuid") from None


NULL_UUID = uuidlib.UUID(int=0)


# ---------------------------------------------------------------- devices and drivers


class Device:
    """A struct device: a named node with a parent, a bus, maybe a driver and a devt.

    Subclasses list their sysfs entries in `entries()` and their child devices in
    `children()`; both are read under the model lock whenever the sysfs view is rebuilt.
    """

    bus_name: str | None = None  # "nd" or "dax": gives the subsystem link and /sys/bus/<bus>/devices
    devtype: str | None = None  # the kernel's device_type name, shown in `devtype`
    nd_type: int | None = None  # ND_DEVICE_* for modalias "nd:t%d"

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
        if strim(buf) not in ("add", "remove", "change", "move", "online", "offline", "bind", "unbind", ""):
            raise fail(errno.EINVAL, "unknown uevent action")

    def children(self) -> Iterable[Device]:
        return ()

    # -- driver model
    @property
    def bound(self) -> bool:
        return self.driver is not None


class Driver:
    """A device driver on a bus: `matches()` is the bus match; `probe()` / `remove()` as the
    kernel's nd_device_driver callbacks. Probe raises OSError to refuse."""

    def __init__(self, system: System, name: str, bus_name: str) -> None:
        self.system = system
        self.name = name
        self.bus_name = bus_name

    def matches(self, dev: Device) -> bool:
        raise NotImplementedError

    def probe(self, dev: Device) -> None:
        raise NotImplementedError

    def remove(self, dev: Device) -> None:
        pass

    def __repr__(self) -> str:
        return f"<Driver {self.name}>"


class Ida:
    """The kernel's ida: the lowest free id, ids reused once released."""

    def __init__(self) -> None:
        self._used: set[int] = set()

    def get(self) -> int:
        i = 0
        while i in self._used:
            i += 1
        self._used.add(i)
        return i

    def take(self, i: int) -> None:
        self._used.add(i)

    def put(self, i: int) -> None:
        self._used.discard(i)


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align
