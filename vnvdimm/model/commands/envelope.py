"""The ioctl envelope of /dev/ndctlN and /dev/nmemN (drivers/nvdimm/bus.c, __nd_ioctl()).

The kernel never trusts the size in the ioctl number: it sizes the buffer field by field from
its command descriptors (nd_cmd_in_size() / nd_cmd_out_size()), copying only the first
ND_CMD_MAX_ENVELOPE bytes to learn the variable sizes, then copies the whole buffer, lets the
bus provider answer it under the bus lock, and copies it back. This module does the same
against `UserMemory`, the caller's memory as the transport reaches it (a bad address there is
EFAULT, exactly where copy_from_user() would fail).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

ND_CMD_MAX_ENVELOPE = 256
ND_IOCTL_MAX_BUFLEN = 4 << 20
UINT_MAX = 0xFFFFFFFF

# uapi/linux/ndctl.h
ND_CMD_ARS_CAP, ND_CMD_ARS_START, ND_CMD_ARS_STATUS, ND_CMD_CLEAR_ERROR = 1, 2, 3, 4
ND_CMD_SMART, ND_CMD_SMART_THRESHOLD, ND_CMD_DIMM_FLAGS = 1, 2, 3
ND_CMD_GET_CONFIG_SIZE, ND_CMD_GET_CONFIG_DATA, ND_CMD_SET_CONFIG_DATA = 4, 5, 6
ND_CMD_VENDOR_EFFECT_LOG_SIZE, ND_CMD_VENDOR_EFFECT_LOG, ND_CMD_VENDOR = 7, 8, 9
ND_CMD_CALL = 10
ND_CMD_PKG_SIZE = 64  # struct nd_cmd_pkg without its payload

NVDIMM_FAMILY_MAX = 5  # NVDIMM_FAMILY_PAPR
NVDIMM_BUS_FAMILY_MAX = 1  # NVDIMM_BUS_FAMILY_INTEL

BUS_COMMAND_NAMES = {ND_CMD_ARS_CAP: "ars_cap", ND_CMD_ARS_START: "ars_start", ND_CMD_ARS_STATUS: "ars_status",
                     ND_CMD_CLEAR_ERROR: "clear_error", ND_CMD_CALL: "cmd_call"}
DIMM_COMMAND_NAMES = {ND_CMD_SMART: "smart", ND_CMD_SMART_THRESHOLD: "smart_thresh", ND_CMD_DIMM_FLAGS: "flags",
                      ND_CMD_GET_CONFIG_SIZE: "get_size", ND_CMD_GET_CONFIG_DATA: "get_data",
                      ND_CMD_SET_CONFIG_DATA: "set_data", ND_CMD_VENDOR_EFFECT_LOG_SIZE: "effect_size",
                      ND_CMD_VENDOR_EFFECT_LOG: "effect_log", ND_CMD_VENDOR: "vendor", ND_CMD_CALL: "cmd_call"}

# Commands a read-only open (O_RDONLY) may not send: they change something.
WRITE_COMMANDS = frozenset({ND_CMD_VENDOR, ND_CMD_SET_CONFIG_DATA, ND_CMD_ARS_START, ND_CMD_CLEAR_ERROR, ND_CMD_CALL})


@dataclass(frozen=True)
class CmdDesc:
    """struct nd_cmd_desc: the field sizes of a command's input and output, UINT_MAX where
    the size comes from an earlier field."""

    in_sizes: tuple[int, ...] = ()
    out_sizes: tuple[int, ...] = ()


_CALL = CmdDesc((ND_CMD_PKG_SIZE, UINT_MAX), (UINT_MAX,))
DIMM_DESCS: dict[int, CmdDesc] = {
    0: CmdDesc(),
    ND_CMD_SMART: CmdDesc((), (4, 128)),
    ND_CMD_SMART_THRESHOLD: CmdDesc((), (4, 8)),
    ND_CMD_DIMM_FLAGS: CmdDesc((), (4, 4)),
    ND_CMD_GET_CONFIG_SIZE: CmdDesc((), (4, 4, 4)),
    ND_CMD_GET_CONFIG_DATA: CmdDesc((4, 4), (4, UINT_MAX)),
    ND_CMD_SET_CONFIG_DATA: CmdDesc((4, 4, UINT_MAX), (4,)),
    ND_CMD_VENDOR_EFFECT_LOG_SIZE: CmdDesc(),
    ND_CMD_VENDOR_EFFECT_LOG: CmdDesc(),
    ND_CMD_VENDOR: CmdDesc((4, 4, UINT_MAX), (4, 4, UINT_MAX)),
    ND_CMD_CALL: _CALL,
}
BUS_DESCS: dict[int, CmdDesc] = {
    0: CmdDesc(),
    ND_CMD_ARS_CAP: CmdDesc((8, 8), (4, 4, 4, 4)),
    ND_CMD_ARS_START: CmdDesc((8, 8, 2, 1, 5), (4, 4)),
    ND_CMD_ARS_STATUS: CmdDesc((), (4, 4, UINT_MAX)),
    ND_CMD_CLEAR_ERROR: CmdDesc((8, 8), (4, 4, 8)),
    ND_CMD_CALL: _CALL,
}


class UserMemory(Protocol):
    """The ioctl argument's memory. Both raise OSError(EFAULT) for an address that is not
    readable (writable) by the caller."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


def _u32(buf: bytes | bytearray, offset: int) -> int:
    return struct.unpack_from("<I", buf, offset)[0] if len(buf) >= offset + 4 else 0


