"""The ioctl protocol (little-endian), one connection per ioctl:

    client -> daemon   request: magic "VNVD", version 3, the ioctl request number, u32
                       `regions` (how many buffers besides the argument follow: 0, or 2 for
                       CXL_MEM_SEND_COMMAND), then u64 window (the argument's size, as the
                       client sized it from the command as the kernel does) and u64 readable
                       (how much of it follows: the part from arg on that reads without a
                       fault); sent with the open descriptor itself as SCM_RIGHTS. Then
                       `regions` x (u64 size, u32 access, u32 0): region 1, 2... (access
                       READ: the daemon may fetch it; WRITE: it may store into it). Then
                       `readable` bytes of the argument (region 0).
    daemon -> client   op WRITE(region, offset, length) + bytes: the client stores them at
                       the region's offset and answers a u32 status (0 or EFAULT)
                       op READ(region, offset, length): the client answers a u32 status (0
                       or EFAULT where copy_from_user() would fault), then, if 0, the bytes
                       op DONE(errno, return value): the ioctl's result; the connection ends

The daemon reads the node (the file's name on its mount) and the access mode (O_ACCMODE)
from the descriptor, never from the client's word, and validates the argument as the kernel
does (vnvdimm.model.commands.envelope, vnvdimm.model.cxl_mailbox): a read of a byte the
client did not send is EFAULT, where copy_from_user() would fault. A region is named by its
index, never by an address: the client sizes and places each one from its own copy of the
argument (CXL_MEM_SEND_COMMAND's in.payload/in.size and out.payload/out.size), sends nothing
outside them, and refuses (drops the connection: EFAULT) an op outside a region, the wrong
way, or a second one the same way on a region. `call()` is that client for Python (tests,
tools): the ioctl argument is a bytearray, sent whole; the extra regions are bytearrays too.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0x564E5644
VERSION = 3
REQUEST = struct.Struct("<IIIIQQ")
REGION = struct.Struct("<QII")
OP = struct.Struct("<IIQQ")
STATUS = struct.Struct("<I")
UCRED = struct.Struct("iII")  # struct ucred (SO_PEERCRED): pid, uid, gid
OP_WRITE, OP_DONE, OP_READ = 2, 3, 4
REGION_READ, REGION_WRITE = 1, 2
#: Not an ioctl: "serve this /dev/fuse descriptor as a /sys connection" (with-vnvdimm's
#: `vnvdimm sysfs-attach`); the argument is the path where the client mounted it.
ATTACH_SYSFS = 0x564E5301
MAX_REGIONS = 2  # besides the argument: CXL_MEM_SEND_COMMAND's input and output payloads
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


def send_request(sock: socket.socket, request: int, fd: int, arg: bytes = b"", window: int | None = None,
                 regions: Sequence[tuple[int, int]] = ()) -> None:
    """The request header with `fd` attached (SCM_RIGHTS), the (size, access) of each extra
    region, then `arg`."""
    data = REQUEST.pack(MAGIC, VERSION, request & 0xFFFFFFFF, len(regions), len(arg) if window is None else window,
                        len(arg)) + b"".join(REGION.pack(size, access, 0) for size, access in regions) + arg
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
    if sent < len(data):
        sock.sendall(data[sent:])


@dataclass
class Result:
    ret: int
    errno: int


def call(path: str, node: str | Path | int, request: int, arg: bytearray | None, accmode: int = os.O_RDWR,
         timeout: float = 30.0, payload_in: bytes | None = None, payload_out: bytearray | None = None) -> Result:
    """Send one ioctl as the preload library does; `arg` is updated in place. `node` is the
    device file (opened here with `accmode`) or an open descriptor of it. `payload_in` and
    `payload_out` are CXL_MEM_SEND_COMMAND's buffers (regions 1 and 2; their sizes are the
    client's, whatever the struct in `arg` says)."""
    fd = node if isinstance(node, int) else os.open(node, accmode | os.O_CLOEXEC)
    regions: list[tuple[int, int]] = []
    buffers: list[bytes | bytearray | None] = [arg]
    if payload_in is not None or payload_out is not None:
        regions = [(len(payload_in or b""), REGION_READ), (len(payload_out or b""), REGION_WRITE)]
        buffers += [payload_in, payload_out]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            _arm(sock, timeout)
            sock.connect(path)
            send_request(sock, request, fd, bytes(arg or b""), regions=regions)
            return _serve(sock, buffers)
    except BlockingIOError as e:  # SO_SNDTIMEO or SO_RCVTIMEO ran out
        raise TimeoutError(f"the daemon did not answer in {timeout} s") from e
    finally:
        if not isinstance(node, int):
            os.close(fd)


def _arm(sock: socket.socket, timeout: float) -> None:
    """A blocking socket with kernel timeouts, as the preload library's: a unix connect()
    then waits (at most SO_SNDTIMEO) for room in a full listen backlog. Python's own
    settimeout() makes the socket non-blocking, and such a connect fails at once (EAGAIN)."""
    sec, frac = divmod(max(timeout, 0.001), 1.0)
    timeval = struct.pack("@ll", int(sec), int(frac * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)


def _serve(sock: socket.socket, buffers: list[bytes | bytearray | None]) -> Result:
    while True:
        op, region, offset, length = OP.unpack(recv_exact(sock, OP.size))
        if op == OP_DONE:
            return Result(length if length < 1 << 63 else length - (1 << 64), offset)
        buf = buffers[region] if region < len(buffers) else None
        inside = buf is not None and offset + length <= len(buf)
        if op == OP_WRITE:
            data = recv_exact(sock, length)
            if inside and isinstance(buf, bytearray) and region != 1:
                buf[offset:offset + length] = data
            else:
                inside = False
            sock.sendall(STATUS.pack(0 if inside else errno.EFAULT))
        elif op == OP_READ and region == 1 and inside and buf is not None:
            sock.sendall(STATUS.pack(0) + bytes(buf[offset:offset + length]))
        elif op == OP_READ:
            sock.sendall(STATUS.pack(errno.EFAULT))
        else:
            raise ConnectionError(f"unknown op {op}")
