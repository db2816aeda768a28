"""Malformed ioctls against a real mount: through the daemon's socket (the wire protocol,
including clients that speak garbage, vanish or stall) and through the preload library (a
ctypes caller with buffers that end at an unmapped page). Every call gets one of the
kernel's errno; the daemon keeps answering."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mount_kit import WITH_VNVDIMM, have_ndctl, mounted
from topologies import SMALL_NFIT

from vnvdimm.ioctl import wire

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]


ALLOWED = {0, errno.ENOTTY, errno.EINVAL, errno.ENXIO, errno.EFAULT, errno.EPERM, errno.EBUSY, errno.EIO,
           errno.EOPNOTSUPP, errno.EBADF}
CALL = 3 << 30 | 64 << 16 | ord("N") << 8 | 10


@pytest.fixture(scope="module")
def fuzz_mnt(request):  # type: ignore[no-untyped-def]
    with mounted(request, SMALL_NFIT) as m:
        yield m


def socket_of(mnt) -> str:  # type: ignore[no-untyped-def]
    return os.getxattr(mnt.dev / "ndctl0", "user.vnvdimm").decode().split()[4]


def tmp_outside(mnt) -> str:  # type: ignore[no-untyped-def]
    path = mnt.root.parent / "outside"
    path.touch()
    return str(path)


def smart_package() -> bytearray:
    return bytearray(struct.pack("<QQII36xI", 0, 1, 0, 132, 0) + bytes(132))


def assert_answers(path: str, mnt) -> None:  # type: ignore[no-untyped-def]
    """The daemon is alive and right: a SMART of nmem0 reports nfit_test's 75 % spares."""
    buf = smart_package()
    assert wire.call(path, mnt.dev / "nmem0", CALL, buf, timeout=30) == wire.Result(0, 0)
    assert buf[64 + 4 + 9] == 75


requests = st.one_of(
    st.integers(0, 2**32 - 1),
    st.builds(lambda d, s, n: d << 30 | s << 16 | ord("N") << 8 | n, st.integers(0, 3), st.integers(0, 0x3FFF),
              st.integers(0, 12)),
    st.sampled_from([0x80081272, 0x1260, 0x1268, 0x127B, 0x125E, 0x5401]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["dev/ndctl0", "dev/nmem0", "dev/nmem1", "dev/pmem0",
                             "sys/bus/nd/devices/ndbus0/provider", "outside"]),
       request_nr=requests, accmode=st.sampled_from([0, 1, 2, 3]), data=st.binary(max_size=400),
       family=st.integers(0, 7), func=st.integers(0, 40), sizes=st.tuples(st.integers(0, 5000), st.integers(0, 5000)))
def test_socket_fuzz(fuzz_mnt, name: str, request_nr: int, accmode: int, data: bytes, family: int,  # type: ignore[no-untyped-def]
                     func: int, sizes: tuple[int, int]) -> None:
    buf = bytearray(data)
    if request_nr & 0xFF == 10 and len(buf) >= 24:
        struct.pack_into("<QQII", buf, 0, family, func, *sizes)
    # "outside": a file of another file system, which the daemon must not take for a node
    node = tmp_outside(fuzz_mnt) if name == "outside" else fuzz_mnt.root / name
    if not name.startswith("dev/"):
        accmode = os.O_RDONLY
    result = wire.call(socket_of(fuzz_mnt), node, request_nr, buf, accmode, timeout=30)
    assert result.errno in ALLOWED, result


