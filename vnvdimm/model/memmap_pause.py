"""`memmap/pause_at`: hold the background memmap initialization at a chosen point (for tests).

A vnvdimm extension on every pfn/dax device, mode 0644: the per-mille of the device's pages
(``pages_total``) at which background initialization pauses. ``1000`` (the default) never
pauses. When the device's ``pages_done`` reaches the mark, the engine's worker pool stops
taking new runs (``MemmapEngine.pause_background``), and the device's own background runs
never reach past the block where the mark falls (``MemmapJob.hold_background_at``), so it
stops at the mark, past it by less than one align block (foreground syncs excepted). It stays
paused until every device that holds it has its mark raised (write a larger value, or
``1000``), or is disabled. The pool is shared, like the kernel's async domain, so a pause
holds back every device's background work; foreground syncs (reads, writes and faults of the
device files) still initialize the blocks they touch, and writing ``sync`` to
``memmap_state`` waits until the pause is lifted.

The mark is the device's setting: it survives disable/enable (each new memmap job is held at
the same point), like ``memmap/ns_per_page``. A device created later (ndctl create-namespace,
or enable-namespace re-creating a personality from its info block) starts without one; for
those the bus-level ``ndbusN/vnvdimm/memmap_pause_at`` (0644, same format) sets a mark for
every pfn/dax device of the platform: each device holds at the lower of the two marks.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import TYPE_CHECKING, Protocol

from vnvdimm.model.base import Attr, fail, kstrtoull

if TYPE_CHECKING:
    from vnvdimm.memmap import MemmapJob
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm.model")

NEVER = 1000
TICK_ACTIVE_S = 0.001  # how often progress is compared with the marks while a mark is pending
TICK_IDLE_S = 0.02


class PausableDevice(Protocol):
    """A pfn/dax device as the controller sees it: its running job and its own mark."""

    name: str
    job: MemmapJob | None
    pause_mark: int


class PauseController:
    """Compares each running device's progress with its mark and pauses/resumes the pool.

    One per System (the pool is the System's). A device's mark is the device's own state
    (`pause_mark`); the controller holds the bus-level default mark and the devices whose
    memmap job is running."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.default_mark = NEVER  # the bus-level mark: every device's, unless its own is lower
        self.paused = False
        self._running: list[PausableDevice] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def set_default(self, permille: int) -> None:
        with self._lock:
            self.default_mark = min(permille, NEVER)
        self._rearm()

    def mark_changed(self, dev: PausableDevice) -> None:
        """A device's own mark was written."""
        self._rearm()

    def track(self, dev: PausableDevice) -> None:
        """A device's memmap job started: its progress is now compared with its mark."""
        with self._lock:
            if dev not in self._running:
                self._running.append(dev)
        self._rearm()

    def running(self) -> list[PausableDevice]:
        """The devices whose memmap job started and was not cancelled (it may be done)."""
        with self._lock:
            return list(self._running)

    def untrack(self, dev: PausableDevice) -> None:
        """A device's memmap job was cancelled (disable): it holds the pool no more."""
        with self._lock:
            if dev in self._running:
                self._running.remove(dev)
        self._wake.set()

    def _rearm(self) -> None:
        with self._lock:
            if self._armed() and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="memmap-pause", daemon=True)
                self._thread.start()
        self._wake.set()
        self.evaluate()

    def _armed(self) -> bool:
        return self.default_mark < NEVER or any(d.pause_mark < NEVER for d in self._running)

    def _marked(self) -> list[tuple[PausableDevice, int]]:
        """Each running device with a mark below NEVER, and its effective mark."""
        return [(d, mark) for d in self.running() if (mark := self.mark_of(d)) < NEVER]

    def mark_of(self, dev: PausableDevice) -> int:
        """The device's effective mark: the lower of its own and the bus-level one."""
        return min(dev.pause_mark, self.default_mark)

    def evaluate(self) -> bool:
        """Pause or resume the pool as the marks say; True while some mark is still ahead."""
        engine = self.system.engine
        hold, pending = [], False
        for dev in self.running():
            # Each job's background runs stop at its mark, so the mark is not overrun by a run
            # handed out before the pool was paused (MemmapJob.hold_background_at).
            job = dev.job
            if job is not None and job.active:
                job.hold_background_at(self.mark_of(dev))
        for dev, mark in self._marked():
            job = dev.job
            if job is None or not job.active:
                continue
            if job.pages_done * NEVER >= mark * job.pages_total:
                hold.append(dev.name)
            else:
                pending = True
        with self._lock:
            if engine is not None and bool(hold) != self.paused:
                self.paused = bool(hold)
                if hold:
                    engine.pause_background()
                    log.info("memmap: background initialization paused (pause_at reached by %s)", ", ".join(hold))
                else:
                    engine.resume_background()
                    log.info("memmap: background initialization resumed")
            if not self._armed() and not self.paused:
                self._thread = None
                return False
        return pending

    def _loop(self) -> None:
        while True:
            try:
                pending = self.evaluate()
            except Exception:  # never let the watcher die with the pool paused
                log.exception("memmap pause watcher failed")
                pending = False
            with self._lock:
                if self._thread is not threading.current_thread():
                    return
            self._wake.wait(TICK_ACTIVE_S if pending else TICK_IDLE_S)
            self._wake.clear()

    def bus_attr(self) -> Attr:
        """ndbusN/vnvdimm/memmap_pause_at: the mark of every pfn/dax device."""
        return Attr("memmap_pause_at", 0o644, show=lambda: f"{self.default_mark}\n",
                    store=lambda buf: self.set_default(parse_permille(buf)))


def parse_permille(buf: bytes) -> int:
    value = kstrtoull(buf, 10)
    if value > NEVER:
        raise fail(errno.EINVAL, "pause_at is a per-mille value, 0 to 1000")
    return value
