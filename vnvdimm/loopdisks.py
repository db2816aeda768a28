"""The daemon's side of the disks' block devices (see vnvdimm.blockdev for the whole design):
a loop device per disk while a session is open, the nodes and partitions the tree serves for
them, /proc/partitions, the partition scan a host kernel without parsers does not do, and the
loop devices' page caches dropped when media errors change."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from vnvdimm.blockdev import LOOP_SET_CAPACITY, attach
from vnvdimm.model.disk import DataPath
from vnvdimm.parttable import TablePartition, read_table
from vnvdimm.sysfs.tree import BLOCKDEV_DIR, Partition, Tree

log = logging.getLogger("vnvdimm.blockdev")

# sync_file_range(2) (Python's os has no binding for it): write the dirty pages of the whole
# range and wait for them, without the flush of the media an fsync would send down.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
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


# How often the daemon looks for partitions the kernel added or removed (BLKPG, BLKRRPART)
# and disks that changed other than by a store: udev takes about as long to make a node.
POLL_S = 0.2

# inotify(7), which Python's os does not bind: udev's watch on a disk node. A disk's table is
# read again when a writer closes its node (IN_CLOSE_WRITE), never while one writes it.
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
IN_CLOSE_WRITE = 0x8
IN_IGNORED = 0x8000
_IN_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


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
    # The partition numbers the kernel had at the last look (None: never looked, the table is
    # read at the first look after the attach).
    seen: frozenset[int] | None = None
    table: list[TablePartition] | None = None  # the disk's table at the last look
    # udev's watch on the disk's node (an inotify watch descriptor; None: not yet placed) and
    # whether a writer closed the node since the table was last read.
    watch: int | None = None
    written: bool = False
    # The kernel dropped every partition (BLKRRPART, which finds none without parsers) at the
    # last look: if they are still gone at this one, the table is read again. One look of
    # grace, because a tool that moves its only partition (BLKPG delete, then add) passes
    # through the same state and must not find its partition added under it.
    dropped: bool = False
    # The data's serial the loop's page cache was filled under: media errors injected or
    # cleared since make it drop (see LoopDisks._drop_stale_caches).
    serial: int = 0
    # Whether it was attached read-only (the disk's state then): a loop device's read-only
    # flag is fixed at attach, so when the disk's changes (set_disk_ro() on a write to the
    # region's read_only) the disk gets a new loop device attached the new way.
    read_only: bool = False


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
        self._host_names: dict[str, str] = {}  # the host's names (loop3, loop3p1) -> ours
        self._stop = threading.Event()
        self._kick = threading.Event()  # look now, not at the next poll
        self._poller: threading.Thread | None = None
        self._closed = False
        # udev's watch (see Loop.watch): one inotify instance, watch descriptor -> its loop.
        self._inotify = -1
        self._watches: dict[int, Loop] = {}
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
        names = dict(self._host_names)
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
                if self._inotify < 0:
                    self._inotify = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
                    if self._inotify < 0:
                        log.warning("no inotify (%s): tables written to a disk are read again only at its "
                                    "attach and after a BLKRRPART", os.strerror(ctypes.get_errno()))
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
                self._read_watch_events()
                self.reconcile()
                self._watch_disks(late=True)
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
                disk = dev.disk
                if disk is not None and not disk.data.closed:
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
                turned = name in wanted and wanted[name][0] is loop.data and loop.read_only != loop.data.read_only()
                if name not in wanted or wanted[name][0] is not loop.data or turned:
                    del self._loops[name]
                    self._unwatch(loop)
                    os.close(loop.fd)  # autoclear: detached once nothing else has it open
                    if not turned:  # (one attached the other way cannot stand for the disk again)
                        self._released[name] = loop.number
                    log.info("%s: loop%d released%s", name, loop.number, " (read-only changed)" if turned else "")
                    changed = True
            for name, (data, block_size) in wanted.items():
                if name in self._loops:
                    continue
                backing = self.mountpoint / BLOCKDEV_DIR.lstrip("/") / name
                try:
                    read_only = data.read_only()
                    number, fd = self._reuse(name, backing, data) or attach(backing, block_size, read_only,
                                                                            partscan=True)
                except OSError as e:
                    log.warning("%s: no loop block device: %s", name, e.strerror or e)
                    continue
                rdev = os.fstat(fd).st_rdev
                self._loops[name] = Loop(number, fd, (os.major(rdev), os.minor(rdev)), data, block_size,
                                         serial=data.serial, read_only=read_only)
                log.info("%s: block device loop%d", name, number)
                changed = True
            self._drop_stale_caches()
            partitions = self._scan_partitions()
            if partitions != self._partitions:
                changed = True
            if changed:
                self._rdevs = {name: loop.rdev for name, loop in self._loops.items()}
                self._partitions = partitions
                names = {f"loop{loop.number}": name for name, loop in self._loops.items()}
                names.update({os.path.basename(p.host_dir): p.name for p in partitions})
                self._host_names = names
        if changed and not self._closed:
            self.tree.refresh()
            # The watch goes on as soon as the node is served, before the store that made the
            # disk is answered: a tool may write its table and close the disk right after.
            self._watch_disks(late=False)

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
            if Path(f"/sys/block/loop{number}/ro").read_text().strip() != str(int(data.read_only())):
                return None  # attached the other way (see Loop.read_only)
            fd = os.open(f"/dev/loop{number}", (os.O_RDONLY if data.read_only() else os.O_RDWR) | os.O_CLOEXEC)
        except OSError:
            return None  # detached meanwhile
        try:
            fcntl.ioctl(fd, LOOP_SET_CAPACITY)
            fcntl.ioctl(fd, BLKFLSBUF)  # its pages were the old disk's
        except OSError:
            os.close(fd)
            return None
        log.info("%s: loop%d was still held: it stands for the disk again", name, number)
        return number, fd

    def write_back(self) -> None:
        """Write the loop devices' dirty pages to the disks (no flush of the media). On the
        kernel the last close of a disk writes its dirty pages back; here the daemon holds
        every loop device open, so a tool's close (ndctl write-infoblock, dd) leaves them in
        the page cache, and a disable right after would take the disk away under them. Called
        before every store (a bind, unbind, reconfiguration); cheap when nothing is dirty."""
        for name, loop in list(self._loops.items()):
            self._write_back(name, loop)

    @staticmethod
    def _write_back(name: str, loop: Loop) -> None:
        if _libc.sync_file_range(loop.fd, 0, 0, SYNC_FILE_RANGE_ALL) != 0:
            log.warning("%s: cannot write back loop%d: %s", name, loop.number, os.strerror(ctypes.get_errno()))

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
            if loop.seen is None or loop.written:
                # Attached, or a writer closed the node: udev has the kernel read the table
                # again (BLKRRPART on close-write), which drops what it no longer has.
                loop.written = loop.dropped = False
                numbers = self._rescan(name, loop, base, numbers, drop_stale=True)
            elif not numbers and (loop.seen or loop.dropped):
                # Every partition gone: a BLKRRPART (which finds none without parsers), or a
                # tool between the delete and the add of its only partition: look once more.
                if loop.dropped:
                    loop.dropped = False
                    numbers = self._rescan(name, loop, base, numbers, drop_stale=False)
                else:
                    loop.dropped = True
            else:
                loop.dropped = False
            loop.seen = numbers
            for number in sorted(numbers):
                entry = f"{base}/loop{loop.number}p{number}"
                try:
                    major, minor = (int(x) for x in _read(f"{entry}/dev").split(":"))
                except (OSError, ValueError):
                    continue  # going away while we look
                found.append(Partition(partition_name(name, number), name, number, (major, minor), entry))
        return found

    def _rescan(self, name: str, loop: Loop, base: str, numbers: frozenset[int],
                drop_stale: bool) -> frozenset[int]:
        """Read the disk's table (the writer's pages written back first: the table is read
        from the media, under the loop device's page cache) and bring the kernel's partitions
        to it; the kernel's partitions after."""
        self._write_back(name, loop)
        table = self._read_table(loop)
        changed = self._sync_partitions(name, loop, table, base, table_changed=drop_stale and loop.table != table)
        loop.table = table
        return self._kernel_partitions(base, loop.number) if changed else numbers

    # -- udev's watch on the disks' nodes

    def _watch_disks(self, late: bool) -> None:
        """Place a watch on the node of each disk that has none. Never under a lock: the path
        is looked up through this daemon's own mount. `late`: placed by a later look than the
        one that attached the disk, so a writer may have closed it unseen meanwhile."""
        if self._inotify < 0:
            return
        for name, loop in list(self._loops.items()):
            if loop.watch is not None:
                continue
            node = os.fsencode(self.mountpoint / "dev" / name)
            try:
                stale = os.stat(node).st_rdev != os.makedev(*loop.rdev)
            except OSError:
                continue  # not served yet (or gone): the next look tries again
            if stale:
                # The kernel gave the name an inode of its previous device (an opener still
                # holds it, and a device node's number never changes): a watch would keep that
                # inode for good. The name is dropped again; the next look watches it.
                self.tree.changes.publish([f"/dev/{name}"])
                self.tree.changes.flush()
                continue
            wd = _libc.inotify_add_watch(self._inotify, node, IN_CLOSE_WRITE)
            if wd < 0:
                continue  # not served yet (or gone): the next look tries again
            with self._lock:
                if self._loops.get(name) is loop:
                    loop.watch = wd
                    self._watches[wd] = loop
                    if late:  # read its table once more at the next look
                        loop.written = True
                        self._kick.set()
                elif wd not in self._watches:
                    _libc.inotify_rm_watch(self._inotify, wd)

    def _unwatch(self, loop: Loop) -> None:
        if loop.watch is not None:
            self._watches.pop(loop.watch, None)
            _libc.inotify_rm_watch(self._inotify, loop.watch)
            loop.watch = None

    def _read_watch_events(self) -> None:
        """Take what the watches saw: mark the disks whose node a writer closed."""
        while self._inotify >= 0:
            try:
                buf = os.read(self._inotify, 4096)
            except OSError:  # EAGAIN: nothing more
                break
            offset = 0
            while offset + _IN_EVENT.size <= len(buf):
                wd, mask, _cookie, length = _IN_EVENT.unpack_from(buf, offset)
                offset += _IN_EVENT.size + length
                loop = self._watches.get(wd)
                if loop is None:
                    continue
                if mask & IN_CLOSE_WRITE:
                    loop.written = True
                if mask & IN_IGNORED:  # the node's inode went: place a new watch
                    self._watches.pop(wd, None)
                    loop.watch = None

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
        poller = self._poller
        if poller is not None and poller is not threading.current_thread():
            poller.join(timeout=5)  # it reads the inotify descriptor closed below
        with self._lock:
            for loop in self._loops.values():
                with contextlib.suppress(OSError):
                    os.close(loop.fd)
            self._loops.clear()
            self._watches.clear()
            if self._inotify >= 0 and (poller is None or not poller.is_alive()):
                os.close(self._inotify)
                self._inotify = -1
            self._rdevs, self._partitions, self._host_names = {}, [], {}
