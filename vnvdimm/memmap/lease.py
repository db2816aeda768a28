"""A job's storage in the engine process: its memfd, its mapping, and who still uses them.

The storage is freed exactly once, when release was asked for and the last user is gone. Users
take a reference for as long as they touch the bytes or hand them on:

* an initializer in this process (foreground sync, the background thread) for its runs;
* a reader of the records or the usemap, for one read;
* the dispatcher, from the job's creation until it has told every worker the job is over;
* each worker holding a mapping, until it acknowledges that it unmapped it.

So ``release()`` returns only once no process maps the memory any more (for map=mem, the memory
is really given back), and a worker never writes into storage that was handed on to something else.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np

from .page import RECORD_SIZE
from .storage import Geometry, Mapping, create_memfd


class LeaseReleased(Exception):
    """The storage is being (or has been) released: no new user may take it."""


class StorageLease:
    """Creates the storage (O(1): sparse) and frees it when released and unused.

    ``defer(fn)`` runs the actual unmap/close somewhere that may block (the engine's service
    thread), never under the caller's locks; ``on_released()`` is called after it.
    """

    def __init__(self, geom: Geometry, name: str, *, ns_per_page: float,
                 defer: Callable[[Callable[[], None]], None],
                 on_released: Callable[[], None] = lambda: None) -> None:
        self.geom = geom
        self._defer = defer
        self._on_released = on_released
        self._lock = threading.Lock()
        self._users = 0
        self._release_requested = False
        self._closing = False
        self._released = threading.Event()
        self._memfd = create_memfd(geom, name)
        self._read_fd: int | None = None
        try:
            self._map: Mapping | None = Mapping(geom, self._memfd)
            self._map.ns_per_page = ns_per_page
            if geom.path is not None:
                self._read_fd = os.open(geom.path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._memfd)
            raise

    # -- references --------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take a reference; :class:`LeaseReleased` once the release has started."""
        with self._lock:
            if self._closing:
                raise LeaseReleased()
            self._users += 1

    def drop(self) -> None:
        """Give a reference back; the last one after a release request frees the storage."""
        with self._lock:
            if self._users <= 0:
                raise RuntimeError("storage lease dropped more often than acquired")
            self._users -= 1
            start = self._start_locked()
        if start:
            self._defer(self._close)

    @contextlib.contextmanager
    def use(self) -> Iterator[Mapping]:
        """The mapping, for the duration of the block."""
        self.acquire()
        try:
            assert self._map is not None
            yield self._map
        finally:
            self.drop()

    def release(self) -> None:
        """Ask for the storage to be freed once its last user is gone (idempotent)."""
        with self._lock:
            self._release_requested = True
            start = self._start_locked()
        if start:
            self._defer(self._close)

    def _start_locked(self) -> bool:
        if self._release_requested and self._users == 0 and not self._closing:
            self._closing = True
            return True
        return False

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def wait_released(self, timeout: float | None) -> bool:
        return self._released.wait(timeout)

    def _close(self) -> None:
        m, self._map = self._map, None
        fds = [fd for fd in (self._memfd, self._read_fd) if fd is not None and fd >= 0]
        self._memfd, self._read_fd = -1, None
        try:
            if m is not None:
                m.close()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        finally:
            self._released.set()
            self._on_released()

    # -- what users do with it -------------------------------------------------------------------
    @property
    def memfd(self) -> int:
        """The memfd, for passing to a worker: only while holding a reference."""
        return self._memfd

    def set_ns_per_page(self, value: float) -> None:
        """Publish a new floor to every process mapping the storage (nothing once released)."""
        with contextlib.suppress(LeaseReleased), self.use() as m:
            m.ns_per_page = value

    def read_records(self, first: int, count: int) -> bytes:
        """The stored bytes of records [first, first + count), zeros where nothing was written."""
        with self.use():
            if self.geom.path is None:
                fd, off = self._memfd, first * RECORD_SIZE
            else:
                assert self._read_fd is not None
                fd, off = self._read_fd, self.geom.offset + first * RECORD_SIZE
            # pread, not the mapping: reading a hole of a memfd this way returns the zero page
            # instead of allocating shared memory for a page nobody initialized yet.
            want = count * RECORD_SIZE
            parts = []
            while want:
                chunk = os.pread(fd, want, off)
                if not chunk:
                    break
                parts.append(chunk)
                off += len(chunk)
                want -= len(chunk)
        return b"".join(parts).ljust(count * RECORD_SIZE, b"\0")

    def read_usemap(self, first: int, count: int) -> np.ndarray:
        with self.use() as m:
            return m.usemap[first : first + count].copy()
