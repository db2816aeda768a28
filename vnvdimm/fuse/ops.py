"""The FUSE operations over the tree (the binding, mfusepy, and libfuse's plumbing under
them: libfuse.py; the mount's options: options.py).

Paths map to tree nodes; attribute files are direct_io (content made per read, st_size
4096, as kernfs); device files use the page cache (so mmap works and each fault becomes a
read that may block on memmap init) and drop it whenever the device behind a name changed.
Reads and writes are libfuse buffers: a device file's bytes move between the kernel and the
media file in libfuse (splice), never through Python.

The kernel caches lookups, attributes and symlink targets for long (a path walk through
/sys/bus/nd/devices/X costs no request at all); the tree's change feed names every path
whose cached answer went stale, and each is invalidated before the write that changed the
tree returns (see `_invalidate`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import mfusepy as fuse

from vnvdimm.fuse import libfuse
from vnvdimm.fuse.libfuse import FUSE_CAP_AUTO_INVAL_DATA, FUSE_CAP_CACHE_SYMLINKS, FUSE_CAP_SPLICE_WRITE
from vnvdimm.fuse.options import REQUEST_BYTES
from vnvdimm.model.disk import DataPath
from vnvdimm.model.keyring import Caller, serving
from vnvdimm.sysfs.kernfs import PAGE_SIZE, KAttr, KBin, KDir, KLink, KNode, OpenAttr, name_change_errno
from vnvdimm.sysfs.tree import KBlock, KChar, KDevFile, KSession, Tree

log = logging.getLogger("vnvdimm.fuse")

POLLIN, POLLPRI, POLLOUT, POLLERR, POLLRDNORM, POLLWRNORM = 0x1, 0x2, 0x4, 0x8, 0x40, 0x100
DEFAULT_POLLMASK = POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM


class OpenDevice:
    """An open device file: the device it was opened on, or (`follow`) whichever device is
    behind its name at each request."""

    __slots__ = ("_data", "follow", "path", "pid", "writable")

    def __init__(self, path: str, data: DataPath, pid: int, writable: bool,
                 follow: Callable[[], DataPath | None] | None = None) -> None:
        self.path = path
        self._data = data
        self.pid = pid  # of the opener (for a loop device: the process that set it up)
        self.writable = writable
        self.follow = follow

    @property
    def data(self) -> DataPath:
        if self.follow is None:
            return self._data
        data = self.follow()
        if data is None:
            raise fuse.FuseOSError(errno.ENXIO)  # no device behind the name now
        return data


class OpenControl:
    """An open /dev/ndctlN or /dev/nmemN: nothing but ioctls (through the preload library)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


class OpenSession(OpenControl):
    """An open /.blockdev/session (nothing to read or write): the disks are block devices
    until its release, or its fsync (which ends the session before it returns: a release
    reaches the daemon after close() has returned, an fsync is answered)."""

    __slots__ = ("ended",)

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.ended = False


# The extended attribute through which the preload library learns what a device file is, and
# with-vnvdimm where to ask for its /sys connection (vnvdimm/scripts/sysfs_attach.py).
NODE_XATTR = "user.vnvdimm"


