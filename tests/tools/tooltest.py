"""Helpers for the end-to-end tests of the tools: a slow topology, holding a memmap at a
point, running a command on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

from mount_kit import memmap_state
from topologies import SLOW_E820  # noqa: F401 (the tools tests take it from here)

REPO = Path(__file__).resolve().parent.parent.parent
VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]
SCRIPTS = REPO / "mountscripts"

def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the knobs that change how rich draws (CI may set them)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(extra)
    return env


def nd_dir(m: Any, dev: str) -> Path:
    return m.sys / "bus" / "nd" / "devices" / dev


def holder(m: Any, namespace: str) -> str:
    return m.read(f"sys/bus/nd/devices/{namespace}/holder").strip()


def restart_memmap(m: Any, dev: str) -> None:
    """Unbind and bind a pfn/dax device: its memmap starts over."""
    driver = "dax_pmem" if dev.startswith("dax") else "nd_pmem"
    m.write(f"sys/bus/nd/drivers/{driver}/unbind", dev.encode())
    m.write(f"sys/bus/nd/drivers/{driver}/bind", dev.encode())


def memmap_progress(m: Any, dev: str) -> tuple[str, int, int]:
    """(memmap_state, pages_done, pages_total), the state read with its invariant checked."""
    d = nd_dir(m, dev)
    state = memmap_state(m.root, dev)
    return state, int((d / "memmap" / "pages_done").read_text()), int((d / "memmap" / "pages_total").read_text())


def hold_memmap(m: Any, dev: str, permille: int = 300, timeout: float = 30) -> None:
    """Restart `dev`'s memmap and let it run to `permille` of its pages, where it is held
    (memmap/pause_at) until release_memmap()."""
    (nd_dir(m, dev) / "memmap" / "pause_at").write_text(f"{permille}\n")
    restart_memmap(m, dev)
    deadline = time.monotonic() + timeout
    while True:
        state, done, total = memmap_progress(m, dev)
        assert state == "active", f"{dev} went idle before reaching its pause mark"
        if done * 1000 >= permille * total:
            return
        assert time.monotonic() < deadline, f"{dev} did not reach {permille} per mille: {done}/{total}"
        time.sleep(0.02)


def release_memmap(m: Any, dev: str) -> None:
    (nd_dir(m, dev) / "memmap" / "pause_at").write_text("1000\n")


def _as_a_terminal_job() -> None:
    """In the child: ^C (SIGINT) and ^\\ (SIGQUIT) act as they do for a job started from a
    terminal. Dispositions set to 'ignore' survive exec, and a test run started in the
    background of a non-interactive shell (nohup, `cmd &`) has both ignored: a program
    started from there could never be interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


class PtyRun:
    """A command on a pseudo-terminal (120x40): everything it printed, and its exit status."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cols: int = 120, rows: int = 40) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.master = master
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     env=env or clean_env(TERM="xterm-256color"), start_new_session=True,
                                     preexec_fn=_as_a_terminal_job)
        os.close(slave)
        self.output = b""

    def read_for(self, seconds: float) -> bytes:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.master], [], [], left)[0]:
                break
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            self.output += chunk
        return self.output

    def read_until(self, needle: bytes | str, timeout: float) -> bytes:
        """Until `needle` was printed (a str is looked for in the text without escape codes)."""
        deadline = time.monotonic() + timeout

        def seen() -> bool:
            return needle in (strip_ansi(self.output) if isinstance(needle, str) else self.output)

        while not seen() and time.monotonic() < deadline:
            before = len(self.output)
            self.read_for(min(0.2, max(0.0, deadline - time.monotonic())))
            if len(self.output) == before and self.proc.poll() is not None:
                break
        return self.output

    def finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read_for(0.1)
        self.read_for(0.2)
        if self.proc.poll() is None:
            waiting = kernel_wait(self.proc.pid)
            self.proc.kill()
            self.proc.wait()
            os.close(self.master)
            raise AssertionError(f"{self.proc.args} did not finish in {timeout} s; {waiting}; "
                                 f"output: {self.output[-2000:]!r}")
        os.close(self.master)
        return self.proc.returncode

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)


def kernel_wait(pid: int) -> str:
    """Where in the kernel a process sits (its wait channel and kernel stack, e.g. a FUSE
    request the daemon has not answered), for the message of a test that found it stuck."""
    parts = []
    for name in ("wchan", "stack"):
        try:
            parts.append(f"{name}: {Path(f'/proc/{pid}/{name}').read_text().strip()!r}")
        except OSError as e:
            parts.append(f"{name}: {e.strerror}")
    return ", ".join(parts)


def strip_ansi(data: bytes) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.decode("utf-8", "replace"))
