"""One device's memmap: what to initialize, how far it got, and the foreground sync.

A :class:`MemmapJob` owns its :class:`~.blockmap.BlockMap` and its :class:`~.lease.StorageLease`,
and guards both with its own lock. It knows the engine only through :class:`JobHost`: where
callbacks run, and whom to tell when blocks become pending again, when the job goes idle and
when its storage may go. The dispatcher and the background thread drive it through
:meth:`claim_run`, :meth:`complete`, :meth:`requeue` and :meth:`fail`.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .blockmap import FG, BlockMap
from .lease import LeaseReleased, StorageLease
from .page import PAGE_DTYPE, PAGES_PER_SECTION, VMEMMAP_BASE, kpagecount_of, kpageflags_of
from .storage import DevStorage, Geometry, MemStorage, initialize_pages

log = logging.getLogger("vnvdimm.memmap")

RUN_TARGET_S = 0.010  # with an ns_per_page floor, size runs to ~10 ms so progress stays visible
# Sections per background run without a floor (~1.5 ms of work each on fresh memory). Every run
# costs the dispatcher ~0.2 ms of the engine process' CPU (messages, claim, completion): four
# sections per run cut that from 71 to 42-51 ms per 64 GiB, but a foreground access that finds
# its block queued in a worker then waits for up to two longer runs (first-access p99 80-100 ms
# against 20-30 ms, same host, same noise), so one it is.
RUN_SECTIONS = 1
RELEASE_WAIT_S = 4.0  # cancel()/release() give up waiting for the storage to go after this


class JobCancelled(OSError):
    """The job was cancelled (device disabled/unbound): ENXIO, as a vanished device."""

    def __init__(self, message: str = "memmap job cancelled") -> None:
        super().__init__(errno.ENXIO, message)


@dataclass
class JobSpec:
    """What to initialize; see the package docstring for each field."""

    name: str
    first_pfn: int
    npages: int
    reserve_pages: int = 0
    altmap_pages: int = 0
    align_pages: int = 512
    nid: int = 0
    pgmap: int = 0
    storage: MemStorage | DevStorage = field(default_factory=MemStorage)
    ns_per_page: float = 0.0
    vmemmap_base: int = VMEMMAP_BASE
    # Background runs stop where this per mille of the pages is reached (MemmapJob.hold_background_at);
    # 1000: no hold. Set at creation so that a job held from the start does not run its first run.
    hold_permille: int = 1000

    def validate(self) -> None:
        if self.npages < 0 or self.first_pfn < 0:
            raise ValueError("first_pfn and npages must be >= 0")
        if not 0 <= self.reserve_pages <= self.npages:
            raise ValueError("reserve_pages must be within [0, npages]")
        if not 0 <= self.altmap_pages <= self.npages:
            raise ValueError("altmap_pages must be within [0, npages]")
        if self.align_pages < 1:
            raise ValueError("align_pages must be >= 1")
        if self.ns_per_page < 0:
            raise ValueError("ns_per_page must be >= 0")
        if not 0 <= self.hold_permille <= 1000:
            raise ValueError("hold_permille must be within [0, 1000]")
        if not isinstance(self.storage, MemStorage | DevStorage):
            raise TypeError("storage must be MemStorage or DevStorage")

    def geometry(self) -> Geometry:
        st = self.storage
        return Geometry(
            first_pfn=self.first_pfn, npages=self.npages, reserve_pages=self.reserve_pages,
            altmap_pages=self.altmap_pages, align_pages=self.align_pages, nid=self.nid,
            pgmap=self.pgmap, vmemmap_base=self.vmemmap_base,
            path=st.path if isinstance(st, DevStorage) else None,
            offset=st.offset if isinstance(st, DevStorage) else 0,
        )


class JobHost(Protocol):
    """What a job needs from its engine."""

    @property
    def workers(self) -> int: ...

    @property
    def debug(self) -> bool: ...

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` soon on a thread that may block, never the caller's (callbacks, unmaps)."""

    def in_service_thread(self) -> bool:
        """True on the thread that runs deferred calls (it must not wait for them)."""

    def work_available(self, job: MemmapJob) -> None:
        """Blocks of ``job`` became pending again."""

    def job_idle(self, job: MemmapJob) -> None:
        """``job`` went idle (done or cancelled); called once."""

    def job_releasing(self, job: MemmapJob) -> None:
        """Release of ``job``'s storage was asked for; called once."""

    def job_released(self, job: MemmapJob) -> None:
        """``job``'s storage is freed."""


