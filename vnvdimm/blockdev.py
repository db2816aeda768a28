"""Real block devices for the emulated disks: while a `with-vnvdimm` command runs as root,
each disk of the mount (``/dev/pmemN``, a BTT's ``/dev/pmemNs``) is a block device node
served by the mount itself (S_IFBLK, its rdev a loop device), and its partitions
(``/dev/pmemNp1``) too, so that `mkfs.ext4 /dev/pmem0 && mount /dev/pmem0 /mnt`, `fsck`,
`parted`, `partprobe`, `umount /dev/pmem0` and `stat` behave as on a real system.

Who attaches: the daemon (`vnvdimm.loopdisks.LoopDisks`), which runs as root when its mount
may carry device nodes, and does so while at least one session is open
(`/.blockdev/session`, held by `vnvdimm blockdevs`, with-vnvdimm's helper): a disk that appears (a namespace enabled,
reconfigured) gets its loop device before the write that made it is answered, as devtmpfs
has the node by then, and one that goes loses it. Outside a session, and for a mount of an
ordinary user, the nodes stay the regular device files the preload library stands in for.

Why loop devices: a FUSE file system cannot serve a block device itself (the kernel routes a
node's open to the driver of its number), and a loop device over the disk's backing file
(``MNT/.blockdev/pmemN``, the same bytes as the device file) keeps every read going through
the daemon: memmap waits, media errors (EIO) and their clearing by a write. The backing file
is opened with O_NOATIME, which the daemon takes as "a loop device's backing file": uncached
(the loop's reads reach the data path, which checks the bad blocks) and following the disk
behind the name. The loop device is configured with partition scanning, so BLKPG, BLKRRPART
and the scan at attach work on it; the daemon lists its partitions (the host's sysfs) as the
disk's, under the names the kernel gives partitions of that disk.

Nothing is left behind: each loop device is created with autoclear and held open by the
daemon only, so the kernel detaches it when the last user is gone (the daemon at the end of
the session or of the disk, a file system mounted on it when its mount namespace ends). A
disable while a file system is mounted fails with EBUSY, as on the kernel: ndctl opens the
block device with O_EXCL first, and the mounted file system holds it exclusively.

Usage (from with-vnvdimm): ``vnvdimm blockdevs MNT -- CMD [ARG...]``: open a session, run
CMD, pass its exit status through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

# Kept free of the model's imports: this module is with-vnvdimm's helper, started for every
# command (the daemon's side is vnvdimm.loopdisks).

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_SET_CAPACITY = 0x4C07
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LOOP_INFO64_SIZE = 232
LO_FLAGS_OFFSET = 52  # lo_flags in struct loop_info64: after five u64 and three u32

BLOCKDEV_DIR = "/.blockdev"  # as vnvdimm.sysfs.tree serves it
SESSION = f"{BLOCKDEV_DIR}/session"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
def _loop_config(fd: int, block_size: int, flags: int) -> bytes:
    """struct loop_config: fd, block_size, struct loop_info64, 64 reserved bytes."""
    info = bytearray(LOOP_INFO64_SIZE)
    struct.pack_into("=I", info, LO_FLAGS_OFFSET, flags)
    return struct.pack("=II", fd, block_size) + bytes(info) + bytes(64)


def attach(path: Path | str, block_size: int = 512, read_only: bool = False, partscan: bool = False
           ) -> tuple[int, int]:
    """A loop device over `path` with autoclear (and partition scanning); returns its number
    and an open descriptor of it (close it and the kernel detaches the device once nobody
    else uses it)."""
    access = os.O_RDONLY if read_only else os.O_RDWR
    backing = os.open(path, access | os.O_NOATIME | os.O_CLOEXEC)
    try:
        flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_PARTSCAN if partscan else 0)
        config = _loop_config(backing, block_size, flags)
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(64):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                loop = os.open(f"/dev/loop{number}", access | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(loop, LOOP_CONFIGURE, config)
                except OSError as e:
                    os.close(loop)
                    if e.errno == errno.EBUSY:  # another process took it first
                        continue
                    raise
                return number, loop
            raise OSError(errno.EBUSY, "no free loop device")
        finally:
            os.close(control)
    finally:
        os.close(backing)  # the loop device holds its own reference


def run(mnt: Path, cmd: list[str]) -> int:
    """Open a block-device session on the mount, run `cmd`, return its exit status (killed by
    a signal, this process dies of the same signal). Signals sent to this process are passed
    on to it. The session is held by this process only (close-on-exec): it ends with it."""
    session: int | None = None
    try:
        session = os.open(mnt / SESSION.lstrip("/"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        reason = "its daemon does not run as root" if e.errno == errno.ENOENT else e.strerror
        print(f"with-vnvdimm: no block devices on {mnt} ({reason}); /dev/pmem* are plain files", file=sys.stderr)
    try:
        child = subprocess.Popen(cmd)
    except OSError as e:
        print(f"with-vnvdimm: {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 127
    for signum in FORWARDED:
        signal.signal(signum, lambda s, _frame: child.send_signal(s))
    status = child.wait()
    if session is not None:
        with contextlib.suppress(OSError):
            end_session(session)
    if status < 0:  # killed by a signal: die of it too, so that the caller sees what CMD did
        signal.signal(-status, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {-status})
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


def end_session(fd: int) -> None:
    """End a session and close it: the fsync returns once the daemon let go of the loop
    devices (those nothing else uses are detached then); a close alone is answered later."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: vnvdimm blockdevs MNT -- CMD [ARG...]", file=sys.stderr)
        return 2
    # Root binds loop devices over MNT's files: only a vnvdimm mount of root's (or the
    # caller's) decides what they are, never a tree that merely looks like one.
    from vnvdimm.mounts import NotVnvdimm, check_trusted_tree

    try:
        check_trusted_tree(Path(argv[0]))
    except NotVnvdimm as e:
        print(f"with-vnvdimm: {e}", file=sys.stderr)
        return 2
    return run(Path(argv[0]), argv[2:])
