"""The ioctl protocol (little-endian), one connection per ioctl:

    client -> daemon   request: magic "VNVD", version 2, the ioctl request number, 4 zero
                       bytes, then u64 window (the argument's size, as the client sized it
                       from the command as the kernel does) and u64 readable (how much of it
                       follows: the part from arg on that reads without a fault); sent with
                       the open descriptor itself as SCM_RIGHTS. Then `readable` bytes of
                       the argument.
    daemon -> client   op WRITE(offset, length) + bytes: the client stores them at arg + offset
                       and answers a u32 status (0 or EFAULT)
                       op DONE(errno, return value): the ioctl's result; the connection ends

The daemon reads the node (the file's name on its mount) and the access mode (O_ACCMODE)
from the descriptor, never from the client's word, and validates the argument as the kernel
does (vnvdimm.model.commands.envelope): a read of a byte the client did not send is EFAULT,
where copy_from_user() would fault. The client sends nothing outside its window and refuses
(drops the connection: EFAULT) a write outside it or a second write. `call()` is that client
for Python (tests, tools): the ioctl argument is a bytearray, sent whole; addresses past its
end are EFAULT.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0x564E5644
VERSION = 2
REQUEST = struct.Struct("<IIIIQQ")
OP = struct.Struct("<IIQQ")
STATUS = struct.Struct("<I")
OP_WRITE, OP_DONE = 2, 3
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


def send_request(sock: socket.socket, request: int, fd: int, arg: bytes = b"", window: int | None = None) -> None:
    """The request header with `fd` attached (SCM_RIGHTS), then `arg`."""
    data = REQUEST.pack(MAGIC, VERSION, request & 0xFFFFFFFF, 0, len(arg) if window is None else window,
                        len(arg)) + arg
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
    if sent < len(data):
        sock.sendall(data[sent:])


@dataclass
class Result:
    ret: int
    errno: int


def call(path: str, node: str | Path | int, request: int, arg: bytearray | None, accmode: int = os.O_RDWR,
         timeout: float = 30.0) -> Result:
    """Send one ioctl as the preload library does; `arg` is updated in place. `node` is the
    device file (opened here with `accmode`) or an open descriptor of it."""
    fd = node if isinstance(node, int) else os.open(node, accmode | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            send_request(sock, request, fd, bytes(arg or b""))
            return _serve(sock, arg)
    finally:
        if not isinstance(node, int):
            os.close(fd)


def _serve(sock: socket.socket, arg: bytearray | None) -> Result:
    while True:
        op, _, offset, length = OP.unpack(recv_exact(sock, OP.size))
        if op == OP_DONE:
            return Result(length if length < 1 << 63 else length - (1 << 64), offset)
        if op != OP_WRITE:
            raise ConnectionError(f"unknown op {op}")
        data = recv_exact(sock, length)
        inside = arg is not None and offset + length <= len(arg)
        if inside:
            arg[offset:offset + length] = data  # type: ignore[index]
        sock.sendall(STATUS.pack(0 if inside else errno.EFAULT))
