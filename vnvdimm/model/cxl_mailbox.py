"""The memdevs' mailbox as /dev/cxl/memN's ioctls reach it (drivers/cxl/core/mbox.c
cxl_query_cmd(), cxl_send_cmd()) and as cxl_test's mock device answers it
(tools/testing/cxl/test/mem.c): identify, supported logs and the command effects log, get
and set the label storage area, partition info, health info.

Carrying the ioctl: CXL_MEM_QUERY_COMMANDS's argument is read and written in place
(`ArgMemory`, offsets into the struct); CXL_MEM_SEND_COMMAND's struct carries two user
pointers, in.payload (in.size bytes to read) and out.payload (room for out.size bytes), which
are read and written through `UserMemory` (absolute addresses, each access bounded by the
struct's own sizes, which are validated here first). Errors are OSError(errno) as the kernel
returns them; a mailbox command's own return code goes into `retval`.
"""

from __future__ import annotations

import errno
import struct
import uuid as uuidlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from vnvdimm.model.base import fail


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | kind << 8 | nr


SEND_COMMAND_SIZE = 48  # struct cxl_send_command
QUERY_HEADER_SIZE = 8  # struct cxl_mem_query_commands without its commands[]
COMMAND_INFO_SIZE = 16  # struct cxl_command_info
CXL_MEM_QUERY_COMMANDS = _ioc(2, 0xCE, 1, QUERY_HEADER_SIZE)
CXL_MEM_SEND_COMMAND = _ioc(3, 0xCE, 2, SEND_COMMAND_SIZE)

CXL_MEM_COMMAND_FLAG_ENABLED = 1 << 0
CXL_MEM_COMMAND_FLAG_EXCLUSIVE = 1 << 1
CXL_MEM_COMMAND_FLAG_MASK = 1 << 0  # what userspace may pass in cxl_send_command.flags
VARIABLE = -1  # CXL_VARIABLE_PAYLOAD

# include/uapi/linux/cxl_mem.h's command ids
ID_IDENTIFY, ID_RAW, ID_GET_SUPPORTED_LOGS, ID_GET_FW_INFO, ID_GET_PARTITION_INFO = 1, 2, 3, 4, 5
ID_GET_LSA, ID_GET_HEALTH_INFO, ID_GET_LOG, ID_SET_PARTITION_INFO, ID_SET_LSA = 6, 7, 8, 9, 10
ID_GET_ALERT_CONFIG, ID_SET_ALERT_CONFIG, ID_GET_SHUTDOWN_STATE, ID_SET_SHUTDOWN_STATE = 11, 12, 13, 14
ID_GET_SCAN_MEDIA_CAPS = 18
ID_MAX = 21


@dataclass(frozen=True)
class MemCommand:
    """An entry of mbox.c's cxl_mem_commands[]: id, opcode, payload sizes, force-enabled."""

    id: int
    opcode: int
    size_in: int
    size_out: int
    force_enable: bool = False


# cxl_mem_commands[] as a kernel without CONFIG_CXL_MEM_RAW_COMMANDS (Debian's) has it
MEM_COMMANDS = (
    MemCommand(ID_IDENTIFY, 0x4000, 0, 0x43, force_enable=True),
    MemCommand(ID_GET_SUPPORTED_LOGS, 0x0400, 0, VARIABLE, force_enable=True),
    MemCommand(ID_GET_FW_INFO, 0x0200, 0, 0x50),
    MemCommand(ID_GET_PARTITION_INFO, 0x4100, 0, 0x20),
    MemCommand(ID_GET_LSA, 0x4102, 0x8, VARIABLE),
    MemCommand(ID_GET_HEALTH_INFO, 0x4200, 0, 0x12),
    MemCommand(ID_GET_LOG, 0x0401, 0x18, VARIABLE, force_enable=True),
    MemCommand(ID_SET_PARTITION_INFO, 0x4101, 0x0A, 0),
    MemCommand(ID_SET_LSA, 0x4103, VARIABLE, 0),
    MemCommand(ID_GET_ALERT_CONFIG, 0x4201, 0, 0x10),
    MemCommand(ID_SET_ALERT_CONFIG, 0x4202, 0x0C, 0),
    MemCommand(ID_GET_SHUTDOWN_STATE, 0x4203, 0, 0x1),
    MemCommand(ID_SET_SHUTDOWN_STATE, 0x4204, 0x1, 0),
    MemCommand(ID_GET_SCAN_MEDIA_CAPS, 0x4303, 0x10, 0x4),
)

CAPACITY_MULTIPLIER = 256 << 20  # CXL_CAPACITY_MULTIPLIER
CEL_UUID = uuidlib.UUID("0da9c0b5-bf41-4b78-8f79-96b1623b3f17")  # DEFINE_CXL_CEL_UUID
# mem.c's mock_cel (opcode, effect); the UUID is a uuid_t (UUID_INIT: big-endian bytes)
MOCK_CEL = ((0x0400, 0), (0x4000, 0), (0x4102, 0), (0x4100, 0), (0x4103, (1 << 1) | (1 << 2)), (0x4200, 0))


