"""libfuse 3 plumbing under the operations (vnvdimm/fuse/ops.py): the C declarations the
binding (mfusepy) lacks or declares too slowly, the reply buffers, the pinned Python thread
states of libfuse's loop threads, and the loop itself (`Loop`, run by `serve`).

The loop re-implements the part of mfusepy's FUSE constructor that builds libfuse's table of
callbacks, so that the callbacks carrying almost every request go straight to the
operations; it relies on private members of the binding, all named in MFUSEPY_PRIVATE_MEMBERS
(tests/unit/test_mfusepy_contract.py checks that the installed mfusepy still has each, and
pyproject.toml bounds mfusepy to the versions tested).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import mfusepy as fuse

from vnvdimm.fuse import fusermount, profile
from vnvdimm.fuse.options import KERNEL_MOUNT_OPTIONS, MAX_LOOP_THREADS, MOUNT_OPTIONS
from vnvdimm.fuse.profile import RequestProfile

log = logging.getLogger("vnvdimm.fuse")

#: What this module takes from mfusepy beyond its documented API (Operations, FuseOSError,
#: fuse_get_context, fuse_exit): the loop below stands in for mfusepy.FUSE's constructor.
MFUSEPY_PRIVATE_MEMBERS = (
    "_libfuse",  # the loaded libfuse (CDLL)
    "fuse_version_major",  # must be 3: the loop registers the *_fuse_3 wrappers
    "fuse_main_real", "fuse_operations", "fuse_file_info", "fuse_context",
    "FUSE.OPTIONS", "FUSE._normalize_fuse_options",
    # the binding's per-callback wrappers read what its constructor sets on the instance
    "FUSE.operations", "FUSE.raw_fi", "FUSE.encoding", "FUSE.errors", "FUSE.use_ns",
    "FUSE._libfuse2_options_moved_into_libfuse3_config",
)

FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_CAP_CACHE_SYMLINKS = 1 << 23

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
class FuseArgs(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)), ("allocated", ctypes.c_int)]


_libfuse.fuse_new_31.argtypes = [ctypes.POINTER(FuseArgs), ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libfuse.fuse_new_31.restype = ctypes.c_void_p
_libfuse.fuse_mount.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_libfuse.fuse_mount.restype = ctypes.c_int
_libfuse.fuse_unmount.argtypes = [ctypes.c_void_p]
_libfuse.fuse_unmount.restype = None
_libfuse.fuse_destroy.argtypes = [ctypes.c_void_p]
_libfuse.fuse_destroy.restype = None
_libfuse.fuse_loop_cfg_create.argtypes = []
_libfuse.fuse_loop_cfg_create.restype = ctypes.c_void_p
_libfuse.fuse_loop_cfg_set_max_threads.argtypes = [ctypes.c_void_p, ctypes.c_uint]
_libfuse.fuse_loop_cfg_set_max_threads.restype = None
_libfuse.fuse_loop_cfg_set_idle_threads.argtypes = [ctypes.c_void_p, ctypes.c_uint]
_libfuse.fuse_loop_cfg_set_idle_threads.restype = ctypes.c_int
_libfuse.fuse_loop_cfg_destroy.argtypes = [ctypes.c_void_p]
_libfuse.fuse_loop_cfg_destroy.restype = None
_libfuse.fuse_loop_mt_312.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libfuse.fuse_loop_mt_312.restype = ctypes.c_int
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


def file_reply(fd: int, extents: Sequence[tuple[int, int]]) -> int:
    """A malloc()ed bufvec of file ranges (libfuse frees it after the reply): the bytes are
    spliced from the file's page cache into the reply once the callback returned, GIL-free."""
    address = _malloc(ctypes.sizeof(bufvec_type(max(1, len(extents)))))
    if not address:
        raise MemoryError
    file_bufvec(fd, extents, address)
    return address  # type: ignore[no-any-return]


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
    return address  # type: ignore[no-any-return]


def request_size(src: int) -> int:
    """The bytes a write request carries (its struct fuse_bufvec at `src`)."""
    return int(_libfuse.fuse_buf_size(src))


