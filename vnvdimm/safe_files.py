"""Private files and directories, safe to use as root: the state dir, the runtime dir of mount
records, and `write_atomically` (a file replaced whole and durably, never through a link).

Whoever can write the state dir (or replace a file in it) decides what a root daemon
truncates, rewrites and serves as /dev/pmem: a symbolic link named `lock` or `regionN.media`
would make it write to any file of the machine. So, as ssh treats a key file, a state dir or
file in it that another user owns or that group or others may write is refused with a
message, symbolic links in it are refused, nothing in it is opened through one (O_NOFOLLOW),
and what vnvdimm creates there is private: directories 0700, files 0600.

The directories above it matter as much: whoever can rename one of them can put a symbolic
link, or a directory of their own, where the state dir was, between the check and a later open
by path. So, as ssh's StrictModes treats a home directory, every ancestor of the state dir (and
of a mount point) must be owned by root or by the user running vnvdimm and not writable by
group or others; a sticky directory such as /tmp is fine for an entry root or the user owns
(nobody else may rename it there), and a symbolic link on the way is followed only if root or
the user owns it. The walk opens each component relative to the one above it
(O_NOFOLLOW | O_DIRECTORY) and checks what it opened, so what is checked is what is used: the
state dir's descriptor at the end of the walk, relative to which every file in it is opened
(a later swap of an ancestor changes nothing).
"""

from __future__ import annotations

import contextlib
import errno
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


def check_ancestor(st: os.stat_result, path: Path, child: os.stat_result, child_path: Path, what: str,
                   target: Path | None = None) -> None:
    """StrictModes for one directory above a state dir or mount point (`what` says which,
    `target` is its path)."""
    me = os.geteuid()
    what = f"{what} {target} is under it" if target is not None and target != child_path else f"it is the {what}"
    if st.st_uid not in (0, me):
        owners = "root" if me == 0 else f"root or {_user(me)}"
        raise UnsafeStateDir(f"{path}: owned by {_user(st.st_uid)}, who could replace {child_path} ({what}) "
                             "with a directory or link of their own; every directory above a state dir or mount "
                             f"point must be owned by {owners}: choose one elsewhere (under your home, "
                             f"or in a directory of root's), or chown root {path}")
    if st.st_mode & 0o022:
        if st.st_mode & stat.S_ISVTX:
            # Sticky (/tmp): only the entry's owner (or root) may rename or remove it there.
            if child.st_uid in (0, me):
                return
            raise UnsafeStateDir(f"{child_path}: owned by {_user(child.st_uid)} in the sticky directory {path}, "
                                 f"so {_user(child.st_uid)} could replace it with a directory or link of their own "
                                 f"({what}); choose a state dir or mount point under a directory of your own")
        who = "group" if st.st_mode & 0o020 and not st.st_mode & 0o002 else "others"
        raise UnsafeStateDir(f"{path}: writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}), who could replace "
                             f"{child_path} ({what}) with a directory or link of their own; choose a state dir "
                             f"or mount point whose every parent directory is writable only by its owner, or "
                             f"chmod go-w {path}"
                             + (" (a sticky directory such as /tmp is fine for an entry you own)"
                                if not st.st_mode & stat.S_ISVTX else ""))


DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW


def _refuse_open(parent_fd: int, name: str, path: Path, e: OSError, what: str) -> UnsafeStateDir:
    st = None
    with contextlib.suppress(OSError):
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if st is not None and stat.S_ISLNK(st.st_mode):
        target = "?"
        with contextlib.suppress(OSError):
            target = os.readlink(name, dir_fd=parent_fd)
        return UnsafeStateDir(f"{path}: the {what} is a symbolic link (to {target}); vnvdimm uses no {what} "
                              "through one (whoever can change it would choose where vnvdimm writes or mounts): "
                              "give the directory itself")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        return UnsafeStateDir(f"{path}: not a directory")
    return UnsafeStateDir(f"{path}: cannot open: {e.strerror}")


def canonical(path: Path) -> Path:
    """`path` made absolute, without following any link (open_checked_dir does that, checking
    each one)."""
    return Path(os.path.abspath(path))


#: As the kernel's path walk: more links than this on one path is a loop (ELOOP).
MAX_LINKS = 40


