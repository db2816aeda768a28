"""The daemon's log file, kept bounded: `vnvdimm.log` rotates to `vnvdimm.log.1` and
`vnvdimm.log.2` (the oldest is dropped) once it reaches a few MiB.

Three writers share the file: the logging handler below, stderr (libfuse and the C runtime
print there) and faulthandler's stack dumps (SIGUSR1). A rotation moves the file aside, opens
a new one and points every descriptor of the process that was on the old file at the new one
(dup2 onto the same numbers), so all three follow. (The memmap workers, separate processes,
keep writing a stack trace of their own death to the file they started with.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

#: Rotate once the log reaches this size.
MAX_BYTES = 4 << 20
#: Generations kept besides the live file: vnvdimm.log.1 (newer) and vnvdimm.log.2.
BACKUPS = 2
#: Overrides MAX_BYTES (for tests that watch a rotation without writing 4 MiB of lines).
MAX_BYTES_ENV = "VNVDIMM_LOG_MAX_BYTES"


def max_bytes_from_environment() -> int:
    try:
        return max(1024, int(os.environ[MAX_BYTES_ENV]))
    except (KeyError, ValueError):
        return MAX_BYTES


def generation(name: str, n: int) -> str:
    return name if n == 0 else f"{name}.{n}"


class RotatingLog(logging.Handler):
    """A handler appending to the file `name` of a directory, rotating it before a record would
    take it past `max_bytes`. The directory is reached only through `opener` (name -> a file
    descriptor open for appending) and `rename` (old name, new name; replacing): the state
    dir's own private, no-symlink operations."""

    def __init__(self, name: str, opener: Callable[[str], int], rename: Callable[[str, str], None],
                 max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        super().__init__()
        self.name_in_dir = name
        self.opener = opener
        self.rename = rename
        self.max_bytes = max_bytes
        self.backups = backups
        self.fd = opener(name)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            size = os.fstat(self.fd).st_size
            if size and size + len(data) > self.max_bytes:
                self.rotate()
            os.write(self.fd, data)
        except Exception:
            self.handleError(record)

    def rotate(self) -> None:
        """Shift the generations, start a new file, move every descriptor on the old one over."""
        old = os.fstat(self.fd)
        for n in range(self.backups, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                self.rename(generation(self.name_in_dir, n - 1), generation(self.name_in_dir, n))
        new = self.opener(self.name_in_dir)
        try:
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                if fd == new:
                    continue
                with contextlib.suppress(OSError):
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) == (old.st_dev, old.st_ino):
                        os.dup2(new, fd, inheritable=fd <= 2)
        finally:
            os.close(new)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        super().close()
