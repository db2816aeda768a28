"""A private directory, safe to use as root: the state dir (and the runtime dir of mount records).

Whoever can write the state dir (or replace a file in it) decides what a root daemon
truncates, rewrites and serves as /dev/pmem: a symbolic link named `lock` or `regionN.media`
would make it write to any file of the machine. So, as ssh treats a key file, a state dir or
file in it that another user owns or that group or others may write is refused with a
message, symbolic links in it are refused, nothing in it is opened through one (O_NOFOLLOW),
and what vnvdimm creates there is private: directories 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeStateDir(RuntimeError):
    """The state dir (or a file in it) could be changed by someone else; the message says how
    to make it private."""


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_entry(st: os.stat_result, path: Path) -> None:
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStateDir(f"{path}: a symbolic link; vnvdimm opens nothing in its state and runtime dirs "
                             "through one (whoever made it would choose which file gets written): remove it")
    if st.st_uid != me:
        raise UnsafeStateDir(f"{path}: owned by {_user(st.st_uid)}, not by {_user(me)} who runs vnvdimm; "
                             "its state and runtime dirs and their files must be your own: use another "
                             "--state-dir (or XDG_RUNTIME_DIR), or chown it")
    if st.st_mode & 0o022:
        raise UnsafeStateDir(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), so "
                             f"another user could replace what vnvdimm writes there: chmod go-w {path}")
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UnsafeStateDir(f"{path}: neither a file nor a directory: remove it")


def make_private_dir(path: Path) -> None:
    """Create `path` (and missing parents) with the leaf 0700; an existing one is kept as is."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def check_private_tree(path: Path) -> None:
    """Refuse `path` unless it, and everything in it (recursively), is ours and not writable by
    group or others, with no symbolic link anywhere."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    except OSError as e:
        st = None
        with contextlib.suppress(OSError):
            st = os.lstat(path)
        if st is not None and stat.S_ISLNK(st.st_mode):
            check_entry(st, path)
        raise UnsafeStateDir(f"{path}: cannot open the state dir: {e.strerror}") from None
    try:
        check_entry(os.fstat(fd), path)
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            check_entry(st, path / name)
            if stat.S_ISDIR(st.st_mode):
                check_private_tree(path / name)
    finally:
        os.close(fd)


def open_private(path: Path, flags: int) -> int:
    """os.open of a file in the state dir: never through a symbolic link, created 0600."""
    return os.open(path, flags | NOFOLLOW, FILE_MODE)


def read_private(path: Path) -> bytes:
    fd = open_private(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