def copy_to_file(src: int, fd: int, extents: Sequence[tuple[int, int]]) -> int:
    """Move a write request's bytes from libfuse's buffer at `src` (a pipe when the kernel
    spliced the request) into these ranges of a file, GIL-free; the bytes moved."""
    done = _libfuse.fuse_buf_copy(ctypes.byref(file_bufvec(fd, extents)), src, 0)
    if done < 0:
        raise fuse.FuseOSError(-done)
    return int(done)


def copy_to_memory(src: int) -> memoryview:
    """A write request's bytes, copied out of libfuse's buffer at `src`."""
    size = request_size(src)
    mem = ctypes.create_string_buffer(size)
    vec = bufvec_type(1)()
    vec.count = 1
    vec.buf[0].size, vec.buf[0].mem = size, ctypes.addressof(mem)
    got = _libfuse.fuse_buf_copy(ctypes.byref(vec), src, 0)
    if got < 0:
        raise fuse.FuseOSError(-got)
    return memoryview(mem).cast("B")[:got]


# ---------------------------------------------------------------- notifications

def current_fuse() -> int:
    """libfuse's struct fuse of the loop calling (valid from init until destroy returns)."""
    return int(_libfuse.fuse_get_context().contents.fuse)


def invalidate_path(fuse_handle: int, path: str) -> int:
    """fuse_invalidate_path(): drop the kernel's cached attributes and contents of `path`."""
    return int(_libfuse.fuse_invalidate_path(fuse_handle, path.encode("utf-8", "surrogateescape")))


def invalidate_entry(fuse_handle: int, parent: int, name: bytes) -> None:
    """fuse_lowlevel_notify_inval_entry(): drop the kernel's entry `name` of node `parent`."""
    _libfuse.fuse_lowlevel_notify_inval_entry(_libfuse.fuse_get_session(fuse_handle), parent, name, len(name))


def exit_loop(fuse_handle: int) -> None:
    """fuse_exit(): the loop ends once its threads are free."""
    _libfuse.fuse_exit(ctypes.c_void_p(fuse_handle))


def notify_poll(handle: int) -> None:
    """Wake the poller of `handle` and release the handle."""
    _libfuse.fuse_notify_poll(handle)
    _libfuse.fuse_pollhandle_destroy(handle)


def poll_kernel_handle(handle: int) -> int:
    """The kernel's handle of the polled file (struct fuse_pollhandle begins with it): one
    per open file, the same at each poll() of it."""
    return int(ctypes.c_uint64.from_address(handle).value)


def destroy_pollhandle(handle: int) -> None:
    _libfuse.fuse_pollhandle_destroy(handle)


# ---------------------------------------------------------------- the loop

_pinned = threading.local()
#: The request profile of the daemon's mount, if profiling (its /sys connections count there too).
active_profile: RequestProfile | None = None


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


class DirectOperations(Protocol):
    """What the loop calls straight from libfuse (every other callback goes through the
    binding's wrappers to the mfusepy.Operations methods of the same object)."""

    #: the names of the only extended attributes there are (any other is ENODATA at once)
    xattr_names: frozenset[bytes]
    #: where the file system is mounted (set by serve() before the loop starts)
    mountpoint: str | None

    def open(self, path: str, fi: Any) -> int: ...
    # (a file system without OPEN has no handles: it sets `reads_by_path` and answers
    # read_path/write_path, given the file's path, instead of read_reply/write_from)
    def read_reply(self, fh: int, size: int, offset: int) -> int: ...
    def write_from(self, fh: int, src: int, offset: int) -> int: ...
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes: ...
    def close(self, fh: int) -> None: ...


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
# libfuse's field -> (its prototype, the Loop method answering it). A device write is one
# request per write(2) (128 KiB for most writers), preceded by a GETXATTR of
# security.capability (the kernel's check whether the write must drop privileges, made on
# every write: the inodes of this mount are not S_NOSEC): their fixed cost decides the write rate.
_DIRECT_CALLBACKS: dict[str, tuple[Any, str]] = {
    "open": (_OPEN, "_open"), "read_buf": (_READ_BUF, "_read_buf"), "release": (_RELEASE, "_release"),
    "write_buf": (_WRITE_BUF, "_write_buf"), "getxattr": (_GETXATTR, "_getxattr")}


