"""The daemon's end of the ioctl channel: a unix socket (0600, in the runtime dir); one thread
accepts, and each connection is answered by a thread of its own.

What an abusive or broken client can cost is bounded: at most MAX_CONNECTIONS are served at
once (the others wait in the listen backlog, and the library's connect times out); each one
has one deadline for its whole exchange, and a shorter one for its request; the bytes held for
callers' buffers are capped (BYTES_IN_FLIGHT). A thread that cannot be started (a process
limit) costs that connection only, and no accept() error ends the accept loop. The model is
locked only while a command is answered, never while the client is talked to: what a command
writes back is staged and sent after the answer. Only root or the daemon's own user may speak
(SO_PEERCRED), and the node and the access mode come from the descriptor the client sends
(SCM_RIGHTS), never from its word."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vnvdimm.ioctl.wire import (
    ATTACH_SYSFS,
    MAGIC,
    MAX_REGIONS,
    MAX_TRANSFER,
    OP,
    OP_DONE,
    OP_READ,
    OP_WRITE,
    REGION,
    REGION_READ,
    REGION_WRITE,
    REQUEST,
    STATUS,
    UCRED,
    VERSION,
)
from vnvdimm.model.commands.dispatch import answer, is_query
from vnvdimm.model.cxl_mailbox import memdev_ioctl

if TYPE_CHECKING:
    from vnvdimm.model.cxl_mailbox import MockMemdevFirmware
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm.ioctl")

MAX_CONNECTIONS = 16  # connections served at once
REQUEST_TIMEOUT = 5.0  # from accept() to the whole request: a client sends it right after connect
EXCHANGE_TIMEOUT = 30.0  # from accept() to the answer, whatever the client does in between
BYTES_IN_FLIGHT = 32 << 20  # callers' buffers held at once, all connections together
ACCEPT_RETRY = 0.05  # after an accept() error (EMFILE, ENFILE, ENOMEM...): try again after this
MAX_ERRNO = 4095
O_PATH = getattr(os, "O_PATH", 0o10000000)


class ByteBudget:
    """Bytes of callers' buffers held by all connections together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def take(self, n: int, deadline: float) -> None:
        """Wait for n bytes of room until `deadline`; ENOMEM then, as a failed vmalloc()."""
        with self._cond:
            while self.used + n > self.limit:
                left = deadline - time.monotonic()
                if left <= 0 or n > self.limit:
                    raise OSError(errno.ENOMEM, f"{n} bytes for an ioctl buffer: {self.used} in flight")
                self._cond.wait(left)
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class Exchange:
    """One connection with one deadline for everything said on it."""

    def __init__(self, conn: socket.socket, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline

    def _arm(self, deadline: float | None = None) -> None:
        left = (deadline or self.deadline) - time.monotonic()
        if left <= 0:
            raise TimeoutError("the ioctl's deadline passed")
        self.conn.settimeout(left)

    def recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            self._arm()
            chunk = self.conn.recv(min(n, 1 << 20))
            if not chunk:
                raise ConnectionError("peer closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._arm()
            view = view[self.conn.send(view):]

    def recv_request(self, deadline: float) -> tuple[bytes, int | None]:
        """The request header and the descriptor sent with it (None if none came)."""
        data = b""
        fds: list[int] = []
        try:
            while len(data) < REQUEST.size:
                self._arm(deadline)
                chunk, ancillary, _, _ = self.conn.recvmsg(REQUEST.size - len(data), socket.CMSG_SPACE(4 * 4))
                if not chunk:
                    raise ConnectionError("peer closed the connection")
                data += chunk
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds[1:]:
            os.close(fd)
        return data, fds[0] if fds else None


class SocketMemory:
    """The caller's ioctl argument as its client sent it: the first `readable` bytes of a
    `window` it sized (region 0), and the regions the client declared besides it (1, 2...:
    (size, access)). A read of anything else is EFAULT, as copy_from_user() of an address that
    faults. Reads of a region ask the client (OP_READ) at once; writes are staged and sent by
    flush(), after the model is no longer locked."""

    def __init__(self, exchange: Exchange, budget: ByteBudget, window: int, sent: bytes,
                 regions: list[tuple[int, int]] | None = None) -> None:
        self.exchange = exchange
        self.budget = budget
        self.window = window
        self.sent = sent
        self.regions = regions or []
        self.held = len(sent)
        self.staged: list[tuple[int, int, bytes]] = []

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > len(self.sent):
            raise OSError(errno.EFAULT, f"bad address at argument + {offset}")
        return self.sent[offset:offset + length]

    def write(self, offset: int, data: bytes) -> None:
        if offset + len(data) > self.window:
            raise OSError(errno.EFAULT, f"bad address at argument + {offset}")
        self._stage(0, offset, data)

    def _region(self, index: int, access: int, offset: int, length: int) -> None:
        if not 1 <= index <= len(self.regions):
            raise OSError(errno.EFAULT, f"no buffer {index} came with the ioctl")
        size, allowed = self.regions[index - 1]
        if not allowed & access or offset + length > size:
            raise OSError(errno.EFAULT, f"bad address at buffer {index} + {offset}")

    def read_region(self, index: int, offset: int, length: int) -> bytes:
        """The client's bytes of a region, fetched now (the model must not be locked)."""
        self._region(index, REGION_READ, offset, length)
        self.budget.take(length, min(self.exchange.deadline, time.monotonic() + REQUEST_TIMEOUT))
        self.held += length
        self.exchange.sendall(OP.pack(OP_READ, index, offset, length))
        status, = STATUS.unpack(self.exchange.recv_exact(STATUS.size))
        if status:
            raise OSError(errno.EFAULT, f"bad address at buffer {index} + {offset}")
        return self.exchange.recv_exact(length)

    def write_region(self, index: int, offset: int, data: bytes) -> None:
        self._region(index, REGION_WRITE, offset, len(data))
        self._stage(index, offset, data)

    def _stage(self, region: int, offset: int, data: bytes) -> None:
        self.budget.take(len(data), min(self.exchange.deadline, time.monotonic() + REQUEST_TIMEOUT))
        self.held += len(data)
        self.staged.append((region, offset, bytes(data)))

    def flush(self) -> None:
        staged, self.staged = self.staged, []
        for region, offset, data in staged:
            self.exchange.sendall(OP.pack(OP_WRITE, region, offset, len(data)) + data)
            status, = STATUS.unpack(self.exchange.recv_exact(STATUS.size))
            if status:
                raise OSError(errno.EFAULT, f"bad address at buffer {region} + {offset}")

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


class SendPayloads:
    """CXL_MEM_SEND_COMMAND's in.payload and out.payload: regions 1 and 2 of the request."""

    IN, OUT = 1, 2

    def __init__(self, memory: SocketMemory) -> None:
        self.memory = memory

    def read_input(self, length: int) -> bytes:
        return self.memory.read_region(self.IN, 0, length)

    def write_output(self, data: bytes) -> None:
        self.memory.write_region(self.OUT, 0, data)


FUSE_DEVICE = (10, 229)  # /dev/fuse


@dataclass(frozen=True)
class SysfsAttach:
    """A /sys connection to serve: its /dev/fuse descriptor (the receiver's to close), where
    the client mounted it, and who the client is."""

    fd: int
    target: str
    pid: int
    uid: int
    gid: int


class IoctlServer:
    def __init__(self, system: System, path: Path) -> None:
        self.system = system
        self.path = path
        #: st_dev of the daemon's FUSE mount, once it is up: only its files have ioctls here
        self.mount_dev: int | None = None
        self.budget = ByteBudget(BYTES_IN_FLIGHT)
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._uid = os.geteuid()
        #: Called after every ioctl but a query (is_query), before it is answered: sysfs
        #: values may have changed (Tree.values_changed).
        self.on_values_changed: Callable[[], None] | None = None
        #: Serves a /sys connection (see ATTACH_SYSFS); raises OSError to refuse it.
        self.on_attach: Callable[[SysfsAttach], None] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(64)
        self._sock = sock
        threading.Thread(target=self._accept, args=(sock,), name="vnvdimm-ioctl", daemon=True).start()
        log.info("ioctls served on %s", self.path)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self, sock: socket.socket) -> None:
        complained = 0.0

        def complain(what: str, e: BaseException) -> None:
            nonlocal complained
            if time.monotonic() - complained > 10:  # a flood logs a line, not a line per connection
                complained = time.monotonic()
                log.warning("ioctl channel: %s (%s)", what, e)

        while self._sock is sock:
            if not self._slots.acquire(timeout=1.0):
                continue  # every slot busy: new connections wait in the backlog
            try:
                conn, _ = sock.accept()
            except OSError as e:
                self._slots.release()
                if self._sock is not sock or e.errno in (errno.EBADF, errno.EINVAL):
                    return  # closed
                complain("accept failed, retrying", e)  # EMFILE, ENFILE, ENOMEM...
                time.sleep(ACCEPT_RETRY)
                continue
            try:
                threading.Thread(target=self._run, args=(conn,), name="vnvdimm-ioctl-conn", daemon=True).start()
            except RuntimeError as e:  # "can't start new thread": a process limit
                self._slots.release()
                conn.close()
                complain("no thread for a connection, dropped it", e)
                time.sleep(ACCEPT_RETRY)

    def _run(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve(conn)
        except Exception:
            log.exception("ioctl channel: a connection failed")
        finally:
            self._slots.release()

    def _peer_allowed(self, conn: socket.socket) -> bool:
        _, uid, _ = UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
        if uid in (0, self._uid):
            return True
        log.warning("ioctl channel: refused a client of uid %d", uid)
        return False

    def _node_of(self, fd: int | None) -> tuple[str, int]:
        """The node's name and the open's access mode, from the descriptor the client sent."""
        if fd is None:
            raise OSError(errno.EBADF, "no descriptor came with the request")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & O_PATH:
            raise OSError(errno.EBADF, "an O_PATH descriptor has no ioctls")
        st = os.fstat(fd)
        if self.mount_dev is None or st.st_dev != self.mount_dev or not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ENOTTY, "not a device file of this mount")
        # The name its opener looked up: ours are all in the mount's dev/, the memdevs in
        # dev/cxl/ (the name is the device's; /proc shows it whatever mount namespace the
        # opener is in).
        where = os.readlink(f"/proc/self/fd/{fd}")
        parent, _, name = where.rpartition("/")
        if parent.endswith("/dev/cxl") and name:
            return f"cxl/{name}", flags & os.O_ACCMODE
        if not parent.endswith("/dev") or not name:
            raise OSError(errno.ENOTTY, f"{where} is not a device file")
        return name, flags & os.O_ACCMODE

    def _memdev_firmware(self, name: str) -> MockMemdevFirmware:
        """The device behind /dev/cxl/NAME while its memdev is registered; ENXIO once it is
        gone (cxl_memdev_ioctl() finds cxlmd->cxlds cleared by the memdev's shutdown)."""
        with self.system.lock:
            for topo in self.system.cxl_topologies:
                for memdev in topo.memdevs:
                    if memdev.name == name:
                        return memdev.firmware
        raise OSError(errno.ENXIO, f"no memdev {name}")

    def _answer(self, name: str, accmode: int, request: int, memory: SocketMemory) -> int:
        if name.startswith("cxl/"):
            firmware = self._memdev_firmware(name.removeprefix("cxl/"))
            memdev_ioctl(firmware, request, memory, SendPayloads(memory), lock=self.system.lock)
            return 0
        return answer(self.system, name, accmode, request, memory)

    def _serve(self, conn: socket.socket) -> None:
        start = time.monotonic()
        exchange = Exchange(conn, start + EXCHANGE_TIMEOUT)
        if not self._peer_allowed(conn):
            return
        try:
            header, fd = exchange.recv_request(start + REQUEST_TIMEOUT)
        except (OSError, ConnectionError):
            return
        try:
            magic, version, request, n_regions, window, readable = REQUEST.unpack(header)
            if (magic != MAGIC or version != VERSION or readable > window or window > MAX_TRANSFER
                    or n_regions > MAX_REGIONS):
                log.warning("ioctl channel: a client spoke something else (magic %#x version %d)", magic, version)
                return
            try:
                regions = [REGION.unpack(exchange.recv_exact(REGION.size))[:2] for _ in range(n_regions)]
            except (OSError, ConnectionError):
                return
            if any(access not in (REGION_READ, REGION_WRITE) for _, access in regions):
                log.warning("ioctl channel: a client declared a buffer neither read nor written")
                return
            if request == ATTACH_SYSFS:
                self._attach(conn, exchange, fd, readable, n_regions)
                return
            try:
                name, accmode = self._node_of(fd)
            except OSError as e:
                log.debug("ioctl %#x refused: %s", request, e)
                self._done(exchange, e.errno or errno.EIO, 0)
                return
        finally:
            if fd is not None:
                os.close(fd)
        code, ret = 0, 0
        try:
            self.budget.take(readable, min(exchange.deadline, time.monotonic() + REQUEST_TIMEOUT))
        except OSError as e:
            self._done(exchange, e.errno or errno.ENOMEM, 0)
            return
        memory: SocketMemory | None = None
        try:
            sent = exchange.recv_exact(readable)
            memory = SocketMemory(exchange, self.budget, window, sent, regions)
            try:
                ret = self._answer(name, accmode, request, memory)
                memory.flush()
            finally:
                if self.on_values_changed is not None and not is_query(name, request, sent):
                    self.on_values_changed()
        except (ConnectionError, TimeoutError):
            return  # the caller is gone or too slow: nothing to answer
        except OSError as e:
            code = e.errno or errno.EIO
        except Exception:
            log.exception("ioctl %#x on %s", request, name)
            code = errno.EIO
        finally:
            if memory is not None:
                memory.release()
            else:
                self.budget.give(readable)
        log.debug("ioctl %#x on %s -> %d (errno %d)", request, name, ret, code)
        self._done(exchange, code, ret)

    def _attach(self, conn: socket.socket, exchange: Exchange, fd: int | None, readable: int, n_regions: int) -> None:
        """ATTACH_SYSFS: serve the /dev/fuse descriptor sent as a /sys connection; the
        argument is where the client mounted it (in its own mount namespace)."""
        code = 0
        try:
            if self.on_attach is None or n_regions or not 0 < readable <= 4096:
                raise OSError(errno.EINVAL, "not a /sys connection request")
            target = exchange.recv_exact(readable).decode("utf-8", "surrogateescape")
            if fd is None:
                raise OSError(errno.EBADF, "no /dev/fuse descriptor came with the request")
            st = os.fstat(fd)
            if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(*FUSE_DEVICE):
                raise OSError(errno.EBADF, "the descriptor is not /dev/fuse")
            pid, uid, gid = UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
            self.on_attach(SysfsAttach(os.dup(fd), target, pid, uid, gid))
        except (ConnectionError, TimeoutError):
            return
        except OSError as e:
            log.info("ioctl channel: a /sys connection refused: %s", e)
            code = e.errno or errno.EIO
        self._done(exchange, code, 0)

    @staticmethod
    def _done(exchange: Exchange, code: int, ret: int) -> None:
        """DONE with a real errno, and a return value an int holds (else EIO)."""
        if not 0 <= code <= MAX_ERRNO or not (code or 0 <= ret <= 0x7FFFFFFF):
            code, ret = errno.EIO, 0
        with contextlib.suppress(OSError, ConnectionError):
            exchange.sendall(OP.pack(OP_DONE, 0, code, ret if not code else 0))
