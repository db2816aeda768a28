"""The worker process: initializes the runs of pages the engine hands it, nothing else.

A worker never decides what to initialize: every claim is made in the engine process, so a
worker that dies (even SIGKILL) only loses work the engine still knows is unfinished. The
messages are those of :mod:`.protocol`.

Between two chunks of a run (and while it sleeps for the ``ns_per_page`` floor, at most
``FLOOR_SLICE_S`` at a time) the worker reads what the engine sent meanwhile: a cancel or a
revoke stops the run in progress at once, an end of a job it is not running is acknowledged
at once, and a :class:`~.protocol.Progress` goes out when the engine has not heard from it for
``HEARTBEAT_S``, so a slow run is not taken for a stalled worker.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable

from . import protocol
from .page import TemplateCache
from .protocol import Attach, Cancel, Detach, Exit, Revoke, Run
from .storage import Geometry, Mapping, initialize_pages

HEARTBEAT_S = 0.25  # well below the dispatcher's stall bound
_FD_ARRAY = array.array("i")


class _WorkerJob:
    def __init__(self, geom: Geometry, memfd: int) -> None:
        self.geom = geom
        self.mapping = Mapping(geom, memfd)
        # Sections populated *in this process' mapping* (phase 1 is done once per section by
        # whoever reaches it first; the engine tells us which ones still need it).
        self.populated: set[int] = set()
        self.cancelled = False

    def close(self) -> None:
        self.mapping.close()


class Worker:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.jobs: dict[int, _WorkerJob] = {}
        self.inbox: deque[tuple[protocol.ToWorker, list[int]]] = deque()
        self.exiting = False
        self.cache = TemplateCache()
        self.current: Run | None = None  # the run in progress
        self.current_revoked = False
        self.last_sent = time.monotonic()

    # -- transport -----------------------------------------------------------------------------
    def send(self, msg: protocol.FromWorker) -> None:
        self.sock.send(protocol.encode(msg))
        self.last_sent = time.monotonic()

    def _recv_one(self, block: bool) -> bool:
        """Receive one message. False on EOF (the engine is gone) or nothing ready."""
        try:
            # (Not socket.recv_fds: in Python 3.11 it ignores its flags argument.)
            data, anc, _flags, _addr = self.sock.recvmsg(
                protocol.MSG_MAX, socket.CMSG_SPACE(4 * _FD_ARRAY.itemsize), 0 if block else socket.MSG_DONTWAIT
            )
        except (BlockingIOError, InterruptedError):
            return False
        fds: list[int] = []
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds.extend(arr)
        if not data:
            # EOF: the engine closed its end or died. Nothing to report to; stop.
            for fd in fds:
                os.close(fd)
            self.exiting = True
            return False
        msg = protocol.decode(data)
        if isinstance(msg, Cancel | Detach):
            self._end_job(msg)
        elif isinstance(msg, Revoke):
            revoked = set(msg.rids)
            self._drop_queued(lambda m: isinstance(m, Run) and m.rid in revoked)
            if self.current is not None and self.current.rid in revoked:
                self.current_revoked = True
        else:
            if isinstance(msg, Exit):
                self.exiting = True
            self.inbox.append((msg, fds))
        return True

    def _drop_queued(self, match: Callable[[protocol.ToWorker], bool]) -> None:
        kept: deque[tuple[protocol.ToWorker, list[int]]] = deque()
        for item in self.inbox:
            if match(item[0]):
                for fd in item[1]:
                    os.close(fd)
            else:
                kept.append(item)
        self.inbox = kept

    def _end_job(self, msg: Cancel | Detach) -> None:
        """Drop everything queued for the job; unmap and acknowledge now, or, if a run of it is
        in progress, stop that run and acknowledge when it has returned."""
        jid = msg.jid
        self._drop_queued(lambda m: isinstance(m, Attach | Run) and m.jid == jid)
        if self.current is not None and self.current.jid == jid:
            job = self.jobs.get(jid)
            if job is not None:
                job.cancelled = True
            self.inbox.append((msg, []))
            return
        self._acknowledge_end(msg)

    def _acknowledge_end(self, msg: Cancel | Detach) -> None:
        job = self.jobs.pop(msg.jid, None)
        if job is not None:
            job.close()
        self.send(protocol.Cancelled(msg.jid) if isinstance(msg, Cancel) else protocol.Detached(msg.jid))

    def _drain(self) -> None:
        while not self.exiting and self._recv_one(block=False):
            pass

    def _pause(self, job: _WorkerJob, timeout: float) -> bool:
        """Sleep up to ``timeout`` (woken early by a message); True if the run must stop."""
        if timeout > 0:
            with contextlib.suppress(InterruptedError):
                select.select([self.sock], [], [], timeout)
        self._drain()
        run = self.current
        if run is not None and time.monotonic() - self.last_sent >= HEARTBEAT_S:
            self.send(protocol.Progress(run.jid, run.rid))
        return job.cancelled or self.current_revoked or self.exiting

    # -- work ----------------------------------------------------------------------------------
    def _run(self, run: Run) -> None:
        job = self.jobs.get(run.jid)
        if job is None or job.cancelled:
            self.send(protocol.RunAbandoned(run.jid, run.rid))
            return
        need = set(run.populate)
        newly: list[int] = []

        def ensure_section(js: int) -> None:
            if js in need and js not in job.populated:
                job.mapping.populate_section(js)
                job.populated.add(js)
                newly.append(js)

        self.current, self.current_revoked = run, False
        try:
            ok = initialize_pages(job.mapping, run.lo, run.hi, ensure_section=ensure_section,
                                  pause=lambda t: self._pause(job, t), cache=self.cache)
        except Exception as exc:  # report, keep serving other jobs
            self.send(protocol.RunFailed(run.jid, run.rid, f"{type(exc).__name__}: {exc}"))
            return
        finally:
            self.current = None
        self.send(protocol.RunDone(run.jid, run.rid, tuple(newly)) if ok
                  else protocol.RunAbandoned(run.jid, run.rid))

    def serve(self) -> None:
        self.send(protocol.Hello(os.getpid()))
        while True:
            if not self.inbox:
                if self.exiting:
                    return
                self._recv_one(block=True)  # a message, or EOF (sets exiting)
                continue
            msg, fds = self.inbox.popleft()
            try:
                if isinstance(msg, Attach):
                    try:
                        self.jobs[msg.jid] = _WorkerJob(msg.geometry, fds[0])
                    except Exception as exc:
                        self.send(protocol.AttachFailed(msg.jid, f"attach: {type(exc).__name__}: {exc}"))
                elif isinstance(msg, Run):
                    self._run(msg)
                elif isinstance(msg, Cancel | Detach):
                    self._acknowledge_end(msg)  # (one whose run was in progress when it came)
                elif isinstance(msg, Exit):
                    return
            finally:
                # The mapping holds the memory; the fd itself is not needed after attach.
                for fd in fds:
                    os.close(fd)

    def shutdown(self) -> None:
        for job in self.jobs.values():
            job.close()
        self.jobs.clear()


def worker_main(fd: int, unblock: Iterable[signal.Signals] | None = None) -> None:
    """Entry point of a worker (forked or spawned), serving the engine on socket ``fd``.

    ``unblock``: the signal mask to restore once the inherited handlers are reset (a forked
    worker is started with signals blocked).
    """
    # A forked worker inherits the engine process' Python signal handlers and wakeup fd (e.g. a
    # daemon's SIGTERM handler that unmounts): none of that must run here.
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD,
                signal.SIGALRM):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C goes to the whole process group; the engine decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if unblock is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblock)
    sock = socket.socket(fileno=fd)
    worker = Worker(sock)
    try:
        worker.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the engine went away
    finally:
        worker.shutdown()
        sock.close()


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
