"""The change feed: which paths of the tree a server may have cached stale metadata for.

Whoever serves the tree may let its clients cache lookups and attributes (a FUSE kernel keeps
dentries and inode attributes); the tree tells it, through one sink, every path whose cached
answer went stale: a node that vanished, or one whose kind, mode, size, link target or device
changed. Nothing here knows how the sink invalidates.

The sink runs on a dedicated thread, never on the thread that changed the tree: a server may
not be able to invalidate from inside the request that caused the change (the FUSE kernel
can wait on the very request being answered). A writer that must not return before its
effects are visible calls `flush()`, which waits until everything published so far reached
the sink.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

log = logging.getLogger("vnvdimm.sysfs")

Sink = Callable[[Sequence[str]], None]

# A flush gives up after this long (the sink is stuck: a server going away); the writer then
# returns, and its change is seen at the latest when the client's cache times out.
FLUSH_TIMEOUT_S = 10.0


class ChangeFeed:
    """Batches of paths, delivered in order to every connected sink (one server per
    connection: each caches on its own)."""

    def __init__(self, name: str = "vnvdimm-sysfs-changes") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, Sequence[str]]] = deque()
        self._published = 0  # sequence number of the last batch queued
        self._delivered = 0  # ... and of the last batch every sink has returned from
        self._sinks: list[Sink] = []
        self._running: Sink | None = None  # the sink being called
        self._thread: threading.Thread | None = None

    def connect(self, sink: Sink) -> None:
        """Start delivering to `sink` too (from a thread of the feed's own)."""
        with self._cond:
            self._sinks.append(sink)
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name=self._name, daemon=True)
                self._thread.start()

    def disconnect(self, sink: Sink | None = None) -> None:
        """Stop delivering to `sink` (every sink if None): returns once it is not running and
        will not run again (its server may free what it uses). With no sink left, batches not
        delivered are dropped."""
        with self._cond:
            self._sinks = [s for s in self._sinks if sink is not None and s != sink]
            if not self._sinks:
                self._queue.clear()
                self._delivered = self._published
            self._cond.notify_all()
            if threading.current_thread() is not self._thread:
                self._cond.wait_for(lambda: self._running is None or (sink is not None and self._running != sink))

    def publish(self, paths: Sequence[str]) -> None:
        """Queue stale paths; never blocks. Without a sink (no server caches anything) they
        are dropped."""
        if not paths:
            return
        with self._cond:
            if not self._sinks:
                return
            self._published += 1
            self._queue.append((self._published, paths))
            self._cond.notify_all()

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until everything published before this call was delivered; False on timeout."""
        with self._cond:
            target = self._published
            ok = self._cond.wait_for(lambda: self._delivered >= target, timeout)
        if not ok:
            log.warning("cache invalidation did not complete within %.0f s", timeout)
        return ok

    def _deliver(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue)
                batches = list(self._queue)
                self._queue.clear()
                sinks = list(self._sinks)
            paths = [p for _, batch in batches for p in batch]
            for sink in sinks:
                with self._cond:
                    if sink not in self._sinks:
                        continue  # disconnected meanwhile
                    self._running = sink
                try:
                    sink(paths)
                except Exception:
                    log.exception("cache invalidation failed")
                finally:
                    with self._cond:
                        self._running = None
                        self._cond.notify_all()
            with self._cond:
                self._delivered = max(self._delivered, batches[-1][0])
                self._cond.notify_all()
