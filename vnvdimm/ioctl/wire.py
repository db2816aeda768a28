"""The ioctl protocol (little-endian), one connection per ioctl:

    client -> daemon   request: magic "VNVD", version 1, ioctl request number, the open's
                       O_ACCMODE, the node's name (64 bytes, NUL padded)
    daemon -> client   op READ(offset, length): the client answers a u32 status (0 or EFAULT),
                       then, if 0, the bytes at arg + offset
                       op WRITE(offset, length) + bytes: the client stores them at arg + offset
                       and answers a u32 status (0 or EFAULT)
                       op DONE(errno, return value): the ioctl's result; the connection ends

The daemon drives: it asks for exactly the bytes the kernel would copy from (and to) the
caller, so sizing and validation live in one place (vnvdimm.model.commands.envelope) and the
client is a dumb memory server. `call()` is that client for Python (tests, tools), with the
ioctl argument being a bytearray (addresses past its end are EFAULT).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

MAGIC = 0x564E5644
VERSION = 1
REQUEST = struct.Struct("<IIII64s")
OP = struct.Struct("<IIQQ")
STATUS = struct.Struct("<I")
OP_READ, OP_WRITE, OP_DONE = 1, 2, 3
MAX_TRANSFER = (4 << 20) + 4096  # ND_IOCTL_MAX_BUFLEN and a little: nothing asks for more


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


@dataclass
class Result:
    ret: int
    errno: int


def call(path: str, name: str, request: int, arg: bytearray | None, accmode: int = 2,
         timeout: float = 30.0) -> Result:
    """Send one ioctl as the preload library does; `arg` is updated in place."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(REQUEST.pack(MAGIC, VERSION, request & 0xFFFFFFFF, accmode, name.encode()[:63]))
        while True:
            op, _, offset, length = OP.unpack(recv_exact(sock, OP.size))
            if op == OP_DONE:
                return Result(length if length < 1 << 63 else length - (1 << 64), offset)
            inside = arg is not None and offset + length <= len(arg)
            if op == OP_READ:
                if inside:
                    sock.sendall(STATUS.pack(0) + bytes(arg[offset:offset + length]))  # type: ignore[index]
                else:
                    sock.sendall(STATUS.pack(errno.EFAULT))
            elif op == OP_WRITE:
                data = recv_exact(sock, length)
                if inside:
                    arg[offset:offset + length] = data  # type: ignore[index]
                sock.sendall(STATUS.pack(0 if inside else errno.EFAULT))
            else:
                raise ConnectionError(f"unknown op {op}")
