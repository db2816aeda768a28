"""Real block devices for the emulated /dev: a loop device over each block device file of a
mount (``MNT/dev/pmemN``, a BTT's ``MNT/dev/pmemNs``), bound over that file inside
`with-vnvdimm`'s private mount namespace, so that `mkfs.ext4 /dev/pmem0 && mount /dev/pmem0
/mnt`, `fsck`, `parted` and `blockdev` work there (root only: loop devices and mounts).

Why loop devices: a FUSE file system cannot serve a block device node itself (the kernel
routes a node's open to its driver, not to the file system), and a loop device over the device
file keeps every read going through the daemon, which still waits for the memmap.

Nothing is left behind: each loop device is created with autoclear and held open by this
process only, so the kernel detaches it when the last user is gone (this process, killed or
not, a file system mounted on it when its namespace ends, a process that still has it open).
Its backing handle follows the device behind the name (opened with O_NOATIME, which the
daemon takes as that request): after `ndctl create-namespace -f`, writes to /dev/pmem0 reach
the new device, as on the kernel where /dev/pmem0 is then a new disk. A disable while a file
system is mounted on it fails with EBUSY, as on the kernel: ndctl opens the block device with
O_EXCL first, and the mounted file system holds the loop device exclusively.

Usage (from with-vnvdimm): ``vnvdimm blockdevs MNT -- CMD [ARG...]``: attach and bind, run
CMD, pass its exit status through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LOOP_INFO64_SIZE = 232
LO_FLAGS_OFFSET = 52  # lo_flags in struct loop_info64: after five u64 and three u32

BLOCK_DEVICE = re.compile(r"pmem\d+s?$")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _loop_config(fd: int, block_size: int, flags: int) -> bytes:
    """struct loop_config: fd, block_size, struct loop_info64, 64 reserved bytes."""
    info = bytearray(LOOP_INFO64_SIZE)
    struct.pack_into("=I", info, LO_FLAGS_OFFSET, flags)
    return struct.pack("=II", fd, block_size) + bytes(info) + bytes(64)


def attach(path: Path, block_size: int = 512, read_only: bool = False) -> tuple[str, int]:
    """A loop device over `path` with autoclear; returns its node and an open descriptor of it
    (close it and the kernel detaches the device once nobody else uses it)."""
    access = os.O_RDONLY if read_only else os.O_RDWR
    backing = os.open(path, access | os.O_NOATIME | os.O_CLOEXEC)
    try:
        flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if read_only else 0)
        config = _loop_config(backing, block_size, flags)
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(64):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                node = f"/dev/loop{number}"
                loop = os.open(node, access | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(loop, LOOP_CONFIGURE, config)
                except OSError as e:
                    os.close(loop)
                    if e.errno == errno.EBUSY:  # another process took it first
                        continue
                    raise
                return node, loop
            raise OSError(errno.EBUSY, "no free loop device")
        finally:
            os.close(control)
    finally:
        os.close(backing)  # the loop device holds its own reference


def block_size_of(mnt: Path, name: str) -> int:
    try:
        return int((mnt / "sys" / "block" / name / "queue" / "logical_block_size").read_text())
    except (OSError, ValueError):
        return 512


def read_only(mnt: Path, name: str) -> bool:
    try:
        return (mnt / "sys" / "block" / name / "ro").read_text().strip() == "1"
    except OSError:
        return False


def bind_all(mnt: Path) -> list[int]:
    """Attach a loop device to every block device file of the mount and bind it over the file
    (in the current mount namespace). Returns the descriptors that keep them."""
    held: list[int] = []
    for name in sorted(os.listdir(mnt / "dev")):
        if not BLOCK_DEVICE.match(name):
            continue
        node, fd = attach(mnt / "dev" / name, block_size_of(mnt, name), read_only(mnt, name))
        held.append(fd)
        subprocess.run(["mount", "--bind", node, str(mnt / "dev" / name)], check=True, capture_output=True,
                       timeout=60)
    return held


def run(mnt: Path, cmd: list[str]) -> int:
    """Bind the loop devices, run `cmd`, return its exit status (killed by a signal, this
    process dies of the same signal). Signals sent to this process are passed on to it."""
    try:
        held = bind_all(mnt)
    except (OSError, subprocess.SubprocessError) as e:
        message = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else e
        print(f"with-vnvdimm: no loop block devices ({message}); /dev/pmem* are plain files", file=sys.stderr)
        held = []
    try:
        child = subprocess.Popen(cmd)
    except OSError as e:
        print(f"with-vnvdimm: {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 127
    for signum in FORWARDED:
        signal.signal(signum, lambda s, _frame: child.send_signal(s))
    status = child.wait()
    for fd in held:
        with contextlib.suppress(OSError):
            os.close(fd)
    if status < 0:  # killed by a signal: die of it too, so that the caller sees what CMD did
        signal.signal(-status, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {-status})
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: vnvdimm blockdevs MNT -- CMD [ARG...]", file=sys.stderr)
        return 2
    return run(Path(argv[0]), argv[2:])
