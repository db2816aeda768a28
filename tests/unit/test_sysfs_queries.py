"""Which ioctls leave every sysfs value as it was (vnvdimm.model.commands.dispatch.is_query):
the /sys connection keeps its cached values across those only, and the helper that
with-vnvdimm runs without the package speaks the ioctl wire's protocol."""

from __future__ import annotations

import struct

import pytest

from vnvdimm.fuse.ops import NODE_XATTR
from vnvdimm.ioctl import wire
from vnvdimm.model.commands.dispatch import is_query
from vnvdimm.scripts import sysfs_attach as attach


def nd_ioctl(command: int) -> int:
    return 0xC000_4E00 | command  # _IOWR('N', command, ...): the size bits do not matter here


def call_pkg(family: int, function: int) -> bytes:
    return struct.pack("<QQ", family, function) + bytes(48)


@pytest.mark.parametrize(("name", "request_number", "arg", "query"), [
    ("nmem0", nd_ioctl(1), b"", True),  # ND_CMD_SMART
    ("nmem0", nd_ioctl(3), b"", True),  # ND_CMD_DIMM_FLAGS
    ("nmem0", nd_ioctl(4), b"", True),  # ND_CMD_GET_CONFIG_SIZE
    ("nmem0", nd_ioctl(5), b"", True),  # ND_CMD_GET_CONFIG_DATA
    ("nmem0", nd_ioctl(6), b"", False),  # ND_CMD_SET_CONFIG_DATA: labels
    ("nmem0", nd_ioctl(10), call_pkg(0, 1), True),  # Intel SMART
    ("nmem0", nd_ioctl(10), call_pkg(0, 18), False),  # Intel SMART_INJECT
    ("nmem0", nd_ioctl(10), call_pkg(0, 22), False),  # Intel UNLOCK_UNIT
    ("nmem0", nd_ioctl(10), call_pkg(1, 1), False),  # another family: not known to be a query
    ("nmem0", nd_ioctl(10), b"\0" * 8, False),  # a package too short to tell
    ("ndctl0", nd_ioctl(1), b"", True),  # ND_CMD_ARS_CAP
    ("ndctl0", nd_ioctl(2), b"", False),  # ND_CMD_ARS_START
    ("ndctl0", nd_ioctl(4), b"", False),  # ND_CMD_CLEAR_ERROR
    ("pmem0", 0x8008_1272, b"", False),  # BLKGETSIZE64: not an nd ioctl
])
def test_only_queries_keep_cached_values(name: str, request_number: int, arg: bytes, query: bool) -> None:
    assert is_query(name, request_number, arg) is query


def test_the_attach_helper_speaks_the_wire_protocol() -> None:
    assert (attach.NODE_XATTR, attach.MAGIC, attach.VERSION, attach.ATTACH_SYSFS, attach.OP_DONE) == \
        (NODE_XATTR, wire.MAGIC, wire.VERSION, wire.ATTACH_SYSFS, wire.OP_DONE)
    assert (attach.REQUEST.format, attach.OP.format, attach.UCRED.format) == \
        (wire.REQUEST.format, wire.OP.format, wire.UCRED.format)
