"""The /sys connection: the tree's /sys served on a FUSE connection of its own, with no OPEN
and no RELEASE, as with-vnvdimm mounts it in its namespace (vnvdimm/scripts/sysfs_attach.py).

Every opened attribute costs the kernel one READ, or nothing at all while its value has not
changed since the last one: answering OPEN with ENOSYS makes the kernel stop sending OPEN
and RELEASE for the connection's files (FUSE's no_open), and keep their pages cached across
opens (it then opens files with FOPEN_KEEP_CACHE). What that asks of the daemon:

* A cached value must never outlive a change. Each attribute read since its last
  invalidation is remembered (`_served`); the tree's value feed announces every moment
  values may have changed (a store, a rebuild, a notification, an ioctl other than a query),
  and all of them are invalidated before the store or ioctl is answered. Volatile attributes
  (progress counters, the BTT's debugfs, a partition's I/O statistics) are also invalidated
  after every read (a value of theirs read right after a stat() is the one of the stat()).
* The kernel reads a cached file up to its size (i_size), which it takes from LOOKUP and
  GETATTR, and shrinks after a short READ unless its attributes changed meanwhile (then the
  page is zero-filled up to the old size). So each attribute's size is its value's length,
  and a READ serves the very value whose length the last LOOKUP or GETATTR reported
  (`_shown`): a value that changed in between is caught by the invalidation that comes with
  the change, never by a size that does not fit. stat() therefore reports the value's length,
  where kernfs reports 4096 (and waits as a read does: wait_probe's show() waits for the
  probes in flight, which run inside the stores that start them).
* A write goes through the page cache (write-through: one WRITE per write(2), answered with
  the store's errno). It copies the written bytes into a cached page of the file, if the
  kernel had one: that page is invalidated while the WRITE is still unanswered (the kernel
  does not hold its lock then).
* poll() has no open file to keep the reader's event count in: at its first poll an open
  file (the kernel's poll handle, `kh`, one per open file) is taken to have read at the
  oldest event count a recent READ of the path was served at (a spurious POLLPRI at worst,
  never a missed one), and each handle then remembers what it was last told. A notification
  invalidates the path before it wakes.
* Without OPEN, nothing refuses an open: kernfs answers EACCES at open(2) for a mode the
  attribute does not have; here root's open succeeds and its write(2) fails with EACCES
  (everyone else's open is refused by the permission check, as on sysfs).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import mfusepy as fuse

from vnvdimm.fuse import libfuse
from vnvdimm.fuse.libfuse import FUSE_CAP_AUTO_INVAL_DATA, FUSE_CAP_CACHE_SYMLINKS
from vnvdimm.fuse.ops import DEFAULT_POLLMASK, POLLERR, POLLPRI, VnvdimmOperations
from vnvdimm.model.keyring import Caller, serving
from vnvdimm.sysfs.kernfs import PAGE_SIZE, KAttr, KBin, KDir, KNode
from vnvdimm.sysfs.tree import ALL_VALUES, Tree

log = logging.getLogger("vnvdimm.fuse")

SYS = "/sys"
#: How long a WRITE waits for the invalidation of its file's cached page (the kernel holds
#: the page's lock during the WRITE only if the page was not up to date: then there is
#: nothing to invalidate, and the wait ends here).
WRITE_INVALIDATION_WAIT_S = 0.5
#: Poll handles remembered (one per open file that polled; no RELEASE says when one goes).
POLL_HANDLES_KEPT = 4096
#: How long a READ's event count is taken to be what some reader may still hold (see poll).
READ_EVENTS_KEPT_S = 60.0


class SysfsOperations(VnvdimmOperations):
    """The tree below /sys, at the root of its own connection. `caller_ids`: the uid and gid
    of whoever attached the connection, for requests that come as the namespace's root
    (uid 0 in a user namespace of theirs); `root_path`: where the mount is reached from the
    daemon (its mount namespace as seen through /proc), for lookups in flight."""

    reads_by_path = True  # the Loop passes paths to read_path/write_path (there is no fh)
    xattr_names = frozenset()

    def __init__(self, tree: Tree, caller_ids: tuple[int, int] = (0, 0), root_path: str | None = None) -> None:
        super().__init__(tree)
        # Everything belongs to the connection's root: root, or the user who is root in the
        # user namespace that mounted it (uids are the mounter's namespace's).
        self.uid, self.gid = 0, 0
        self.caller_ids = caller_ids
        self.root_path = root_path
        # tree paths whose value (or its size) the kernel may hold since their last
        # invalidation; of those, the ones whose page a READ filled
        self._served: set[str] = set()
        self._paged: set[str] = set()
        self._reads: dict[str, int] = {}  # tree path -> READs served (which one a drop follows)
        self._shown: dict[str, bytes] = {}  # tree path -> the value the kernel has the size of
        self._writing: dict[str, int] = {}  # tree path -> WRITEs in flight
        self._served_lock = threading.Lock()
        # tree path -> {event count a READ was served at: when, monotonic}: what readers of the
        # last READ_EVENTS_KEPT_S may still hold (see poll)
        self._read_events: dict[str, dict[int, float]] = {}
        self._poll_seen: OrderedDict[int, int] = OrderedDict()  # kh -> event count it was told of
        self._poll_lock = threading.Lock()
        self._fuse_users = 0  # calls into libfuse's struct fuse in flight (see _with_fuse)
        self._ended = False
        self._fuse_users_cond = threading.Condition()
        # (path, poll handle to wake after, event to set after, the READ count it follows)
        self._work: queue.SimpleQueue[tuple[str, int | None, threading.Event | None, int | None] | None] = \
            queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------ paths

    @staticmethod
    def _tree_path(path: str) -> str:
        return SYS if path == "/" else SYS + path

    @staticmethod
    def _conn_path(tree_path: str) -> str | None:
        if tree_path == SYS:
            return "/"
        return tree_path[len(SYS):] if tree_path.startswith(SYS + "/") else None

    def _node(self, path: str):  # type: ignore[no-untyped-def]
        return super()._node(self._tree_path(path))

    def _answer(self, path: str) -> KNode:
        return super()._answer(self._tree_path(path))

    # ------------------------------------------------------------ lifecycle

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if conn_info is not None:
            conn_info.want &= ~FUSE_CAP_AUTO_INVAL_DATA  # every change is invalidated explicitly
            conn_info.want |= conn_info.capable & FUSE_CAP_CACHE_SYMLINKS
        with self._fuse_lock:
            self._fuse = libfuse.current_fuse()
        self._worker = threading.Thread(target=self._work_loop, name="vnvdimm-sysfs-inval", daemon=True)
        self._worker.start()
        self.tree.changes.connect(self._invalidate)
        self.tree.values.connect(self._values_changed)

    def loop_ended(self) -> None:
        """The loop is over (libfuse.serve_descriptor): from now on nothing calls into
        libfuse's struct fuse, which frees its node table next. Once."""
        with self._fuse_lock:
            if self._ended:
                return
            self._ended = True
        self.tree.values.disconnect(self._values_changed)
        self.tree.changes.disconnect(self._invalidate)
        with self._fuse_lock, self._fuse_users_cond:
            self._fuse = None
            self._fuse_users_cond.wait_for(lambda: not self._fuse_users)
        self._work.put(None)
        if self._worker is not None:
            self._worker.join()

    def destroy(self, path: str) -> None:
        self.loop_ended()

    # ------------------------------------------------------------ invalidation

    def _invalidate(self, paths: Sequence[str]) -> None:
        """The change feed's sink: what a rebuild made stale (see VnvdimmOperations), below /sys."""
        late = []
        for tree_path in paths:
            self._shown.pop(tree_path, None)  # (a node that went or changed: its next size is asked for)
            conn = self._conn_path(tree_path)
            if conn is None:
                continue
            with self._served_lock:
                writing = tree_path in self._writing
            if writing:
                # its WRITE may hold the page (and wait for this very feed): after it, then
                self._work.put((tree_path, None, None, None))
            elif self._invalidate_conn(conn) == -errno.ENOENT:
                late.append(tree_path)
        if not late or self.root_path is None:
            return
        current = self.tree.snapshot().generation
        for tree_path in late:
            answered = self._answered.get(tree_path)
            conn = self._conn_path(tree_path)
            if answered is None or answered >= current or conn is None:
                continue
            with contextlib.suppress(OSError):
                os.lstat(self.root_path + conn)  # waits for a lookup of the name in flight
            self._invalidate_conn(conn)

    def _invalidate_conn(self, conn_path: str) -> int:
        return self._with_fuse(lambda handle: libfuse.invalidate_path(handle, conn_path))

    def _with_fuse(self, call: Callable[[int], int]) -> int:
        """call(libfuse's struct fuse) unless the loop is over; 0 then. Not under a lock held
        across the call: an invalidation may wait (in the kernel) for a page that a request in
        flight holds, and that request may be a store waiting for another invalidation."""
        with self._fuse_users_cond:
            handle = self._fuse
            if handle is None:
                return 0
            self._fuse_users += 1
        try:
            return call(handle)
        finally:
            with self._fuse_users_cond:
                self._fuse_users -= 1
                self._fuse_users_cond.notify_all()

    def _values_changed(self, paths: Sequence[str]) -> None:
        """The value feed's sink: every cached value that may be stale goes, but for files
        with a WRITE in flight (their WRITE handles its own)."""
        with self._served_lock:
            if ALL_VALUES in paths:
                stale = [p for p in self._served if p not in self._writing]
            else:
                stale = [p for p in paths if p in self._served and p not in self._writing]
            self._served.difference_update(stale)
            self._paged.difference_update(stale)
        for tree_path in stale:
            conn = self._conn_path(tree_path)
            if conn is not None:
                self._invalidate_conn(conn)

    def _work_loop(self) -> None:
        """Invalidations that must not run on a request's thread (the kernel may hold the
        very page the request fills), then what waits for them: a poll wake-up, a WRITE."""
        while True:
            item = self._work.get()
            if item is None:
                return
            tree_path, poll_handle, done, after_read = item
            conn = self._conn_path(tree_path)
            if conn is not None:
                self._invalidate_conn(conn)
            if after_read is not None:
                with self._served_lock:
                    if self._reads.get(tree_path) == after_read:  # no READ filled it again since
                        self._paged.discard(tree_path)
            if poll_handle is not None and not self._with_fuse(lambda _, ph=poll_handle: libfuse.notify_poll(ph) or 1):
                libfuse.destroy_pollhandle(poll_handle)  # the loop is over: nobody to wake
            if done is not None:
                done.set()

    # ------------------------------------------------------------ open / data

    def _show(self, tree_path: str, node: KAttr) -> bytes:
        """The value now, remembered as the one the kernel will have the size of."""
        with self._served_lock:
            self._served.add(tree_path)  # before show(): a change from now on invalidates it
        data = node.show()
        self._shown[tree_path] = data
        return data

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        """LOOKUP and GETATTR: an attribute's size is its value's length (see the module)."""
        tree_path = self._tree_path(path)
        node = super()._answer(tree_path)
        st = self._stat(node)
        if isinstance(node, KAttr) and node.attr.show is not None:
            try:
                st["st_size"] = len(self._show(tree_path, node))
            except OSError:
                self._shown.pop(tree_path, None)  # (the read will say why; stat() must not)
        return st

    def open(self, path: str, fi: Any) -> int:
        raise fuse.FuseOSError(errno.ENOSYS)  # the kernel stops sending OPEN and RELEASE

    def read_path(self, path: str, size: int, offset: int) -> int:
        tree_path = self._tree_path(path)
        node = self.tree.lookup(tree_path)
        if isinstance(node, KAttr):
            if node.attr.show is None:
                raise fuse.FuseOSError(errno.EACCES)
            self._note_read(tree_path)
            data = self._shown.get(tree_path) if offset == 0 else None
            if data is None:
                data = self._show(tree_path, node)
            with self._served_lock:
                self._paged.add(tree_path)
                reads = self._reads[tree_path] = self._reads.get(tree_path, 0) + 1
            if node.volatile:
                self._work.put((tree_path, None, None, reads))  # after this READ: the next open asks again
            return libfuse.memory_bufvec(data[offset: offset + size])
        if isinstance(node, KBin):
            data = node.read(size, offset)
            self._work.put((tree_path, None, None, None))  # bin attributes: read afresh each time
            return libfuse.memory_bufvec(data)
        if node is None:
            raise fuse.FuseOSError(errno.ENOENT)
        raise fuse.FuseOSError(errno.EISDIR if isinstance(node, KDir) else errno.EINVAL)

    def write_path(self, path: str, src: int, offset: int) -> int:
        tree_path = self._tree_path(path)
        node = self.tree.lookup(tree_path)
        if not isinstance(node, KAttr):
            raise fuse.FuseOSError(errno.ENOENT if node is None else errno.EACCES)
        if node.attr.store is None or not node.attr.mode & 0o222:
            raise fuse.FuseOSError(errno.EACCES)  # kernfs refuses it at open(2) already
        data = bytes(libfuse.copy_to_memory(src))
        with self._served_lock:
            self._writing[tree_path] = self._writing.get(tree_path, 0) + 1
            # (a page a READ filled is up to date, so the WRITE does not hold its lock; a page
            # this write fills wholly becomes up to date, and is not held either)
            cached = tree_path in self._paged or len(data) >= PAGE_SIZE
            self._served.discard(tree_path)
            self._paged.discard(tree_path)
        try:
            uid, gid, pid = fuse.fuse_get_context()
            if uid == 0 and self.caller_ids[0] != 0:
                uid, gid = self.caller_ids  # the namespace's root is the user who attached it
            with serving(Caller(pid, uid, gid)):
                return self.tree.store(node, data)
        finally:
            if cached:
                # The write copied its bytes into the file's cached page (up to date, so not
                # locked now): drop it before the writer can read it back.
                done = threading.Event()
                self._work.put((tree_path, None, done, None))
                done.wait(WRITE_INVALIDATION_WAIT_S)
            with self._served_lock:
                left = self._writing[tree_path] - 1
                if left:
                    self._writing[tree_path] = left
                else:
                    del self._writing[tree_path]

    # ------------------------------------------------------------ poll

    def _note_read(self, tree_path: str) -> None:
        now = time.monotonic()
        with self._poll_lock:
            seen = self._read_events.setdefault(tree_path, {})
            seen[self.tree.events.count(tree_path)] = now
            for event in [e for e, t in seen.items() if now - t > READ_EVENTS_KEPT_S]:
                del seen[event]

    def _oldest_read_event(self, tree_path: str) -> int:
        """What a poller that never polled before last read: kernfs keeps that per open file,
        which no request here names, so the oldest event count a recent READ was served at
        stands for it. A reader that read since gets one spurious POLLPRI, reads again and
        polls on: a wake-up is never missed."""
        now = time.monotonic()
        with self._poll_lock:
            recent = [e for e, t in self._read_events.get(tree_path, {}).items() if now - t <= READ_EVENTS_KEPT_S]
        return min(recent) if recent else self.tree.events.count(tree_path)

    def poll(self, path: str, fh: Any, ph: Any, reventsp: Any) -> int:
        tree_path = self._tree_path(path)
        node = self.tree.lookup(tree_path)
        if not isinstance(node, KAttr) or not ph:
            changed = False
            if isinstance(node, KAttr):
                changed = self.tree.events.count(tree_path) != self._oldest_read_event(tree_path)
            if ph:
                libfuse.destroy_pollhandle(ph)
            reventsp[0] = DEFAULT_POLLMASK | (POLLERR | POLLPRI if changed else 0)
            return 0
        kh = libfuse.poll_kernel_handle(ph)
        events = self.tree.events
        with self._poll_lock:
            seen = self._poll_seen.pop(kh, None)
        if seen is None:
            seen = self._oldest_read_event(tree_path)
        changed = events.wait(tree_path, seen, lambda: self._work.put((tree_path, ph, None, None)))
        if changed:
            libfuse.destroy_pollhandle(ph)
            seen = events.count(tree_path)  # reported once: the reader reads again (sysfs' protocol)
        with self._poll_lock:
            self._poll_seen[kh] = seen
            while len(self._poll_seen) > POLL_HANDLES_KEPT:
                self._poll_seen.popitem(last=False)
        reventsp[0] = DEFAULT_POLLMASK | (POLLERR | POLLPRI if changed else 0)
        return 0

    # ------------------------------------------------------------ what /sys has not

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        """O_TRUNC (`echo x > attr`): ignored, as sysfs does; the kernel drops the page."""
        tree_path = self._tree_path(path)
        with self._served_lock:
            self._paged.discard(tree_path)
        return super().truncate(path, length, fh)

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        return 0  # kernfs: noop_fsync

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        raise fuse.FuseOSError(errno.ENODATA)

    def listxattr(self, path: str) -> list[str]:
        self._node(path)
        return []


