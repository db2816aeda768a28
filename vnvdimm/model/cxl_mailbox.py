"""The memdevs' mailbox as /dev/cxl/memN's ioctls reach it (drivers/cxl/core/mbox.c
cxl_query_cmd(), cxl_send_cmd()) and as cxl_test's mock device answers it
(tools/testing/cxl/test/mem.c): identify, supported logs and the command effects log, get
and set the label storage area, partition info, health info.

Carrying the ioctl: the argument is read and written in place (`ArgMemory`, offsets into the
struct); CXL_MEM_SEND_COMMAND's struct carries two more buffers, in.payload (in.size bytes to
read) and out.payload (room for out.size bytes), reached through `PayloadMemory` (the
caller's side holds their addresses and bounds every access by the declared sizes; here the
sizes are validated first, as the kernel does, so nothing is read or allocated for a size it
refuses). Errors are OSError(errno) as the kernel returns them; a mailbox command's own return
code goes into `retval`.
"""

from __future__ import annotations

import errno
import struct
import uuid as uuidlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

from vnvdimm.model.base import fail


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | kind << 8 | nr


SEND_COMMAND = struct.Struct("<IIIIIIQIIQ")  # struct cxl_send_command (sizes are __u32)
SEND_COMMAND_SIZE = SEND_COMMAND.size
QUERY_HEADER_SIZE = 8  # struct cxl_mem_query_commands without its commands[]
COMMAND_INFO_SIZE = 16  # struct cxl_command_info
CXL_MEM_QUERY_COMMANDS = _ioc(2, 0xCE, 1, QUERY_HEADER_SIZE)
CXL_MEM_SEND_COMMAND = _ioc(3, 0xCE, 2, SEND_COMMAND_SIZE)

CXL_MEM_COMMAND_FLAG_ENABLED = 1 << 0
CXL_MEM_COMMAND_FLAG_EXCLUSIVE = 1 << 1
CXL_MEM_COMMAND_FLAG_MASK = 1 << 0  # what userspace may pass in cxl_send_command.flags
VARIABLE = -1  # CXL_VARIABLE_PAYLOAD, as cxl_command_info's size_in/size_out show it
CXL_VARIABLE_PAYLOAD_U32 = 0xFFFFFFFF  # the same, as a __u32 out.size
INT_MAX = 0x7FFFFFFF

# include/uapi/linux/cxl_mem.h's command ids
ID_IDENTIFY, ID_RAW, ID_GET_SUPPORTED_LOGS, ID_GET_FW_INFO, ID_GET_PARTITION_INFO = 1, 2, 3, 4, 5
ID_GET_LSA, ID_GET_HEALTH_INFO, ID_GET_LOG, ID_SET_PARTITION_INFO, ID_SET_LSA = 6, 7, 8, 9, 10
ID_GET_ALERT_CONFIG, ID_SET_ALERT_CONFIG, ID_GET_SHUTDOWN_STATE, ID_SET_SHUTDOWN_STATE = 11, 12, 13, 14
ID_GET_SCAN_MEDIA_CAPS = 18
ID_MAX = 21  # CXL_MEM_COMMAND_ID_MAX: also ARRAY_SIZE(cxl_mem_commands), what a query counts
# cxl_pmem.c's exclusive_cmds: what user space may not send while an nvdimm sits on the memdev
# cxl_pmem_init(): the commands cxl_pmem keeps while it holds a memdev's nvdimm
NVDIMM_EXCLUSIVE_COMMANDS = frozenset({ID_SET_SHUTDOWN_STATE, ID_SET_LSA})


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


class PayloadMemory(Protocol):
    """cxl_send_command's two buffers as the caller declared them: in.payload (in.size bytes
    to copy in) and out.payload (room for out.size bytes). Their addresses are the caller's
    business (the preload library holds them); OSError(EFAULT) where the caller's copy
    faults, and for anything outside the declared sizes."""

    def read_input(self, length: int) -> bytes: ...

    def write_output(self, data: bytes) -> None: ...


class MockMemdevFirmware:
    """One cxl_test memdev's device side: mem.c's mock mailbox over its label area."""

    def __init__(self, ram_size: int, pmem_size: int, lsa_size: int, payload_size: int,
                 firmware_version: str) -> None:
        self.ram_size = ram_size
        self.pmem_size = pmem_size
        self.payload_size = payload_size
        self.firmware_version = firmware_version
        self.lsa = bytearray(lsa_size)
        # mds->exclusive_cmds: the command ids the kernel keeps for itself (EBUSY from user
        # space, flagged in a query); cxl_pmem claims NVDIMM_EXCLUSIVE_COMMANDS while it has
        # the memdev's nvdimm (set_exclusive_cxl_commands()) and gives them back after
        self.exclusive_commands: set[int] = set()
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


