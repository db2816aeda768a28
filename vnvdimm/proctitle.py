"""What `ps`, `top` and `pgrep` show for vnvdimm's long-running processes: `vnvdimm daemon MNT`
and `vnvdimm worker N MNT`, instead of the `python -m vnvdimm.cli mount MNT ...` they all
inherited (the workers are forked from the daemon).

Done here rather than with the setproctitle package: that is a C extension (a compiler or a
matching wheel at install time, where vnvdimm must install without one), and what is needed is
small: a title never longer than the command line it replaces (it names the same MNT), so the
kernel's argument area is rewritten in place (its address is in /proc/self/stat), NUL-separated
like real arguments, the rest zeroed; /proc/PID/cmdline then reads the new words followed by
empty ones. comm (`ps -e`, `top`) is set with prctl(PR_SET_NAME) to its first 15 bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

PR_SET_NAME = 15
COMM_BYTES = 15  # TASK_COMM_LEN - 1
# /proc/PID/stat fields 48 and 49 (arg_start, arg_end), counted after the ") " that ends comm.
_ARG_START_FIELD = 48 - 3


def set_title(*words: str) -> bool:
    """Show `words` as the process's command line and name; False where the kernel does not
    let us (the title is then left as it was: a cosmetic failure, never an error)."""
    comm = " ".join(words).encode()[:COMM_BYTES].rstrip()
    done = False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        done = libc.prctl(PR_SET_NAME, ctypes.c_char_p(comm), 0, 0, 0) == 0
    return _rewrite_arguments(words) and done


def _rewrite_arguments(words: tuple[str, ...]) -> bool:
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b") ", 1)[1].split()
        start, end = int(fields[_ARG_START_FIELD]), int(fields[_ARG_START_FIELD + 1])
    except (OSError, IndexError, ValueError):
        return False
    size = end - start
    if size <= 1 or start == 0:
        return False
    data = b"\0".join(w.encode() for w in words)[: size - 1]
    # The last byte stays NUL: the kernel then reads the area as arguments (a non-NUL last byte
    # means a setproctitle(3)-style single string that may run on into the environment).
    ctypes.memmove(start, data + b"\0" * (size - len(data)), size)
    return True


def title_of(pid: int) -> list[str]:
    """`pid`'s arguments without the empty ones a rewritten title leaves (for tests and ps-like views)."""
    try:
        raw = open(f"/proc/{pid}/cmdline", "rb").read()  # noqa: SIM115
    except OSError:
        return []
    return [w.decode(errors="replace") for w in raw.split(b"\0") if w]