class ArgMemory(Protocol):
    """The ioctl argument, at offsets (the preload library's in-place copy)."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class UserMemory(Protocol):
    """The caller's memory at absolute addresses (cxl_send_command's payload pointers);
    OSError(EFAULT) for an address the caller cannot read (write)."""

    def read(self, address: int, length: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...


class MockMemdevFirmware:
    """One cxl_test memdev's device side: mem.c's mock mailbox over its label area."""

    def __init__(self, ram_size: int, pmem_size: int, lsa_size: int, payload_size: int,
                 firmware_version: str) -> None:
        self.ram_size = ram_size
        self.pmem_size = pmem_size
        self.payload_size = payload_size
        self.firmware_version = firmware_version
        self.lsa = bytearray(lsa_size)
        self.handlers: dict[int, Callable[[bytes, int], tuple[bytes, int]]] = {
            0x0400: self._supported_logs, 0x0401: self._get_log, 0x4000: self._identify,
            0x4100: self._partition_info, 0x4102: self._get_lsa, 0x4103: self._set_lsa,
            0x4200: self._health_info,
        }

    @property
    def enabled(self) -> set[int]:
        """cxl_walk_cel() + the force-enabled: the command ids the device's CEL enables."""
        opcodes = {op for op, _ in MOCK_CEL}
        return {c.id for c in MEM_COMMANDS if c.force_enable or c.opcode in opcodes}

    def execute(self, opcode: int, payload_in: bytes, size_out: int) -> tuple[bytes, int]:
        """cxl_mock_mbox_send(): (payload out, its size); -EIO for an unknown opcode."""
        handler = self.handlers.get(opcode)
        if handler is None:
            raise fail(errno.EIO, f"opcode {opcode:#x} not implemented by the mock")
        return handler(payload_in, size_out)

    # -- mem.c's handlers; each gets the input payload and the output room (size_out)
    def _identify(self, payload_in: bytes, size_out: int) -> tuple[bytes, int]:
        out = struct.pack("<16sQQQQHHHHI3sHBB", self.firmware_version.encode()[:16],
                          (self.ram_size + self.pmem_size) // CAPACITY_MULTIPLIER, 0, 0,
                          (256 << 20) // CAPACITY_MULTIPLIER, 0, 0, 0, 0, len(self.lsa), b"\0\0\0", 0, 0, 0)
        if size_out < len(out):
            raise fail(errno.EINVAL, "identify: output too small")
        return out, size_out

    def _partition_info(self, payload_in: bytes, size_out: int) -> tuple[bytes, int]:
        out = struct.pack("<QQQQ", self.ram_size // CAPACITY_MULTIPLIER, self.pmem_size // CAPACITY_MULTIPLIER, 0, 0)
        if size_out < len(out):
            raise fail(errno.EINVAL, "partition info: output too small")
        return out, size_out

    def _health_info(self, payload_in: bytes, size_out: int) -> tuple[bytes, int]:
        # maintenance needed, performance degraded, replacement needed; all data lost;
        # temperature critical, corrected volatile errors warning; 15 % life used, 25 C,
        # 10 dirty shutdowns, 20 volatile and 30 persistent corrected errors
        out = struct.pack("<BBBBHIII", 0x7, 0x3, 0x18, 15, 25, 10, 20, 30)
        if size_out < len(out):
            raise fail(errno.EINVAL, "health info: output too small")
        return out, size_out

    def _supported_logs(self, payload_in: bytes, size_out: int) -> tuple[bytes, int]:
        out = struct.pack("<H6s16sI", 1, b"", CEL_UUID.bytes, 4 * len(MOCK_CEL))
        if size_out < len(out):
            raise fail(errno.EINVAL, "supported logs: output too small")
        return out, len(out)

    def _get_log(self, payload_in: bytes, size_out: int) -> tuple[bytes, int]:
        if len(payload_in) < 0x18:
            raise fail(errno.EINVAL, "get log: input too small")
        log_uuid = uuidlib.UUID(bytes=payload_in[:16])
        offset, length = struct.unpack_from("<II", payload_in, 16)
        cel = b"".join(struct.pack("<HH", op, effect) for op, effect in MOCK_CEL)
        if length > self.payload_size or offset + length > len(cel) or log_uuid != CEL_UUID or length > size_out:
            raise fail(errno.EINVAL, "get log: bad request")
        return cel[offset:offset + length], size_out

    def _get_lsa(self, payload_in: bytes, size_out: int) -> tuple[bytes, int]:
        if len(payload_in) < 8:
            raise fail(errno.EINVAL, "get lsa: input too small")
        offset, length = struct.unpack_from("<II", payload_in)
        if offset + length > len(self.lsa) or length > size_out:
            raise fail(errno.EINVAL, "get lsa: beyond the label area or the output")
        return bytes(self.lsa[offset:offset + length]), size_out

    def _set_lsa(self, payload_in: bytes, size_out: int) -> tuple[bytes, int]:
        if len(payload_in) < 8:
            raise fail(errno.EINVAL, "set lsa: input too small")
        (offset,) = struct.unpack_from("<I", payload_in)
        data = payload_in[8:]
        if offset + len(data) > len(self.lsa):
            raise fail(errno.EINVAL, "set lsa: beyond the label area")
        self.lsa[offset:offset + len(data)] = data
        return b"", 0


def query_commands(fw: MockMemdevFirmware, arg: ArgMemory, exclusive: Collection[int] = ()) -> None:
    """cxl_query_cmd(): n_commands 0 asks for the count; else up to n_commands entries."""
    (n_commands,) = struct.unpack("<I", arg.read(0, 4))
    if n_commands == 0:
        arg.write(0, struct.pack("<I", len(MEM_COMMANDS)))
        return
    enabled = fw.enabled
    for j, cmd in enumerate(MEM_COMMANDS[:n_commands]):
        flags = (CXL_MEM_COMMAND_FLAG_ENABLED if cmd.id in enabled else 0) | (
            CXL_MEM_COMMAND_FLAG_EXCLUSIVE if cmd.id in exclusive else 0)
        arg.write(QUERY_HEADER_SIZE + j * COMMAND_INFO_SIZE, struct.pack("<IIii", cmd.id, flags, cmd.size_in,
                                                                         cmd.size_out))


def send_command(fw: MockMemdevFirmware, arg: ArgMemory, user: UserMemory,
                 exclusive: Collection[int] = ()) -> None:
    """cxl_send_cmd(): validate the struct (cxl_validate_cmd_from_user()), read in.size bytes
    of input, run the command, write at most out.size bytes of output, then retval and
    out.size back into the struct."""
    raw = arg.read(0, SEND_COMMAND_SIZE)
    cmd_id, flags, rsvd, _retval, in_size, in_rsvd, in_ptr, out_size, out_rsvd, out_ptr = struct.unpack(
        "<IIIIiIQiIQ", raw)
    if cmd_id == 0 or cmd_id >= ID_MAX:
        raise fail(errno.ENOTTY, f"command id {cmd_id}")
    if flags & ~CXL_MEM_COMMAND_FLAG_MASK:
        raise fail(errno.EINVAL, "unknown flags")
    if in_size > fw.payload_size:
        raise fail(errno.EINVAL, "input larger than the mailbox payload")
    if cmd_id == ID_RAW:
        raise fail(errno.ENOTTY, "raw commands are not enabled (CONFIG_CXL_MEM_RAW_COMMANDS)")
    if rsvd or in_rsvd or out_rsvd:
        raise fail(errno.EINVAL, "reserved fields must be zero")
    cmd = next((c for c in MEM_COMMANDS if c.id == cmd_id), None)
    if cmd is None or cmd_id not in fw.enabled:
        raise fail(errno.ENOTTY, f"command {cmd_id} is not enabled")
    if cmd_id in exclusive:
        raise fail(errno.EBUSY, f"command {cmd_id} is claimed by the kernel")
    if cmd.size_in != VARIABLE and cmd.size_in != in_size:
        raise fail(errno.ENOMEM, "input size differs from the command's")
    if cmd.size_out != VARIABLE and out_size < cmd.size_out:
        raise fail(errno.ENOMEM, "output room smaller than the command's")
    if in_size < 0 or out_size < 0:
        raise fail(errno.EINVAL, "negative size")
    room = min(out_size, fw.payload_size)  # cxl_mbox_cmd_ctor(): at most the payload size
    payload_in = user.read(in_ptr, in_size) if in_size else b""
    payload_out, size_out = fw.execute(cmd.opcode, payload_in, room)
    size_out = min(size_out, room)
    out = payload_out[:size_out].ljust(size_out, b"\0")
    if size_out:
        user.write(out_ptr, out)
    arg.write(12, struct.pack("<I", 0))  # retval: the mock's return code, success
    arg.write(32, struct.pack("<i", size_out))


def memdev_ioctl(fw: MockMemdevFirmware, ioctl_cmd: int, arg: ArgMemory, user: UserMemory) -> None:
    """cxl_memdev_ioctl(): the two commands of /dev/cxl/memN; ENOTTY for any other."""
    if ioctl_cmd == CXL_MEM_QUERY_COMMANDS:
        query_commands(fw, arg)
    elif ioctl_cmd == CXL_MEM_SEND_COMMAND:
        send_command(fw, arg, user)
    else:
        raise fail(errno.ENOTTY, f"ioctl {ioctl_cmd:#x}")
