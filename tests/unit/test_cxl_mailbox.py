"""The memdev mailbox's daemon side: CXL_MEM_QUERY_COMMANDS and CXL_MEM_SEND_COMMAND as
mbox.c validates them and cxl_test's mem.c answers them, over a fake caller memory (the
preload library's part: the argument in place, the payload pointers by address)."""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from vnvdimm.model.cxl_mailbox import (
    CEL_UUID,
    CXL_MEM_QUERY_COMMANDS,
    CXL_MEM_SEND_COMMAND,
    ID_GET_HEALTH_INFO,
    ID_GET_LOG,
    ID_GET_LSA,
    ID_GET_PARTITION_INFO,
    ID_GET_SUPPORTED_LOGS,
    ID_IDENTIFY,
    ID_MAX,
    ID_RAW,
    ID_SET_LSA,
    ID_SET_PARTITION_INFO,
    NVDIMM_EXCLUSIVE_COMMANDS,
    SEND_COMMAND,
    MockMemdevFirmware,
    memdev_ioctl,
)

GiB = 1 << 30


class Arg:
    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset:offset + len(data)] = data


class User:
    """The caller's address space: a few mapped ranges; anything else is EFAULT."""

    def __init__(self) -> None:
        self.maps: dict[int, bytearray] = {}
        self.accessed: list[tuple[str, int, int]] = []

    def map(self, address: int, data: bytes) -> int:
        self.maps[address] = bytearray(data)
        return address

    def _find(self, address: int, length: int) -> tuple[bytearray, int]:
        for base, buf in self.maps.items():
            if base <= address and address + length <= base + len(buf):
                return buf, address - base
        raise OSError(errno.EFAULT, "bad address")

    def read(self, address: int, length: int) -> bytes:
        buf, off = self._find(address, length)
        self.accessed.append(("r", address, length))
        return bytes(buf[off:off + length])

    def write(self, address: int, data: bytes) -> None:
        buf, off = self._find(address, len(data))
        self.accessed.append(("w", address, len(data)))
        buf[off:off + len(data)] = data


class Payloads:
    """What the preload library offers the daemon: in.size bytes at in.payload and out.size
    bytes of room at out.payload, as the struct said when the ioctl was made."""

    def __init__(self, arg: Arg, user: User) -> None:
        _, _, _, _, self.in_size, _, self.in_ptr, self.out_size, _, self.out_ptr = struct.unpack_from(
            "<IIIIIIQIIQ", arg.buf) if len(arg.buf) >= 48 else (0,) * 10
        self.user = user

    def read_input(self, length: int) -> bytes:
        if length > self.in_size:
            raise OSError(errno.EFAULT, "beyond in.size")
        return self.user.read(self.in_ptr, length)

    def write_output(self, data: bytes) -> None:
        if len(data) > self.out_size:
            raise OSError(errno.EFAULT, "beyond out.size")
        self.user.write(self.out_ptr, data)


def ioctl(fw: MockMemdevFirmware, request: int, arg: Arg, user: User) -> None:
    memdev_ioctl(fw, request, arg, Payloads(arg, user))


@pytest.fixture
def fw() -> MockMemdevFirmware:
    return MockMemdevFirmware(GiB, GiB, 128 << 10, 4096, "mock fw v1 ")


def send(fw: MockMemdevFirmware, user: User, cmd_id: int, payload_in: bytes = b"", out_size: int = 0,
         in_size: int | None = None) -> tuple[bytes, Arg]:
    in_ptr = user.map(0x10000, payload_in) if payload_in else 0
    out_ptr = user.map(0x80000, bytes(out_size)) if out_size else 0
    size_in = len(payload_in) if in_size is None else in_size
    arg = Arg(struct.pack("<IIIIIIQIIQ", cmd_id, 0, 0, 0xFFFF, size_in, 0, in_ptr, out_size, 0, out_ptr))
    ioctl(fw, CXL_MEM_SEND_COMMAND, arg, user)
    (size_out,) = struct.unpack_from("<I", arg.buf, 32)
    return (bytes(user.maps[0x80000][:size_out]) if out_size else b""), arg


def errno_of(fn) -> int | None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except OSError as e:
        return e.errno
    return None


