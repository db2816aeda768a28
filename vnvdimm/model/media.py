"""The persistent media: one sparse file per region, addressed like the region's SPA range.

A `Window` is a byte range of a region's media seen through a device (a namespace, the data
area of a pfn/dax device, ...). Device files read and write through windows; nothing is
cached here, so every byte that a write returned is in the file (the host page cache), and
`fsync` makes it durable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from vnvdimm.model.badblocks import BadBlocks
from vnvdimm.model.base import fail


class Media:
    """A region's backing file, opened once for the life of the daemon."""

    def __init__(self, path: Path, size: int, *, dir_fd: int | None = None) -> None:
        """`dir_fd`: the descriptor of `path`'s directory; the file is opened in it by name."""
        self.path = path
        self.size = size
        # Never through a symbolic link: whoever made it would choose what a root daemon writes.
        self.fd = os.open(path.name if dir_fd is not None else path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW,
                          dir_fd=dir_fd)
        actual = os.fstat(self.fd).st_size
        if actual != size:
            os.close(self.fd)
            raise fail(errno.EINVAL, f"{path}: media is {actual} bytes, the region is {size}")
        self.badblocks = BadBlocks()  # the poison list of this SPA range

    @classmethod
    def anonymous(cls, name: str, size: int) -> Media:
        """Memory, not a file of the state dir: a sparse anonymous memory file (memfd) that
        lasts as long as the daemon (soft-reserved RAM: vnvdimm.model.hmem)."""
        media = cls.__new__(cls)
        media.fd = os.memfd_create(f"vnvdimm-{name}", os.MFD_CLOEXEC)
        os.ftruncate(media.fd, size)
        media.path = Path(f"/proc/self/fd/{media.fd}")
        media.size = size
        media.badblocks = BadBlocks()
        return media

    @staticmethod
    def create(path: Path, size: int, *, dir_fd: int | None = None) -> None:
        """A new sparse media file of `size` bytes, all zeros (fresh pmem reads as zeros)."""
        name = path.name if dir_fd is not None else path
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except BaseException:
            os.unlink(name, dir_fd=dir_fd)  # not a media file of the wrong size for the next mount to trip on
            raise
        finally:
            os.close(fd)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def preadinto(self, buf: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [buf], offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def zero(self, offset: int, size: int) -> None:
        """Zero a range, keeping the file sparse where it can (FALLOC_FL_PUNCH_HOLE)."""
        try:
            _punch_hole(self.fd, offset, size)
        except OSError:
            chunk = b"\0" * (1 << 20)
            done = 0
            while done < size:
                n = min(len(chunk), size - done)
                os.pwrite(self.fd, chunk[:n], offset + done)
                done += n

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _punch_hole(fd: int, offset: int, size: int) -> None:
    res = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(_FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE),
                         ctypes.c_long(offset), ctypes.c_long(size))
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