#: /sys connections one daemon serves at once (one per with-vnvdimm command running).
MAX_SYSFS_CONNECTIONS = 256


class SysfsConnections:
    """The /sys connections of a daemon: one loop thread each, from the attach request
    (IoctlServer.on_attach) until the connection ends (the mount namespace that had it is
    gone) or the daemon stops (`end_all`)."""

    def __init__(self, tree: Tree, wake_signal: int) -> None:
        self.tree = tree
        self.wake_signal = wake_signal
        self._lock = threading.Lock()
        self._live: dict[SysfsOperations, threading.Thread] = {}
        self._ended = False

    def attach(self, fd: int, target: str, pid: int, uid: int, gid: int) -> None:
        """Serve the connection of /dev/fuse descriptor `fd` (ours from now on), mounted at
        `target` in the mount namespace of the client `pid` (uid, gid); raises OSError
        (closing the descriptor) to refuse it."""
        try:
            with self._lock:
                if self._ended:
                    raise OSError(errno.ESHUTDOWN, "the daemon is stopping")
                if len(self._live) >= MAX_SYSFS_CONNECTIONS:
                    raise OSError(errno.EBUSY, f"{MAX_SYSFS_CONNECTIONS} /sys connections are served already")
                ops = SysfsOperations(self.tree, (uid, gid), _reach(pid, target))
                thread = threading.Thread(target=self._serve, args=(ops, fd), name="vnvdimm-sysfs",
                                          daemon=True)
                self._live[ops] = thread
            thread.start()
        except BaseException:
            with self._lock:
                self._live = {o: t for o, t in self._live.items() if t.is_alive()}
            os.close(fd)
            raise
        log.info("serving a /sys connection for pid %d (uid %d) at %s", pid, uid, target)

    def _serve(self, ops: SysfsOperations, fd: int) -> None:
        try:
            libfuse.serve_descriptor(ops, fd, libfuse.active_profile)
        except Exception:
            log.exception("a /sys connection failed")
        finally:
            with self._lock:
                self._live.pop(ops, None)
            log.info("a /sys connection ended")

    def count(self) -> int:
        with self._lock:
            return len(self._live)

    def end_all(self) -> None:
        """The daemon stops: every loop is told to end (its clients then get ENOTCONN)."""
        with self._lock:
            self._ended = True
            live = list(self._live.items())
        for ops, thread in live:
            if ops.exit_loop() and thread.ident is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(thread.ident, self.wake_signal)


def _reach(pid: int, target: str) -> str | None:
    """The connection's mount as the daemon reaches it: through the mount namespace of the
    client's parent (the with-vnvdimm shell that goes on to run the command; the client itself
    exits once attached)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    target = target if target.startswith("/") else "/" + target
    return f"/proc/{ppid}/root{target.rstrip('/')}"