def query_commands(fw: MockMemdevFirmware, arg: ArgMemory) -> None:
    """cxl_query_cmd(): n_commands 0 asks for the count, ARRAY_SIZE(cxl_mem_commands) (the
    array is indexed by id: CXL_MEM_COMMAND_ID_MAX entries, the ids a kernel lacks zeroed);
    else the first min(n_commands, that) entries, flagged enabled or exclusive. One copy out
    here (the kernel copies entry by entry: only a fault midway differs)."""
    (n_commands,) = struct.unpack("<I", arg.read(0, 4))
    if n_commands == 0:
        arg.write(0, struct.pack("<I", ID_MAX))
        return
    by_id = {c.id: c for c in MEM_COMMANDS}
    enabled = fw.enabled
    infos = []
    for index in range(min(n_commands, ID_MAX)):
        cmd = by_id.get(index)
        if cmd is None:
            infos.append(bytes(COMMAND_INFO_SIZE))
            continue
        flags = (CXL_MEM_COMMAND_FLAG_ENABLED if cmd.id in enabled else 0) | (
            CXL_MEM_COMMAND_FLAG_EXCLUSIVE if cmd.id in fw.exclusive_commands else 0)
        infos.append(struct.pack("<IIii", cmd.id, flags, cmd.size_in, cmd.size_out))
    arg.write(QUERY_HEADER_SIZE, b"".join(infos))


def send_command(fw: MockMemdevFirmware, arg: ArgMemory, payloads: PayloadMemory,
                 lock: AbstractContextManager[object] | None = None) -> None:
    """cxl_send_cmd(): validate the struct as cxl_validate_cmd_from_user() does (errno and
    order are the kernel's), copy in.size bytes in, run the command (under `lock`, the model's:
    the caller's memory is never touched while it is held), copy the output out, then the
    struct with retval and out.size. Nothing is read or allocated for a size the checks refuse."""
    raw = arg.read(0, SEND_COMMAND_SIZE)
    cmd_id, flags, rsvd, _retval, in_size, in_rsvd, in_ptr, out_size, out_rsvd, out_ptr = struct.unpack(
        SEND_COMMAND.format, raw)
    if cmd_id == 0 or cmd_id >= ID_MAX:
        raise fail(errno.ENOTTY, f"command id {cmd_id}")
    if in_size > fw.payload_size:
        raise fail(errno.EINVAL, f"input of {in_size} bytes: the mailbox payload is {fw.payload_size}")
    if cmd_id == ID_RAW:  # cxl_to_mem_cmd_raw()
        if rsvd >> 16:
            raise fail(errno.EINVAL, "raw.rsvd must be zero")
        if out_size > fw.payload_size:
            raise fail(errno.EINVAL, f"raw output of {out_size} bytes: the mailbox payload is {fw.payload_size}")
        raise fail(errno.EPERM, "raw commands are not enabled (CONFIG_CXL_MEM_RAW_COMMANDS)")
    if flags & ~CXL_MEM_COMMAND_FLAG_MASK:
        raise fail(errno.EINVAL, "unknown flags")
    if rsvd or in_rsvd or out_rsvd:
        raise fail(errno.EINVAL, "reserved fields must be zero")
    cmd = next((c for c in MEM_COMMANDS if c.id == cmd_id), None)
    if cmd is None or cmd_id not in fw.enabled:
        raise fail(errno.ENOTTY, f"command {cmd_id} is not enabled")
    if cmd_id in fw.exclusive_commands:
        raise fail(errno.EBUSY, f"command {cmd_id} is claimed by the kernel")
    if cmd.size_in != VARIABLE and cmd.size_in != in_size:
        raise fail(errno.ENOMEM, f"input of {in_size} bytes: the command takes {cmd.size_in}")
    if cmd.size_out != VARIABLE and out_size < cmd.size_out:
        raise fail(errno.ENOMEM, f"room for {out_size} bytes: the command returns {cmd.size_out}")
    # cxl_mbox_cmd_ctor(): vmemdup_user() of the input, then a bounce buffer of out.size
    # (CXL_VARIABLE_PAYLOAD: the payload size), which kvzalloc() refuses past INT_MAX
    payload_in = payloads.read_input(in_size) if in_size else b""
    if out_size == CXL_VARIABLE_PAYLOAD_U32:
        out_size = fw.payload_size
    if out_size > INT_MAX:
        raise fail(errno.ENOMEM, f"no bounce buffer of {out_size} bytes")
    # What the device hands back is at most its payload size (cxl_pci's mailbox copies
    # min(size_out, payload_size)); the mock's bytes past it would be zeros.
    room = min(out_size, fw.payload_size)
    with lock if lock is not None else nullcontext():
        payload_out, size_out = fw.execute(cmd.opcode, payload_in, room)
    size_out = min(size_out, room)
    if size_out:
        payloads.write_output(payload_out[:size_out].ljust(size_out, b"\0"))
    arg.write(0, SEND_COMMAND.pack(cmd_id, flags, rsvd, 0, in_size, in_rsvd, in_ptr, size_out, out_rsvd, out_ptr))


def memdev_ioctl(fw: MockMemdevFirmware, ioctl_cmd: int, arg: ArgMemory, payloads: PayloadMemory,
                 lock: AbstractContextManager[object] | None = None) -> None:
    """__cxl_memdev_ioctl(): the two commands of /dev/cxl/memN; ENOTTY for any other. (A
    memdev that is gone answers ENXIO before this: its caller finds no memdev.)"""
    if ioctl_cmd & 0xFFFFFFFF == CXL_MEM_QUERY_COMMANDS:
        query_commands(fw, arg)  # membership tests of the device's sets only: no lock needed
    elif ioctl_cmd & 0xFFFFFFFF == CXL_MEM_SEND_COMMAND:
        send_command(fw, arg, payloads, lock)
    else:
        raise fail(errno.ENOTTY, f"ioctl {ioctl_cmd:#x}")