class VnvdimmOperations(fuse.Operations):
    use_ns = True
    xattr_names = frozenset({NODE_XATTR.encode()})  # as libfuse passes names (see getxattr)

    def __init__(self, tree: Tree, on_ready: Callable[[], None] | None = None, ioctl_socket: str = "") -> None:
        self.tree = tree
        self.on_ready = on_ready
        self.ioctl_socket = ioctl_socket
        # Everything belongs to the mounting user, as everything in sysfs and /dev belongs to
        # root: root for a root mount, and for an ordinary user's mount the user, who is root
        # inside with-vnvdimm's user namespace. The modes are the kernel's either way.
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.mounted_ns = time.time_ns()
        self._handles: dict[int, OpenAttr | OpenDevice | OpenControl | KBin] = {}
        self._next_fh = 1
        self._fh_lock = threading.Lock()
        self._last_serial: dict[str, int] = {}
        # libfuse's struct fuse, between init and destroy (the lock is held across every call
        # that uses it: destroy() frees it once we return)
        self._fuse: int | None = None
        self._fuse_lock = threading.Lock()
        self.mountpoint: str | None = None
        # path -> generation of the tree the last successful lookup/getattr answered from
        self._answered: dict[str, int] = {}
        self._dev_nodeid: int | None = None  # the kernel's node id of /dev (see _dev_entry)
        #: Called (from a loop thread) whenever a device file's last reference is released.
        self.on_device_release: Callable[[], None] | None = None

    # ------------------------------------------------------------ helpers

    def _node(self, path: str):  # type: ignore[no-untyped-def]
        node = self.tree.lookup(path)
        if node is None:
            raise fuse.FuseOSError(errno.ENOENT)
        return node

    def _new_fh(self, obj: OpenAttr | OpenDevice | OpenControl | KBin) -> int:
        with self._fh_lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = obj
        return fh

    # ------------------------------------------------------------ lifecycle

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if conn_info is not None:
            # Device files keep their cache only while the same device is behind the name
            # (see open()), and their attributes change only with the device (invalidated):
            # auto_inval_data would only add GETATTR round trips.
            conn_info.want &= ~FUSE_CAP_AUTO_INVAL_DATA
            # Symlink targets in the page cache: following /sys/bus/nd/devices/X costs no
            # READLINK; a retargeted or vanished link has its page dropped (_invalidate).
            conn_info.want |= conn_info.capable & FUSE_CAP_CACHE_SYMLINKS
            # Device-file reads answered by splicing the media file's pages into the reply.
            conn_info.want |= conn_info.capable & FUSE_CAP_SPLICE_WRITE
            # Requests small enough for libfuse's pipes: see REQUEST_BYTES.
            conn_info.max_write = min(conn_info.max_write, REQUEST_BYTES)
        with self._fuse_lock:
            self._fuse = libfuse.current_fuse()
        self.tree.changes.connect(self._invalidate)
        if self.on_ready is not None:
            threading.Thread(target=self.on_ready, name="vnvdimm-ready", daemon=True).start()

    def destroy(self, path: str) -> None:
        # libfuse frees its struct fuse after this returns: no invalidation may run after it.
        self.tree.changes.disconnect(self._invalidate)
        with self._fuse_lock:
            self._fuse = None

    def _invalidate(self, paths: Sequence[str]) -> None:
        """The change feed's sink (its own thread, never a request handler: the kernel may
        wait for pages locked by requests in flight).

        fuse_invalidate_path() drops the cached attributes (the next access asks again:
        ENOENT for a path that vanished) and cached contents (a symlink's target, a device
        file's pages) of a path the kernel has an inode for. Entries themselves are never
        dropped: invalidating a dentry detaches the mounts on it, and with-vnvdimm mounts the
        host's /dev/pts and /dev/shm on ours.

        A lookup answered from the tree before the change may not have reached the kernel
        yet: its inode does not exist, the invalidation finds nothing (ENOENT), and the
        answer would be cached once it arrives. For each such path answered from an older
        tree, an lstat() through the mount waits for that lookup (the kernel lets one lookup
        of a name run at a time) and the path is invalidated again."""
        late = [path for path in paths if self._invalidate_path(path) == -errno.ENOENT]
        if not late or self.mountpoint is None:
            return
        current = self.tree.snapshot().generation
        for path in late:
            answered = self._answered.get(path)
            if answered is None or answered >= current:
                continue
            with contextlib.suppress(OSError):
                os.lstat(self.mountpoint + path)
            self._invalidate_path(path)

    def _invalidate_path(self, path: str) -> int:
        dev_entry = self._dev_entry(path)
        with self._fuse_lock:
            if self._fuse is None:
                return 0
            rc = libfuse.invalidate_path(self._fuse, path)
            if dev_entry is not None:
                # A device node's number is fixed with its inode (the kernel never changes
                # i_rdev): a node that went and came back with another device (a block device
                # attached anew) needs a new inode, so its entry goes, unlike the rest.
                # Nothing is mounted on these names (with-vnvdimm mounts on /dev/pts, /dev/shm).
                libfuse.invalidate_entry(self._fuse, *dev_entry)
            return rc

    def _dev_entry(self, path: str) -> tuple[int, bytes] | None:
        """(nodeid of /dev, name) for a device node directly in /dev; None for anything else.
        libfuse's high-level API reports its node ids as st_ino."""
        parent, _, name = path.rpartition("/")
        if parent != "/dev" or name in ("pts", "shm") or self.mountpoint is None:
            return None
        if self._dev_nodeid is None:
            try:
                self._dev_nodeid = os.lstat(self.mountpoint + "/dev").st_ino
            except OSError:
                return None
        return self._dev_nodeid, name.encode("utf-8", "surrogateescape")

    def exit_loop(self) -> bool:
        """Make the FUSE loop end once its threads are free (libfuse's fuse_exit: a flag the
        loop's main thread checks when woken). False once the loop is over."""
        with self._fuse_lock:  # held across the call: destroy() frees the handle after us
            if self._fuse is None:
                return False
            libfuse.exit_loop(self._fuse)
            return True

    def open_devices(self) -> list[tuple[str, int]]:
        """(path, opener pid) of every open device file handle."""
        with self._fh_lock:
            return [(o.path, o.pid) for o in self._handles.values() if isinstance(o, OpenDevice)]

    # ------------------------------------------------------------ metadata

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        return self._stat(self._answer(path))

    def _answer(self, path: str) -> KNode:
        """The node at `path` in the current tree, recorded as answered from that tree."""
        while True:
            snap = self.tree.snapshot()
            node = snap.nodes.get(path)
            if node is None:
                raise fuse.FuseOSError(errno.ENOENT)
            # Recorded before the tree is looked at again: a change that replaced this tree
            # after that look sees the record (see _invalidate); one before it, we answer from.
            self._answered[path] = snap.generation
            if self.tree.snapshot() is snap:
                return node

    def _stat(self, node: KNode) -> dict[str, Any]:
        t = self.mounted_ns
        st: dict[str, Any] = {"st_atime": t, "st_mtime": t, "st_ctime": t, "st_nlink": 1,
                               "st_uid": self.uid, "st_gid": self.gid}
        if isinstance(node, KDir):
            st["st_mode"] = stat.S_IFDIR | node.mode
            st["st_nlink"] = 2
            st["st_size"] = 0
        elif isinstance(node, KAttr):
            st["st_mode"] = stat.S_IFREG | node.mode
            st["st_size"] = PAGE_SIZE
        elif isinstance(node, KBin):
            st["st_mode"] = stat.S_IFREG | node.mode
            st["st_size"] = node.size()
        elif isinstance(node, KLink):
            st["st_mode"] = stat.S_IFLNK | 0o777
            st["st_size"] = len(node.target)
        elif isinstance(node, KChar):
            st["st_mode"] = stat.S_IFCHR | node.mode
            st["st_rdev"] = os.makedev(*node.rdev)
            st["st_size"] = 0
        elif isinstance(node, KBlock):
            st["st_mode"] = stat.S_IFBLK | node.mode
            st["st_rdev"] = os.makedev(*node.rdev)
            st["st_size"] = 0
        elif isinstance(node, KSession):
            st["st_mode"] = stat.S_IFREG | node.mode
            st["st_size"] = 0
        elif isinstance(node, KDevFile):
            st["st_mode"] = stat.S_IFREG | node.mode
            st["st_size"] = node.data.size if node.data is not None else 0
            if node.rdev is not None:
                st["st_rdev"] = os.makedev(*node.rdev)
            if node.data is not None:
                # A different device behind the same name looks like a changed file.
                st["st_mtime"] = st["st_ctime"] = t + node.data.serial
        return st

    def readdir(self, path: str, fh: int) -> list[str]:
        node = self._node(path)
        if not isinstance(node, KDir):
            raise fuse.FuseOSError(errno.ENOTDIR)
        return [".", "..", *node.children]

    def readlink(self, path: str) -> str:
        node = self._node(path)
        if not isinstance(node, KLink):
            raise fuse.FuseOSError(errno.EINVAL)
        return node.target

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        """`user.vnvdimm` of a device file: "<c|b> MAJOR:MINOR NAME ALIGN SOCKET" (what the
        preload library needs to stand in for the kernel's node); of /sys: "sysfs SOCKET".
        Nothing else has xattrs."""
        node = self._node(path)
        if path == "/sys" and name == NODE_XATTR and self.ioctl_socket:
            # where with-vnvdimm asks for a /sys connection of its own (vnvdimm/scripts/sysfs_attach.py)
            return f"sysfs {self.ioctl_socket}".encode()
        if name != NODE_XATTR or not isinstance(node, KDevFile) or node.rdev is None or not self.ioctl_socket:
            raise fuse.FuseOSError(errno.ENODATA)
        major, minor = node.rdev
        return f"{node.kind} {major}:{minor} {path.rsplit('/', 1)[-1]} {node.align} {self.ioctl_socket}".encode()

    def listxattr(self, path: str) -> list[str]:
        node = self._node(path)
        if path == "/sys" and self.ioctl_socket:
            return [NODE_XATTR]
        return [NODE_XATTR] if isinstance(node, KDevFile) and node.rdev is not None and self.ioctl_socket else []

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": PAGE_SIZE, "f_frsize": PAGE_SIZE, "f_namemax": 255}

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        # `echo x > attr` opens with O_TRUNC: sysfs ignores it, and so do block devices.
        node = self._node(path)
        if isinstance(node, KDir):
            raise fuse.FuseOSError(errno.EISDIR)
        return 0

    def utimens(self, path: str, times: Any = None) -> int:
        self._node(path)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        raise fuse.FuseOSError(errno.EPERM)

    # Names are the model's alone: creating, linking, renaming or removing one is refused
    # with sysfs's errno (kernfs.name_change_errno), not libfuse's ENOSYS.
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise fuse.FuseOSError(name_change_errno("create"))

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise fuse.FuseOSError(name_change_errno("mknod", mode))

    def mkdir(self, path: str, mode: int) -> int:
        raise fuse.FuseOSError(name_change_errno("mkdir"))

    def symlink(self, target: str, source: str) -> int:
        raise fuse.FuseOSError(name_change_errno("symlink"))

    def link(self, target: str, source: str) -> int:
        raise fuse.FuseOSError(name_change_errno("link"))

    def unlink(self, path: str) -> int:
        raise fuse.FuseOSError(name_change_errno("unlink"))

    def rmdir(self, path: str) -> int:
        raise fuse.FuseOSError(name_change_errno("rmdir"))

    def rename(self, old: str, new: str) -> int:
        raise fuse.FuseOSError(name_change_errno("rename"))

    def chown(self, path: str, uid: int, gid: int) -> int:
        raise fuse.FuseOSError(errno.EPERM)

    # ------------------------------------------------------------ open / release

    def open(self, path: str, fi: Any) -> int:
        node = self._node(path)
        flags = fi.flags
        wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY
        wants_read = (flags & os.O_ACCMODE) != os.O_WRONLY
        if isinstance(node, KAttr):
            attr = node.attr
            if wants_write and (attr.store is None or not attr.mode & 0o222):
                raise fuse.FuseOSError(errno.EACCES)
            if wants_read and (attr.show is None or not attr.mode & 0o444):
                raise fuse.FuseOSError(errno.EACCES)
            fi.direct_io = 1
            fi.fh = self._new_fh(OpenAttr(path, node, self.tree.events.count(path)))
        elif isinstance(node, KBin):
            if wants_write:
                raise fuse.FuseOSError(errno.EACCES)
            fi.direct_io = 1
            fi.fh = self._new_fh(node)
        elif isinstance(node, KDevFile) and node.control:
            fi.direct_io = 1
            fi.fh = self._new_fh(OpenControl(path))
        elif isinstance(node, KSession) and self.tree.block_devices is not None:
            # Answered once every disk is a block device (or could not be made one).
            fi.direct_io = 1
            self.tree.block_devices.session_opened()
            fi.fh = self._new_fh(OpenSession(path))
        elif isinstance(node, KDevFile):
            data = node.data
            if data is None or data.closed:
                raise fuse.FuseOSError(errno.ENXIO)
            # (a read-only disk opens for writing as the kernel's does: bdev_open() does not
            # look at bdev_read_only(); each write is refused, EPERM, by the data path)
            # Keep the page cache across opens only while the same device is behind the name.
            # A name never opened has nothing cached: dropping its (empty) cache would make
            # this open wait for every read in flight through an open that came just before
            # (the kernel's invalidation waits on their locked pages: a cold block each).
            with self._fh_lock:
                last = self._last_serial.get(path)
                fi.keep_cache = 1 if last is None or last == data.serial else 0
                self._last_serial[path] = data.serial
            follow = None
            if flags & os.O_NOATIME and node.kind == "b":
                # The backing file of a loop block device (vnvdimm/blockdev.py asks so): it stands
                # for the block device of that name, which a namespace reconfiguration replaces,
                # as the kernel replaces /dev/pmemN. Uncached: the device under it may change.
                # Only block device files back loop devices; a character device (device-dax)
                # opened O_NOATIME (fio does) stays mappable MAP_SHARED.
                follow = partial(self._device_data, path)
                fi.direct_io = 1
            if flags & os.O_DIRECT:
                fi.direct_io = 1
            fi.fh = self._new_fh(OpenDevice(path, data, fuse.fuse_get_context()[2], wants_write, follow))
        elif isinstance(node, KDir):
            raise fuse.FuseOSError(errno.EISDIR)
        else:
            raise fuse.FuseOSError(errno.ENXIO)
        return 0

    def _device_data(self, path: str) -> DataPath | None:
        node = self.tree.lookup(path)
        data = node.data if isinstance(node, KDevFile) else None
        return None if data is None or data.closed else data

    def close(self, fh: int) -> None:
        """RELEASE: the last close of an open file (a device file's writes are then synced,
        and the teardown told: a detached daemon stops once none is open)."""
        with self._fh_lock:
            obj = self._handles.pop(fh, None)
        if isinstance(obj, OpenDevice):
            if obj.writable:
                # What was written through this file is on the media once it is closed (a
                # loop device's backing file is closed at detach, after its last flush).
                with contextlib.suppress(OSError):
                    data = obj.data
                    if not data.closed:
                        data.fsync()
            if self.on_device_release is not None:
                self.on_device_release()
        elif isinstance(obj, OpenSession):
            self._end_session(obj)

    def _end_session(self, obj: OpenSession) -> None:
        with self._fh_lock:
            ended, obj.ended = obj.ended, True
        if not ended and self.tree.block_devices is not None:
            self.tree.block_devices.session_closed()

    def _handle(self, fh: Any) -> OpenAttr | OpenDevice | OpenControl | KBin:
        return self._handle_of(fh.fh)

    def _handle_of(self, fh: int) -> OpenAttr | OpenDevice | OpenControl | KBin:
        obj = self._handles.get(fh)
        if obj is None:
            raise fuse.FuseOSError(errno.EBADF)
        return obj

    # ------------------------------------------------------------ data

    def _store(self, obj: OpenAttr, data: bytes) -> int:
        # the writer's identity reaches the model: the kernel looks keys up in the
        # writer's keyrings (nmemN/security, a DIMM's unlock at probe)
        uid, gid, pid = fuse.fuse_get_context()
        with serving(Caller(pid, uid, gid)):
            n = self.tree.store(obj.node, data)
        log.debug("store %s <- %r", obj.node, data[:64])
        return n

    def read_reply(self, fh: int, size: int, offset: int) -> int:
        """Every read: answered with a libfuse buffer (struct fuse_bufvec, malloc()ed: its
        address is returned and libfuse frees it), not Python bytes."""
        obj = self._handles.get(fh)
        if isinstance(obj, OpenDevice) and not obj.data.spliceable:
            return libfuse.memory_bufvec(obj.data.read(size, offset))  # a BTT: through its map
        if isinstance(obj, OpenDevice):
            # The checks (and the memmap wait) here; the bytes are spliced by libfuse from
            # the media file's page cache into the reply once we return, GIL-free.
            data = obj.data
            return libfuse.file_reply(data.media.fd, data.read_extents(offset, size))
        if isinstance(obj, OpenAttr):
            return libfuse.memory_bufvec(obj.read(size, offset, self.tree.events))
        if isinstance(obj, KBin):
            return libfuse.memory_bufvec(obj.read(size, offset))
        if isinstance(obj, OpenControl):
            raise fuse.FuseOSError(errno.EINVAL)  # the nd control devices have no read()
        raise fuse.FuseOSError(errno.EBADF)

    def write_from(self, fh: int, src: int, offset: int) -> int:
        """Every write: taken from libfuse's buffer at `src` (struct fuse_bufvec; a pipe when
        the kernel spliced the request)."""
        obj = self._handle_of(fh)
        if isinstance(obj, OpenDevice) and obj.data.spliceable:
            # The request's bytes go from libfuse's buffer (a pipe when spliced) straight
            # into the media file, GIL-free.
            data = obj.data
            extents = data.write_extents(offset, libfuse.request_size(src))
            done = libfuse.copy_to_file(src, data.media.fd, extents)
            data.written(extents, done)
            self.tree.values.flush()  # (a write that cleared poison changed badblocks: seen at once)
            return done
        if isinstance(obj, OpenDevice):  # a BTT disk: its write path takes the bytes in place
            done = obj.data.write(libfuse.copy_to_memory(src), offset)
            self.tree.values.flush()
            return done
        if isinstance(obj, OpenAttr):
            return self._store(obj, bytes(libfuse.copy_to_memory(src)))
        if isinstance(obj, OpenControl):
            raise fuse.FuseOSError(errno.EINVAL)  # the nd control devices have no write()
        raise fuse.FuseOSError(errno.EACCES)

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        obj = self._handle(fh)
        if isinstance(obj, OpenDevice):
            obj.data.fsync()
        elif isinstance(obj, OpenSession):
            self._end_session(obj)
        return 0

    # ------------------------------------------------------------ poll

    def poll(self, path: str, fh: Any, ph: Any, reventsp: Any) -> int:
        obj = self._handle(fh)
        if not isinstance(obj, OpenAttr):
            reventsp[0] = DEFAULT_POLLMASK
            if ph:
                libfuse.destroy_pollhandle(ph)
            return 0
        handle = ph
        if handle:
            changed = self.tree.events.wait(obj.path, obj.event, partial(libfuse.notify_poll, handle))
            if changed:
                libfuse.destroy_pollhandle(handle)
        else:
            changed = self.tree.events.count(obj.path) != obj.event
        reventsp[0] = DEFAULT_POLLMASK | (POLLERR | POLLPRI if changed else 0)
        return 0