def open_checked_dir(path: Path, what: str, create: bool = False) -> tuple[int, Path]:
    """Open the directory `path` (absolute) by walking from / one component at a time, each
    opened O_NOFOLLOW | O_DIRECTORY relative to the one above and checked as an ancestor
    (check_ancestor) of the next. A symbolic link on the way (/var/run, a home reached through
    /home -> /data/home) is followed only when it is owned by root or the user and sits in a
    directory that passes the same check (so that only they can have put it there); the last
    component is never a link. `create`: make the missing directories (the last one 0700).
    Returns the descriptor of `path` itself and the path it was found at (links resolved). The
    last directory's owner and mode are not checked here: a state dir's are check_private_tree's,
    a mount point's fusermount3's. Raises UnsafeStateDir naming what fails and what to do."""
    if not path.is_absolute():
        raise ValueError(f"{path}: not an absolute path")
    me = os.geteuid()
    todo = list(path.parts[1:])
    links = retries = 0
    fd = os.open("/", DIR_FLAGS)
    here = Path("/")
    try:
        st = os.fstat(fd)
        while todo:
            name = todo.pop(0)
            leaf = not todo
            if name == "..":
                up = os.open("..", DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd, here = up, here.parent
                st = os.fstat(fd)
                continue
            child_path = here / name
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, DIR_MODE if leaf else 0o755, dir_fd=fd)
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise _refuse_open(fd, name, child_path, e, what) from None
            except OSError as e:
                link = None
                with contextlib.suppress(OSError):
                    link = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if link is not None and stat.S_ISDIR(link.st_mode) and e.errno in (errno.ELOOP, errno.ENOTDIR):
                    # Not a directory when opened, one now: renamed meanwhile. Look again
                    # (a few times: someone doing it in a loop is refused below).
                    retries += 1
                    if retries > MAX_LINKS:
                        raise UnsafeStateDir(f"{child_path}: changes while vnvdimm opens it (something renames or "
                                             f"swaps it, on the way to the {what} {path}); make sure nobody else "
                                             "can rename the directories above it") from None
                    todo.insert(0, name)
                    continue
                if leaf or link is None or not stat.S_ISLNK(link.st_mode):
                    raise _refuse_open(fd, name, child_path, e, what) from None
                check_ancestor(st, here, link, child_path, what, path)
                if link.st_uid not in (0, me):
                    raise UnsafeStateDir(f"{child_path}: a symbolic link owned by {_user(link.st_uid)} on the way to "
                                         f"the {what} {path}; vnvdimm follows only links of root's or yours: "
                                         "give the real path") from None
                links += 1
                if links > MAX_LINKS:
                    raise UnsafeStateDir(f"{path}: too many levels of symbolic links") from None
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", DIR_FLAGS)
                    here = Path("/")
                    st = os.fstat(fd)
                todo = [p for p in Path(target).parts if p != "/"] + todo
                continue
            child_st = os.fstat(child)
            try:
                check_ancestor(st, here, child_st, child_path, what, path)
            except BaseException:
                os.close(child)
                raise
            os.close(fd)
            fd, st, here = child, child_st, child_path
    except BaseException:
        os.close(fd)
        raise
    return fd, here


def check_private_tree(path: Path, dir_fd: int | None = None) -> None:
    """Refuse `path` unless it, and everything in it (recursively), is ours and not writable by
    group or others, with no symbolic link anywhere. `dir_fd`: the directory, already open
    (what is checked is then that very directory, whatever `path` names meanwhile)."""
    if dir_fd is None:
        try:
            fd = os.open(path, DIR_FLAGS)
        except OSError as e:
            st = None
            with contextlib.suppress(OSError):
                st = os.lstat(path)
            if st is not None and stat.S_ISLNK(st.st_mode):
                check_entry(st, path)
            raise UnsafeStateDir(f"{path}: cannot open the state dir: {e.strerror}") from None
    else:
        fd = dir_fd
    try:
        check_entry(os.fstat(fd), path)
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            check_entry(st, path / name)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
                try:
                    check_private_tree(path / name, sub)
                finally:
                    os.close(sub)
    finally:
        if dir_fd is None:
            os.close(fd)


def open_private(path: Path, flags: int, dir_fd: int | None = None) -> int:
    """os.open of a file in the state dir: never through a symbolic link, created 0600.
    `dir_fd`: the descriptor of `path`'s directory; only `path.name` is looked up, in it."""
    if dir_fd is not None:
        return os.open(path.name, flags | NOFOLLOW, FILE_MODE, dir_fd=dir_fd)
    return os.open(path, flags | NOFOLLOW, FILE_MODE)


def read_private(path: Path, dir_fd: int | None = None) -> bytes:
    fd = open_private(path, os.O_RDONLY, dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def fsync_dir(path: Path, dir_fd: int | None = None) -> None:
    """fsync a directory: `dir_fd` itself when given (`path` is then only its name)."""
    if dir_fd is not None:
        os.fsync(dir_fd)
        return
    fd = os.open(path, DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, dir_fd: int | None = None) -> None:
    """Replace `path` with `data`, durably: a temporary file, fsync'ed, renamed over it, then
    the directory fsync'ed. `dir_fd`: the descriptor of `path`'s directory; every name is then
    looked up in it (a rename of a directory above changes nothing)."""
    tmp = path.with_name(f".{path.name}.tmp")
    name, tmp_name = (path.name, tmp.name) if dir_fd is not None else (path, tmp)
    # O_NOFOLLOW: never write through a symbolic link someone planted in the state dir.
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name, dir_fd=dir_fd)
        raise
    if dir_fd is not None:
        os.fsync(dir_fd)
        return
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
