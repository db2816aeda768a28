"""The preload library trusts the mount VNVDIMM_MOUNT_DEV names only if it is vnvdimm's.

VNVDIMM_MOUNT_DEV is a number in the environment: stale (the mount is gone and its anonymous
device number went to another FUSE file system), copied, or set by whoever prepared the
environment. The file system it names answered every question the library asked as long as
it was FUSE: its files' `user.vnvdimm` made them device nodes for `stat`, and their ioctls
went to whatever socket they named (whose peer had to be root or the file system's owner).
Here that file system is a FUSE file system of another kind (type "fuse", no vnvdimm
subtype) whose one file claims to be /dev/pmem0 and names a listening socket: the library
must leave it alone, as it leaves a file of tmpfs alone."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_kit import wait_for

from vnvdimm.mounts import fuse_mounts_under, lazy_unmount
from vnvdimm.preload import library_path

pytestmark = pytest.mark.mount

# A FUSE file system of one file, "pmem0", whose user.vnvdimm names the socket given.
FAKE_FS = textwrap.dedent("""
    import errno, stat, sys, time
    import mfusepy
    attribute = sys.argv[2].encode()
    class Fake(mfusepy.Operations):
        def getattr(self, path, fh=None):
            times = dict.fromkeys(("st_atime", "st_mtime", "st_ctime"), time.time())
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **times}
            if path == "/pmem0":
                return {"st_mode": stat.S_IFREG | 0o666, "st_nlink": 1, "st_size": 4096, **times}
            raise mfusepy.FuseOSError(errno.ENOENT)
        def readdir(self, path, fh):
            return [".", "..", "pmem0"]
        def getxattr(self, path, name, position=0):
            if path == "/pmem0" and name == "user.vnvdimm":
                return attribute
            raise mfusepy.FuseOSError(errno.ENODATA)
        def open(self, path, flags):
            return 0
        def read(self, path, size, offset, fh):
            return bytes(size)
    mfusepy.FUSE(Fake(), sys.argv[1], foreground=True, fsname="fake", allow_other=True)
""")

VICTIM = textwrap.dedent("""
    import ctypes, errno, os, stat, sys
    path = sys.argv[1]
    print("block" if stat.S_ISBLK(os.stat(path).st_mode) else "regular")
    libc = ctypes.CDLL(None, use_errno=True)
    size = ctypes.c_uint64(0)
    fd = os.open(path, os.O_RDONLY)
    rc = libc.ioctl(fd, ctypes.c_ulong(0x80081272), ctypes.byref(size))  # BLKGETSIZE64
    print(rc, errno.errorcode.get(ctypes.get_errno(), "0") if rc else "0")
""")


@pytest.fixture
def fake_fs(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    if os.geteuid() != 0:
        pytest.skip("mounts a FUSE file system with allow_other: needs root")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "attacker.sock"))
    listener.listen(8)
    listener.setblocking(False)
    mnt = tmp_path / "fake"
    mnt.mkdir()
    attribute = f"b 259:0 pmem0 0 {tmp_path / 'attacker.sock'}"
    server = subprocess.Popen([sys.executable, "-c", FAKE_FS, str(mnt), attribute])
    try:
        wait_for(lambda: str(mnt) in fuse_mounts_under(tmp_path), 60, "the fake file system's mount")
        yield mnt, listener
    finally:
        for m in fuse_mounts_under(tmp_path):
            lazy_unmount(m)
        server.kill()
        server.wait()
        listener.close()


def test_a_fuse_file_system_of_another_kind_is_not_trusted(fake_fs: tuple[Path, socket.socket]) -> None:
    mnt, listener = fake_fs
    st = os.stat(mnt / "pmem0")
    env = {**os.environ, "LD_PRELOAD": str(library_path()),
           "VNVDIMM_MOUNT_DEV": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", "VNVDIMM_IOCTL_TIMEOUT_MS": "5000"}
    res = subprocess.run([sys.executable, "-c", VICTIM, str(mnt / "pmem0")], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["regular", "-1 ENOTTY"], res.stdout + res.stderr
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody ever connected
    with contextlib.suppress(OSError):
        listener.close()
