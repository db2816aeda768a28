"""`memmap/pause_at`: hold the background memmap initialization at a chosen point (for tests).

A vnvdimm extension on every pfn/dax device, mode 0644: the per-mille of the device's pages
(``pages_total``) at which background initialization pauses. ``1000`` (the default) never
pauses. When the device's ``pages_done`` reaches the mark, the engine's worker pool stops
taking new runs (``MemmapEngine.pause_background``: runs already handed out finish, so the
device stops at or a little past the mark); it stays paused until every device that holds it
has its mark raised (write a larger value, or ``1000``), or is disabled. The pool is shared, like
the kernel's async domain, so a pause holds back every device's background work; foreground
syncs (reads, writes and faults of the device files) still initialize the blocks they touch,
and writing ``sync`` to ``memmap_state`` waits until the pause is lifted.

The mark is the device's setting: it survives disable/enable (each new memmap job is held at
the same point), like ``memmap/ns_per_page``.
"""

from __future__ import annotations

import errno
import logging
import threading
import weakref
from typing import TYPE_CHECKING

from vnvdimm.model.base import fail, kstrtoull

if TYPE_CHECKING:
    from vnvdimm.model.personality import Pfn
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm.model")

NEVER = 1000
TICK_ACTIVE_S = 0.001  # how often progress is compared with the marks while a mark is pending
TICK_IDLE_S = 0.02


class PauseController:
    """Compares each marked device's progress with its mark and pauses/resumes the pool."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.marks: weakref.WeakKeyDictionary[Pfn, int] = weakref.WeakKeyDictionary()
        self.paused = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, dev: Pfn, permille: int) -> None:
        with self._lock:
            if permille >= NEVER:
                self.marks.pop(dev, None)
            else:
                self.marks[dev] = permille
            if self.marks and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="memmap-pause", daemon=True)
                self._thread.start()
        self._wake.set()
        self.evaluate()

    def get(self, dev: Pfn) -> int:
        return self.marks.get(dev, NEVER)

    def evaluate(self) -> bool:
        """Pause or resume the pool as the marks say; True while some mark is still ahead."""
        engine = self.system.engine
        hold, pending = [], False
        for dev, mark in list(self.marks.items()):
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
            if not self.marks and not self.paused:
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


_CONTROLLERS: weakref.WeakKeyDictionary[System, PauseController] = weakref.WeakKeyDictionary()
_CONTROLLERS_LOCK = threading.Lock()


def controller(system: System) -> PauseController:
    with _CONTROLLERS_LOCK:
        ctl = _CONTROLLERS.get(system)
        if ctl is None:
            ctl = _CONTROLLERS[system] = PauseController(system)
        return ctl


def show(dev: Pfn) -> str:
    return f"{controller(dev.system).get(dev)}\n"


def store(dev: Pfn, buf: bytes) -> None:
    value = kstrtoull(buf, 10)
    if value > NEVER:
        raise fail(errno.EINVAL, "pause_at is a per-mille value, 0 to 1000")
    controller(dev.system).set(dev, value)
