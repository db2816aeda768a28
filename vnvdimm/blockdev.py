"""Real block devices for the emulated disks: while a `with-vnvdimm` command runs as root,
each disk of the mount (``/dev/pmemN``, a BTT's ``/dev/pmemNs``) is a block device node
served by the mount itself (S_IFBLK, its rdev a loop device), and its partitions
(``/dev/pmemNp1``) too, so that `mkfs.ext4 /dev/pmem0 && mount /dev/pmem0 /mnt`, `fsck`,
`parted`, `partprobe`, `umount /dev/pmem0`, `stat` and `rm` behave as on a real system.

Who attaches: the daemon (`LoopDisks`), which runs as root when its mount may carry device
nodes, and does so while at least one session is open (`/.blockdev/session`, held by
`vnvdimm blockdevs`, with-vnvdimm's helper): a disk that appears (a namespace enabled,
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
import ctypes
import errno
import fcntl
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from vnvdimm.model.disk import DataPath, Disk
from vnvdimm.parttable import TablePartition, read_table
from vnvdimm.sysfs.tree import BLOCKDEV_DIR, Partition, Tree

log = logging.getLogger("vnvdimm.blockdev")

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_SET_CAPACITY = 0x4C07
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LOOP_INFO64_SIZE = 232
LO_FLAGS_OFFSET = 52  # lo_flags in struct loop_info64: after five u64 and three u32

BLKFLSBUF = 0x1261
BLKPG = 0x1269
BLKPG_ADD_PARTITION = 1
BLKPG_DEL_PARTITION = 2


class _BlkpgPartition(ctypes.Structure):
    _fields_ = [("start", ctypes.c_longlong), ("length", ctypes.c_longlong), ("pno", ctypes.c_int),
                ("devname", ctypes.c_char * 64), ("volname", ctypes.c_char * 64)]


class _BlkpgIoctlArg(ctypes.Structure):
    _fields_ = [("op", ctypes.c_int), ("flags", ctypes.c_int), ("datalen", ctypes.c_int),
                ("data", ctypes.c_void_p)]


def blkpg(fd: int, op: int, part: TablePartition) -> None:
    """BLKPG_ADD_PARTITION / BLKPG_DEL_PARTITION on the block device `fd` (what parted does
    to inform the kernel)."""
    data = _BlkpgPartition(part.start, part.length, part.number)
    arg = _BlkpgIoctlArg(op, 0, ctypes.sizeof(data), ctypes.addressof(data))
    fcntl.ioctl(fd, BLKPG, bytes(arg))


SESSION = f"{BLOCKDEV_DIR}/session"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# How often the daemon looks for partitions the kernel added or removed (BLKPG, BLKRRPART)
# and disks that changed other than by a store: udev takes about as long to make a node.
POLL_S = 0.2


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


def partition_name(disk: str, number: int) -> str:
    """The kernel's name for partition `number` of `disk` (disk_name()): a "p" between
    them when the disk's name ends in a digit (pmem0p1), none otherwise (pmem0s1)."""
    return f"{disk}{'p' if disk[-1:].isdigit() else ''}{number}"


@dataclass
class Loop:
    number: int
    fd: int
    rdev: tuple[int, int]
    data: DataPath  # the device it was attached for: another one behind the name gets a new loop
    block_size: int
    # The partition numbers the kernel had at the last look (None: never looked): when they
    # change (BLKRRPART dropped them, or this is the attach), the table is read again.
    seen: frozenset[int] | None = None
    table: list[TablePartition] | None = None  # the disk's table at the last look
    # The data's serial the loop's page cache was filled under: media errors injected or
    # cleared since make it drop (see LoopDisks._drop_stale_caches).
    serial: int = 0


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


