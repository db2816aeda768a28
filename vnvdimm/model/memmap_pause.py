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
the same point), like ``memmap/ns_per_page``. A device created later (ndctl create-namespace,
or enable-namespace re-creating a personality from its info block) starts without one; for
those the bus-level ``ndbusN/vnvdimm/memmap_pause_at`` (0644, same format) sets a mark for
every pfn/dax device of the platform: each device holds at the lower of the two marks.
"""

from __future__ import annotations

import errno
import logging
import threading
import weakref
from typing import TYPE_CHECKING

from vnvdimm.model.base import Attr, fail, kstrtoull

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
        self.default_mark = NEVER  # the bus-level mark: every device's, unless its own is lower
        self.paused = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, dev: Pfn | None, permille: int) -> None:
        """Set a device's mark, or the default mark of every device (dev None)."""
        with self._lock:
            if dev is None:
                self.default_mark = min(permille, NEVER)
            elif permille >= NEVER:
                self.marks.pop(dev, None)
            else:
                self.marks[dev] = permille
            if self._armed() and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="memmap-pause", daemon=True)
                self._thread.start()
        self._wake.set()
        self.evaluate()

    def _armed(self) -> bool:
        return bool(self.marks) or self.default_mark < NEVER

    def get(self, dev: Pfn) -> int:
        return self.marks.get(dev, NEVER)

    def _marked(self) -> list[tuple[Pfn, int]]:
        """Each device with a mark below NEVER, and its effective mark."""
        if self.default_mark >= NEVER:
            return list(self.marks.items())
        from vnvdimm.model.personality import Pfn

        with self.system.lock:  # the device lists change under the model lock only
            devices = [d for d in self.system.all_devices() if isinstance(d, Pfn)]
        return [(d, min(self.marks.get(d, NEVER), self.default_mark)) for d in devices]

    def evaluate(self) -> bool:
        """Pause or resume the pool as the marks say; True while some mark is still ahead."""
        engine = self.system.engine
        hold, pending = [], False
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
    controller(dev.system).set(dev, _permille(buf))


def _permille(buf: bytes) -> int:
    value = kstrtoull(buf, 10)
    if value > NEVER:
        raise fail(errno.EINVAL, "pause_at is a per-mille value, 0 to 1000")
    return value


def bus_attr(system: System) -> Attr:
    """ndbusN/vnvdimm/memmap_pause_at: the mark of every pfn/dax device."""
    return Attr("memmap_pause_at", 0o644, show=lambda: f"{controller(system).default_mark}\n",
                store=lambda buf: controller(system).set(None, _permille(buf)))
