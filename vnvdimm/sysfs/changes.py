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
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, Sequence[str]]] = deque()
        self._published = 0  # sequence number of the last batch queued
        self._delivered = 0  # ... and of the last batch the sink has returned from
        self._sink: Sink | None = None
        self._thread: threading.Thread | None = None

    def connect(self, sink: Sink) -> None:
        """Start delivering to `sink` (from a thread of the feed's own)."""
        with self._cond:
            self._sink = sink
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name="vnvdimm-sysfs-changes", daemon=True)
                self._thread.start()

    def disconnect(self) -> None:
        """Stop delivering: returns once the sink is not running and will not run again (the
        server may free what the sink uses). Batches not delivered are dropped."""
        with self._cond:
            self._sink = None
            self._queue.clear()
            self._delivered = self._published
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def publish(self, paths: Sequence[str]) -> None:
        """Queue stale paths; never blocks. Without a sink (no server caches anything) they
        are dropped."""
        if not paths:
            return
        with self._cond:
            if self._sink is None:
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
                self._cond.wait_for(lambda: self._queue or self._sink is None)
                if self._sink is None:
                    return
                sink = self._sink
                batches = list(self._queue)
                self._queue.clear()
            paths = [p for _, batch in batches for p in batch]
            try:
                sink(paths)
            except Exception:
                log.exception("cache invalidation failed")
            with self._cond:
                self._delivered = max(self._delivered, batches[-1][0])
                self._cond.notify_all()
