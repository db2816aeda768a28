"""The worker process: initializes the runs of pages the engine hands it, nothing else.

A worker never decides what to initialize: every claim is made in the engine process, so a
worker that dies (even SIGKILL) only loses work the engine still knows is unfinished.

Protocol: pickled tuples over a ``SOCK_SEQPACKET`` socketpair (message boundaries kept, fds passed
with ``SCM_RIGHTS``). Engine -> worker::

    ("attach", jid, geometry)   + the job's memfd      map the job's storage (kept until detach)
    ("run", jid, rid, lo, hi, ns_per_page, populate)   initialize job pages [lo, hi)
    ("cancel", jid)                                    abandon the job's runs, unmap, then ack
    ("detach", jid)                                    the job is done: unmap, then ack
    ("exit",)

Worker -> engine::

    ("hello", pid)
    ("done", jid, rid, populated_sections)
    ("abandoned", jid, rid)      the run was stopped by a cancel (or the job is unknown)
    ("cancelled", jid)           ack of "cancel": nothing of the job is mapped any more
    ("detached", jid)            ack of "detach": same
    ("error", jid, rid, message) the run failed (e.g. ENOSPC in phase 1)
"""

from __future__ import annotations

import array
import contextlib
import os
import pickle
import select
import signal
import socket
import sys
from collections import deque
from collections.abc import Iterable
from typing import Any

from .page import TemplateCache
from .storage import Geometry, Mapping, initialize_pages

MSG_MAX = 1 << 16
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
        self.inbox: deque[tuple[tuple[Any, ...], list[int]]] = deque()
        self.exiting = False
        self.cache = TemplateCache()

    # -- transport -----------------------------------------------------------------------------
    def send(self, msg: tuple[Any, ...]) -> None:
        self.sock.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def _recv_one(self, block: bool) -> bool:
        """Receive one message into the inbox. False on EOF (the engine is gone) or nothing ready."""
        try:
            # (Not socket.recv_fds: in Python 3.11 it ignores its flags argument.)
            data, anc, _flags, _addr = self.sock.recvmsg(
                MSG_MAX, socket.CMSG_SPACE(4 * _FD_ARRAY.itemsize), 0 if block else socket.MSG_DONTWAIT
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
        msg = pickle.loads(data)
        if msg[0] == "cancel":
            # Runs of a cancelled job still queued here are dropped at once, so the cancel does
            # not wait behind them; the engine forgets their claims when it gets the ack.
            jid = msg[1]
            kept = deque(item for item in self.inbox if not (item[0][0] == "run" and item[0][1] == jid))
            self.inbox = kept
            job = self.jobs.get(jid)
            if job is not None:
                job.cancelled = True
        elif msg[0] == "exit":
            self.exiting = True
        self.inbox.append((msg, fds))
        return True

    def _drain(self) -> None:
        while not self.exiting and self._recv_one(block=False):
            pass

    def _pause(self, job: _WorkerJob, timeout: float) -> bool:
        """Sleep up to ``timeout`` (woken early by a message); True if the job must stop."""
        if timeout > 0 and not self.inbox:
            try:
                select.select([self.sock], [], [], timeout)
            except InterruptedError:
                pass
        self._drain()
        return job.cancelled or self.exiting

    # -- work ----------------------------------------------------------------------------------
    def _run(self, jid: int, rid: int, lo: int, hi: int, ns_per_page: float, populate: list[int]) -> None:
        job = self.jobs.get(jid)
        if job is None or job.cancelled:
            self.send(("abandoned", jid, rid))
            return
        need = set(populate)
        newly: list[int] = []

        def ensure_section(js: int) -> None:
            if js in need and js not in job.populated:
                job.mapping.populate_section(js)
                job.populated.add(js)
                newly.append(js)

        try:
            ok = initialize_pages(job.mapping, lo, hi, ensure_section=ensure_section,
                                  pause=lambda t: self._pause(job, t), ns_per_page=ns_per_page,
                                  cache=self.cache)
        except Exception as exc:  # report, keep serving other jobs
            self.send(("error", jid, rid, f"{type(exc).__name__}: {exc}"))
            return
        self.send(("done", jid, rid, newly) if ok else ("abandoned", jid, rid))

    def _detach(self, jid: int) -> None:
        job = self.jobs.pop(jid, None)
        if job is not None:
            job.close()

    def serve(self) -> None:
        self.send(("hello", os.getpid()))
        while True:
            if not self.inbox:
                if self.exiting:
                    return
                self._recv_one(block=True)  # a message, or EOF (sets exiting)
                continue
            msg, fds = self.inbox.popleft()
            kind = msg[0]
            try:
                if kind == "attach":
                    jid, geom = msg[1], msg[2]
                    try:
                        self.jobs[jid] = _WorkerJob(geom, fds[0])
                    except Exception as exc:
                        self.send(("error", jid, -1, f"attach: {type(exc).__name__}: {exc}"))
                elif kind == "run":
                    self._run(*msg[1:])
                elif kind == "cancel":
                    self._detach(msg[1])
                    self.send(("cancelled", msg[1]))
                elif kind == "detach":
                    self._detach(msg[1])
                    self.send(("detached", msg[1]))
                elif kind == "exit":
                    return
            finally:
                # The mapping holds the memory; the fd itself is not needed after attach.
                for fd in fds:
                    os.close(fd)

    def shutdown(self) -> None:
        for jid in list(self.jobs):
            self._detach(jid)


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
