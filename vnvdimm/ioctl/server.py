"""The daemon's end of the ioctl channel: a unix socket (0600, in the runtime dir) served by
a thread per connection. A client that sends garbage, stalls or vanishes costs its own
connection only; the model is locked only while a command is answered, never while waiting
on a client."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from vnvdimm.ioctl.wire import (
    MAGIC,
    MAX_TRANSFER,
    OP,
    OP_DONE,
    OP_READ,
    OP_WRITE,
    REQUEST,
    STATUS,
    VERSION,
    recv_exact,
)
from vnvdimm.model.commands.dispatch import answer

if TYPE_CHECKING:
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm.ioctl")

CLIENT_TIMEOUT = 30.0  # a client that stops answering for this long loses its ioctl (EFAULT)


class SocketMemory:
    """The caller's ioctl argument, reached through its connection."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def read(self, offset: int, length: int) -> bytes:
        if length > MAX_TRANSFER:
            raise OSError(errno.EFAULT, "read too large")
        self.conn.sendall(OP.pack(OP_READ, 0, offset, length))
        status, = STATUS.unpack(recv_exact(self.conn, STATUS.size))
        if status:
            raise OSError(errno.EFAULT, f"bad address at argument + {offset}")
        return recv_exact(self.conn, length)

    def write(self, offset: int, data: bytes) -> None:
        self.conn.sendall(OP.pack(OP_WRITE, 0, offset, len(data)) + data)
        status, = STATUS.unpack(recv_exact(self.conn, STATUS.size))
        if status:
            raise OSError(errno.EFAULT, f"bad address at argument + {offset}")


class IoctlServer:
    def __init__(self, system: System, path: Path) -> None:
        self.system = system
        self.path = path
        self._sock: socket.socket | None = None

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
        threading.Thread(target=self._accept, name="vnvdimm-ioctl", daemon=True).start()
        log.info("ioctls served on %s", self.path)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="vnvdimm-ioctl-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            try:
                magic, version, request, accmode, raw_name = REQUEST.unpack(recv_exact(conn, REQUEST.size))
            except (OSError, ConnectionError):
                return
            if magic != MAGIC or version != VERSION:
                log.warning("ioctl channel: a client spoke something else (magic %#x version %d)", magic, version)
                return
            name = raw_name.split(b"\0", 1)[0].decode("ascii", "replace")
            code, ret = 0, 0
            try:
                ret = answer(self.system, name, accmode & os.O_ACCMODE, request, SocketMemory(conn))
            except (ConnectionError, TimeoutError, BrokenPipeError):
                return  # the caller is gone: nothing to answer
            except OSError as e:
                code = e.errno or errno.EIO
            except Exception:
                log.exception("ioctl %#x on %s", request, name)
                code = errno.EIO
            log.debug("ioctl %#x on %s -> %d (errno %d)", request, name, ret, code)
            with contextlib.suppress(OSError):
                conn.sendall(OP.pack(OP_DONE, 0, code, ret & 0xFFFFFFFFFFFFFFFF))
