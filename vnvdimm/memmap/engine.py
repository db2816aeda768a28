"""The memmap engine: the facade that creates jobs and owns the threads and the worker pool.

Rooms (each owns its state; none touches another's private fields):

* :mod:`.job` - a job: its block map (:mod:`.blockmap`), its storage lease (:mod:`.lease`), the
  foreground sync, cancel and release, under the job's own lock;
* :mod:`.dispatch` - the queue of jobs with pending blocks and the dispatcher thread, the only
  thread that talks to the workers (:mod:`.protocol` messages);
* :mod:`.pool` - the worker processes (:mod:`.worker`);
* this module - the engine: job creation, the service thread (user callbacks and the release of
  storage, never on a caller's thread or under a lock), the in-process background thread
  (``workers=0``, or while no worker makes progress), and shutdown.

Lock order: the run queue's lock, then a job's lock; a job never calls out while holding its own.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable

from .blockmap import BG, DONE, FG, MAX_WORKERS, PENDING, WORKER_BASE
from .dispatch import STALL_TIMEOUT_S, Dispatcher, RunQueue
from .job import JobCancelled, JobSpec, MemmapJob
from .pool import REAP_TIMEOUT_S, WorkerPool

__all__ = ["BG", "DONE", "FG", "PENDING", "WORKER_BASE", "JobCancelled", "JobSpec", "MemmapEngine",
           "MemmapJob"]

log = logging.getLogger("vnvdimm.memmap")

_live_engines: weakref.WeakSet[MemmapEngine] = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    # A program that forgot close(): its workers would exit on EOF anyway, but close() also
    # reaps them and frees the storage in order.
    for eng in list(_live_engines):
        with contextlib.suppress(Exception):
            eng.close()


class MemmapEngine:
    """A pool of worker processes shared by every job (the kernel's async domain).

    ``workers``: None for one per CPU, 0 for an in-process background thread and no processes.
    ``stall_timeout``: a worker holding runs with no sign of progress this long has them handed
    to the others.
    """

    def __init__(self, workers: int | None = None, *, debug: bool = False,
                 stall_timeout: float = STALL_TIMEOUT_S, title: str | None = None) -> None:
        """`title`: the workers show `vnvdimm worker N TITLE` in ps (the daemon's mount point)."""
        n = (os.cpu_count() or 1) if workers is None else workers
        if not 0 <= n <= MAX_WORKERS:
            raise ValueError(f"workers must be within [0, {MAX_WORKERS}]")
        self._nworkers = n
        self._debug = debug
        self._lock = threading.Lock()  # the job table and the lifecycle flags
        self._jobs: dict[int, MemmapJob] = {}
        self._ids = itertools.count(1)
        self._started = False
        self._closing = False
        self._closed = threading.Event()
        self._queue = RunQueue()
        self.pool = WorkerPool(n, WORKER_BASE, title=title)
        self._dispatcher: Dispatcher | None = None
        if n:
            self._dispatcher = Dispatcher(self.pool, self._queue, stall_timeout=stall_timeout,
                                          on_pool_stuck=self._rescue)
        self._background: threading.Thread | None = None
        self._service_q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._service_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return self._nworkers

    @property
    def debug(self) -> bool:
        return self._debug

    @property
    def replacements(self) -> int:
        """Workers restarted after a crash."""
        return self.pool.replacements

    @property
    def handoffs(self) -> int:
        """Runs handed from a stalled worker to others."""
        return self._dispatcher.handoffs if self._dispatcher is not None else 0

    def workers_ready(self) -> int:
        """Workers serving (they said hello): those a new job's runs can go to at once."""
        return self._dispatcher.ready_workers() if self._dispatcher is not None else 0

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes (for tests and status)."""
        return self.pool.pids()

    def start(self) -> None:
        """Start the workers (fork if this process has no other thread yet) and engine threads."""
        with self._lock:
            if self._started:
                return
            if self._closing:
                raise RuntimeError("engine is closed")
            self._started = True
        _live_engines.add(self)
        # Fork is fast (ms) but only safe before any other thread exists; otherwise spawn.
        self.pool.start(fork=threading.active_count() == 1)
        self._service_thread = threading.Thread(target=self._service_loop, name="memmap-service",
                                                daemon=True)
        self._service_thread.start()
        if self._dispatcher is not None:
            self._dispatcher.start()
        else:
            self._start_background(lambda: True)

    def close(self) -> None:
        """Cancel every job, stop and reap the workers, free all storage. Idempotent."""
        with self._lock:
            already, self._closing = self._closing, True
            jobs = list(self._jobs.values())
        if already:
            self._closed.wait(10)
            return
        for job in jobs:
            job.cancel(wait=False)
        if not self.in_service_thread():
            for job in jobs:
                job.wait_released(REAP_TIMEOUT_S + 1)
        self._queue.close()
        if self._dispatcher is not None:
            self._dispatcher.stop()
        if self._background is not None:
            self._background.join(5)
        if self._service_thread is not None and not self.in_service_thread():
            self._service_q.put(None)
            self._service_thread.join(5)
        self._closed.set()

    def __enter__(self) -> MemmapEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pause_background(self) -> None:
        """Stop handing out new background runs (runs already queued finish). For tests."""
        self._queue.pause()

    def resume_background(self) -> None:
        self._queue.resume()
        self._wake_dispatcher()

    # -- jobs ------------------------------------------------------------------------------------
    def create_job(self, spec: JobSpec) -> MemmapJob:
        """Create a job and return at once: the pool initializes it in the background (a
        caller that wants it complete, as the pre-series kernel had it, waits for it)."""
        spec.validate()
        if not self._started:
            self.start()
        with self._lock:
            if self._closing:
                raise RuntimeError("engine is closed")
            jid = next(self._ids)
        job = MemmapJob(self, jid, spec)
        with self._lock:
            closing = self._closing
            if not closing:
                self._jobs[jid] = job
        if closing:
            job.cancel(wait=False)
            raise RuntimeError("engine is closed")
        if job.active:
            if self._dispatcher is not None:
                # The dispatcher attaches the workers first, then makes the job dispatchable.
                self._dispatcher.add_job(job)
            else:
                self._queue.add(job)
        return job

    # -- JobHost: what the jobs call ---------------------------------------------------------------
    def defer(self, fn: Callable[[], None]) -> None:
        t = self._service_thread
        if t is not None and t.is_alive() and not self._closed.is_set():
            self._service_q.put(fn)
        else:
            fn()

    def in_service_thread(self) -> bool:
        return threading.current_thread() is self._service_thread

    def work_available(self, job: MemmapJob) -> None:
        self._queue.add(job)
        self._wake_dispatcher()

    def job_idle(self, job: MemmapJob) -> None:
        self._queue.remove(job)
        if self._dispatcher is not None:
            self._dispatcher.end_job(job, cancel=job.cancelled)

    def job_releasing(self, job: MemmapJob) -> None:
        if self._dispatcher is not None:
            self._dispatcher.job_releasing(job)

    def job_released(self, job: MemmapJob) -> None:
        with self._lock:
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]

    # -- threads ---------------------------------------------------------------------------------
    def _wake_dispatcher(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.wake()

    def _service_loop(self) -> None:
        while True:
            fn = self._service_q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:
                log.exception("memmap: callback failed")

    def _rescue(self) -> None:
        """No worker makes progress (none left, or all stalled): initialize in this process
        until one does, rather than let the waiters hang."""
        assert self._dispatcher is not None
        dispatcher = self._dispatcher
        if self._background is None or not self._background.is_alive():
            log.error("memmap: no worker makes progress; initializing in the engine process meanwhile")
            self._start_background(dispatcher.all_stalled)

    def _start_background(self, keep_going: Callable[[], bool]) -> None:
        t = threading.Thread(target=self._background_loop, args=(keep_going,), name="memmap-bg",
                             daemon=True)
        self._background = t
        t.start()

    def _background_loop(self, keep_going: Callable[[], bool]) -> None:
        while True:
            r = self._queue.wait_claim(BG, keep_going)
            if r is None:
                return
            job, b0, b1 = r
            job.run_claimed([(b0, b1)], BG)

