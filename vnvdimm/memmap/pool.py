"""The worker processes: starting (fork or spawn), replacing, stopping and reaping them.

Only the dispatcher thread talks to the workers (:mod:`.dispatch`); this module knows nothing of
jobs or runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

from vnvdimm.proctitle import set_title

from . import protocol
from .protocol import ToWorker
from .worker import worker_main

log = logging.getLogger("vnvdimm.memmap")

REAP_TIMEOUT_S = 2.0  # a worker not gone this long after being told to exit is killed
MAX_RESTARTS = 8  # replacements allowed per RESTART_WINDOW_S before a slot is left empty
RESTART_WINDOW_S = 30

_FORK_BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2,
                         signal.SIGCHLD, signal.SIGALRM}
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(eq=False)
class WorkerHandle:
    """The engine's end of one worker process (what it was given to do is the dispatcher's business)."""

    slot: int
    owner: int  # the block owner the worker's claims are made as
    pid: int
    sock: socket.socket
    popen: subprocess.Popen[bytes] | None
    dead: bool = False
    killed: bool = False  # SIGKILLed by us (waiting for its EOF)

    def send(self, msg: ToWorker, fds: list[int] | None = None) -> bool:
        """Send a message; False if the worker is (found) dead: its EOF is handled by the reader."""
        if self.dead:
            return False
        data = protocol.encode(msg)
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
            return True
        except OSError:
            return False

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

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


class WorkerPool:
    """A fixed number of slots, each holding a live worker, or None when it could not be replaced."""

    def __init__(self, size: int, owner_base: int, title: str | None = None) -> None:
        self.size = size
        self.owner_base = owner_base
        # what the workers show in ps after "vnvdimm worker N" (the daemon's mount point)
        self.title = title
        self.slots: list[WorkerHandle | None] = []
        self.replacements = 0  # workers restarted after a crash
        self._restarts: list[float] = []

    def live(self) -> list[WorkerHandle]:
        return [w for w in self.slots if w is not None and not w.dead]

    def pids(self) -> list[int]:
        return [w.pid for w in list(self.slots) if w is not None and not w.dead]

    def start(self, fork: bool) -> None:
        for slot in range(self.size):
            self.slots.append(self.start_worker(slot, fork=fork))

    def start_worker(self, slot: int, fork: bool) -> WorkerHandle:
        """A new worker for ``slot``: forked (fast, only while this process has one thread) or
        spawned (fork+exec)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        owner = self.owner_base + slot
        if not fork:
            fd = child.fileno()
            code = (f"import sys; sys.path.insert(0, {_PKG_ROOT!r}); "
                    + (f"from vnvdimm.proctitle import set_title; set_title(*{self._title_words(slot)!r}); "
                       if self.title is not None else "")
                    + "from vnvdimm.memmap.worker import worker_main; worker_main(int(sys.argv[1]))")
            popen = subprocess.Popen([sys.executable, "-c", code, str(fd)], pass_fds=(fd,),
                                     stdin=subprocess.DEVNULL, close_fds=True)
            child.close()
            return WorkerHandle(slot, owner, popen.pid, parent, popen)
        others = [w.sock for w in self.live()]
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
                if self.title is not None:
                    set_title(*self._title_words(slot))
                worker_main(child.detach(), unblock=old_mask)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child.close()
        return WorkerHandle(slot, owner, pid, parent, None)

    def _title_words(self, slot: int) -> tuple[str, ...]:
        return ("vnvdimm", "worker", str(slot), self.title or "")

    def replace(self, dead: WorkerHandle) -> WorkerHandle | None:
        """A replacement for a dead worker, unless workers keep dying (then the slot stays empty)."""
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        new: WorkerHandle | None = None
        if len(self._restarts) < MAX_RESTARTS:
            self._restarts.append(now)
            try:
                # Threads exist now: a replacement is spawned (fork+exec), never forked.
                new = self.start_worker(dead.slot, fork=False)
            except Exception:
                log.exception("memmap: cannot start a replacement worker")
        else:
            log.error("memmap: workers keep dying (%d in %d s): slot %d stays empty",
                      len(self._restarts), RESTART_WINDOW_S, dead.slot)
        self.slots[dead.slot] = new
        if new is not None:
            self.replacements += 1
        return new

    def stop(self) -> None:
        """Tell every live worker to exit and reap it (killed if it does not go in time)."""
        live = self.live()
        for w in live:
            w.send(protocol.Exit())
        for w in live:
            w.dead = True
            w.reap(REAP_TIMEOUT_S)
            w.sock.close()

    def abandon(self) -> None:
        """Last resort at close: reap whatever the dispatcher could not stop."""
        for w in self.slots:
            if w is not None and not w.dead:
                w.dead = True
                with contextlib.suppress(OSError):
                    w.sock.close()
                w.reap(REAP_TIMEOUT_S)