class Loop(fuse.FUSE):
    """libfuse's loop over the operations, run by the constructor (as the binding's is).

    Every callback runs on a pinned thread state, answers an exception with an errno (see
    _failed) and is counted by operation when profiling (see profile.py), all in _guarded.
    OPEN, READ, WRITE, RELEASE and GETXATTR come straight from libfuse to the operations (the
    methods below); every other callback is the binding's, as its own constructor would
    register it. With `ended`, `mountpoint` is a descriptor someone else mounted (/dev/fd/N)
    and the loop runs without libfuse's signal handlers (see _run_on)."""

    def __init__(self, ops: DirectOperations, mountpoint: str, request_profile: RequestProfile | None,
                 ended: Callable[[], None] | None = None, **options: Any) -> None:
        # what mfusepy's constructor sets, read by its callback wrappers (MFUSEPY_PRIVATE_MEMBERS)
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
        by_path = getattr(ops, "reads_by_path", False)
        for name, prototype, *_ in fuse.fuse_operations._fields_:
            if name in _DIRECT_CALLBACKS:
                raw_type, method = _DIRECT_CALLBACKS[name]
                if by_path and name in ("read_buf", "write_buf"):
                    method += "_path"
                elif by_path and name == "release":
                    continue  # no OPEN, no RELEASE
                callback = raw_type(self._guarded(name, getattr(self, method)))
                field = getattr(fuse.fuse_operations, name)
                ctypes.c_void_p.from_address(ctypes.addressof(table) + field.offset).value = \
                    ctypes.cast(callback, ctypes.c_void_p).value
            else:
                implemented = getattr(ops, name.removeprefix("f") if name in ("fgetattr", "ftruncate") else name, None)
                if name != "init" and (implemented is None or getattr(implemented, "libfuse_ignore", False)):
                    continue
                wrapper = getattr(self, name + "_fuse_3", None) or getattr(self, name)
                callback = prototype(self._guarded(name, wrapper, none_is_zero=True))
                setattr(table, name, callback)
            callbacks.append(callback)
        if ended is None:
            err = fuse.fuse_main_real(len(args), argv, ctypes.pointer(table), ctypes.sizeof(table), None)
        else:
            err = self._run_on(mountpoint, options, table, ended)
        if self._critical is not None:
            raise self._critical
        if err:
            raise RuntimeError(err)

    @staticmethod
    def _run_on(descriptor_path: str, options: dict[str, Any], table: Any, ended: Callable[[], None]) -> int:
        """fuse_main_real()'s steps without its signal handlers (they would take SIGPIPE and
        the stop signals from the daemon, and give them back as SIG_DFL at the end), and with
        `ended` called between the loop's end and fuse_destroy(): libfuse frees its node table
        there before it calls the operations' destroy, so nothing may look a path up in it
        from then on (fuse_invalidate_path() would walk freed nodes)."""
        kept = {k: v for k, v in options.items() if k in ("attr_timeout", "entry_timeout", "negative_timeout")}
        args = [b"vnvdimm", b"-o", ",".join(Loop._normalize_fuse_options(**kept)).encode()]
        argv = (ctypes.c_char_p * len(args))(*args)
        fargs = FuseArgs(len(args), ctypes.cast(argv, ctypes.POINTER(ctypes.c_char_p)), 0)
        handle = _libfuse.fuse_new_31(ctypes.byref(fargs), ctypes.byref(table), ctypes.sizeof(table), None)
        if not handle:
            return -errno.EINVAL
        try:
            if _libfuse.fuse_mount(handle, descriptor_path.encode()) != 0:
                return -errno.EBADF
            config = _libfuse.fuse_loop_cfg_create()
            _libfuse.fuse_loop_cfg_set_max_threads(config, options.get("max_threads", MAX_LOOP_THREADS))
            _libfuse.fuse_loop_cfg_set_idle_threads(config, options.get("max_idle_threads", MAX_LOOP_THREADS))
            try:
                err = int(_libfuse.fuse_loop_mt_312(handle, config))
            finally:
                _libfuse.fuse_loop_cfg_destroy(config)
                ended()
            _libfuse.fuse_unmount(handle)
            return 0 if err == -errno.ENODEV or err > 0 else err  # (the connection ended: the usual way)
        finally:
            _libfuse.fuse_destroy(handle)

    def _guarded(self, op: str, body: Callable[..., Any], none_is_zero: bool = False) -> Callable[..., int]:
        """`body` as libfuse may call it: on a pinned thread state, an exception answered
        with an errno, timed when profiling. The binding's wrappers answer None for 0."""
        if none_is_zero:
            answer = body

            def body(*args: Any) -> int:
                return answer(*args) or 0

        failed = self._failed
        request_profile = self.profile
        if request_profile is None:
            def guarded(*args: Any) -> int:
                pin_thread_state()
                try:
                    return body(*args)  # type: ignore[no-any-return]
                except BaseException as e:
                    return failed(op, e)
            return guarded

        def timed(*args: Any) -> int:
            pin_thread_state()
            started = time.thread_time_ns()
            try:
                return body(*args)  # type: ignore[no-any-return]
            except BaseException as e:
                return failed(op, e)
            finally:
                request_profile.record(op, time.thread_time_ns() - started)
        return timed

    def _failed(self, op: str, exc: BaseException) -> int:
        """The reply to a callback that raised (as the binding answers): an OSError's errno,
        EINVAL for a bug (logged); anything else stops the loop and is raised once it ended."""
        if op == "init":
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
        return self.operations.open(path.decode(self.encoding, self.errors), fuse.fuse_file_info.from_address(fip))

    def _read_buf(self, path: int, bufpp: int, size: int, offset: int, fip: int) -> int:
        address = self.operations.read_reply(ctypes.c_uint64.from_address(fip + _FH_OFFSET).value, size, offset)
        ctypes.c_void_p.from_address(bufpp).value = address
        return 0

    def _read_buf_path(self, path: int | None, bufpp: int, size: int, offset: int, fip: int) -> int:
        name = ctypes.string_at(path) if path else b""
        address = self.operations.read_path(name.decode(self.encoding, self.errors), size, offset)  # type: ignore[attr-defined]
        ctypes.c_void_p.from_address(bufpp).value = address
        return 0

    def _write_buf_path(self, path: int | None, bufp: int, offset: int, fip: int) -> int:
        name = ctypes.string_at(path) if path else b""
        return self.operations.write_path(name.decode(self.encoding, self.errors), bufp, offset)  # type: ignore[attr-defined, no-any-return]

    def _write_buf(self, path: int, bufp: int, offset: int, fip: int) -> int:
        return self.operations.write_from(ctypes.c_uint64.from_address(fip + _FH_OFFSET).value, bufp, offset)

    def _getxattr(self, path: bytes, name: bytes, value: int, size: int) -> int:
        if name not in self.operations.xattr_names:
            return -errno.ENODATA
        data = self.operations.getxattr(path.decode(self.encoding, self.errors),
                                        name.decode(self.encoding, self.errors))
        if not value:  # a size query
            return len(data)
        if len(data) > size:
            return -errno.ERANGE
        ctypes.memmove(value, data, len(data))
        return len(data)

    def _release(self, path: int, fip: int) -> int:
        self.operations.close(ctypes.c_uint64.from_address(fip + _FH_OFFSET).value)
        return 0


def serve(ops: DirectOperations, mountpoint: str, *, allow_other: bool = False, debug: bool = False,
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
        global active_profile
        active_profile = profiling[0]
    try:
        Loop(ops, f"/dev/fd/{fd}", profiling[0] if profiling is not None else None, **options)
    except BaseException:
        fusermount.unmount(mountpoint)  # the loop never answered: no mount may stay behind
        raise


def serve_descriptor(ops: DirectOperations, fd: int, request_profile: RequestProfile | None = None) -> None:
    """Run the loop on a connection someone else mounted (its /dev/fuse descriptor, which
    libfuse closes when the loop ends) until the connection ends: its last mount gone (a
    mount namespace that died), or exit_loop(). `ops.loop_ended()` is called once the loop
    is over and before libfuse frees what it kept of the tree."""
    Loop(ops, f"/dev/fd/{fd}", request_profile, ended=ops.loop_ended, **MOUNT_OPTIONS)  # type: ignore[attr-defined]
