"""Mounting through fusermount3, for root and ordinary users alike.

libfuse mounts by itself only when it can open /dev/fuse and call mount(2); otherwise it
runs fusermount3 with its stderr going wherever the daemon's goes (nowhere, once
daemonized), and a failure reaches the caller as a bare status. vnvdimm runs the setuid
helper itself instead: it asks for the mount, receives the /dev/fuse descriptor over a socket
(the helper's `_FUSE_COMMFD` protocol) and hands it to libfuse as `/dev/fd/N`. So an ordinary
user needs neither access to /dev/fuse nor membership in a group, and when the mount is
refused the helper's own words are what the user reads.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess

FUSE_CONF = "/etc/fuse.conf"


class FusermountError(RuntimeError):
    """The mount was refused; the message is fusermount3's reason and what to do about it."""


def fusermount_path() -> str:
    path = shutil.which("fusermount3")
    if path is None:
        raise FusermountError("fusermount3 not found: install the fuse3 package (apt-get install fuse3)")
    return path


def user_allow_other() -> bool:
    """Whether /etc/fuse.conf lets ordinary users mount with allow_other."""
    try:
        with open(FUSE_CONF) as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def check_can_mount(allow_other: bool) -> None:
    """What an ordinary user's mount needs, checked before anything is created."""
    helper = fusermount_path()
    if os.geteuid() == 0:
        return
    st = os.stat(helper)
    if not (st.st_mode & stat.S_ISUID and st.st_uid == 0):
        raise FusermountError(f"{helper} is not setuid root, so only root can mount FUSE file systems here: "
                              f"run as root, or restore the fuse3 package's mode (chmod u+s {helper})")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        # fusermount3 opens it with the user's own rights.
        raise FusermountError("/dev/fuse is not readable and writable by you (a stock system makes it 0666): "
                              "run as root, or ask the administrator to chmod 0666 /dev/fuse")
    if allow_other and not user_allow_other():
        raise FusermountError(f"--allow-other needs 'user_allow_other' in {FUSE_CONF} when not run as root "
                              "(a line of its own; ask the administrator), or mount without --allow-other "
                              "(then only you can see the mount: no other user, not even root)")


def mount(mountpoint: str, options: list[str], anchor_fd: int | None = None) -> int:
    """Mount a FUSE file system at `mountpoint` and return the /dev/fuse descriptor serving it.
    `options` are kernel mount options (fsname=, subtype=, default_permissions, ...).
    `anchor_fd`: the mount point's directory as it was checked (opened O_NOFOLLOW at the end
    of a checked walk); the mount must land on that very directory (see `check_landing`)."""
    helper = fusermount_path()
    before = {m.identity for m in _mountinfo()}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen([helper, "-o", ",".join(options), "--", mountpoint], env=env,
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        theirs.close()
        fds: list[int] = []
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            pass
        _, err = proc.communicate(timeout=60)
    finally:
        ours.close()
        if theirs.fileno() >= 0:
            theirs.close()
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        raise FusermountError(explain(err.decode(errors="replace").strip(), proc.returncode))
    os.set_inheritable(fds[0], False)
    if anchor_fd is not None:
        try:
            check_landing(mountpoint, anchor_fd, before, _subtype(options))
        except FusermountError:
            os.close(fds[0])
            raise
    return fds[0]


class _Mount:
    def __init__(self, line: str) -> None:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        self.mount_id, self.parent_id = int(fields[0]), int(fields[1])
        self.mountpoint = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        self.fstype = tail[0] if tail else ""
        self.super_options = tail[2].split(",") if len(tail) > 2 else []

    @property
    def identity(self) -> tuple[int, int, str]:
        """What tells this mount from one made later: its id alone does not, the kernel gives
        a freed id to the next mount (an unmount anywhere on the machine between two looks
        would make a new mount seem old)."""
        return self.mount_id, self.parent_id, self.mountpoint


def _mountinfo() -> list[_Mount]:
    with open("/proc/self/mountinfo") as f:
        return [_Mount(line) for line in f.read().splitlines() if " - " in line]


def _subtype(options: list[str]) -> str:
    for option in options:
        if option.startswith("subtype="):
            return "fuse." + option.removeprefix("subtype=")
    return "fuse"


def mount_id_of(fd: int) -> int:
    """The id of the mount that holds the file open as `fd` (as /proc/self/mountinfo numbers them)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"no mnt_id in /proc/self/fdinfo/{fd}")


def check_landing(mountpoint: str, anchor_fd: int, before: set[tuple[int, int, str]], fstype: str) -> None:
    """fusermount3 looks `mountpoint` up by its path again: should a directory above it have
    been swapped since the check (for a link to elsewhere), the mount lands on another
    directory. It is ours only if a new mount of `fstype` sits at `mountpoint` on top of the
    mount that holds the checked directory (`anchor_fd`), and that directory is still the one
    `mountpoint` names (no two directories have the same path at once). Otherwise the mounts
    that appeared meanwhile (of this file system type, of this user) are detached and the
    mount is refused: the caller closes the /dev/fuse descriptor, which kills it for good."""
    parent = mount_id_of(anchor_fd)
    try:
        where = os.readlink(f"/proc/self/fd/{anchor_fd}")
    except OSError:
        where = ""
    me = f"user_id={os.geteuid()}"
    new = [m for m in _mountinfo() if m.identity not in before and m.fstype == fstype and me in m.super_options]
    if where == mountpoint and any(m.mountpoint == mountpoint and m.parent_id == parent for m in new):
        return
    # Every mount of this user's of this type that appeared during our call goes (one at
    # `mountpoint` itself is on another directory when `where` differs). Another vnvdimm of
    # the same user mounting in the same instant would be detached too: its daemon sees it and
    # exits; a mount left where an attacker chose would be worse.
    for m in new:
        unmount(m.mountpoint)
    moved = f" (the directory checked is now at {where})" if where and where != mountpoint else ""
    raise FusermountError(f"{mountpoint}: the mount point changed between its check and the mount{moved}: "
                          "a directory above it was renamed or swapped; the mount was undone. Make sure "
                          "nobody else can rename the directories above it, then mount again")


def unmount(mountpoint: str) -> None:
    """Detach a mount made by `mount` whose serving never started."""
    subprocess.run([fusermount_path(), "-u", "-z", "--", mountpoint], capture_output=True, check=False)


# What to do about fusermount3's usual refusals (its message is always shown as well).
_HINTS = (
    ("user_allow_other", f"add a line 'user_allow_other' to {FUSE_CONF}, or mount without --allow-other"),
    ("/dev/fuse", "load the fuse module (modprobe fuse); in a container, pass --device /dev/fuse"),
    ("not owned by user", "mount on a directory you own"),
    ("no write access", "mount on a directory you own"),
    ("permission denied", "mount on a directory you own and can write to"),
    ("too many fuse", f"raise mount_max in {FUSE_CONF}, or unmount some FUSE file systems"),
    ("operation not permitted", "FUSE mounts are not allowed here (a container without CAP_SYS_ADMIN, or a "
                                "seccomp/AppArmor policy): run on a host or a privileged container"),
)


def explain(message: str, status: int) -> str:
    text = message or f"fusermount3 failed with status {status} and no message"
    lowered = text.lower()
    for needle, hint in _HINTS:
        if needle in lowered:
            return f"{text} ({hint})"
    return text