def test_garbage_clients_cost_only_their_connection(fuzz_mnt) -> None:  # type: ignore[no-untyped-def]
    path = socket_of(fuzz_mnt)
    header = wire.REQUEST.pack(wire.MAGIC, wire.VERSION, CALL, 0, 196, 196)
    for junk in (b"", b"\xff" * 7, os.urandom(wire.REQUEST.size), wire.REQUEST.pack(1, 2, 3, 4, 5, 6),
                 header, header + b"\x01\x00\x00"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(30)
            # the daemon may close with bytes of ours unread: a reset, not an answer
            with contextlib.suppress(ConnectionResetError):
                while s.recv(4096):
                    pass
    assert_answers(path, fuzz_mnt)


def test_a_stalled_client_blocks_nobody(fuzz_mnt) -> None:  # type: ignore[no-untyped-def]
    path = socket_of(fuzz_mnt)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stalled.connect(path)
        node = os.open(fuzz_mnt.dev / "nmem0", os.O_RDWR)
        try:
            # a request that promises the package and never sends it: the daemon waits for it
            stalled.sendmsg([wire.REQUEST.pack(wire.MAGIC, wire.VERSION, CALL, 0, 196, 196)],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", node))])
        finally:
            os.close(node)
        done = threading.Event()
        threading.Thread(target=lambda: (assert_answers(path, fuzz_mnt), done.set()), daemon=True).start()
        assert done.wait(30), "an ioctl waited for a stalled client"
    finally:
        stalled.close()
    assert_answers(path, fuzz_mnt)


CALLER = r"""
import ctypes, ctypes.util, errno, json, mmap, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
PAGE = 4096
out = []
for case in json.load(sys.stdin):
    fd = os.open(case["node"], os.O_RDWR if case["rw"] else os.O_RDONLY)
    data = bytes.fromhex(case["data"])
    pages = (len(data) + PAGE - 1) // PAGE + 1
    base = libc.mmap(None, pages * PAGE, 3, 0x22, -1, 0)
    guard = base + (pages - 1) * PAGE
    libc.mprotect(ctypes.c_void_p(guard), PAGE, 0)  # the buffer ends where memory ends
    ptr = guard - len(data)
    ctypes.memmove(ptr, data, len(data))
    ctypes.set_errno(0)
    rc = libc.ioctl(fd, case["request"], ctypes.c_void_p(ptr if case["pointer"] else 0))
    err = ctypes.get_errno() if rc < 0 else 0
    out.append({"rc": rc, "errno": err, "after": ctypes.string_at(ptr, len(data)).hex()})
    libc.munmap(ctypes.c_void_p(base), pages * PAGE)
    os.close(fd)
print(json.dumps(out))
"""


def run_caller(mnt, cases: list[dict[str, object]]) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    res = subprocess.run([str(WITH_VNVDIMM), str(mnt.root), "--", sys.executable, "-c", CALLER],
                         input=json.dumps(cases), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def test_preload_library_forwards_ioctls_as_the_kernel_sizes_them(fuzz_mnt) -> None:  # type: ignore[no-untyped-def]
    smart = smart_package()
    ars_cap = 3 << 30 | 32 << 16 | ord("N") << 8 | 1
    cases = [
        {"node": "/dev/nmem0", "request": CALL, "data": smart.hex(), "rw": True, "pointer": True},
        {"node": "/dev/nmem0", "request": CALL, "data": smart[:-1].hex(), "rw": True, "pointer": True},
        {"node": "/dev/nmem0", "request": CALL, "data": smart.hex(), "rw": False, "pointer": True},
        {"node": "/dev/nmem0", "request": CALL, "data": smart.hex(), "rw": True, "pointer": False},
        {"node": "/dev/ndctl0", "request": ars_cap, "data": bytes(32).hex(), "rw": True, "pointer": True},
        {"node": "/dev/ndctl0", "request": ars_cap, "data": bytes(31).hex(), "rw": True, "pointer": True},
        {"node": "/dev/pmem0", "request": 0x80081272, "data": bytes(8).hex(), "rw": False, "pointer": True},
        {"node": "/dev/nmem0", "request": 3 << 30 | 8 << 16 | ord("N") << 8 | 9, "data": bytes(64).hex(),
         "rw": True, "pointer": True},
    ]
    got = run_caller(fuzz_mnt, cases)
    assert [(r["rc"], r["errno"]) for r in got] == [
        (0, 0), (-1, errno.EFAULT), (-1, errno.EPERM), (-1, errno.EFAULT), (0, 0), (-1, errno.EFAULT), (0, 0),
        (-1, errno.ENOTTY)]
    answer = bytes.fromhex(got[0]["after"])  # type: ignore[arg-type]
    assert answer[64 + 4 + 9] == 75 and answer[64 + 4 + 12:64 + 4 + 14] == struct.pack("<H", 23 * 16)
    status, _, clear_unit = struct.unpack_from("<III", bytes.fromhex(got[4]["after"]), 16)  # type: ignore[arg-type]
    assert (status >> 16, clear_unit) == (3, 256)
    size = int((fuzz_mnt.sys / "block/pmem0/size").read_text()) * 512
    assert struct.unpack("<Q", bytes.fromhex(got[6]["after"])) == (size,)  # type: ignore[arg-type]


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.fixed_dictionaries({
    "node": st.sampled_from(["/dev/ndctl0", "/dev/nmem0", "/dev/nmem1", "/dev/pmem0"]),
    "request": requests, "data": st.binary(max_size=300).map(bytes.hex), "rw": st.booleans(),
    "pointer": st.booleans()}), min_size=20, max_size=40))
def test_preload_fuzz(fuzz_mnt, cases: list[dict[str, object]]) -> None:  # type: ignore[no-untyped-def]
    for r in run_caller(fuzz_mnt, cases):
        assert r["errno"] in ALLOWED, r
    assert_answers(socket_of(fuzz_mnt), fuzz_mnt)
