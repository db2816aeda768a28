"""Per-request counters of the FUSE adapter, for measuring (never on by default).

With VNVDIMM_FUSE_PROFILE=FILE in the daemon's environment, every callback the binding makes
into the adapter is counted by operation with the CPU time its thread spent in it
(`time.thread_time_ns`: what the daemon paid, not how long the caller waited, so it holds on a
busy machine). `kill -USR2 <daemon>` writes the counts since the previous signal to FILE (JSON,
replaced atomically) and starts over: the first signal after a warm-up, a second one after the
workload measured.

The operations are the binding's callbacks: `getattr` answers both the kernel's LOOKUP and its
GETATTR; OPENDIR, RELEASEDIR and FLUSH never reach Python (libfuse answers them itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

ENV = "VNVDIMM_FUSE_PROFILE"


class RequestProfile:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, list[int]] = {}

    def record(self, op: str, cpu_ns: int) -> None:
        with self._lock:
            entry = self._ops.get(op)
            if entry is None:
                entry = self._ops[op] = [0, 0]
            entry[0] += 1
            entry[1] += cpu_ns

    def take(self) -> dict[str, dict[str, int]]:
        """{op: {"count": N, "cpu_ns": T}} since the last take(), and start over."""
        with self._lock:
            ops, self._ops = self._ops, {}
        return {op: {"count": n, "cpu_ns": t} for op, (n, t) in sorted(ops.items())}

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "ops": self.take()}) + "\n")
        tmp.replace(path)


def from_environment() -> tuple[RequestProfile, Path] | None:
    value = os.environ.get(ENV)
    return (RequestProfile(), Path(value)) if value else None


def dump_on_sigusr2(profile: RequestProfile, path: Path) -> None:
    """Write (and restart) the profile on every SIGUSR2, from a thread of its own. Called from
    the main thread, which then runs libfuse's loop in C: the signal's Python handler would
    never run there, so its arrival is read from the wakeup fd instead."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(wfd, False)
    signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)

    def loop() -> None:
        while True:
            got = os.read(rfd, 64)
            if not got:
                return
            if signal.SIGUSR2 in got:
                with contextlib.suppress(OSError):
                    profile.write(path)

    threading.Thread(target=loop, name="vnvdimm-fuse-profile", daemon=True).start()
