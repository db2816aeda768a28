"""The FUSE adapter: the only module that imports the binding (mfusepy, libfuse 3).

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
import ctypes
import errno
import functools
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import mfusepy as fuse

from vnvdimm.fuse import fusermount, profile
from vnvdimm.fuse.profile import RequestProfile
from vnvdimm.model.disk import DataPath
from vnvdimm.model.keyring import Caller, serving
from vnvdimm.sysfs.kernfs import PAGE_SIZE, KAttr, KBin, KDir, KLink, KNode, OpenAttr, name_change_errno
from vnvdimm.sysfs.tree import KBlock, KChar, KDevFile, KSession, Snapshot, Tree

log = logging.getLogger("vnvdimm.fuse")

FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_CAP_CACHE_SYMLINKS = 1 << 23
FUSE_CAP_SPLICE_WRITE = 1 << 7
POLLIN, POLLPRI, POLLOUT, POLLERR, POLLRDNORM, POLLWRNORM = 0x1, 0x2, 0x4, 0x8, 0x40, 0x100
DEFAULT_POLLMASK = POLLIN | POLLOUT | POLLRDNORM | POLLWRNORM

_libfuse = fuse._libfuse
_libfuse.fuse_notify_poll.argtypes = [ctypes.c_void_p]
_libfuse.fuse_pollhandle_destroy.argtypes = [ctypes.c_void_p]
_libfuse.fuse_exit.argtypes = [ctypes.c_void_p]
_libfuse.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_libfuse.fuse_invalidate_path.restype = ctypes.c_int
_libfuse.fuse_get_session.argtypes = [ctypes.c_void_p]
_libfuse.fuse_get_session.restype = ctypes.c_void_p
_libfuse.fuse_lowlevel_notify_inval_entry.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p,
                                                      ctypes.c_size_t]
_libfuse.fuse_lowlevel_notify_inval_entry.restype = ctypes.c_int
_libfuse.fuse_buf_size.argtypes = [ctypes.c_void_p]
_libfuse.fuse_buf_size.restype = ctypes.c_size_t
_libfuse.fuse_buf_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_libfuse.fuse_buf_copy.restype = ctypes.c_ssize_t
# libc calls made on every read, declared without argtypes: ctypes' per-argument conversion
# cost more than the calls themselves. Sizes are ints (< 2**31, passed as C ints, widened by
# the ABI); addresses are passed as c_void_p objects.
_libc = ctypes.CDLL(None)
_malloc = _libc.malloc
_malloc.restype = ctypes.c_void_p
_free = _libc.free
_free.restype = None

# struct fuse_buf and struct fuse_bufvec of libfuse 3 (fuse_common.h), declared here: the
# binding's fuse_bufvec has a pointer where libfuse has an inline array of buffers.
FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2


class FuseBuf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


@functools.cache
def bufvec_type(count: int) -> type[ctypes.Structure]:
    """struct fuse_bufvec with `count` buffers (libfuse declares buf[1] and allocates more)."""
    return type(f"FuseBufvec{count}", (ctypes.Structure,), {"_fields_": [
        ("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t), ("buf", FuseBuf * count)]})


def file_bufvec(fd: int, extents: Sequence[tuple[int, int]], address: int | None = None) -> ctypes.Structure:
    """A bufvec of the byte ranges (offset, length) of a file: libfuse moves them with
    splice()/pread()/pwrite() itself. At `address` (malloc()ed memory) if given."""
    cls = bufvec_type(max(1, len(extents)))
    vec = cls() if address is None else cls.from_address(address)
    vec.count, vec.idx, vec.off = len(extents), 0, 0
    for buf, (pos, length) in zip(vec.buf, extents, strict=False):
        buf.size, buf.flags, buf.mem, buf.fd, buf.pos = length, FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK, None, fd, pos
    return vec


# struct fuse_bufvec with one memory buffer, packed in one go (count, idx, off; size, flags,
# mem, fd, pos): setting the fields of a ctypes structure one by one cost several us a read.
MEMORY_BUFVEC = struct.Struct("@NNNNiPiq")
_MEMORY_BUFVEC_BYTES = ctypes.c_char * MEMORY_BUFVEC.size


def memory_bufvec(data: bytes) -> int:
    """A malloc()ed bufvec holding a malloc()ed copy of `data` (libfuse frees both)."""
    size = len(data)
    address = _malloc(MEMORY_BUFVEC.size)
    mem = _malloc(size or 1)
    if not address or not mem:
        _free(ctypes.c_void_p(address))
        _free(ctypes.c_void_p(mem))
        raise MemoryError
    # written through ctypes arrays (a plain copy in C), not libc calls
    (ctypes.c_char * size).from_address(mem).raw = data
    _MEMORY_BUFVEC_BYTES.from_address(address).raw = MEMORY_BUFVEC.pack(1, 0, 0, size, 0, mem, -1, 0)
    return address


_pinned = threading.local()


def pin_thread_state() -> None:
    """Keep the Python thread state of the calling libfuse thread for the thread's life.

    A ctypes callback entered from a thread that Python did not start gets a thread state
    made for the call (PyGILState_Ensure) and destroyed on return (PyGILState_Release):
    every FUSE request paid for both, about half the daemon's CPU per attribute request.
    One Ensure never released keeps the state. libfuse's loop threads live until unmount (its
    idle threads are never destroyed unless `max_idle_threads` is set: it must not be, each
    thread leaving would leave its state behind)."""
    if not getattr(_pinned, "held", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _pinned.held = True


# The callbacks that carry almost every request (an attribute read is OPEN, READ, RELEASE),
# declared with plain pointers: the binding's own prototypes make a ctypes object of every
# pointer argument and pass each call through three layers of Python.
_OPEN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_READ_BUF = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64,
                             ctypes.c_void_p)
_RELEASE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_WRITE_BUF = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
_GETXATTR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
_FH_OFFSET = fuse.fuse_file_info.fh.offset
# libfuse's field -> (its prototype, the _Loop method answering it). A device write is one
# request per write(2) (128 KiB for most writers), preceded by a GETXATTR of
# security.capability (the kernel's check whether the write must drop privileges, made on
# every write: the inodes of this mount are not S_NOSEC): their fixed cost decides the write rate.
_DIRECT_CALLBACKS: dict[str, tuple[Any, str]] = {
    "open": (_OPEN, "_open"), "read_buf": (_READ_BUF, "_read_buf"), "release": (_RELEASE, "_release"),
    "write_buf": (_WRITE_BUF, "_write_buf"), "getxattr": (_GETXATTR, "_getxattr")}


class _Loop(fuse.FUSE):
    """libfuse's loop over the operations, run by the constructor (as the binding's is).

    Every callback runs on a pinned thread state and is counted by operation when profiling
    (see profile.py). OPEN, READ, WRITE, RELEASE and GETXATTR come straight from libfuse to
    the operations (the methods below); every other callback is the binding's, as its own
    constructor would register it."""

    def __init__(self, ops: VnvdimmOperations, mountpoint: str, request_profile: RequestProfile | None,
                 **options: Any) -> None:
        self.operations = ops
        self.raw_fi = True
        self.encoding, self.errors = "utf-8", "surrogateescape"
        self.use_ns = True
        self._libfuse2_options_moved_into_libfuse3_config: dict[str, Any] = {}
        self.profile = request_profile
        self._critical: BaseException | None = None
        flags = [flag for key, flag in self.OPTIONS if options.pop(key, False)]
        options.setdefault("fsname", type(ops).__name__)
        args = [b"vnvdimm", *(f.encode() for f in flags), b"-o",
                ",".join(self._normalize_fuse_options(**options)).encode(), mountpoint.encode()]
        argv = (ctypes.c_char_p * len(args))(*args)
        table = fuse.fuse_operations()
        callbacks = []  # referenced until the loop ends
        for name, prototype, *_ in fuse.fuse_operations._fields_:
            if name in _DIRECT_CALLBACKS:
                raw_type, method = _DIRECT_CALLBACKS[name]
                callback = raw_type(self._timed(name, getattr(self, method)))
                field = getattr(fuse.fuse_operations, name)
                ctypes.c_void_p.from_address(ctypes.addressof(table) + field.offset).value = \
                    ctypes.cast(callback, ctypes.c_void_p).value
            else:
                implemented = getattr(ops, name.removeprefix("f") if name in ("fgetattr", "ftruncate") else name, None)
                if name != "init" and (implemented is None or getattr(implemented, "libfuse_ignore", False)):
                    continue
                wrapper = getattr(self, name + "_fuse_3", None) or getattr(self, name)
                callback = prototype(functools.partial(self._wrapper, wrapper))
                setattr(table, name, callback)
            callbacks.append(callback)
        err = fuse.fuse_main_real(len(args), argv, ctypes.pointer(table), ctypes.sizeof(table), None)
        if self._critical is not None:
            raise self._critical
        if err:
            raise RuntimeError(err)

    def _timed(self, op: str, callback: Callable[..., int]) -> Callable[..., int]:
        profile = self.profile
        if profile is None:
            return callback

        def timed(*args: Any) -> int:
            started = time.thread_time_ns()
            try:
                return callback(*args)
            finally:
                profile.record(op, time.thread_time_ns() - started)

        return timed

    def _wrapper(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        pin_thread_state()
        if self.profile is None:
            try:
                return func(*args, **kwargs) or 0
            except BaseException as e:
                return self._failed(func.__name__, e)
        started = time.thread_time_ns()
        try:
            return func(*args, **kwargs) or 0
        except BaseException as e:
            return self._failed(func.__name__, e)
        finally:
            self.profile.record(func.__name__.removesuffix("_fuse_3"), time.thread_time_ns() - started)

    def _failed(self, op: str, exc: BaseException) -> int:
        """The reply to a callback that raised (as the binding answers): an OSError's errno,
        EINVAL for a bug (logged); anything else stops the loop and is raised once it ended."""
        if op.startswith("init"):
            raise exc
        if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
            log.debug("%s: %s", op, exc)
            return -exc.errno
        if isinstance(exc, Exception):
            log.exception("FUSE operation %s failed", op)
            return -errno.EINVAL
        self._critical = exc
        log.critical("FUSE operation %s: %r, stopping", op, exc)
        fuse.fuse_exit()
        return -errno.EFAULT

    # The direct callbacks: `fip` is the address of libfuse's struct fuse_file_info, `bufpp`
    # of the struct fuse_bufvec pointer a read answers with.

    def _open(self, path: bytes, fip: int) -> int:
        pin_thread_state()
        try:
            return self.operations.open(path.decode(self.encoding, self.errors),  # type: ignore[no-any-return]
                                        fuse.fuse_file_info.from_address(fip))
        except BaseException as e:
            return self._failed("open", e)

    def _read_buf(self, path: int, bufpp: int, size: int, offset: int, fip: int) -> int:
        pin_thread_state()
        try:
            address = self.operations.read_reply(ctypes.c_uint64.from_address(fip + _FH_OFFSET).value, size, offset)
            ctypes.c_void_p.from_address(bufpp).value = address
            return 0
        except BaseException as e:
            return self._failed("read_buf", e)

    def _write_buf(self, path: int, bufp: int, offset: int, fip: int) -> int:
        pin_thread_state()
        try:
            return self.operations.write_from(ctypes.c_uint64.from_address(fip + _FH_OFFSET).value, bufp, offset)
        except BaseException as e:
            return self._failed("write_buf", e)

    def _getxattr(self, path: bytes, name: bytes, value: int, size: int) -> int:
        pin_thread_state()
        if name != _NODE_XATTR_NAME:
            return -errno.ENODATA  # the one xattr there is (see VnvdimmOperations.getxattr)
        try:
            data = self.operations.getxattr(path.decode(self.encoding, self.errors),
                                            name.decode(self.encoding, self.errors))
        except BaseException as e:
            return self._failed("getxattr", e)
        if not value:  # a size query
            return len(data)
        if len(data) > size:
            return -errno.ERANGE
        ctypes.memmove(value, data, len(data))
        return len(data)

    def _release(self, path: int, fip: int) -> int:
        pin_thread_state()
        try:
            self.operations.close(ctypes.c_uint64.from_address(fip + _FH_OFFSET).value)
            return 0
        except BaseException as e:
            return self._failed("release", e)


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


# The extended attribute through which the preload library learns what a device file is.
NODE_XATTR = "user.vnvdimm"
_NODE_XATTR_NAME = NODE_XATTR.encode()  # as libfuse passes names to the direct callback


class VnvdimmOperations(fuse.Operations):
    use_ns = True

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
        # (tree, path -> struct stat bytes) of the tree getattr last answered from
        self._stat_images: tuple[Snapshot | None, dict[str, bytes]] = (None, {})
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
            self._fuse = _libfuse.fuse_get_context().contents.fuse
        self.tree.changes.connect(self._invalidate)
        if self.on_ready is not None:
            threading.Thread(target=self.on_ready, name="vnvdimm-ready", daemon=True).start()

    def destroy(self, path: str) -> None:
        # libfuse frees its struct fuse after this returns: no invalidation may run after it.
        self.tree.changes.disconnect()
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
            rc = int(_libfuse.fuse_invalidate_path(self._fuse, path.encode("utf-8", "surrogateescape")))
            if dev_entry is not None:
                # A device node's number is fixed with its inode (the kernel never changes
                # i_rdev): a node that went and came back with another device (a block device
                # attached anew) needs a new inode, so its entry goes, unlike the rest.
                # Nothing is mounted on these names (with-vnvdimm mounts on /dev/pts, /dev/shm).
                parent, name = dev_entry
                _libfuse.fuse_lowlevel_notify_inval_entry(_libfuse.fuse_get_session(self._fuse), parent, name,
                                                          len(name))
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
            _libfuse.fuse_exit(ctypes.c_void_p(self._fuse))
            return True

    def open_devices(self) -> list[tuple[str, int]]:
        """(path, opener pid) of every open device file handle."""
        with self._fh_lock:
            return [(o.path, o.pid) for o in self._handles.values() if isinstance(o, OpenDevice)]

    # ------------------------------------------------------------ metadata

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        return self._stat(self._answer(path)[0])

    def stat_image(self, path: str) -> bytes:
        """getattr() as the struct stat libfuse hands the kernel, built once per node of a
        tree for the kinds whose stat is fixed with the node (a bin attribute's size and a
        device file's device are read live): a later tree has new nodes, so nothing built
        from an older one is served."""
        node, snap = self._answer(path)
        images = self._stat_images
        if images[0] is not snap:
            images = self._stat_images = (snap, {})
        image = images[1].get(path)
        if image is None:
            st = fuse.c_stat()
            fuse.set_st_attrs(st, self._stat(node), use_ns=True)
            image = bytes(st)
            if isinstance(node, KDir | KAttr | KLink | KChar | KBlock | KSession):
                images[1][path] = image
        return image

    def _answer(self, path: str) -> tuple[KNode, Snapshot]:
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
                return node, snap

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
        preload library needs to stand in for the kernel's node). Nothing else has xattrs."""
        node = self._node(path)
        if name != NODE_XATTR or not isinstance(node, KDevFile) or node.rdev is None or not self.ioctl_socket:
            raise fuse.FuseOSError(errno.ENODATA)
        major, minor = node.rdev
        return f"{node.kind} {major}:{minor} {path.rsplit('/', 1)[-1]} {node.align} {self.ioctl_socket}".encode()

    def listxattr(self, path: str) -> list[str]:
        node = self._node(path)
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
            if wants_write and data.read_only():
                raise fuse.FuseOSError(errno.EACCES)
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

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        obj = self._handle(fh)
        if isinstance(obj, OpenDevice):
            return obj.data.read(size, offset)
        if isinstance(obj, OpenAttr):
            return obj.read(size, offset, self.tree.events)
        if isinstance(obj, OpenControl):
            raise fuse.FuseOSError(errno.EINVAL)  # the nd control devices have no read()
        return obj.read(size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        return self._write(self._handle(fh), data, offset)

    def _write(self, obj: OpenAttr | OpenDevice | OpenControl | KBin, data: bytes, offset: int) -> int:
        if isinstance(obj, OpenDevice):
            return obj.data.write(data, offset)
        if isinstance(obj, OpenAttr):
            # the writer's identity reaches the model: the kernel looks keys up in the
            # writer's keyrings (nmemN/security, a DIMM's unlock at probe)
            uid, gid, pid = fuse.fuse_get_context()
            with serving(Caller(pid, uid, gid)):
                n = self.tree.store(obj.node, data)
            log.debug("store %s <- %r", obj.node, data[:64])
            return n
        if isinstance(obj, OpenControl):
            raise fuse.FuseOSError(errno.EINVAL)
        raise fuse.FuseOSError(errno.EACCES)

    def read_reply(self, fh: int, size: int, offset: int) -> int:
        """Every read: answered with a libfuse buffer (struct fuse_bufvec, malloc()ed: its
        address is returned and libfuse frees it), not Python bytes."""
        obj = self._handles.get(fh)
        if isinstance(obj, OpenDevice) and not obj.data.spliceable:
            address = memory_bufvec(obj.data.read(size, offset))  # a BTT: through its map
        elif isinstance(obj, OpenDevice):
            # The checks (and the memmap wait) here; the bytes are spliced by libfuse from
            # the media file's page cache into the reply once we return, GIL-free.
            data = obj.data
            extents = data.read_extents(offset, size)
            address = _malloc(ctypes.sizeof(bufvec_type(max(1, len(extents)))))
            if not address:
                raise MemoryError
            file_bufvec(data.media.fd, extents, address)
        elif isinstance(obj, OpenAttr):
            address = memory_bufvec(obj.read(size, offset, self.tree.events))
        elif isinstance(obj, KBin):
            address = memory_bufvec(obj.read(size, offset))
        elif isinstance(obj, OpenControl):
            raise fuse.FuseOSError(errno.EINVAL)  # the nd control devices have no read()
        else:
            raise fuse.FuseOSError(errno.EBADF)
        return address

    def write_from(self, fh: int, src: int, offset: int) -> int:
        """Every write: taken from libfuse's buffer at `src` (struct fuse_bufvec; a pipe when
        the kernel spliced the request)."""
        size = _libfuse.fuse_buf_size(src)
        obj = self._handle_of(fh)
        if isinstance(obj, OpenDevice) and obj.data.spliceable:
            # The request's bytes go from libfuse's buffer (a pipe when spliced) straight
            # into the media file, GIL-free.
            data = obj.data
            extents = data.write_extents(offset, size)
            done = _libfuse.fuse_buf_copy(ctypes.byref(file_bufvec(data.media.fd, extents)), src, 0)
            if done < 0:
                raise fuse.FuseOSError(-done)
            written, left = [], done
            for moff, n in extents:
                if left <= 0:
                    break
                written.append((moff, min(n, left)))
                left -= n
            data.written(written)
            return int(done)
        mem = ctypes.create_string_buffer(size)
        vec = bufvec_type(1)()
        vec.count = 1
        vec.buf[0].size, vec.buf[0].mem = size, ctypes.addressof(mem)
        got = _libfuse.fuse_buf_copy(ctypes.byref(vec), src, 0)
        if got < 0:
            raise fuse.FuseOSError(-got)
        if isinstance(obj, OpenDevice):  # a BTT disk: its write path takes the bytes in place
            return obj.data.write(memoryview(mem).cast("B")[:got], offset)
        return self._write(obj, mem.raw[:got], offset)

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
                _libfuse.fuse_pollhandle_destroy(ph)
            return 0
        handle = ph

        def wake() -> None:
            _libfuse.fuse_notify_poll(handle)
            _libfuse.fuse_pollhandle_destroy(handle)

        if handle:
            changed = self.tree.events.wait(obj.path, obj.event, wake)
            if changed:
                _libfuse.fuse_pollhandle_destroy(handle)
        else:
            changed = self.tree.events.count(obj.path) != obj.event
        reventsp[0] = DEFAULT_POLLMASK | (POLLERR | POLLPRI if changed else 0)
        return 0


# The kernel's side of the mount (given to fusermount3). `dev` lets the standard character
# nodes (/dev/null...) work; only root may have it: an ordinary user's mount is nodev, and
# with-vnvdimm binds the host's nodes over them instead.
KERNEL_MOUNT_OPTIONS = ("fsname=vnvdimm", "subtype=vnvdimm", "default_permissions")
# libfuse's side (the loop and its caches).
# Names and attributes are cached by the kernel for an hour: every change of the tree is
# invalidated explicitly (VnvdimmOperations._invalidate), the timeout only bounds how long a
# missed one could last. A missing name is never cached (negative_timeout 0: a device that
# appears is seen at once; there is no node to invalidate for a name that does not exist).
CACHE_TIMEOUT_S = 3600.0
MAX_LOOP_THREADS = 1024
MOUNT_OPTIONS: dict[str, Any] = {
    "attr_timeout": CACHE_TIMEOUT_S,
    "entry_timeout": CACHE_TIMEOUT_S,
    "negative_timeout": 0,
    # Every request that waits (a read of a cold range, `echo sync`, wait_probe) holds one
    # loop thread until it returns; libfuse's default of 10 threads let ten such waiters
    # stall every other request of the mount, sysfs reads included.
    "max_threads": MAX_LOOP_THREADS,
    # libfuse 3.14's fuse_main_real() hands its max_idle_threads to fuse_loop_cfg_set_idle_threads()
    # even when the option was not given; the unset value (UINT_MAX) is refused there with
    # "Ignoring invalid max threads value 4294967295 > max (100000)" on stderr (our log) at
    # every mount. Given explicitly and equal to max_threads it means what the unset value
    # does: an idle thread never leaves (one more idle thread than threads cannot exist), so
    # every loop thread keeps its pinned Python thread state (pin_thread_state()).
    "max_idle_threads": MAX_LOOP_THREADS,
}




def _pipe_max_bytes() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


# The largest request (read or write) the kernel sends. libfuse splices a request into a pipe
# and a reply out of one only while the whole message fits that pipe: a request needs its
# data plus a page of headers, a reply its data plus a page for each buffer and one more.
# Pipes above fs.pipe-max-size (1 MiB by default) need CAP_SYS_RESOURCE in the initial user
# namespace; without it libfuse's attempt to grow its pipe fails once per thread and every
# later request of that thread is copied through memory instead: for a 1 MiB read, a fresh
# 1 MiB buffer (256 page faults), a pread into it and a write of it to /dev/fuse. Six pages
# below the pipe size: a reply of up to three media extents still fits (libfuse counts a
# page for the header, one per buffer and one spare). 256 pages is the kernel's own cap.
REQUEST_BYTES = min(256, _pipe_max_bytes() // PAGE_SIZE - 6) * PAGE_SIZE
# Readahead in windows of whole requests; the kernel's default window is 128 KiB.
READ_AHEAD_KB = REQUEST_BYTES >> 10


def raise_readahead(mountpoint: str) -> None:
    """Let buffered reads of device files reach the daemon as requests of REQUEST_BYTES
    instead of 128 KiB ones, through the mount's backing_dev_info (root only; harmless if refused)."""
    dev = os.stat(mountpoint).st_dev
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{READ_AHEAD_KB}\n")
    except OSError as e:
        log.info("cannot raise %s: %s", path, e.strerror)


def serve(ops: VnvdimmOperations, mountpoint: str, *, allow_other: bool = False, debug: bool = False,
          anchor_fd: int | None = None, source: str | None = None) -> None:
    """Mount (through fusermount3: see fusermount.py) and run the multithreaded FUSE loop
    until the file system is unmounted. A refused mount raises FusermountError. `anchor_fd`:
    the mount point as it was checked; a mount that lands elsewhere is refused. `source`: what
    the mount table (findmnt, df) shows as the mount's source, e.g. the config file;
    "vnvdimm" if None or not writable as a mount option."""
    kernel_options = [*KERNEL_MOUNT_OPTIONS]
    if source is not None and source.isprintable() and not any(c in source for c in ", \\\t"):
        kernel_options = [f"fsname={source}" if o.startswith("fsname=") else o for o in kernel_options]
    if os.geteuid() == 0:
        kernel_options.append("dev")
    if allow_other:
        kernel_options.append("allow_other")
    fd = fusermount.mount(mountpoint, kernel_options, anchor_fd)
    options: dict[str, Any] = {"foreground": True, **MOUNT_OPTIONS}
    if debug:
        options["debug"] = True
    ops.mountpoint = os.path.abspath(mountpoint)
    profiling = profile.from_environment()
    if profiling is not None:
        profile.dump_on_sigusr2(*profiling)
    try:
        _Loop(ops, f"/dev/fd/{fd}", profiling[0] if profiling is not None else None, **options)
    except BaseException:
        fusermount.unmount(mountpoint)  # the loop never answered: no mount may stay behind
        raise
