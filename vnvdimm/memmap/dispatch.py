"""Handing runs out: the queue of jobs with pending blocks, and the dispatcher thread.

The dispatcher is the only thread that talks to the workers. It keeps up to ``RUNS_IN_FLIGHT``
runs queued per worker, so a worker never idles on the round trip, and it watches them:

* a worker that dies has its runs given back and is replaced;
* a worker that makes no progress for ``stall_timeout`` (stopped, swapped out) has its runs
  handed to the others and gets no new ones until it is heard from again; the runs it had are
  revoked, and its late reports about them are recognized by their run id and ignored (what it
  may still write is byte for byte what the new initializer writes);
* a worker that does not acknowledge the end of a job in ``ACK_TIMEOUT_S`` once the job's
  storage is to be released is killed, so released storage is never written.

Each worker holding a job's mapping holds a reference on the job's storage lease until it
acknowledges (or dies); the dispatcher holds one from the job's creation until it has told
every worker the job is over.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import protocol
from .blockmap import ClaimError
from .job import MemmapJob
from .lease import LeaseReleased
from .pool import REAP_TIMEOUT_S, WorkerHandle, WorkerPool

log = logging.getLogger("vnvdimm.memmap")

RUNS_IN_FLIGHT = 2  # runs queued per worker: one being initialized, one waiting
ACK_TIMEOUT_S = 0.8  # a worker that does not acknowledge the end of a released job is killed
STALL_TIMEOUT_S = 3.0  # a worker with runs and no sign of progress this long is bypassed


class RunQueue:
    """The jobs that may have pending blocks, served round robin (devices progress together)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: deque[MemmapJob] = deque()
        self._paused = False
        self._closed = False
        self._generation = 0  # bumped by kick(): wakes waiters to re-check their condition

    def add(self, job: MemmapJob) -> None:
        with self._cond:
            if job not in self._jobs:
                self._jobs.append(job)
            self._cond.notify_all()

    def remove(self, job: MemmapJob) -> None:
        with self._cond, contextlib.suppress(ValueError):
            self._jobs.remove(job)

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def kick(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def claim_next(self, owner: int) -> tuple[MemmapJob, int, int] | None:
        with self._cond:
            return self._claim_locked(owner)

    def wait_claim(self, owner: int, keep_going: Callable[[], bool]) -> tuple[MemmapJob, int, int] | None:
        """Block until a run is claimed for ``owner``; None once closed or ``keep_going()`` is False."""
        with self._cond:
            while not self._closed and keep_going():
                r = self._claim_locked(owner)
                if r is not None:
                    return r
                self._cond.wait()
            return None

    def _claim_locked(self, owner: int) -> tuple[MemmapJob, int, int] | None:
        if self._paused or self._closed:
            return None
        for _ in range(len(self._jobs)):
            job = self._jobs[0]
            r = job.claim_run(owner)
            if r is None:
                self._jobs.popleft()
                continue
            self._jobs.rotate(-1)
            return job, r[0], r[1]
        return None


@dataclass
class _Claim:
    job: MemmapJob
    b0: int
    b1: int


@dataclass(eq=False)
class _Runs:
    """What one worker was handed, and how it keeps up."""

    ready: bool = False  # said hello
    outstanding: dict[int, _Claim] = field(default_factory=dict)  # run id -> claim
    stalled: bool = False  # no progress for the stall bound: no new runs until heard from again
    heard_at: float = 0.0  # last sign of progress (a message, or the first of its runs)


@dataclass(eq=False)
class _Tracked:
    """A job as the dispatcher follows it on the workers."""

    job: MemmapJob
    attached: set[int] = field(default_factory=set)  # slots holding a mapping (one lease ref each)
    acks: dict[int, float | None] = field(default_factory=dict)  # slot -> kill deadline (None: none yet)
    ended: bool = False  # the workers were told (cancel/detach); the dispatcher's ref is dropped
    releasing: bool = False


@dataclass(frozen=True)
class _Add:
    job: MemmapJob


@dataclass(frozen=True)
class _End:
    job: MemmapJob
    cancel: bool


@dataclass(frozen=True)
class _Releasing:
    job: MemmapJob


@dataclass(frozen=True)
class _Stop:
    pass


class Dispatcher:
    """The worker pool's dispatcher thread (see the module docstring)."""

    def __init__(self, pool: WorkerPool, queue: RunQueue, *, stall_timeout: float = STALL_TIMEOUT_S,
                 on_pool_stuck: Callable[[], None] = lambda: None) -> None:
        self.pool = pool
        self._queue = queue
        self.stall_timeout = stall_timeout
        self._on_pool_stuck = on_pool_stuck  # no live worker that makes progress is left
        self._cmds: deque[_Add | _End | _Releasing | _Stop] = deque()
        self._tracked: dict[int, _Tracked] = {}
        self._runs: dict[WorkerHandle, _Runs] = {}
        self._run_ids = itertools.count(1)
        self._wake_r = self._wake_w = -1
        self._thread = threading.Thread(target=self._dispatch_loop, name="memmap-dispatch", daemon=True)
        self._stopping = False
        self.handoffs = 0  # runs handed from a stalled worker to others

    # -- called from any thread ------------------------------------------------------------------
    def start(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread.start()

    def add_job(self, job: MemmapJob) -> None:
        """Attach the workers to a new job, then make it dispatchable."""
        job.lease.acquire()  # now, so the storage cannot go before the workers are told
        self._post(_Add(job))

    def end_job(self, job: MemmapJob, cancel: bool) -> None:
        self._post(_End(job, cancel))

    def job_releasing(self, job: MemmapJob) -> None:
        self._post(_Releasing(job))

    def stop(self) -> None:
        """Stop the workers and the thread (after every job was cancelled)."""
        if self._thread.is_alive():
            self._post(_Stop())
            self._thread.join(REAP_TIMEOUT_S * 2 + 1)
        self.pool.abandon()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def wake(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"!")

    def _post(self, cmd: _Add | _End | _Releasing | _Stop) -> None:
        self._cmds.append(cmd)
        self.wake()

    # -- the thread ----------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        for w in self.pool.live():
            self._runs[w] = _Runs()
            sel.register(w.sock, selectors.EVENT_READ, w)
        try:
            while True:
                # (This loop runs once per completed run: ~0.3 ms apart with 2 workers, on CPUs the
                # workers need, so it does little when nothing is due.)
                due = self._next_deadline()
                timeout = None if due is None else max(0.0, due - time.monotonic()) + 0.01
                for key, _ev in sel.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            while os.read(self._wake_r, 4096):
                                pass
                    else:
                        self._on_readable(sel, key.data)
                if self._cmds and self._process_cmds(sel):
                    return
                now = time.monotonic()
                if due is not None and now >= due:
                    self._check_acks(now)
                    self._check_stalls(now)
                self._fill(now)
        except Exception:
            log.exception("memmap dispatcher crashed")
            raise
        finally:
            sel.close()

    def _next_deadline(self) -> float | None:
        """When the next kill or stall is due (monotonic time), None when nothing is."""
        deadlines = [dl for t in self._tracked.values() for dl in t.acks.values() if dl is not None]
        deadlines += [r.heard_at + self.stall_timeout for r in self._runs.values()
                      if r.outstanding and not r.stalled]
        return min(deadlines, default=None)

    def _process_cmds(self, sel: selectors.BaseSelector) -> bool:
        """Run queued commands; True when told to stop (then the workers are stopped)."""
        while self._cmds:
            cmd = self._cmds.popleft()
            if isinstance(cmd, _Add):
                t = self._tracked[cmd.job.id] = _Tracked(cmd.job)
                for w in self.pool.live():
                    if self._runs[w].ready:
                        self._attach(w, t)
                if cmd.job.active:
                    self._queue.add(cmd.job)
            elif isinstance(cmd, _End):
                self._end(cmd.job, cmd.cancel)
            elif isinstance(cmd, _Releasing):
                t = self._tracked.get(cmd.job.id)
                if t is not None:
                    t.releasing = True
                    self._arm_ack_deadlines(t)
            else:
                self._stopping = True
                self.pool.stop()
                return True
        return False

    def _attach(self, w: WorkerHandle, t: _Tracked) -> None:
        if t.ended or not t.job.active or w.slot in t.attached:
            return
        try:
            t.job.lease.acquire()
        except LeaseReleased:
            return
        # The memfd stays open while we hold our own reference (until the job ended).
        if w.send(protocol.Attach(t.job.id, t.job.geom), [t.job.lease.memfd]):
            t.attached.add(w.slot)
        else:
            t.job.lease.drop()

    def _end(self, job: MemmapJob, cancel: bool) -> None:
        t = self._tracked.get(job.id)
        if t is None or t.ended:
            return
        t.ended = True
        for slot in sorted(t.attached):
            w = self.pool.slots[slot]
            # Done: no run of the job can be outstanding, the worker just unmaps. Either way its
            # reference is dropped on the ack: the storage is released only once no worker maps
            # it, so release() really frees the memory.
            msg = protocol.Cancel(job.id) if cancel else protocol.Detach(job.id)
            if w is not None and w.send(msg):
                t.acks[slot] = None
            else:
                job.lease.drop()
        t.attached.clear()
        if cancel:
            t.releasing = True
        self._arm_ack_deadlines(t)
        job.lease.drop()  # the dispatcher's own reference
        self._forget_if_finished(t)

    def _arm_ack_deadlines(self, t: _Tracked) -> None:
        if t.releasing:
            deadline = time.monotonic() + ACK_TIMEOUT_S
            for slot, dl in t.acks.items():
                if dl is None:
                    t.acks[slot] = deadline

    def _forget_if_finished(self, t: _Tracked) -> None:
        if t.ended and not t.attached and not t.acks:
            self._tracked.pop(t.job.id, None)

    def _fill(self, now: float) -> None:
        if self._stopping:
            return
        for w in self.pool.live():
            runs = self._runs[w]
            if not runs.ready or runs.stalled:
                continue
            while len(runs.outstanding) < RUNS_IN_FLIGHT:
                r = self._queue.claim_next(w.owner)
                if r is None:
                    return
                job, b0, b1 = r
                if not runs.outstanding:
                    runs.heard_at = now  # the stall clock starts with the first run
                rid = next(self._run_ids)
                runs.outstanding[rid] = _Claim(job, b0, b1)
                lo, hi = job.pages_of(b0, b1)
                w.send(protocol.Run(job.id, rid, lo, hi, tuple(job.sections_to_populate(lo, hi))))

    # -- from the workers ---------------------------------------------------------------------------
    def _on_readable(self, sel: selectors.BaseSelector, w: WorkerHandle) -> None:
        while not w.dead:
            try:
                data = w.sock.recv(protocol.MSG_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._on_worker_death(sel, w)
                return
            self._on_message(w, protocol.decode(data))

    def _on_message(self, w: WorkerHandle, msg: protocol.ToWorker | protocol.FromWorker) -> None:
        runs = self._runs[w]
        runs.heard_at = time.monotonic()
        if runs.stalled:
            runs.stalled = False
            log.warning("memmap worker %d (pid %d) makes progress again", w.slot, w.pid)
            self._queue.kick()  # a rescue thread may stop
        if isinstance(msg, protocol.Hello):
            runs.ready = True
            for t in list(self._tracked.values()):
                self._attach(w, t)
        elif isinstance(msg, protocol.RunDone):
            c = runs.outstanding.pop(msg.rid, None)
            if c is None:
                return  # a run revoked from a stalled worker: someone else owns its blocks
            try:
                c.job.complete(c.b0, c.b1, w.owner, msg.populated)
            except ClaimError:
                log.exception("memmap %s: block claim invariant violated", c.job.name)
        elif isinstance(msg, protocol.RunAbandoned | protocol.RunFailed):
            c = runs.outstanding.pop(msg.rid, None)
            if c is None:
                return
            c.job.requeue(c.b0, c.b1, w.owner)
            if isinstance(msg, protocol.RunFailed):
                c.job.fail(msg.message)
        elif isinstance(msg, protocol.AttachFailed):
            t = self._tracked.get(msg.jid)
            if t is not None:
                t.job.fail(msg.message)
        elif isinstance(msg, protocol.Cancelled | protocol.Detached):
            t = self._tracked.get(msg.jid)
            if t is None:
                return
            self._give_back(w, t.job)
            if t.acks.pop(w.slot, "none") != "none":
                t.job.lease.drop()
            self._forget_if_finished(t)
        # (Progress: only the heard_at above.)

    def _give_back(self, w: WorkerHandle, job: MemmapJob) -> None:
        """Requeue what ``w`` still holds of ``job`` (it dropped it on a cancel)."""
        outstanding = self._runs[w].outstanding
        for rid, c in list(outstanding.items()):
            if c.job is job:
                del outstanding[rid]
                job.requeue(c.b0, c.b1, w.owner)

    def _on_worker_death(self, sel: selectors.BaseSelector, w: WorkerHandle) -> None:
        w.dead = True
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(w.sock)
        lost = list(self._runs.pop(w).outstanding.values())
        for c in lost:
            c.job.requeue(c.b0, c.b1, w.owner)
        for t in list(self._tracked.values()):
            if w.slot in t.attached:
                t.attached.discard(w.slot)
                t.job.lease.drop()
            if t.acks.pop(w.slot, "none") != "none":
                t.job.lease.drop()
            self._forget_if_finished(t)
        w.sock.close()
        w.reap(REAP_TIMEOUT_S)
        if self._stopping:
            return
        log.warning("memmap worker %d (pid %d) died; %d runs re-queued; starting a replacement",
                    w.slot, w.pid, len(lost))
        new = self.pool.replace(w)
        if new is not None:
            self._runs[new] = _Runs()
            sel.register(new.sock, selectors.EVENT_READ, new)
        self._check_pool_stuck()

    # -- watchdogs ---------------------------------------------------------------------------------
    def _check_acks(self, now: float) -> None:
        for t in list(self._tracked.values()):
            for slot, dl in t.acks.items():
                w = self.pool.slots[slot]
                if dl is not None and now > dl and w is not None and not w.dead and not w.killed:
                    log.warning("memmap worker %d (pid %d) did not acknowledge the end of %s: killing it",
                                slot, w.pid, t.job.name)
                    w.kill()

    def _check_stalls(self, now: float) -> None:
        for w in self.pool.live():
            runs = self._runs[w]
            if runs.stalled or not runs.outstanding or now - runs.heard_at <= self.stall_timeout:
                continue
            runs.stalled = True
            claims = list(runs.outstanding.items())
            runs.outstanding.clear()
            log.warning("memmap worker %d (pid %d) made no progress in %.1f s: its %d runs go to others",
                        w.slot, w.pid, now - runs.heard_at, len(claims))
            revoked: dict[int, list[int]] = {}
            for rid, c in claims:
                c.job.requeue(c.b0, c.b1, w.owner)
                revoked.setdefault(c.job.id, []).append(rid)
            for jid, rids in revoked.items():
                w.send(protocol.Revoke(jid, tuple(rids)))
            self.handoffs += len(claims)
        self._check_pool_stuck()

    def _check_pool_stuck(self) -> None:
        if not self._stopping and self.all_stalled():
            self._on_pool_stuck()

    def ready_workers(self) -> int:
        """Live workers that said hello (called from other threads too: a snapshot)."""
        return sum(1 for w in self.pool.live() if (runs := self._runs.get(w)) is not None and runs.ready)

    def all_stalled(self) -> bool:
        """No live worker that makes progress (none left, or every one stalled)."""
        for w in self.pool.live():
            runs = self._runs.get(w)  # (called from other threads too: a snapshot is enough)
            if runs is None or not runs.stalled:
                return False
        return True
