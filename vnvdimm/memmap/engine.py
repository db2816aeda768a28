"""The memmap init engine: jobs, block states, the worker pool and the foreground sync.

Concurrency model (why it is safe):

* Every claim is made in this (the engine's) process under ``engine._lock``: a block goes
  PENDING -> claimed(owner) -> DONE, or back to PENDING when its initializer gave up (cancel,
  crash, error). Only the owner that claimed a block may complete it, so a block is initialized
  (completed) exactly once, and a worker's death loses nothing the engine does not know about.
* The dispatcher thread is the only one that talks to the workers. It keeps up to
  ``RUNS_IN_FLIGHT`` runs queued per worker, so a worker never idles on the round trip.
* A job's storage (its mapping in this process, its memfd) is reference counted by ``_users``:
  foreground/background threads using the mapping, the dispatcher (until it has told every
  worker the job is over), and each worker still holding a mapping that must be acknowledged. The
  storage is released (by the service thread) only when that count reaches zero.
* User callbacks (``subscribe``) and the release of storage run on the service thread, never
  under the lock and never on a caller's thread (except the "already idle" case of subscribe).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import logging
import os
import pickle
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .page import (
    PAGE_DTYPE,
    PAGES_PER_SECTION,
    PFN_SECTION_SHIFT,
    RECORD_SIZE,
    VMEMMAP_BASE,
    kpagecount_of,
    kpageflags_of,
)
from .storage import DevStorage, Geometry, Mapping, MemStorage, create_memfd, initialize_pages

log = logging.getLogger("vnvdimm.memmap")

# Block states (uint8 per block). Workers own slots 0..N-1 and claim as WORKER_BASE + slot.
PENDING = 0
DONE = 1
FG = 2  # claimed by a foreground sync_range (any thread of the engine process)
BG = 3  # claimed by the in-process background thread (workers=0)
WORKER_BASE = 4
MAX_WORKERS = 255 - WORKER_BASE

RUNS_IN_FLIGHT = 2  # runs queued per worker: one being initialized, one waiting
RUN_TARGET_S = 0.010  # with an ns_per_page floor, size runs to ~10 ms so progress stays visible
ACK_TIMEOUT_S = 0.8  # a worker that does not acknowledge a cancel in this time is killed
REAP_TIMEOUT_S = 2.0
MAX_RESTARTS = 8  # replacements allowed per RESTART_WINDOW_S before a slot is left empty
RESTART_WINDOW_S = 30
MSG_MAX = 1 << 16

_FORK_BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2,
                         signal.SIGCHLD, signal.SIGALRM}
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    mode: str = "async"
    vmemmap_base: int = VMEMMAP_BASE

    def validate(self) -> None:
        if self.mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', not {self.mode!r}")
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
        if not isinstance(self.storage, MemStorage | DevStorage):
            raise TypeError("storage must be MemStorage or DevStorage")


class MemmapJob:
    """One device's memmap: created by :meth:`MemmapEngine.create_job`."""

    def __init__(self, engine: MemmapEngine, jid: int, spec: JobSpec) -> None:
        self._engine = engine
        self.id = jid
        self.spec = spec
        self.name = spec.name
        st = spec.storage
        self.geom = Geometry(
            first_pfn=spec.first_pfn, npages=spec.npages, reserve_pages=spec.reserve_pages,
            altmap_pages=spec.altmap_pages, align_pages=spec.align_pages, nid=spec.nid,
            pgmap=spec.pgmap, vmemmap_base=spec.vmemmap_base,
            path=st.path if isinstance(st, DevStorage) else None,
            offset=st.offset if isinstance(st, DevStorage) else 0,
        )
        g = self.geom
        self._ns_per_page = float(spec.ns_per_page)
        # Two conditions on the engine lock: _cond wakes sync_range waiters at every completed
        # run; _idle_cond wakes wait() only at the end, so a waiter of the whole job (sync mode,
        # `echo sync > memmap_state`) is not woken (a cross-CPU wakeup) for every run.
        self._cond = threading.Condition(engine._lock)
        self._idle_cond = threading.Condition(engine._lock)
        self._cancel_evt = threading.Event()
        self._released = threading.Event()
        self._subs: list[Callable[[MemmapJob], None]] = []
        self._notified = False
        self._error: str | None = None

        # Storage (created here: O(1), sparse).
        self._memfd = create_memfd(g, spec.name)
        self._read_fd: int | None = None
        try:
            self._map: Mapping | None = Mapping(g, self._memfd)
            if g.path is not None:
                self._read_fd = os.open(g.path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._memfd)
            raise

        # Block states: np.zeros is calloc, so even 512 Ki blocks cost nothing until touched.
        A = g.align_pages
        nb = g.nblocks
        self._state = np.zeros(nb, dtype=np.uint8)
        # Blocks lying wholly in the reserve have nothing to initialize.
        full_reserve_blocks = nb if g.reserve_pages >= g.npages else g.reserve_pages // A
        self._state[:full_reserve_blocks] = DONE
        self._blocks_left = nb - full_reserve_blocks
        self._cursor = full_reserve_blocks
        self._sec_pop = np.zeros(g.nsections, dtype=np.uint8)
        self._pages_total = g.npages - g.reserve_pages
        self._pages_done = 0
        self._init_counts = np.zeros(nb, dtype=np.uint16) if engine.debug else None
        self._owners_used: set[int] = set()

        self._t0 = time.monotonic()
        self._t_end: float | None = None
        self._done = self._blocks_left == 0
        self._cancelled = False
        self._release_requested = False
        self._release_started = False
        self._users = 0  # see module docstring
        self._disp_ref = False
        self._attached: set[int] = set()  # worker slots holding a mapping
        self._acks: set[int] = set()  # worker slots that must acknowledge a cancel
        self._detach_acks: set[int] = set()  # ... a detach (the job is done)
        self._cancel_time = 0.0
        if self._done:
            self._t_end = self._t0

    # -- geometry helpers ----------------------------------------------------------------------
    def _pages_of(self, b0: int, b1: int) -> tuple[int, int]:
        g = self.geom
        return max(b0 * g.align_pages, g.reserve_pages), min(b1 * g.align_pages, g.npages)

    def _npages_of(self, b0: int, b1: int) -> int:
        lo, hi = self._pages_of(b0, b1)
        return max(0, hi - lo)

    def _clip(self, first: int, count: int) -> tuple[int, int]:
        if first < 0 or count < 0:
            raise ValueError("negative page index or count")
        first = min(first, self.geom.npages)
        return first, min(count, self.geom.npages - first)

    # -- public state ----------------------------------------------------------------------------
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
        return self._pages_done

    @property
    def pages_total(self) -> int:
        return self._pages_total

    @property
    def elapsed(self) -> float:
        end = self._t_end
        return (end if end is not None else time.monotonic()) - self._t0

    @property
    def rate(self) -> float:
        el = self.elapsed
        return self._pages_done / el if el > 0 else 0.0

    @property
    def ns_per_page(self) -> float:
        return self._ns_per_page

    @ns_per_page.setter
    def ns_per_page(self, value: float) -> None:
        if value < 0:
            raise ValueError("ns_per_page must be >= 0")
        # Read at the start of each run/chunk: takes effect for the next run.
        self._ns_per_page = float(value)

    @property
    def workers(self) -> int:
        """Pool size of the engine (0: the in-process background thread)."""
        return self._engine.workers

    @property
    def workers_used(self) -> int:
        """Distinct background initializers (worker slots / background thread) that completed runs."""
        return len(self._owners_used - {FG})

    @property
    def sections_total(self) -> int:
        return self.geom.nsections

    @property
    def sections_populated(self) -> int:
        """Phase 1 progress: sections whose record storage exists."""
        return int(np.count_nonzero(self._sec_pop))

    @property
    def blocks_total(self) -> int:
        return self.geom.nblocks

    def block_states(self) -> np.ndarray:
        """A copy of the per-block state array (PENDING/DONE/claimed-by-owner)."""
        return self._state.copy()

    def debug_init_counts(self) -> np.ndarray:
        """Completions per block (engine created with ``debug=True``): all 1 when idle."""
        if self._init_counts is None:
            raise RuntimeError("engine not created with debug=True")
        return self._init_counts.copy()

    # -- foreground sync -----------------------------------------------------------------------
    def sync_range(self, first_page: int, npages: int) -> None:
        """Return when every page of [first_page, first_page + npages) is initialized.

        Initializes the pending blocks covering the range in the calling thread and waits for
        those a worker holds. Raises :class:`JobCancelled` if the job is (or gets) cancelled.
        """
        if self._done:
            return  # the fast path: one attribute read
        if self._cancelled:
            raise JobCancelled()
        g = self.geom
        lo = max(first_page, g.reserve_pages)
        hi = min(first_page + npages, g.npages)
        if lo >= hi:
            return
        A = g.align_pages
        b0, b1 = lo // A, (hi - 1) // A + 1
        st = self._state
        if (st[b0:b1] == DONE).all():  # O(blocks covered), no lock
            return
        eng = self._engine
        # A run we initialize is completed section by section, so that the waiters on its first
        # blocks (other threads, other accesses) do not wait for all of it.
        max_blocks = max(1, PAGES_PER_SECTION // A)
        while True:
            with eng._lock:
                if self._cancelled:
                    raise JobCancelled()
                seg = st[b0:b1]
                if (seg == DONE).all():
                    return
                mine = np.flatnonzero(seg == PENDING)
                if mine.size:
                    seg[mine] = FG
                    self._users += 1
                else:
                    # Everything left is held by a worker (or another thread): wait for any
                    # progress, then look again (a block given back by a dead worker is PENDING
                    # again, and then we take it ourselves).
                    self._cond.wait()
                    continue
            mine += b0
            breaks = np.flatnonzero(np.diff(mine) != 1) + 1
            runs = []
            for r in np.split(mine, breaks):
                first, end = int(r[0]), int(r[-1]) + 1
                runs += [(x, min(x + max_blocks, end)) for x in range(first, end, max_blocks)]
            eng._init_in_engine(self, runs, FG, raise_errors=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is idle (done or cancelled): True, or False on timeout."""
        with self._engine._lock:
            return self._idle_cond.wait_for(lambda: not self.active, timeout)

    def cancel(self) -> None:
        """Stop all work on the job and free its storage. Prompt and idempotent."""
        self._engine._cancel_job(self, wait=True)

    def release(self) -> None:
        """Free the storage of an idle job (cancels it first if it is still active)."""
        self._engine._cancel_job(self, wait=True)

    def subscribe(self, callback: Callable[[MemmapJob], None]) -> None:
        """Call ``callback(job)`` from an engine thread when the job goes idle (done or cancelled).

        If the job is already idle, the callback is called at once, in the caller's thread.
        """
        with self._engine._lock:
            if self.active:
                self._subs.append(callback)
                return
        callback(self)

    # -- read-only views (never trigger initialization) ---------------------------------------
    @contextlib.contextmanager
    def _storage_ref(self) -> Any:
        with self._engine._lock:
            if self._release_started or self._map is None:
                raise JobCancelled("memmap storage released")
            self._users += 1
        try:
            yield
        finally:
            with self._engine._lock:
                self._users -= 1
                self._engine._maybe_release_locked(self)

    def raw_records(self, first_page: int, count: int) -> bytes:
        """The stored 64-byte records of pages [first_page, first_page + count), as they are."""
        first, count = self._clip(first_page, count)
        if count == 0:
            return b""
        with self._storage_ref():
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
            data = b"".join(parts)
        return data.ljust(count * RECORD_SIZE, b"\0")

    def records(self, first_page: int, count: int) -> np.ndarray:
        """:meth:`raw_records` as a :data:`PAGE_DTYPE` array (a copy)."""
        return np.frombuffer(self.raw_records(first_page, count), dtype=PAGE_DTYPE).copy()

    def initialized(self, first_page: int, count: int) -> np.ndarray:
        """Per page: True when initialized (never for the reserve)."""
        first, count = self._clip(first_page, count)
        pages = np.arange(first, first + count, dtype=np.int64)
        out = self._state[pages // self.geom.align_pages] == DONE
        out &= pages >= self.geom.reserve_pages
        return out

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
        count = min(count, n - first)
        with self._storage_ref():
            assert self._map is not None
            return self._map.usemap[first : first + count].copy()

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else ("active" if self.active else "idle")
        return f"<MemmapJob {self.name} {state} {self._pages_done}/{self._pages_total}>"


class _Worker:
    """The engine's handle on one worker process."""

    def __init__(self, slot: int, pid: int, sock: socket.socket, popen: subprocess.Popen[bytes] | None):
        self.slot = slot
        self.owner = WORKER_BASE + slot
        self.pid = pid
        self.sock = sock
        self.popen = popen
        self.ready = False
        self.dead = False
        self.outstanding: dict[int, tuple[MemmapJob, int, int]] = {}

    def reap(self, timeout: float) -> None:
        """Wait for the process to exit; SIGKILL it after ``timeout``. Leaves no zombie."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                return
            time.sleep(0.002)


_live_engines: weakref.WeakSet[MemmapEngine] = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    # A program that forgot close(): its workers would exit on EOF anyway, but close() also
    # reaps them and frees the storage in order.
    for eng in list(_live_engines):
        with contextlib.suppress(Exception):
            eng.close()


class MemmapEngine:
    """A pool of worker processes shared by every job (the kernel's async domain)."""

    def __init__(self, workers: int | None = None, *, debug: bool = False) -> None:
        n = (os.cpu_count() or 1) if workers is None else workers
        if not 0 <= n <= MAX_WORKERS:
            raise ValueError(f"workers must be within [0, {MAX_WORKERS}]")
        self._nworkers = n
        self.debug = debug
        self._lock = threading.Lock()
        self._work_cond = threading.Condition(self._lock)  # background thread (workers=0)
        self._jobs: dict[int, MemmapJob] = {}
        self._rr: deque[MemmapJob] = deque()  # jobs that may have pending blocks
        self._ids = itertools.count(1)
        self._run_ids = itertools.count(1)
        self._paused = False
        self._started = False
        self._closing = False
        self._closed = False
        self._cmds: deque[tuple[Any, ...]] = deque()
        self._workers: list[_Worker | None] = []
        self._wake_r = self._wake_w = -1
        self._threads: list[threading.Thread] = []
        self._service_q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._service_thread: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None
        self.replacements = 0  # workers restarted after a crash
        self._restarts: list[float] = []

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return self._nworkers

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes (for tests and status)."""
        with self._lock:
            return [w.pid for w in self._workers if w is not None and not w.dead]

    def start(self) -> None:
        """Start the workers (fork if this process has no other thread yet) and engine threads."""
        with self._lock:
            if self._started:
                return
            if self._closed:
                raise RuntimeError("engine is closed")
            self._started = True
        _live_engines.add(self)
        # Fork is fast (ms) but only safe before any other thread exists; otherwise spawn.
        can_fork = threading.active_count() == 1
        for slot in range(self._nworkers):
            self._workers.append(self._start_worker(slot, fork=can_fork))
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._service_thread = threading.Thread(target=self._service_loop, name="memmap-service",
                                                daemon=True)
        self._service_thread.start()
        if self._nworkers:
            self._dispatcher = threading.Thread(target=self._dispatch_loop, name="memmap-dispatch",
                                                daemon=True)
            self._dispatcher.start()
        else:
            t = threading.Thread(target=self._bg_loop, name="memmap-bg", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        """Cancel every job, stop and reap the workers, free all storage. Idempotent."""
        with self._lock:
            if self._closing:
                already = True
            else:
                already = False
                self._closing = True
            jobs = list(self._jobs.values())
        if already:
            self._wait_closed()
            return
        for job in jobs:
            self._cancel_job(job, wait=False)
        in_service = threading.current_thread() is self._service_thread
        if not in_service:
            for job in jobs:
                job._released.wait(REAP_TIMEOUT_S + 1)
        with self._lock:
            self._work_cond.notify_all()
        if self._dispatcher is not None:
            self._post(("exit",))
            self._dispatcher.join(REAP_TIMEOUT_S * 2 + 1)
        for t in self._threads:
            t.join(5)
        # Any worker the dispatcher could not stop (it should have): make sure.
        for w in self._workers:
            if w is not None and not w.dead:
                w.dead = True
                with contextlib.suppress(OSError):
                    w.sock.close()
                w.reap(REAP_TIMEOUT_S)
        if self._service_thread is not None and not in_service:
            self._service_q.put(None)
            self._service_thread.join(5)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        with self._lock:
            self._closed = True

    def _wait_closed(self) -> None:
        deadline = time.monotonic() + 10
        while not self._closed and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> MemmapEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pause_background(self) -> None:
        """Stop handing out new background runs (runs already queued finish). For tests."""
        with self._lock:
            self._paused = True

    def resume_background(self) -> None:
        with self._lock:
            self._paused = False
            self._work_cond.notify_all()
        self._wake()

    # -- jobs ------------------------------------------------------------------------------------
    def create_job(self, spec: JobSpec) -> MemmapJob:
        """Create a job: returns at once in async mode, when it is done in sync mode."""
        spec.validate()
        if not self._started:
            self.start()
        with self._lock:
            if self._closing:
                raise RuntimeError("engine is closed")
            jid = next(self._ids)
        job = MemmapJob(self, jid, spec)
        with self._lock:
            if self._closing:
                job._cancelled = True
                self._start_release_locked(job)
                raise RuntimeError("engine is closed")
            self._jobs[jid] = job
            if job._done:
                pass
            elif self._nworkers:
                # The dispatcher attaches the workers first, then makes the job dispatchable.
                job._disp_ref = True
                job._users += 1
                self._cmds.append(("attach", job))
            else:
                self._rr.append(job)
                self._work_cond.notify_all()
        if job._done:
            self._schedule_notify(job)
        self._wake()
        if spec.mode == "sync":
            if not self._nworkers:
                self._help(job)  # no pool: the caller is the initializer, as before the series
            job.wait()
            if job.cancelled:
                raise JobCancelled()
        return job

    def _help(self, job: MemmapJob) -> None:
        """Initialize runs of ``job`` in the calling thread until none is pending."""
        while True:
            with self._lock:
                if job._cancelled:
                    return
                r = self._claim_run_locked(job, FG)
                if r is None:
                    return
                job._users += 1
            self._init_in_engine(job, [r], FG, raise_errors=True)

    def _run_pages_for(self, job: MemmapJob) -> int:
        ns = job._ns_per_page
        target = PAGES_PER_SECTION if ns <= 0 else int(RUN_TARGET_S / (ns * 1e-9))
        return max(job.geom.align_pages, min(PAGES_PER_SECTION, target))

    def _claim_run_locked(self, job: MemmapJob, owner: int) -> tuple[int, int] | None:
        """Claim the next run of pending blocks of ``job`` (in block order) for ``owner``."""
        if job._cancelled or job._done:
            return None
        st = job._state
        nb = len(st)
        c = job._cursor
        b0 = c if c < nb and st[c] == PENDING else -1  # the usual case: no scan
        while b0 < 0 and c < nb:
            window = st[c : c + 4096]
            hit = np.flatnonzero(window == PENDING)
            if hit.size:
                b0 = c + int(hit[0])
                break
            c += len(window)
        if b0 < 0:
            job._cursor = nb
            return None
        g = job.geom
        A = g.align_pages
        # A run stays within one section (unless a block is bigger than one) and within the
        # run size; it stops at the first block someone else holds.
        first_pfn_of_block = g.first_pfn + b0 * A
        sec_end_page = (((first_pfn_of_block >> PFN_SECTION_SHIFT) + 1) << PFN_SECTION_SHIFT) - g.first_pfn
        limit = min(nb, b0 + max(1, self._run_pages_for(job) // A), max(b0 + 1, sec_end_page // A))
        seg = st[b0:limit]
        stop = np.flatnonzero(seg != PENDING)
        b1 = b0 + (int(stop[0]) if stop.size else len(seg))
        st[b0:b1] = owner
        job._cursor = b1
        return b0, b1

    def _claim_next_locked(self, owner: int) -> tuple[MemmapJob, int, int] | None:
        """Round-robin over the jobs with pending blocks (several devices progress together)."""
        if self._paused:
            return None
        for _ in range(len(self._rr)):
            job = self._rr[0]
            r = self._claim_run_locked(job, owner)
            if r is None:
                self._rr.popleft()
                continue
            self._rr.rotate(-1)
            return job, r[0], r[1]
        return None

    def _requeue_locked(self, job: MemmapJob, b0: int, b1: int, owner: int) -> None:
        """Give claimed blocks back (their initializer gave up): PENDING again, never left claimed."""
        seg = job._state[b0:b1]
        seg[seg == owner] = PENDING
        # A sync_range waiting for these blocks takes them over itself.
        job._cond.notify_all()
        if job._cancelled or job._done:
            return
        job._cursor = min(job._cursor, b0)
        if job not in self._rr:
            self._rr.append(job)
        self._work_cond.notify_all()
        self._wake()

    def _complete_locked(self, job: MemmapJob, b0: int, b1: int, owner: int, populated: list[int]) -> None:
        seg = job._state[b0:b1]
        if job._cancelled:
            seg[seg == owner] = PENDING
            return
        if not (seg == owner).all():
            # Would mean two initializers for one block: never mark such blocks twice.
            log.error("memmap %s: blocks [%d, %d) completed by %d but held by %s", job.name, b0, b1,
                      owner, np.unique(seg))
            raise AssertionError("memmap block claim invariant violated")
        seg[:] = DONE
        if job._init_counts is not None:
            job._init_counts[b0:b1] += 1
        job._pages_done += job._npages_of(b0, b1)
        job._blocks_left -= b1 - b0
        for js in populated:
            job._sec_pop[js] = 1
        job._owners_used.add(owner)
        job._cond.notify_all()
        if job._blocks_left == 0:
            job._done = True
            job._t_end = time.monotonic()
            with contextlib.suppress(ValueError):
                self._rr.remove(job)
            if job._disp_ref:
                self._cmds.append(("detach", job))
                self._wake()
            self._schedule_notify_locked(job)

    def _init_in_engine(self, job: MemmapJob, runs: list[tuple[int, int]], owner: int,
                        raise_errors: bool) -> None:
        """Initialize claimed runs in this process (foreground or background thread).

        The caller has taken one ``_users`` reference for us; it is dropped here.
        """
        m = job._map
        assert m is not None
        populated: list[int] = []

        def ensure_section(js: int) -> None:
            if not job._sec_pop[js]:
                m.populate_section(js)
                populated.append(js)

        def pause(t: float) -> bool:
            return job._cancel_evt.wait(t) if t > 0 else job._cancel_evt.is_set()

        next_run = 0  # runs[next_run:] are still claimed by us
        try:
            for b0, b1 in runs:
                lo, hi = job._pages_of(b0, b1)
                ok = initialize_pages(m, lo, hi, ensure_section=ensure_section, pause=pause,
                                      ns_per_page=job._ns_per_page)
                if not ok:
                    break
                with self._lock:
                    # Completed run by run, so waiters on the first blocks need not wait for all.
                    self._complete_locked(job, b0, b1, owner, populated)
                    populated = []
                next_run += 1
        except Exception as exc:
            if raise_errors:
                raise
            self._fail_job(job, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                for b0, b1 in runs[next_run:]:
                    self._requeue_locked(job, b0, b1, owner)
                for js in populated:
                    job._sec_pop[js] = 1
                job._users -= 1
                self._maybe_release_locked(job)
        if job._cancelled and owner == FG:
            raise JobCancelled()

    def _fail_job(self, job: MemmapJob, message: str) -> None:
        log.error("memmap %s: %s; cancelling the job", job.name, message)
        job._error = message
        self._cancel_job(job, wait=False)

    # -- cancel / release ------------------------------------------------------------------------
    def _cancel_job(self, job: MemmapJob, wait: bool) -> None:
        with self._lock:
            if not job._release_requested:
                job._release_requested = True
                if not job._done and not job._cancelled:
                    job._cancelled = True
                    job._t_end = time.monotonic()
                    self._schedule_notify_locked(job)
                job._cancel_evt.set()
                job._cancel_time = time.monotonic()
                with contextlib.suppress(ValueError):
                    self._rr.remove(job)
                job._cond.notify_all()
                job._idle_cond.notify_all()
                if job._disp_ref:
                    self._cmds.append(("cancel", job))
                    self._wake()
                self._maybe_release_locked(job)
        in_service = threading.current_thread() is self._service_thread
        # (A subscriber cancelling from its callback runs on the service thread, which is the
        # one that releases: it must not wait for itself.)
        if wait and not in_service and not job._released.wait(REAP_TIMEOUT_S + 2):
            log.error("memmap %s: storage not released in time", job.name)

    def _maybe_release_locked(self, job: MemmapJob) -> None:
        if job._release_requested and job._users == 0 and not job._release_started:
            self._start_release_locked(job)

    def _start_release_locked(self, job: MemmapJob) -> None:
        job._release_started = True
        self._jobs.pop(job.id, None)
        m, job._map = job._map, None
        fds = [fd for fd in (job._memfd, job._read_fd) if fd is not None]
        job._memfd = -1
        job._read_fd = None

        def release() -> None:
            try:
                if m is not None:
                    m.close()
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            finally:
                job._released.set()

        if self._service_thread is not None and self._service_thread.is_alive() and not self._closed:
            self._service_q.put(release)
        else:
            release()

    # -- notification ----------------------------------------------------------------------------
    def _schedule_notify(self, job: MemmapJob) -> None:
        with self._lock:
            self._schedule_notify_locked(job)

    def _schedule_notify_locked(self, job: MemmapJob) -> None:
        if job._notified:
            return
        job._notified = True
        subs, job._subs = job._subs, []
        job._cond.notify_all()
        job._idle_cond.notify_all()
        for cb in subs:
            self._service_q.put(lambda cb=cb: cb(job))

    def _service_loop(self) -> None:
        while True:
            fn = self._service_q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:
                log.exception("memmap: callback failed")

    # -- background thread (workers = 0) ---------------------------------------------------------
    def _bg_loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._closing:
                        return
                    r = self._claim_next_locked(BG)
                    if r is not None:
                        break
                    self._work_cond.wait()
                job, b0, b1 = r
                job._users += 1
            self._init_in_engine(job, [(b0, b1)], BG, raise_errors=False)

    # -- worker processes ------------------------------------------------------------------------
    def _start_worker(self, slot: int, fork: bool) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if fork:
            others = [w.sock for w in self._workers if w is not None and not w.dead]
            # Signals stay blocked across the fork until the child has reset the handlers it
            # inherited (worker_main), so none of the engine process' handlers can run there.
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED_SIGNALS)
            pid = os.fork()
            if pid == 0:  # the child
                code = 0
                try:
                    # Drop the engine's ends of every worker socket: a worker holding another
                    # worker's engine end would hide that worker's EOF if the engine died.
                    for s in [parent, *others]:
                        with contextlib.suppress(OSError):
                            os.close(s.detach())
                    from .worker import worker_main

                    worker_main(child.detach(), unblock=old_mask)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            child.close()
            return _Worker(slot, pid, parent, None)
        fd = child.fileno()
        code = (f"import sys; sys.path.insert(0, {_PKG_ROOT!r}); "
                "from vnvdimm.memmap.worker import worker_main; worker_main(int(sys.argv[1]))")
        popen = subprocess.Popen([sys.executable, "-c", code, str(fd)], pass_fds=(fd,),
                                 stdin=subprocess.DEVNULL, close_fds=True)
        child.close()
        return _Worker(slot, popen.pid, parent, popen)

    def _post(self, cmd: tuple[Any, ...]) -> None:
        with self._lock:
            self._cmds.append(cmd)
        self._wake()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"!")

    def _send(self, w: _Worker, msg: tuple[Any, ...], fds: list[int] | None = None) -> bool:
        if w.dead:
            return False
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            if fds:
                socket.send_fds(w.sock, [data], fds)
            else:
                w.sock.send(data)
            return True
        except OSError:
            return False  # dead: its EOF is handled by the dispatcher loop

    def _dispatch_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        for w in self._workers:
            if w is not None:
                sel.register(w.sock, selectors.EVENT_READ, w)
        try:
            while True:
                # (This loop runs once per completed run: ~0.3 ms apart with 2 workers, on CPUs the
                # workers need, so it skips what has nothing to do.)
                acks = any(j._acks for j in list(self._jobs.values()))
                for key, _ev in sel.select(0.1 if acks else None):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            while os.read(self._wake_r, 4096):
                                pass
                    else:
                        self._on_readable(sel, key.data)
                if self._cmds and self._process_cmds(sel):  # (appends are followed by a wake)
                    return
                if acks:
                    self._check_ack_timeouts()
                self._fill()
        except Exception:
            log.exception("memmap dispatcher crashed")
            raise
        finally:
            sel.close()

    def _process_cmds(self, sel: selectors.BaseSelector) -> bool:
        """Run queued commands; True when told to exit (then the workers are stopped)."""
        while True:
            with self._lock:
                if not self._cmds:
                    return False
                cmd = self._cmds.popleft()
            kind = cmd[0]
            if kind == "attach":
                job = cmd[1]
                for w in self._live_workers():
                    if w.ready:
                        self._attach(w, job)
                with self._lock:
                    if not job._cancelled and not job._done:
                        self._rr.append(job)
            elif kind in ("cancel", "detach"):
                self._end_job_on_workers(cmd[1], cancel=kind == "cancel")
            elif kind == "exit":
                self._stop_workers(sel)
                return True

    def _attach(self, w: _Worker, job: MemmapJob) -> None:
        with self._lock:
            if job._cancelled or job._done or job._memfd < 0 or w.slot in job._attached:
                return
            # Sent under the lock so the memfd cannot be closed by a concurrent release.
            if self._send(w, ("attach", job.id, job.geom), [job._memfd]):
                job._attached.add(w.slot)
                job._users += 1

    def _end_job_on_workers(self, job: MemmapJob, cancel: bool) -> None:
        with self._lock:
            if not job._disp_ref:
                return  # already ended (a cancel after the job finished)
            job._disp_ref = False
            job._users -= 1
            slots = list(job._attached)
            job._attached.clear()
        for slot in slots:
            w = self._workers[slot]
            if w is None or w.dead:
                with self._lock:
                    job._users -= 1
                continue
            # Done: no run of the job can be outstanding, the worker just unmaps ("detach").
            # Either way its _users ref is dropped on the ack: the storage is released only
            # once no worker maps it, so release() really frees the memory (and a worker does
            # not pay for tearing down a big mapping in the middle of the next job).
            if self._send(w, ("cancel" if cancel else "detach", job.id)):
                with self._lock:
                    (job._acks if cancel else job._detach_acks).add(slot)
                continue
            with self._lock:
                job._users -= 1
        with self._lock:
            self._maybe_release_locked(job)

    def _live_workers(self) -> list[_Worker]:
        return [w for w in self._workers if w is not None and not w.dead]

    def _fill(self) -> None:
        sends: list[tuple[_Worker, tuple[Any, ...]]] = []
        with self._lock:
            if self._closing:
                return
            for w in self._live_workers():
                if not w.ready:
                    continue
                while len(w.outstanding) < RUNS_IN_FLIGHT:
                    r = self._claim_next_locked(w.owner)
                    if r is None:
                        break
                    job, b0, b1 = r
                    rid = next(self._run_ids)
                    w.outstanding[rid] = (job, b0, b1)
                    lo, hi = job._pages_of(b0, b1)
                    g = job.geom
                    need = [js for js in range(g.section_of(lo), g.section_of(hi - 1) + 1)
                            if not job._sec_pop[js]]
                    sends.append((w, ("run", job.id, rid, lo, hi, job._ns_per_page, need)))
        for w, msg in sends:
            self._send(w, msg)

    def _on_readable(self, sel: selectors.BaseSelector, w: _Worker) -> None:
        while not w.dead:
            try:
                data = w.sock.recv(MSG_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._on_worker_death(sel, w)
                return
            self._on_message(w, pickle.loads(data))

    def _on_message(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "hello":
            w.ready = True
            with self._lock:
                jobs = [j for j in self._jobs.values() if j._disp_ref and not j._cancelled and not j._done]
            for job in jobs:
                self._attach(w, job)
            return
        if kind in ("cancelled", "detached"):
            with self._lock:
                job = self._job_by_id(msg[1])
                if job is None:
                    return
                self._drop_outstanding_locked(w, job)
                acks = job._acks if kind == "cancelled" else job._detach_acks
                if w.slot in acks:
                    acks.discard(w.slot)
                    job._users -= 1
                self._maybe_release_locked(job)
            return
        rid = msg[2]
        if kind == "error" and rid == -1:  # the worker could not map the job's storage
            with self._lock:
                job = self._job_by_id(msg[1])
            if job is not None:
                self._fail_job(job, msg[3])
            return
        with self._lock:
            entry = w.outstanding.pop(rid, None)
            if entry is None:
                return
            job, b0, b1 = entry
            if kind == "done":
                self._complete_locked(job, b0, b1, w.owner, list(msg[3]))
                return
            self._requeue_locked(job, b0, b1, w.owner)
        if kind == "error":
            self._fail_job(job, msg[3])

    def _job_by_id(self, jid: int) -> MemmapJob | None:
        job = self._jobs.get(jid)
        if job is not None:
            return job
        for w in self._workers:  # released already, but a worker may still report on it
            if w is None:
                continue
            for j, _b0, _b1 in w.outstanding.values():
                if j.id == jid:
                    return j
        return None

    def _drop_outstanding_locked(self, w: _Worker, job: MemmapJob) -> None:
        for rid, (j, b0, b1) in list(w.outstanding.items()):
            if j is job:
                del w.outstanding[rid]
                self._requeue_locked(j, b0, b1, w.owner)

    def _on_worker_death(self, sel: selectors.BaseSelector, w: _Worker) -> None:
        w.dead = True
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(w.sock)
        with self._lock:
            lost = list(w.outstanding.values())
            w.outstanding.clear()
            for job, b0, b1 in lost:
                self._requeue_locked(job, b0, b1, w.owner)
            for job in list(self._jobs.values()):
                if w.slot in job._attached:
                    job._attached.discard(w.slot)
                    job._users -= 1
                for acks in (job._acks, job._detach_acks):
                    if w.slot in acks:
                        acks.discard(w.slot)
                        job._users -= 1
                self._maybe_release_locked(job)
            closing = self._closing
        w.sock.close()
        w.reap(REAP_TIMEOUT_S)
        if closing:
            return
        log.warning("memmap worker %d (pid %d) died; %d runs re-queued; starting a replacement",
                    w.slot, w.pid, len(lost))
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        nw: _Worker | None = None
        if len(self._restarts) < MAX_RESTARTS:
            self._restarts.append(now)
            try:
                # Threads exist now: a replacement is spawned (fork+exec), never forked.
                nw = self._start_worker(w.slot, fork=False)
            except Exception:
                log.exception("memmap: cannot start a replacement worker")
        else:
            log.error("memmap: workers keep dying (%d in %d s): slot %d stays empty",
                      len(self._restarts), RESTART_WINDOW_S, w.slot)
        self._workers[w.slot] = nw
        if nw is not None:
            self.replacements += 1
            sel.register(nw.sock, selectors.EVENT_READ, nw)
        elif not self._live_workers() and not self._threads:
            # No pool left: finish the work in this process rather than hang the waiters.
            log.error("memmap: no worker left; continuing with an in-process background thread")
            t = threading.Thread(target=self._bg_loop, name="memmap-bg", daemon=True)
            t.start()
            self._threads.append(t)

    def _check_ack_timeouts(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = {slot for j in self._jobs.values() for slot in j._acks
                    if now - j._cancel_time > ACK_TIMEOUT_S}
        for slot in late:
            w = self._workers[slot]
            if w is not None and not w.dead:
                log.warning("memmap worker %d (pid %d) did not acknowledge a cancel: killing it",
                            slot, w.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)

    def _stop_workers(self, sel: selectors.BaseSelector) -> None:
        live = self._live_workers()
        for w in live:
            self._send(w, ("exit",))
        for w in live:
            w.dead = True
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(w.sock)
            w.reap(REAP_TIMEOUT_S)
            w.sock.close()