class LoopDisks:
    """The daemon's side (see the module's docstring): a loop device per disk while a session
    is open, the nodes and partitions the tree serves for them, /proc/partitions."""

    def __init__(self, tree: Tree, mountpoint: Path | str) -> None:
        self.tree = tree
        self.mountpoint = Path(mountpoint)
        self._lock = threading.Lock()  # one reconcile at a time
        self._sessions = 0
        self._loops: dict[str, Loop] = {}
        self._released: dict[str, int] = {}  # disk name -> the loop device it last had
        # What the tree serves, replaced whole (read by tree builds without the lock).
        self._rdevs: dict[str, tuple[int, int]] = {}
        self._partitions: list[Partition] = []
        self._stop = threading.Event()
        self._kick = threading.Event()  # look now, not at the next poll
        self._poller: threading.Thread | None = None
        self._closed = False
        tree.system.subscribe(self._on_notify)

    @staticmethod
    def available() -> bool:
        """Loop devices and device nodes on the mount: root with /dev/loop-control."""
        return os.geteuid() == 0 and os.path.exists("/dev/loop-control")

    # -- what the tree asks (vnvdimm.sysfs.tree.BlockDevices)

    def disk_rdev(self, name: str) -> tuple[int, int] | None:
        return self._rdevs.get(name)

    def partitions(self) -> list[Partition]:
        return self._partitions

    def proc_partitions(self) -> str:
        """The host's /proc/partitions, its lines for the loop devices behind the disks (and
        their partitions) under the disks' names; nothing else (inside with-vnvdimm, /sys/block
        has the emulated disks only)."""
        names = {f"loop{loop.number}": name for name, loop in self._loops.items()}
        names.update({os.path.basename(p.host_dir): p.name for p in self._partitions})
        with open("/proc/partitions") as f:
            lines = f.read().splitlines(keepends=True)
        out = lines[:2]  # "major minor  #blocks  name" and a blank line
        for line in lines[2:]:
            fields = line.split()
            if len(fields) == 4 and fields[3] in names:
                out.append(line[:line.rindex(fields[3])] + names[fields[3]] + "\n")
        return "".join(out)

    # -- sessions

    def session_opened(self) -> None:
        with self._lock:
            self._sessions += 1
            if self._poller is None or not self._poller.is_alive():
                self._stop.clear()
                self._poller = threading.Thread(target=self._poll, name="vnvdimm-blockdevs", daemon=True)
                self._poller.start()
        self.reconcile()

    def session_closed(self) -> None:
        with self._lock:
            self._sessions = max(0, self._sessions - 1)
            if self._sessions == 0:
                self._stop.set()
                self._kick.set()
        self.reconcile()

    def _on_notify(self, dev: object, attr: str) -> None:
        # A disk's bad blocks changed (from any thread, maybe under the model lock: only wake).
        if attr == "badblocks" and self._loops:
            self._kick.set()

    def _poll(self) -> None:
        while True:
            self._kick.wait(POLL_S)
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self.reconcile()
            except Exception:  # a reconcile must never end the poller of a live session
                log.exception("block devices: reconcile failed")

    # -- the work

    def _wanted(self) -> dict[str, tuple[DataPath, int]]:
        """The disks that should have a block device: name -> (data path, logical block size)."""
        if self._sessions == 0 or self._closed:
            return {}
        system = self.tree.system
        wanted: dict[str, tuple[DataPath, int]] = {}
        with system.lock:
            for dev in system.all_devices():
                disk = getattr(dev, "disk", None)
                if isinstance(disk, Disk) and not disk.data.closed:
                    wanted[disk.name] = (disk.data, disk.logical_block_size)
        return wanted

    def reconcile(self) -> None:
        """Attach a loop device for each disk that has none, let go of those whose disk is
        gone (or replaced), pick up partition changes; publish any change to the tree.
        Never called with the model lock held (the backing file is opened through the mount)."""
        with self._lock:
            wanted = self._wanted()
            changed = False
            for name, loop in list(self._loops.items()):
                if name not in wanted or wanted[name][0] is not loop.data:
                    del self._loops[name]
                    os.close(loop.fd)  # autoclear: detached once nothing else has it open
                    self._released[name] = loop.number
                    log.info("%s: loop%d released", name, loop.number)
                    changed = True
            for name, (data, block_size) in wanted.items():
                if name in self._loops:
                    continue
                backing = self.mountpoint / BLOCKDEV_DIR.lstrip("/") / name
                try:
                    number, fd = self._reuse(name, backing, data) or attach(backing, block_size, data.read_only(),
                                                                            partscan=True)
                except OSError as e:
                    log.warning("%s: no loop block device: %s", name, e.strerror or e)
                    continue
                rdev = os.fstat(fd).st_rdev
                self._loops[name] = Loop(number, fd, (os.major(rdev), os.minor(rdev)), data, block_size,
                                         serial=data.serial)
                log.info("%s: block device loop%d", name, number)
                changed = True
            self._drop_stale_caches()
            partitions = self._scan_partitions()
            if partitions != self._partitions:
                changed = True
            if changed:
                self._rdevs = {name: loop.rdev for name, loop in self._loops.items()}
                self._partitions = partitions
        if changed and not self._closed:
            self.tree.refresh()

    def _reuse(self, name: str, backing: Path, data: DataPath) -> tuple[int, int] | None:
        """The loop device this disk had, if something still holds it open (so it is still
        attached over this disk's backing file, which follows the name): it stands for the
        disk again, with the new disk's size. A node's device number is fixed while its inode
        lives (an open file of it keeps it), so a disk that came back must keep its number."""
        number = self._released.pop(name, None)
        if number is None:
            return None
        try:
            if Path(f"/sys/block/loop{number}/loop/backing_file").read_text().strip() != str(backing):
                return None
            fd = os.open(f"/dev/loop{number}", (os.O_RDONLY if data.read_only() else os.O_RDWR) | os.O_CLOEXEC)
        except OSError:
            return None  # detached meanwhile
        try:
            fcntl.ioctl(fd, LOOP_SET_CAPACITY)
        except OSError:
            os.close(fd)
            return None
        log.info("%s: loop%d was still held: it stands for the disk again", name, number)
        return number, fd

    def _drop_stale_caches(self) -> None:
        """pmem_do_read() fails every read that touches a bad block: pages of the loop device
        cached before an error was injected (or a scrub found it) must not answer for the
        block, so the loop device's page cache is written back and dropped (BLKFLSBUF) when
        the media errors behind it change. The backing file itself is uncached."""
        for name, loop in self._loops.items():
            serial = loop.data.serial
            if serial != loop.serial:
                loop.serial = serial
                try:
                    fcntl.ioctl(loop.fd, BLKFLSBUF)
                except OSError as e:
                    log.warning("%s: cannot drop the page cache of loop%d: %s", name, loop.number, e.strerror)

    def _scan_partitions(self) -> list[Partition]:
        found: list[Partition] = []
        for name, loop in sorted(self._loops.items()):
            base = f"/sys/block/loop{loop.number}"
            numbers = self._kernel_partitions(base, loop.number)
            table = self._read_table(loop)
            if loop.table != table or loop.seen != numbers:
                # The table was rewritten (udev rescans a disk closed after a write) or the
                # kernel's partitions changed (BLKRRPART, which finds none without parsers).
                if self._sync_partitions(name, loop, table, base, table_changed=loop.table != table):
                    numbers = self._kernel_partitions(base, loop.number)
                loop.seen, loop.table = numbers, table
            for number in sorted(numbers):
                entry = f"{base}/loop{loop.number}p{number}"
                try:
                    major, minor = (int(x) for x in _read(f"{entry}/dev").split(":"))
                except (OSError, ValueError):
                    continue  # going away while we look
                found.append(Partition(partition_name(name, number), name, number, (major, minor), entry))
        return found

    @staticmethod
    def _kernel_partitions(base: str, loop_number: int) -> frozenset[int]:
        prefix = f"loop{loop_number}p"
        try:
            return frozenset(int(e[len(prefix):]) for e in os.listdir(base)
                             if e.startswith(prefix) and e[len(prefix):].isdigit())
        except OSError:
            return frozenset()

    @staticmethod
    def _read_table(loop: Loop) -> list[TablePartition]:
        data = loop.data
        return read_table(lambda offset, length: data.read(length, offset), data.size, loop.block_size)

    def _sync_partitions(self, name: str, loop: Loop, table: list[TablePartition], base: str,
                         table_changed: bool) -> bool:
        """The kernel's partition scan, for a host kernel without partition parsers: the
        partitions of the disk's table that the kernel does not have are added with BLKPG
        (at attach, after BLKRRPART, after a new table was written, as udev has the kernel
        rescan a disk closed after a write); when the table changed, those it no longer has
        (or has elsewhere) go, unless in use. True if anything changed."""
        kernel: dict[int, tuple[int, int]] = {}
        for number in self._kernel_partitions(base, loop.number):
            entry = f"{base}/loop{loop.number}p{number}"
            with contextlib.suppress(OSError, ValueError):
                kernel[number] = (int(_read(f"{entry}/start")) * 512, int(_read(f"{entry}/size")) * 512)
        wanted = {p.number: p for p in table}
        changed = False
        for number, (start, length) in kernel.items():
            part = wanted.get(number)
            if not table_changed or (part is not None and (part.start, part.length) == (start, length)):
                continue
            try:
                blkpg(loop.fd, BLKPG_DEL_PARTITION, TablePartition(number, 0, 0))
                changed = True
            except OSError as e:  # EBUSY: mounted, open exclusively
                log.info("%s: partition %d stays: %s", name, number, e.strerror)
        present = self._kernel_partitions(base, loop.number) if changed else frozenset(kernel)
        for part in table:
            if part.number in present:
                continue
            try:
                blkpg(loop.fd, BLKPG_ADD_PARTITION, part)
                changed = True
                log.info("%s: partition %d at %d, %d bytes (from its table)", name, part.number, part.start,
                         part.length)
            except OSError as e:
                log.info("%s: partition %d not added: %s", name, part.number, e.strerror)
        return changed

    def close(self) -> None:
        """The daemon ends: let go of every loop device (no tree left to tell)."""
        self._closed = True
        self._stop.set()
        self._kick.set()
        with self._lock:
            for loop in self._loops.values():
                with contextlib.suppress(OSError):
                    os.close(loop.fd)
            self._loops.clear()
            self._rdevs, self._partitions = {}, []


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
    return run(Path(argv[0]), argv[2:])