def in_size(dimm: bool, cmd: int, desc: CmdDesc, idx: int, in_env: bytearray) -> int:
    """nd_cmd_in_size()"""
    if idx >= len(desc.in_sizes):
        return UINT_MAX
    if desc.in_sizes[idx] < UINT_MAX:
        return desc.in_sizes[idx]
    if dimm and cmd in (ND_CMD_SET_CONFIG_DATA, ND_CMD_VENDOR) and idx == 2:
        return _u32(in_env, 4)  # hdr->in_length
    if cmd == ND_CMD_CALL:
        return _u32(in_env, 16)  # pkg->nd_size_in
    return UINT_MAX


def out_size(dimm: bool, cmd: int, desc: CmdDesc, idx: int, in_env: bytearray, out_env: bytearray,
             remainder: int = 0) -> int:
    """nd_cmd_out_size(), with its u32 arithmetic"""
    if idx >= len(desc.out_sizes):
        return UINT_MAX
    if desc.out_sizes[idx] < UINT_MAX:
        return desc.out_sizes[idx]
    if dimm and cmd == ND_CMD_GET_CONFIG_DATA and idx == 1:
        return _u32(in_env, 4)
    if dimm and cmd == ND_CMD_VENDOR and idx == 2:
        return _u32(out_env, 4)
    if not dimm and cmd == ND_CMD_ARS_STATUS and idx == 2:
        out_length = _u32(out_env, 4)
        if out_length < 4:
            return 0
        if out_length - 4 == remainder:
            return remainder
        return (out_length - 8) & UINT_MAX
    if cmd == ND_CMD_CALL:
        return _u32(in_env, 20)  # pkg->nd_size_out
    return UINT_MAX


class CommandError(OSError):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(code, f"{errno.errorcode.get(code, code)}: {why}")


def _copy_envelope(user: UserMemory, env: bytearray, at: int, size: int) -> None:
    """One field's worth of the envelope: at most its first ND_CMD_MAX_ENVELOPE bytes."""
    if at >= ND_CMD_MAX_ENVELOPE:
        return
    copy = min(ND_CMD_MAX_ENVELOPE - at, size)
    if copy:
        env[at:at + copy] = user.read(at, copy)


@dataclass
class Request:
    """What __nd_ioctl() hands the bus provider: the command, the function behind it (the
    nd_command of an ND_CMD_CALL), the copied buffer, and the package family."""

    cmd: int
    func: int
    buf: bytearray
    family: int | None = None


class Target(Protocol):
    """A bus or a DIMM as the envelope needs it."""

    is_dimm: bool

    def cmd_mask(self) -> int: ...

    def family_mask(self) -> int: ...


def nd_ioctl(target: Target, read_only: bool, ioctl_cmd: int, user: UserMemory,
             answer: Callable[[Request], int]) -> int:
    """__nd_ioctl(): validate, size and copy the buffer, `answer` it, copy it back. Returns
    the ioctl's return value; raises CommandError with the kernel's errno."""
    cmd = ioctl_cmd & 0xFF  # _IOC_NR(): the kernel looks at nothing else of the number
    dimm = target.is_dimm
    family = None
    if cmd == ND_CMD_CALL:
        pkg = user.read(0, ND_CMD_PKG_SIZE)
        family = struct.unpack_from("<Q", pkg, 0)[0]
        if family > (NVDIMM_FAMILY_MAX if dimm else NVDIMM_BUS_FAMILY_MAX):
            raise CommandError(errno.EINVAL, f"family {family} out of range")
        if not target.family_mask() >> family & 1:
            raise CommandError(errno.EINVAL, f"family {family} not supported")
    desc = (DIMM_DESCS if dimm else BUS_DESCS).get(cmd)
    if desc is None or not (desc.in_sizes or desc.out_sizes) or cmd > ND_CMD_CALL or \
            not target.cmd_mask() >> cmd & 1:
        raise CommandError(errno.ENOTTY, f"command {cmd} not supported")
    if read_only and cmd in WRITE_COMMANDS:
        raise CommandError(errno.EPERM, f"command {cmd} on a read-only open")

    # in_len and out_len are u32 in the kernel: an nd_size_in of 0xFFFFFFC0 wraps in_len back
    # to 0, and the output envelope is then read from the start of the argument, not 4 GiB on
    in_env = bytearray(ND_CMD_MAX_ENVELOPE)
    in_len = 0
    for i in range(len(desc.in_sizes)):
        size = in_size(dimm, cmd, desc, i, in_env)
        if size == UINT_MAX:
            raise CommandError(errno.ENXIO, f"unknown input size, field {i}")
        _copy_envelope(user, in_env, in_len, size)
        in_len = (in_len + size) & UINT_MAX
    func = struct.unpack_from("<Q", in_env, 8)[0] if cmd == ND_CMD_CALL else cmd

    out_env = bytearray(ND_CMD_MAX_ENVELOPE)
    out_len = 0
    for i in range(len(desc.out_sizes)):
        size = out_size(dimm, cmd, desc, i, in_env, out_env)
        if size == UINT_MAX:
            raise CommandError(errno.EFAULT, f"unknown output size, field {i}")
        if out_len < ND_CMD_MAX_ENVELOPE:
            copy = min(ND_CMD_MAX_ENVELOPE - out_len, size)
            if copy:
                out_env[out_len:out_len + copy] = user.read(in_len + out_len, copy)
        out_len = (out_len + size) & UINT_MAX

    buf_len = in_len + out_len
    if buf_len > ND_IOCTL_MAX_BUFLEN:
        raise CommandError(errno.EINVAL, f"buffer of {buf_len} bytes")
    buf = bytearray(user.read(0, buf_len))
    rc = answer(Request(cmd, func, buf, family))
    user.write(0, bytes(buf))
    return rc