def test_query_counts_then_lists_with_enabled_flags(fw: MockMemdevFirmware) -> None:
    """cxl_query_cmd() counts ARRAY_SIZE(cxl_mem_commands), an array indexed by command id:
    the ids this kernel lacks (0, RAW without CONFIG_CXL_MEM_RAW_COMMANDS...) are zeroed."""
    arg = Arg(bytes(8))
    ioctl(fw, CXL_MEM_QUERY_COMMANDS, arg, User())
    (n,) = struct.unpack_from("<I", arg.buf)
    assert n == ID_MAX == 21
    arg = Arg(struct.pack("<II", n, 0) + bytes(16 * n))
    ioctl(fw, CXL_MEM_QUERY_COMMANDS, arg, User())
    infos = [struct.unpack_from("<IIii", arg.buf, 8 + 16 * i) for i in range(n)]
    assert infos[0] == infos[ID_RAW] == (0, 0, 0, 0)
    assert all(info[0] in (0, index) for index, info in enumerate(infos))
    enabled = {i[0] for i in infos if i[1] & 1}
    assert enabled == {ID_IDENTIFY, ID_GET_SUPPORTED_LOGS, ID_GET_PARTITION_INFO, ID_GET_LSA, ID_GET_HEALTH_INFO,
                       ID_GET_LOG, ID_SET_LSA}
    assert infos[ID_GET_LSA][2:] == (8, -1)
    # a short query fills only what it asked for
    arg = Arg(struct.pack("<II", 2, 0) + bytes(16 * 2) + b"\xaa" * 16)
    ioctl(fw, CXL_MEM_QUERY_COMMANDS, arg, User())
    assert arg.buf[-16:] == b"\xaa" * 16
    # commands the kernel claims (cxl_pmem holding the memdev's nvdimm) are flagged exclusive
    fw.exclusive_commands.update(NVDIMM_EXCLUSIVE_COMMANDS)
    arg = Arg(struct.pack("<II", n, 0) + bytes(16 * n))
    ioctl(fw, CXL_MEM_QUERY_COMMANDS, arg, User())
    assert struct.unpack_from("<II", arg.buf, 8 + 16 * ID_SET_LSA) == (ID_SET_LSA, 0b11)


def test_identify_partition_and_health_are_mem_c_s(fw: MockMemdevFirmware) -> None:
    user = User()
    out, arg = send(fw, user, ID_IDENTIFY, out_size=0x43)
    assert out[:16] == b"mock fw v1 \0\0\0\0\0"
    total, volatile, persistent, align = struct.unpack_from("<QQQQ", out, 16)
    assert (total, volatile, persistent, align) == (8, 0, 0, 1)  # in 256 MiB units
    assert struct.unpack_from("<I", out, 56)[0] == 128 << 10
    assert struct.unpack_from("<I", arg.buf, 12)[0] == 0  # retval
    out, _ = send(fw, user, ID_GET_PARTITION_INFO, out_size=0x20)
    assert struct.unpack("<QQQQ", out) == (4, 4, 0, 0)
    out, _ = send(fw, user, ID_GET_HEALTH_INFO, out_size=0x12)
    assert struct.unpack("<BBBBHIII", out) == (7, 3, 0x18, 15, 25, 10, 20, 30)


def test_the_cel_is_reachable_through_supported_logs(fw: MockMemdevFirmware) -> None:
    user = User()
    out, _ = send(fw, user, ID_GET_SUPPORTED_LOGS, out_size=4096)
    entries, log_uuid, size = struct.unpack_from("<H6x16sI", out)
    assert (entries, log_uuid, size) == (1, CEL_UUID.bytes, 24)
    out, _ = send(fw, user, ID_GET_LOG, CEL_UUID.bytes + struct.pack("<II", 0, 24), out_size=24)
    assert [struct.unpack_from("<HH", out, 4 * i)[0] for i in range(6)] == [
        0x0400, 0x4000, 0x4102, 0x4100, 0x4103, 0x4200]


def test_label_area_round_trip_bounded_by_the_struct_sizes(fw: MockMemdevFirmware) -> None:
    user = User()
    send(fw, user, ID_SET_LSA, struct.pack("<II", 4096, 0) + b"label data")
    out, _ = send(fw, user, ID_GET_LSA, struct.pack("<II", 4096, 10), out_size=10)
    assert out == b"label data"
    # reads and writes touched exactly in.size and out.size bytes at the payload pointers
    assert ("r", 0x10000, 8) in user.accessed and ("w", 0x80000, 10) in user.accessed
    # beyond the label area: EINVAL from the device, nothing written
    assert errno_of(lambda: send(fw, user, ID_GET_LSA, struct.pack("<II", (128 << 10) - 4, 8), out_size=8)) \
        == errno.EINVAL
    assert errno_of(lambda: send(fw, user, ID_SET_LSA, struct.pack("<II", (128 << 10) - 4, 0) + b"12345")) \
        == errno.EINVAL
    assert fw.lsa[(128 << 10) - 4:] == bytes(4)


def test_validation_as_mbox_c_does_it(fw: MockMemdevFirmware) -> None:
    user = User()
    assert errno_of(lambda: send(fw, user, 0)) == errno.ENOTTY
    assert errno_of(lambda: send(fw, user, 99)) == errno.ENOTTY
    assert errno_of(lambda: send(fw, user, ID_SET_PARTITION_INFO, bytes(10))) == errno.ENOTTY  # not in the CEL
    assert errno_of(lambda: send(fw, user, ID_GET_LSA, bytes(4), out_size=8)) == errno.ENOMEM  # size_in is 8
    assert errno_of(lambda: send(fw, user, ID_IDENTIFY, out_size=0x20)) == errno.ENOMEM  # room below 0x43
    assert errno_of(lambda: send(fw, user, ID_SET_LSA, bytes(8 + 4096))) == errno.EINVAL  # > payload_max
    # a payload pointer the caller cannot read: EFAULT, as copy_from_user() fails
    arg = Arg(struct.pack("<IIIIIIQIIQ", ID_GET_LSA, 0, 0, 0, 8, 0, 0xdead0000, 8, 0, 0x80000))
    user.map(0x80000, bytes(8))
    assert errno_of(lambda: ioctl(fw, CXL_MEM_SEND_COMMAND, arg, user)) == errno.EFAULT
    assert errno_of(lambda: ioctl(fw, 0x1234, Arg(bytes(8)), user)) == errno.ENOTTY