class MemmapJob:
    """One device's memmap: created by :meth:`MemmapEngine.create_job`."""

    def __init__(self, host: JobHost, jid: int, spec: JobSpec) -> None:
        self._host = host
        self.id = jid
        self.spec = spec
        self.name = spec.name
        self.geom = spec.geometry()
        self._ns_per_page = float(spec.ns_per_page)
        self._lock = threading.Lock()
        # _progress wakes sync_range waiters at every completed run; _idle wakes wait() only at
        # the end, so a waiter of the whole job (sync mode, `echo sync > memmap_state`) is not
        # woken (a cross-CPU wakeup) for every run.
        self._progress = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._cancel_evt = threading.Event()
        self._blocks = BlockMap(self.geom, count_completions=host.debug)
        self._lease = StorageLease(self.geom, spec.name, ns_per_page=self._ns_per_page, defer=host.defer,
                                   on_released=lambda: host.job_released(self))
        self._subs: list[Callable[[MemmapJob], None]] = []
        self._error: str | None = None
        self._t0 = time.monotonic()
        self._done = self._blocks.done
        self._t_end: float | None = self._t0 if self._done else None
        self._notified = self._done  # nothing can have subscribed yet
        self._cancelled = False
        self._release_requested = False
        self._claim_stop = self._stop_block(spec.hold_permille)

    # -- public state ----------------------------------------------------------------------------
    @property
    def lease(self) -> StorageLease:
        """The job's storage (the dispatcher lends it to the workers)."""
        return self._lease

    @property
    def active(self) -> bool:
        return not self._done and not self._cancelled

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def error(self) -> str | None:
        """Why the job was cancelled by the engine itself (e.g. ENOSPC in phase 1), else None."""
        return self._error

    @property
    def pages_done(self) -> int:
        return self._blocks.pages_done

    @property
    def pages_total(self) -> int:
        return self._blocks.pages_total

    @property
    def elapsed(self) -> float:
        end = self._t_end
        return (end if end is not None else time.monotonic()) - self._t0

    @property
    def rate(self) -> float:
        el = self.elapsed
        return self.pages_done / el if el > 0 else 0.0

    @property
    def ns_per_page(self) -> float:
        return self._ns_per_page

    @ns_per_page.setter
    def ns_per_page(self, value: float) -> None:
        if value < 0:
            raise ValueError("ns_per_page must be >= 0")
        # Published in the storage's control page: every initializer, in this process or a
        # worker, reads it between chunks (and while sleeping for the floor), so it applies at
        # once to the runs in flight too.
        self._ns_per_page = float(value)
        self._lease.set_ns_per_page(self._ns_per_page)

    @property
    def workers(self) -> int:
        """Pool size of the engine (0: the in-process background thread)."""
        return self._host.workers

    @property
    def owners_used(self) -> frozenset[int]:
        """Initializers (``FG``, ``BG``, ``WORKER_BASE + slot``) that completed blocks."""
        return self._blocks.owners_used

    @property
    def workers_used(self) -> int:
        """Distinct background initializers (worker slots / background thread) that completed runs."""
        return len(self._blocks.owners_used - {FG})

    @property
    def sections_total(self) -> int:
        return self.geom.nsections

    @property
    def sections_populated(self) -> int:
        """Phase 1 progress: sections whose record storage exists."""
        return self._blocks.sections_populated

    def block_states(self) -> np.ndarray:
        """A copy of the per-block state array (PENDING/DONE/claimed-by-owner)."""
        return self._blocks.states()

    def debug_init_counts(self) -> np.ndarray:
        """Completions per block (engine created with ``debug=True``): all 1 when idle."""
        counts = self._blocks.completions()
        if counts is None:
            raise RuntimeError("engine not created with debug=True")
        return counts

    # -- driven by the dispatcher and the background thread ---------------------------------------
    def run_pages(self) -> int:
        """Pages per background run: RUN_SECTIONS sections, or ~RUN_TARGET_S of work under an
        ns floor (so progress stays visible)."""
        ns = self._ns_per_page
        most = RUN_SECTIONS * PAGES_PER_SECTION
        target = most if ns <= 0 else int(RUN_TARGET_S / (ns * 1e-9))
        return max(self.geom.align_pages, min(most, target))

    def claim_run(self, owner: int) -> tuple[int, int] | None:
        """Claim the next run of pending blocks for ``owner`` (None: nothing pending, or
        nothing before the hold)."""
        with self._lock:
            if not self.active:
                return None
            return self._blocks.claim_next(owner, self.run_pages(), stop_block=self._claim_stop)

    def hold_background_at(self, permille: int) -> None:
        """Background runs claim only the blocks (in block order) that bring the job to
        ``permille`` of its pages (1000: all). A pause mark (model/memmap_pause.py) is then
        reached within a block instead of a run (a section: half of a small device); the
        mark's pause of the pool still holds the runs of the other devices. Foreground syncs
        are not held. Raising the hold makes the job dispatchable again."""
        stop = self._stop_block(permille)
        with self._lock:
            raised = stop > self._claim_stop
            self._claim_stop = stop
            active = self.active
        if raised and active:
            self._host.work_available(self)

    def _stop_block(self, permille: int) -> int:
        g = self.geom
        if permille >= 1000:
            return g.nblocks
        pages = -(-permille * self.pages_total // 1000)  # ceil: the mark is reached, not missed
        if pages == 0:
            return 0
        return min(g.nblocks, -(-(g.reserve_pages + pages) // g.align_pages))

    def pages_of(self, b0: int, b1: int) -> tuple[int, int]:
        return self._blocks.pages_of(b0, b1)

    def sections_to_populate(self, lo: int, hi: int) -> list[int]:
        with self._lock:
            return self._blocks.unpopulated_sections(lo, hi)

    def complete(self, b0: int, b1: int, owner: int, populated: list[int] | tuple[int, ...] = ()) -> None:
        """``owner`` initialized blocks [b0, b1); ``populated``: sections it ran phase 1 for."""
        with self._lock:
            self._blocks.mark_populated(populated)
            if self._cancelled:
                self._blocks.requeue(b0, b1, owner)  # nothing stays claimed
                self._progress.notify_all()
                return
            self._blocks.complete(b0, b1, owner)
            self._progress.notify_all()
            went_idle = self._blocks.done and self._go_idle_locked()
        if went_idle:
            self._after_idle()

    def requeue(self, b0: int, b1: int, owner: int) -> None:
        """``owner`` gave blocks [b0, b1) up (cancel, crash, error, handoff): pending again."""
        with self._lock:
            given_back = self._blocks.requeue(b0, b1, owner)
            # A sync_range waiting for these blocks takes them over itself.
            self._progress.notify_all()
            active = self.active
        if given_back and active:
            self._host.work_available(self)

    def fail(self, message: str) -> None:
        """Cancel the job for an error of the engine's own (e.g. ENOSPC in phase 1)."""
        log.error("memmap %s: %s; cancelling the job", self.name, message)
        self._error = message
        self._end(wait=False)

    def run_claimed(self, runs: list[tuple[int, int]], owner: int) -> None:
        """Initialize runs claimed for ``owner`` in this thread (the background thread)."""
        self._initialize_here(runs, owner, raise_errors=False)

    # -- foreground ---------------------------------------------------------------------------------
    def sync_range(self, first_page: int, npages: int) -> None:
        """Return when every page of [first_page, first_page + npages) is initialized.

        Initializes the pending blocks covering the range in the calling thread and waits for
        those a worker holds. Raises :class:`JobCancelled` if the job is (or gets) cancelled.
        """
        if self._done:
            return  # the fast path: one attribute read
        if self._cancelled:
            raise JobCancelled()
        cover = self._blocks.blocks_covering(first_page, npages)
        if cover is None:
            return
        b0, b1 = cover
        if self._blocks.all_done(b0, b1):  # O(blocks covered), no lock
            return
        # A run we initialize is completed section by section, so that the waiters on its first
        # blocks (other threads, other accesses) do not wait for all of it.
        max_blocks = max(1, PAGES_PER_SECTION // self.geom.align_pages)
        while True:
            with self._lock:
                if self._cancelled:
                    raise JobCancelled()
                if self._blocks.all_done(b0, b1):
                    return
                runs = self._blocks.claim_pending_in(b0, b1, FG, max_blocks)
                if not runs:
                    # Everything left is held by a worker (or another thread): wait for any
                    # progress, then look again (a block given back by a dead or stalled worker
                    # is PENDING again, and then we take it ourselves).
                    self._progress.wait()
                    continue
            self._initialize_here(runs, FG, raise_errors=True)

    def _initialize_here(self, runs: list[tuple[int, int]], owner: int, raise_errors: bool) -> None:
        """Initialize claimed runs in this process; completed run by run, the rest given back."""
        populated: list[int] = []
        next_run = 0  # runs[next_run:] are still claimed by us
        try:
            with self._lease.use() as m:
                def ensure_section(js: int) -> None:
                    if not self._blocks.is_populated(js):  # a hint: populating twice is harmless
                        m.populate_section(js)
                        populated.append(js)

                def pause(t: float) -> bool:
                    return self._cancel_evt.wait(t) if t > 0 else self._cancel_evt.is_set()

                for b0, b1 in runs:
                    lo, hi = self._blocks.pages_of(b0, b1)
                    if not initialize_pages(m, lo, hi, ensure_section=ensure_section, pause=pause):
                        break
                    # Completed run by run, so waiters on the first blocks need not wait for all.
                    self.complete(b0, b1, owner, populated)
                    populated = []
                    next_run += 1
        except LeaseReleased:
            pass  # cancelled and released before we started
        except Exception as exc:
            if raise_errors:
                raise
            self.fail(f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._blocks.mark_populated(populated)
            for b0, b1 in runs[next_run:]:
                self.requeue(b0, b1, owner)
        if self._cancelled and owner == FG:
            raise JobCancelled()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is idle (done or cancelled): True, or False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self.active, timeout)

    def cancel(self, *, wait: bool = True) -> None:
        """Stop all work on the job and free its storage (waited for unless ``wait=False``).

        Prompt and idempotent."""
        self._end(wait=wait)

    def release(self) -> None:
        """Free the storage of an idle job (cancels it first if it is still active)."""
        self._end(wait=True)

    def wait_released(self, timeout: float | None) -> bool:
        return self._lease.wait_released(timeout)

    def subscribe(self, callback: Callable[[MemmapJob], None]) -> None:
        """Call ``callback(job)`` from an engine thread when the job goes idle (done or cancelled).

        If the job is already idle, the callback is called at once, in the caller's thread.
        """
        with self._lock:
            if self.active:
                self._subs.append(callback)
                return
        callback(self)

    # -- idle and release ------------------------------------------------------------------------
    def _go_idle_locked(self) -> bool:
        """Record the idle transition; True the first time (then call :meth:`_after_idle`)."""
        if self._notified:
            return False
        self._notified = True
        self._done = self._blocks.done
        if self._t_end is None:
            self._t_end = time.monotonic()
        self._progress.notify_all()
        self._idle.notify_all()
        return True

    def _after_idle(self) -> None:
        with self._lock:
            subs, self._subs = self._subs, []
        self._host.job_idle(self)
        for cb in subs:
            self._host.defer(lambda cb=cb: cb(self))

    def _end(self, wait: bool) -> None:
        with self._lock:
            first = not self._release_requested
            went_idle = False
            if first:
                self._release_requested = True
                if self.active:
                    self._cancelled = True
                    went_idle = self._go_idle_locked()
                self._cancel_evt.set()
                self._progress.notify_all()
                self._idle.notify_all()
        if first:
            if went_idle:
                self._after_idle()
            self._host.job_releasing(self)
            self._lease.release()
        # (A subscriber cancelling from its callback runs on the thread that releases: it must
        # not wait for itself.)
        if wait and not self._host.in_service_thread() and not self._lease.wait_released(RELEASE_WAIT_S):
            log.error("memmap %s: storage not released in time", self.name)

    # -- read-only views (never trigger initialization) ---------------------------------------
    def _clip(self, first: int, count: int) -> tuple[int, int]:
        if first < 0 or count < 0:
            raise ValueError("negative page index or count")
        first = min(first, self.geom.npages)
        return first, min(count, self.geom.npages - first)

    def raw_records(self, first_page: int, count: int) -> bytes:
        """The stored 64-byte records of pages [first_page, first_page + count), as they are."""
        first, count = self._clip(first_page, count)
        if count == 0:
            return b""
        try:
            return self._lease.read_records(first, count)
        except LeaseReleased:
            raise JobCancelled("memmap storage released") from None

    def records(self, first_page: int, count: int) -> np.ndarray:
        """:meth:`raw_records` as a :data:`PAGE_DTYPE` array (a copy)."""
        return np.frombuffer(self.raw_records(first_page, count), dtype=PAGE_DTYPE).copy()

    def initialized(self, first_page: int, count: int) -> np.ndarray:
        """Per page: True when initialized (never for the reserve)."""
        first, count = self._clip(first_page, count)
        return self._blocks.initialized(first, count)

    def kpageflags(self, first_page: int, count: int) -> bytes:
        """u64 LE per page as /proc/kpageflags: KPF_NOPAGE where not initialized."""
        present = self.initialized(first_page, count)  # before reading: see raw_records
        recs = np.frombuffer(self.raw_records(first_page, len(present)), dtype=PAGE_DTYPE)
        return kpageflags_of(recs, present).astype("<u8").tobytes()

    def kpagecount(self, first_page: int, count: int) -> bytes:
        """u64 LE per page as /proc/kpagecount: page_mapcount(), 0 where not initialized."""
        present = self.initialized(first_page, count)
        recs = np.frombuffer(self.raw_records(first_page, len(present)), dtype=PAGE_DTYPE)
        return kpagecount_of(recs, present).astype("<u8").tobytes()

    def pageblock_migratetype(self, first_pageblock: int, count: int) -> np.ndarray:
        """Migratetype of pageblocks (index relative to the job's first pageblock, pfn >> 9)."""
        n = self.geom.npageblocks
        if first_pageblock < 0 or count < 0:
            raise ValueError("negative pageblock index or count")
        first = min(first_pageblock, n)
        try:
            return self._lease.read_usemap(first, min(count, n - first))
        except LeaseReleased:
            raise JobCancelled("memmap storage released") from None

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else ("active" if self.active else "idle")
        return f"<MemmapJob {self.name} {state} {self.pages_done}/{self.pages_total}>"
