"""A DIMM's label storage area: raw bytes, as the firmware of a real DIMM keeps them.

The kernel reaches a DIMM's label area only through three commands (ND_CMD_GET_CONFIG_SIZE,
ND_CMD_GET_CONFIG_DATA, ND_CMD_SET_CONFIG_DATA): its size, a read at an offset and a write at
an offset, each transfer at most `max_xfer` bytes. The area itself is opaque to the DIMM:
nothing is parsed when it is written. The nvdimm driver parses it when the DIMM probes
(nd_label_data_init()), so userspace that rewrote the area (ndctl write-labels) disables and
re-enables the DIMM to make the kernel see the new labels.

vnvdimm keeps each area as one regular file of exactly `size` bytes in the state dir. Every
write reaches the disk before it returns (pwrite + fdatasync), so a daemon killed between two
writes leaves the area as a DIMM losing power between two commands would: each command done
or not done, none torn by the page cache.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from vnvdimm.model.base import fail
from vnvdimm.safe_files import write_atomically

# tools/testing/nvdimm/test/nfit.c: LABEL_SIZE (SZ_128K) and the 4 KiB max_xfer its
# GET_CONFIG_SIZE answers with.
NFIT_TEST_LABEL_SIZE = 128 << 10
NFIT_TEST_MAX_XFER = 4 << 10


def nfit_test_fill(index: int) -> bytes:
    """The initial content nfit_test gives label area `index` of a bus: the zeroed buffer
    with sprintf(label, "label%d", index) at its start (no valid index block)."""
    return f"label{index}".encode() + b"\0"


class LabelArea:
    """The label storage area of one DIMM, backed by a file of exactly `size` bytes."""

    _fd = -1  # until the file is open (__del__ of an area whose open failed)

    def __init__(self, path: Path, size: int, max_xfer: int, *, sync_each_write: bool = True,
                 dir_fd: int | None = None) -> None:
        """`sync_each_write` False: writes reach the disk when the area is closed, not each on
        its own (for an area nobody uses until it is complete: an installer's). `dir_fd`: the
        descriptor of `path`'s directory; the file is opened in it by name."""
        if size <= 0 or max_xfer <= 0:
            raise ValueError(f"{path}: label area size {size} / max_xfer {max_xfer} must be positive")
        self.path = path
        self.size = size
        self.max_xfer = max_xfer
        self.sync_each_write = sync_each_write
        self._unsynced = False
        self._lock = threading.Lock()
        self._fd = os.open(path.name if dir_fd is not None else path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW,
                           dir_fd=dir_fd)
        try:
            actual = os.fstat(self._fd).st_size
            if actual != size:
                raise ValueError(f"{path}: label area has {actual} bytes, the DIMM has {size}")
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    @classmethod
    def create(cls, path: Path, size: int, max_xfer: int, fill: bytes = b"", *,
               sync_each_write: bool = True, dir_fd: int | None = None) -> LabelArea:
        """A fresh area: zeroes with `fill` at offset 0, durable before it is returned (without
        `sync_each_write`: once it is closed; its directory entry is the creator's to sync)."""
        if sync_each_write:
            write_fresh(path, size, fill, dir_fd=dir_fd)
            return cls(path, size, max_xfer, dir_fd=dir_fd)
        if len(fill) > size:
            raise ValueError(f"{path}: fill of {len(fill)} bytes does not fit a {size}-byte area")
        fd = os.open(path.name if dir_fd is not None else path,
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            os.ftruncate(fd, size)
            if fill:
                os.pwrite(fd, fill, 0)
        finally:
            os.close(fd)
        area = cls(path, size, max_xfer, sync_each_write=False, dir_fd=dir_fd)
        area._unsynced = True
        return area

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise fail(errno.EINVAL, f"{self.path.name}: [{offset}, +{length}) outside the {self.size}-byte area")

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (EINVAL when the range leaves the area)."""
        self._check(offset, length)
        out = bytearray()
        with self._lock:
            while len(out) < length:
                chunk = os.pread(self._fd, length - len(out), offset + len(out))
                if not chunk:  # the file cannot shrink under us: it is ours and fixed-size
                    raise fail(errno.EIO, f"{self.path}: short read")
                out += chunk
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Store `data` at `offset`, durably, without looking at it (EINVAL out of range)."""
        self._check(offset, len(data))
        view = memoryview(data)
        with self._lock:
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
            if self.sync_each_write:
                os.fdatasync(self._fd)
            else:
                self._unsynced = True

    def reset(self, fill: bytes = b"") -> None:
        """Back to a freshly allocated area (what reloading nfit_test gives every DIMM)."""
        self.write(0, (fill + bytes(self.size))[: self.size])

    def close(self) -> None:
        """Close the area, its writes on the disk first."""
        with self._lock:
            if self._fd >= 0:
                try:
                    if self._unsynced:
                        os.fdatasync(self._fd)
                        self._unsynced = False
                finally:
                    os.close(self._fd)
                    self._fd = -1

    def __del__(self) -> None:
        # an area dropped without close() (a failed boot) does not keep its descriptor
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_fresh(path: Path, size: int, fill: bytes, *, dir_fd: int | None = None) -> None:
    """Create `path` as a `size`-byte area holding `fill` then zeroes, atomically and durably."""
    if len(fill) > size:
        raise ValueError(f"{path}: fill of {len(fill)} bytes does not fit a {size}-byte area")
    write_atomically(path, fill + bytes(size - len(fill)), dir_fd=dir_fd)