PAYLOAD_ROOM = 8192  # the fake caller's output buffer: larger than any answer may be


class Recording(Payloads):
    """The caller's buffers, declared with whatever sizes the struct says, counting what the
    daemon's side asks of them."""

    def __init__(self, arg: Arg, user: User) -> None:
        super().__init__(arg, user)
        self.asked: list[tuple[str, int]] = []

    def read_input(self, length: int) -> bytes:
        self.asked.append(("read", length))
        return super().read_input(length)

    def write_output(self, data: bytes) -> None:
        self.asked.append(("write", len(data)))
        super().write_output(data)


def raw_send(fw: MockMemdevFirmware, cmd_id: int, in_size: int, out_size: int, flags: int = 0,
             rsvd: int = 0) -> tuple[int | None, list[tuple[str, int]], Arg]:
    user = User()
    user.map(0x10000, struct.pack("<II", 0, 16))
    user.map(0x80000, bytes(PAYLOAD_ROOM))
    arg = Arg(struct.pack("<IIIIIIQIIQ", cmd_id, flags, rsvd, 0, in_size, 0, 0x10000, out_size, 0, 0x80000))
    before = bytes(arg.buf)
    payloads = Recording(arg, user)
    code = errno_of(lambda: memdev_ioctl(fw, CXL_MEM_SEND_COMMAND, arg, payloads))
    if code is not None:
        assert bytes(arg.buf) == before  # the struct is copied back on success only
    return code, payloads.asked, arg


def test_huge_sizes_get_the_kernels_errno_before_a_byte_is_asked_for(fw: MockMemdevFirmware) -> None:
    """The attacker is the client: sizes the kernel refuses are refused in its order and with
    its errno, before the input is read or any output room is taken."""
    assert raw_send(fw, 0, 0xFFFFFFFF, 0)[:2] == (errno.ENOTTY, [])  # the id first
    assert raw_send(fw, ID_MAX, 0xFFFFFFFF, 0)[:2] == (errno.ENOTTY, [])
    assert raw_send(fw, ID_SET_LSA, 0xFFFFFFFF, 0)[:2] == (errno.EINVAL, [])  # > payload_max
    assert raw_send(fw, ID_SET_LSA, 4097, 0)[:2] == (errno.EINVAL, [])
    assert raw_send(fw, ID_RAW, 8, 16)[:2] == (errno.EPERM, [])  # no CONFIG_CXL_MEM_RAW_COMMANDS
    assert raw_send(fw, ID_RAW, 8, 4097)[:2] == (errno.EINVAL, [])  # raw output checked first
    assert raw_send(fw, ID_RAW, 8, 16, rsvd=1 << 16)[:2] == (errno.EINVAL, [])  # raw.rsvd
    assert raw_send(fw, ID_GET_LSA, 8, 16, flags=1 << 1)[:2] == (errno.EINVAL, [])
    assert raw_send(fw, ID_GET_LSA, 4, 16)[:2] == (errno.ENOMEM, [])  # GET_LSA takes 8
    # out.size past INT_MAX: kvzalloc() refuses the bounce buffer after vmemdup_user()
    assert raw_send(fw, ID_GET_LSA, 8, 0x80000000)[:2] == (errno.ENOMEM, [("read", 8)])
    # 2 GiB - 1 or CXL_VARIABLE_PAYLOAD: at most payload_max bytes come back
    for out_size in (0x7FFFFFFF, 0xFFFFFFFF):
        code, asked, arg = raw_send(fw, ID_GET_LSA, 8, out_size)
        assert (code, asked) == (None, [("read", 8), ("write", 4096)])
        assert struct.unpack_from("<I", arg.buf, 32)[0] == 4096


def test_the_c_librarys_constants_are_the_models() -> None:
    """The preload library sizes QUERY_COMMANDS and SEND_COMMAND with its own copies of the
    kernel's numbers: one value each, on both sides (the wire's own: test_wire_constants.py)."""
    source = (Path(__file__).resolve().parents[2] / "vnvdimm/preload/vnvdimm_preload.c").read_text()
    defines = dict(re.findall(r"^#define (\w+) (0x[0-9a-f]+|\d+)u?\b", source, re.MULTILINE))
    assert int(defines["CXL_MEM_COMMAND_ID_MAX"], 0) == ID_MAX
    assert int(defines["CXL_MEM_QUERY_COMMANDS"], 0) == CXL_MEM_QUERY_COMMANDS
    assert int(defines["CXL_MEM_SEND_COMMAND"], 0) == CXL_MEM_SEND_COMMAND
    assert int(defines["CXL_SEND_SIZE"], 0) == SEND_COMMAND.size == 48
