"""`vnvdimm sysfs-attach MNT`: with-vnvdimm's /sys connection.

Run inside with-vnvdimm's private mount namespace (as root there: root, or the user in a
user namespace of theirs), before the trees are bound over /sys and /dev: mounts a FUSE
connection at MNT/sys in this namespace only and hands its /dev/fuse descriptor to the
daemon of MNT, which serves the tree's /sys on it with no OPEN or RELEASE (one READ per
attribute read, or none while its value has not changed; vnvdimm/fuse/sysfs_ops.py). The
connection ends with the namespace. On any failure nothing stays mounted and MNT/sys is
what with-vnvdimm binds, as before: exit status 1, with the reason on stderr.

Only the daemon of MNT, and only one running as root or as the caller, may serve it: the
socket is the one MNT names for it, and its peer's uid is checked.

with-vnvdimm runs this file as a script with `python3 -S` (no site, no package: the standard
library only), a few milliseconds on every with-vnvdimm call; the protocol's constants are
the ioctl wire's (vnvdimm/ioctl/wire.py; a unit test keeps them equal).
"""

from __future__ import annotations

import array
import ctypes
import os
import socket
import struct
import sys

# vnvdimm.ioctl.wire's, for this script alone
NODE_XATTR = "user.vnvdimm"
MAGIC, VERSION, ATTACH_SYSFS = 0x564E5644, 3, 0x564E5301
REQUEST = struct.Struct("<IIIIQQ")
OP = struct.Struct("<IIQQ")
OP_DONE = 3
UCRED = struct.Struct("iII")

MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MNT_DETACH = 2
ROOT_MODE = "40000"  # a directory, octal, as the kernel's fuse mount wants it
ANSWER_TIMEOUT_S = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class AttachError(Exception):
    pass


def _mount_options(path: str) -> list[str]:
    """The super options of the mount holding `path` (from this namespace's mountinfo)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == dev and " - " in line:
                return line.rsplit(" - ", 1)[1].split()[-1].split(",")
    return []


def _socket_of(sys_dir: str) -> str:
    try:
        value = os.getxattr(sys_dir, NODE_XATTR).decode("utf-8", "surrogateescape")
    except OSError as e:
        raise AttachError(f"{sys_dir}: its daemon serves no /sys connection ({e.strerror})") from None
    kind, _, path = value.partition(" ")
    if kind != "sysfs" or not path.startswith("/"):
        raise AttachError(f"{sys_dir}: unexpected {NODE_XATTR} {value!r}")
    return path


def _handed_over(socket_path: str, fd: int, target: str) -> None:
    """Send the descriptor to the daemon; raises AttachError unless it serves it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(ANSWER_TIMEOUT_S)
        try:
            sock.connect(socket_path)
            _, uid, _ = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
            if uid not in (0, os.getuid()):
                raise AttachError(f"{socket_path}: served by uid {uid}, neither root nor you")
            arg = target.encode("utf-8", "surrogateescape")
            data = REQUEST.pack(MAGIC, VERSION, ATTACH_SYSFS, 0, len(arg), len(arg)) + arg
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
            answer = b""
            while len(answer) < OP.size:
                chunk = sock.recv(OP.size - len(answer))
                if not chunk:
                    raise ConnectionError("the daemon closed the connection")
                answer += chunk
            op, _, code, _ = OP.unpack(answer)
        except (OSError, ConnectionError) as e:
            raise AttachError(f"{socket_path}: {e}") from None
    if op != OP_DONE:
        raise AttachError(f"{socket_path}: unexpected answer {op}")
    if code:
        raise AttachError(f"the daemon refused: {os.strerror(code)}")


def attach(mnt: str) -> None:
    target = os.path.join(os.path.realpath(mnt), "sys")
    socket_path = _socket_of(target)  # (read before the mount covers it)
    allow_other = "allow_other" in _mount_options(target)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        options = [f"fd={fd}", f"rootmode={ROOT_MODE}", f"user_id={os.getuid()}", f"group_id={os.getgid()}",
                   "default_permissions", *(["allow_other"] if allow_other else [])]
        if _libc.mount(b"vnvdimm", target.encode(), b"fuse.vnvdimm", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                       ",".join(options).encode()) != 0:
            e = ctypes.get_errno()
            raise AttachError(f"mount on {target}: {os.strerror(e)}")
        try:
            _handed_over(socket_path, fd, target)
        except BaseException:
            # Nobody serves it: a request to it would fail (ENOTCONN once fd is closed); gone.
            _libc.umount2(target.encode(), MNT_DETACH)
            raise
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: vnvdimm sysfs-attach MNT   (with-vnvdimm runs it in its namespace)", file=sys.stderr)
        return 2
    try:
        attach(argv[0])
    except AttachError as e:
        print(f"vnvdimm sysfs-attach: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"vnvdimm sysfs-attach: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
