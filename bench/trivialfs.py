"""The floor for attribute reads: a FUSE file system on the same binding (mfusepy, libfuse 3,
multithreaded, direct_io, the same mount options as vnvdimm) that serves one constant string
and does nothing else. Any path whose last component is a known attribute name is that file;
every other path is a directory, so the floor can be measured at the same path depth as the
vnvdimm attribute it is compared with (each component costs the kernel a lookup).

    python bench/trivialfs.py MNT [--pinned]   # foreground; unmount with fusermount3 -u MNT

As the binding comes, each callback from a libfuse thread creates and destroys a Python
thread state; with --pinned each thread keeps its own, as vnvdimm's loop does
(vnvdimm.fuse.libfuse.pin_thread_state): the floor for the same per-request plumbing.
"""

from __future__ import annotations

import errno
import stat
import sys
import time
from typing import Any

import mfusepy as fuse

CONTENT = b"idle\n"
FILES = ("memmap_state", "size", "align", "x")


class TrivialFs(fuse.Operations):
    use_ns = True

    def __init__(self) -> None:
        self.t = time.time_ns()

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        if path.rsplit("/", 1)[-1] in FILES:
            return {"st_mode": stat.S_IFREG | 0o644, "st_size": 4096, "st_nlink": 1, "st_mtime": self.t}
        if len(path) > 4096:
            raise fuse.FuseOSError(errno.ENAMETOOLONG)
        return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_mtime": self.t}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *FILES]

    def open(self, path: str, fi: Any) -> int:
        fi.direct_io = 1
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        return CONTENT[offset: offset + size]


class PinnedLoop(fuse.FUSE):
    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        from vnvdimm.fuse.libfuse import pin_thread_state

        pin_thread_state()
        return super()._wrapper(func, *args, **kwargs)


def main() -> None:
    from vnvdimm.fuse.options import MOUNT_OPTIONS  # exactly vnvdimm's options: same kernel behaviour

    loop = PinnedLoop if "--pinned" in sys.argv[2:] else fuse.FUSE
    loop(TrivialFs(), sys.argv[1], raw_fi=True, foreground=True, fsname="trivialfs", subtype="trivialfs",
         **MOUNT_OPTIONS)


if __name__ == "__main__":
    main()
