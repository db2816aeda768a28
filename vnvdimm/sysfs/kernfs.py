"""kernfs semantics, independent of how the tree is served: nodes, show/store calls with
the kernel's buffer rules, and sysfs_notify() event counters for poll().

* An attribute's content is produced by show() when a reader reads at offset 0 and served
  from that buffer for the rest of the open file (seq_file); st_size is always 4096.
* A write is one store() of at most PAGE_SIZE bytes; the kernel hands the store everything
  the writer sent (ndctl's trailing NUL included) and the write returns its full length.
* Opening for write a file without a store, or for read one without a show, is EACCES.
* poll() reports POLLPRI|POLLERR once the attribute was notified after the reader's last
  read (or open), like kernfs_fop_poll().
"""

from __future__ import annotations

import errno
import logging
import re
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from vnvdimm.model.base import Attr, BinAttr, ProbingAnswer

PAGE_SIZE = 4096

log = logging.getLogger("vnvdimm.sysfs")

def name_change_errno(op: str, mode: int = 0) -> int:
    """What sysfs answers its owner (root) for a change of its names: kernfs has no create
    (the VFS's vfs_create: EACCES, also for mknod of a regular file), and refuses mknod of a
    device, mkdir, symlink, link, unlink, rmdir and rename with EPERM (measured on a host's
    /sys). Anyone else gets EACCES from the VFS's permission check first (default_permissions
    makes the kernel do it here too). `op` is the VFS operation's name."""
    if op == "create" or (op == "mknod" and (mode & 0o170000) in (0, 0o100000)):
        return errno.EACCES
    return errno.EPERM


# The path component that names a device (the rest of a path is its attribute).
_DEVICE_NAME = re.compile(r"^(ndbus|ndctl|nmem|region|namespace|pfn|dax|btt|pmem)\d")


class KNode:
    __slots__ = ()


@dataclass(slots=True)
class KDir(KNode):
    children: dict[str, KNode] = field(default_factory=dict)
    mode: int = 0o755


@dataclass(slots=True)
class KAttr(KNode):
    attr: Attr
    lock: AbstractContextManager[object]
    path: str = ""  # set when the node is placed in a tree (for the log)

    @property
    def mode(self) -> int:
        return self.attr.mode

    @property
    def volatile(self) -> bool:
        """Its value may change with nothing to tell a cache (see Attr.volatile)."""
        return self.attr.volatile

    def show(self) -> bytes:
        if self.attr.show is None:
            raise OSError(errno.EACCES, "attribute is write-only")
        with nullcontext() if self.attr.blocking else self.lock:
            text = self.attr.show()
        # surrogateescape: bytes a store kept as they were (alt_name) come back byte for byte
        data = text.encode("utf-8", "surrogateescape")
        if len(data) >= PAGE_SIZE:
            # sysfs_kf_seq_show(): "fill_read_buffer: ... returned bad count", PAGE_SIZE - 1 kept
            data = data[:PAGE_SIZE - 1]
        return data

    def store(self, data: bytes) -> int:
        if self.attr.store is None:
            raise OSError(errno.EACCES, "attribute is read-only")
        if not data:
            return 0
        data = data[:PAGE_SIZE]
        try:
            with nullcontext() if self.attr.blocking else self.lock:
                self.attr.store(data)
        except OSError as e:
            log_refused_store(self.path or self.attr.name, data, e)
            raise
        return len(data)


#: A refused store's log line names at most this much of the value written (a store is up to
#: a page) and of the reason, so that the log grows by a short line per refusal, whatever is written.
LOGGED_VALUE_BYTES = 48
LOGGED_REASON_CHARS = 200


def log_refused_store(path: str, data: bytes, exc: OSError) -> None:
    """Every store the model refuses is logged with its device, attribute and reason; the
    driver core's normal probing (ProbingAnswer: ndctl's bind to every driver in turn) at
    debug level only."""
    parts = path.strip("/").split("/")
    at = next((i for i in range(len(parts) - 2, -1, -1) if _DEVICE_NAME.match(parts[i])), len(parts) - 2)
    device = parts[at] if at >= 0 else ""
    attribute = "/".join(parts[at + 1:])
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "?"
    reason = exc.strerror or str(exc)
    if code not in reason:
        reason = f"{reason} ({code})"
    if len(reason) > LOGGED_REASON_CHARS:
        reason = f"{reason[:LOGGED_REASON_CHARS]}... ({code})"
    stripped = data.rstrip(b"\0\n")
    value = repr(stripped[:LOGGED_VALUE_BYTES].decode("latin-1"))
    if len(stripped) > LOGGED_VALUE_BYTES:
        value += f"... ({len(data)} bytes)"
    if isinstance(exc, ProbingAnswer):
        log.debug("bind probing: driver %s, device %s: %s [%s]", device, value, reason, path)
        return
    log.info("store refused: device %s, attribute %s, value %s: %s [%s]", device, attribute, value, reason, path)


@dataclass(slots=True)
class KBin(KNode):
    attr: BinAttr
    lock: AbstractContextManager[object]

    @property
    def mode(self) -> int:
        return self.attr.mode

    def size(self) -> int:
        with self.lock:
            return self.attr.size()

    def read(self, size: int, offset: int) -> bytes:
        with self.lock:
            return self.attr.read(offset, size)


@dataclass(slots=True)
class KLink(KNode):
    target: str


class Events:
    """sysfs_notify() counters and the pollers waiting on them, keyed by attribute path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._waiters: dict[str, list[Callable[[], None]]] = {}

    def count(self, path: str) -> int:
        return self._counts.get(path, 0)

    def notify(self, path: str) -> None:
        with self._lock:
            self._counts[path] = self._counts.get(path, 0) + 1
            waiters = self._waiters.pop(path, [])
        for wake in waiters:
            wake()

    def wait(self, path: str, seen: int, wake: Callable[[], None]) -> bool:
        """Register `wake` unless the attribute already changed since `seen`; True if changed."""
        with self._lock:
            if self._counts.get(path, 0) != seen:
                return True
            self._waiters.setdefault(path, []).append(wake)
            return False


class OpenAttr:
    """An open attribute file (struct kernfs_open_file)."""

    __slots__ = ("buf", "event", "node", "path")

    def __init__(self, path: str, node: KAttr, event: int) -> None:
        self.path = path
        self.node = node
        self.buf: bytes | None = None
        self.event = event

    def read(self, size: int, offset: int, events: Events) -> bytes:
        if offset == 0 or self.buf is None:
            self.event = events.count(self.path)
            self.buf = self.node.show()
        return self.buf[offset: offset + size]
