"""/dev/cxl/memN's mailbox ioctls through the preload library, attacked from both ends.

CXL_MEM_SEND_COMMAND carries two user pointers (in.payload with in.size bytes, out.payload
with room for out.size bytes). The library offers the daemon exactly those two buffers and
the 48-byte struct, by index, never by address. As the attacker on the daemon's side (a fake
daemon on the mount's socket), a write or read outside them, the wrong way or twice is
refused and not a byte of the victim's memory changes. As the attacker on the client's side
(huge or inconsistent sizes, bad pointers, raw commands), the ioctl fails with the errno
mbox.c's cxl_validate_cmd_from_user() gives, and the daemon never asks for (so never holds)
bytes a refused size names. What is asserted is what the victim observes: errno, its memory,
what the fake daemon received."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import sys

import pytest
from mount_kit import WITH_VNVDIMM, have_ndctl, mounted
from reliability_kit import fake_daemon

from vnvdimm.ioctl import wire
from vnvdimm.model.cxl_mailbox import (
    CXL_MEM_QUERY_COMMANDS,
    CXL_MEM_SEND_COMMAND,
    ID_GET_LSA,
    ID_IDENTIFY,
    ID_MAX,
    ID_RAW,
    ID_SET_LSA,
    SEND_COMMAND,
)

pytestmark = pytest.mark.skipif(not have_ndctl(), reason="needs ndctl")

CXL_TEST = 'template = "cxl_test"\n[memmap]\nworkers = 1\n'
PAYLOAD_MAX = 4096  # the cxl_test memdevs' payload_max
LSA_SIZE = 128 << 10

# The victim: one ioctl on NODE with the struct, the input payload and the output buffer laid
# out in one mapping filled with a canary; reports the result, the struct and the output
# after, and whether any byte outside the struct and the output buffer changed. The payload
# pointers are the real buffers' unless the struct is given whole ("raw").
VICTIM = r"""
import ctypes, json, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
spec = json.loads(sys.argv[1])
fd = os.open(spec["node"], os.O_RDWR)
if spec.get("before"):
    subprocess.run(spec["before"], shell=True, check=True)
area = ctypes.create_string_buffer(b"\xa5" * 16384, 16384)
base = ctypes.addressof(area)
arg_at, in_at, out_at = 4096, 8192, 12288
payload_in = bytes.fromhex(spec.get("in", ""))
ctypes.memmove(base + in_at, payload_in, len(payload_in))
arg = bytes.fromhex(spec["arg"])
if spec.get("send"):
    f = spec["send"]
    in_ptr = f.get("in_ptr", base + in_at)
    out_ptr = f.get("out_ptr", base + out_at)
    arg = bytes.fromhex(spec["arg"]) if "arg" in f else arg
    import struct
    arg = struct.pack("<IIIIIIQIIQ", f["id"], f.get("flags", 0), f.get("rsvd", 0), 0xFFFF,
                      f.get("in_size", len(payload_in)), 0, in_ptr, f["out_size"], 0, out_ptr)
ctypes.memmove(base + arg_at, arg, len(arg))
ctypes.set_errno(0)
rc = libc.ioctl(fd, spec["request"], ctypes.c_void_p(base + arg_at))
err = ctypes.get_errno() if rc < 0 else 0
raw = area.raw
out_len = spec.get("out_len", 0)
untouched = raw[:arg_at] + raw[arg_at + len(arg):out_at] + raw[out_at + out_len:]
canary = bytearray(b"\xa5" * 16384)
canary[in_at:in_at + len(payload_in)] = payload_in
expected = bytes(canary[:arg_at] + canary[arg_at + len(arg):out_at] + canary[out_at + out_len:])
print(json.dumps({"rc": rc, "errno": err, "arg": raw[arg_at:arg_at + len(arg)].hex(),
                  "out": raw[out_at:out_at + out_len].hex(), "outside_intact": untouched == expected}))
"""


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VNVDIMM_MOUNT_DEV")}
    out["VNVDIMM_BLOCKDEVS"] = "0"
    return out


def victim(mnt, request: int, arg: bytes = b"", node: str = "/dev/cxl/mem0", **spec: object) -> dict[str, object]:  # type: ignore[no-untyped-def]
    doc = json.dumps({"node": node, "request": request, "arg": arg.hex(), **spec})
    res = subprocess.run([str(WITH_VNVDIMM), str(mnt.root), "--", sys.executable, "-c", VICTIM, doc],
                         capture_output=True, text=True, timeout=120, env=env())
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    out["stderr"] = res.stderr
    return out


def send(mnt, cmd_id: int, payload_in: bytes = b"", out_size: int = 0, out_len: int | None = None,  # type: ignore[no-untyped-def]
         **fields: int) -> dict[str, object]:
    """CXL_MEM_SEND_COMMAND with the real buffers (out_len bytes of room, out_size unless
    told) and any field of the struct overridden."""
    return victim(mnt, CXL_MEM_SEND_COMMAND, bytes(48), send={"id": cmd_id, "out_size": out_size, **fields},
                  out_len=out_size if out_len is None else out_len, **{"in": payload_in.hex()})


@pytest.fixture(scope="module")
def ct(request):  # type: ignore[no-untyped-def]
    """One cxl_test mount for the module (labels are read on mem0, written on mem5 only)."""
    with mounted(request, CXL_TEST) as m:
        yield m


def socket_of(mnt) -> str:  # type: ignore[no-untyped-def]
    return os.getxattr(mnt.dev / "cxl/mem0", "user.vnvdimm").decode().split()[4]


# ---------------------------------------------------------------- a fake daemon


def op(kind: int, region: int, offset: int, length: int, data: bytes | None = None) -> bytes:
    if kind == wire.OP_WRITE:
        return wire.OP.pack(kind, region, offset, length) + (data if data is not None else b"\x00" * length)
    return wire.OP.pack(kind, region, offset, length)


GET_LSA_IN = struct.pack("<II", 0, 16)  # offset 0, length 16
ATTACKS = {
    "write-past-out-size": [op(wire.OP_WRITE, 2, 8, 16)],
    "write-before-out": [op(wire.OP_WRITE, 2, 2**64 - 8, 16)],
    "write-into-the-input": [op(wire.OP_WRITE, 1, 0, 8)],
    "read-the-output": [op(wire.OP_READ, 2, 0, 16)],
    "read-past-in-size": [op(wire.OP_READ, 1, 0, 9)],
    "read-the-struct-again": [op(wire.OP_READ, 0, 0, 48)],
    "a-region-never-declared": [op(wire.OP_WRITE, 3, 0, 4)],
    "second-read": [op(wire.OP_READ, 1, 0, 8), op(wire.OP_READ, 1, 0, 8)],
    "second-write": [op(wire.OP_WRITE, 2, 0, 16, b"\x01" * 16), op(wire.OP_WRITE, 2, 0, 16)],
    "an-unknown-op": [op(1, 2, 0, 16)],
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_fake_daemon_cannot_reach_past_the_declared_buffers(ct, attack: str) -> None:  # type: ignore[no-untyped-def]
    """A GET_LSA of 16 bytes: the daemon may read the 8 input bytes once and write the 16
    bytes of output and the struct once each. Everything else is refused with EFAULT, said on
    stderr; no byte outside the struct and the output changes, the output only by a first,
    legitimate write; the daemon got the struct, the two sizes, and the input only if it
    asked for it legitimately."""
    ops = ATTACKS[attack]
    replies = b""

    def behave(conn: socket.socket) -> None:
        nonlocal replies
        for one in ops:
            conn.sendall(one)
            with contextlib.suppress(OSError):  # a legitimate op's status (and bytes)
                replies += conn.recv(4 + 8)

    with fake_daemon(socket_of(ct), behave) as received:
        out = send(ct, ID_GET_LSA, GET_LSA_IN, out_size=16)
    assert (out["rc"], out["errno"]) == (-1, errno.EFAULT)
    assert out["outside_intact"]
    assert "refused" in out["stderr"]  # type: ignore[operator]
    assert bytes.fromhex(str(out["out"])) == (b"\x01" * 16 if attack == "second-write" else b"\xa5" * 16)
    (sent,) = received
    header = wire.REQUEST.unpack(sent[:wire.REQUEST.size])
    assert header == (wire.MAGIC, 3, CXL_MEM_SEND_COMMAND, 2, 48, 48)  # 2 regions, the 48-byte struct
    rest = sent[wire.REQUEST.size:]
    assert [wire.REGION.unpack_from(rest, i * wire.REGION.size) for i in range(2)] == [
        (8, wire.REGION_READ, 0), (16, wire.REGION_WRITE, 0)]
    struct_sent = rest[2 * wire.REGION.size:2 * wire.REGION.size + 48]
    fields = SEND_COMMAND.unpack(struct_sent)
    assert (fields[0], fields[4], fields[7]) == (ID_GET_LSA, 8, 16)  # id, in.size, out.size
    after = replies + rest[2 * wire.REGION.size + 48:]
    if attack == "second-read":
        assert after == struct.pack("<I", 0) + GET_LSA_IN  # once, exactly in.size bytes
    else:
        assert after in (b"", struct.pack("<I", 0))  # at most the status of a first write


def test_the_daemon_reads_exactly_the_input_and_nothing_past_it(ct) -> None:  # type: ignore[no-untyped-def]
    """A daemon that asks for the whole input gets exactly in.size bytes of it, though the
    victim's buffer is followed by more readable memory (its canary)."""
    payload = struct.pack("<II", 4096, 0) + b"labels!" * 3
    replies: list[bytes] = []

    def behave(conn: socket.socket) -> None:
        conn.sendall(op(wire.OP_READ, 1, 0, len(payload)))
        replies.append(wire.recv_exact(conn, 4 + len(payload)))
        conn.sendall(wire.OP.pack(wire.OP_DONE, 0, 0, 0))

    with fake_daemon(socket_of(ct), behave) as received:
        out = send(ct, ID_SET_LSA, payload)
    assert (out["rc"], out["errno"]) == (0, 0)
    assert out["outside_intact"]
    assert replies == [struct.pack("<I", 0) + payload]
    (sent,) = received
    assert b"\xa5" not in sent  # not a byte of the canary after the input, then or later


# ---------------------------------------------------------------- the real daemon


def test_a_label_read_writes_exactly_the_output_and_the_struct(ct) -> None:  # type: ignore[no-untyped-def]
    out = send(ct, ID_GET_LSA, struct.pack("<II", 100, 16), out_size=16)
    assert (out["rc"], out["errno"]) == (0, 0)
    assert out["outside_intact"]
    assert bytes.fromhex(str(out["out"])) == bytes(16)  # mem.c's area starts zeroed
    fields = SEND_COMMAND.unpack(bytes.fromhex(str(out["arg"])))
    assert (fields[0], fields[3], fields[7]) == (ID_GET_LSA, 0, 16)  # id, retval, out.size


# (struct fields, errno): cxl_validate_cmd_from_user()'s checks in its order
REFUSALS = [
    pytest.param({"id": 0}, errno.ENOTTY, id="id-0"),
    pytest.param({"id": ID_MAX, "in_size": 0xFFFFFFFF}, errno.ENOTTY, id="id-max-before-the-size"),
    pytest.param({"id": ID_SET_LSA, "in_size": PAYLOAD_MAX + 1}, errno.EINVAL, id="input-past-payload-max"),
    pytest.param({"id": ID_SET_LSA, "in_size": 0xFFFFFFFF}, errno.EINVAL, id="input-of-4-GiB"),
    pytest.param({"id": ID_RAW}, errno.EPERM, id="raw-not-enabled"),
    pytest.param({"id": ID_RAW, "out_size": PAYLOAD_MAX + 1}, errno.EINVAL, id="raw-output-past-payload-max"),
    pytest.param({"id": ID_RAW, "rsvd": 1 << 16}, errno.EINVAL, id="raw-rsvd"),
    pytest.param({"id": ID_GET_LSA, "flags": 2}, errno.EINVAL, id="unknown-flag"),
    pytest.param({"id": ID_GET_LSA, "rsvd": 1}, errno.EINVAL, id="rsvd"),
    pytest.param({"id": 9}, errno.ENOTTY, id="set-partition-info-not-in-the-cel"),
    pytest.param({"id": 15}, errno.ENOTTY, id="an-id-this-kernel-lacks"),
    pytest.param({"id": ID_GET_LSA, "in_size": 4}, errno.ENOMEM, id="fixed-input-size"),
    pytest.param({"id": ID_IDENTIFY, "in_size": 0, "out_size": 0x42}, errno.ENOMEM, id="output-below-the-command"),
    pytest.param({"id": ID_GET_LSA, "out_size": 0x80000000}, errno.ENOMEM, id="output-past-int-max"),
    pytest.param({"id": ID_GET_LSA, "in_ptr": 16}, errno.EFAULT, id="input-pointer-unmapped"),
    pytest.param({"id": ID_GET_LSA, "out_ptr": 16}, errno.EFAULT, id="output-pointer-unmapped"),
    pytest.param({"id": ID_GET_LSA, "out_ptr": 2**64 - 8}, errno.EFAULT, id="output-wrapping-the-address-space"),
    pytest.param({"id": ID_GET_LSA, "in_size": 8, "out_size": 16, "payload_offset": LSA_SIZE - 8}, errno.EINVAL,
                 id="mock-refuses-past-the-label-area"),
]


@pytest.mark.parametrize(("fields", "code"), REFUSALS)
def test_bad_sizes_and_pointers_get_the_kernels_errno(ct, fields: dict[str, int], code: int) -> None:  # type: ignore[no-untyped-def]
    """Through the library, each refusal is the kernel's errno, and neither the struct nor the
    output buffer changes (the kernel copies them back only on success)."""
    fields = {"out_size": 16, **fields}
    offset = fields.pop("payload_offset", 0)
    out = send(ct, payload_in=struct.pack("<II", offset, 16), out_len=16, **{"cmd_id": fields.pop("id"), **fields})
    assert (out["rc"], out["errno"]) == (-1, code), out
    assert out["outside_intact"]
    assert bytes.fromhex(str(out["out"])) == b"\xa5" * 16
    assert bytes.fromhex(str(out["arg"]))[32:36] == struct.pack("<I", fields["out_size"])  # out.size as given


def raw_exchange(mnt, send_cmd: bytes, regions: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:  # type: ignore[no-untyped-def]
    """One SEND_COMMAND as a client that declares whatever it likes; the ops the daemon sent,
    answering each READ with zeros and each WRITE with success."""
    ops = []
    fd = os.open(mnt.dev / "cxl/mem0", os.O_RDWR)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(socket_of(mnt))
            wire.send_request(s, CXL_MEM_SEND_COMMAND, fd, send_cmd, regions=regions)
            while True:
                kind, region, offset, length = wire.OP.unpack(wire.recv_exact(s, wire.OP.size))
                ops.append((kind, region, offset, length))
                if kind == wire.OP_DONE:
                    return ops
                if kind == wire.OP_READ:
                    s.sendall(struct.pack("<I", 0) + bytes(length))
                else:
                    wire.recv_exact(s, length)
                    s.sendall(struct.pack("<I", 0))
    finally:
        os.close(fd)


def test_huge_sizes_are_refused_before_the_daemon_asks_for_a_byte(ct) -> None:  # type: ignore[no-untyped-def]
    """A client declaring 4 GiB of input, or room for 2 GiB of output: the daemon answers the
    kernel's errno without a READ (it never holds the input) and without a WRITE."""
    huge_in = SEND_COMMAND.pack(ID_SET_LSA, 0, 0, 0, 0xFFFFFFFF, 0, 0x1000, 0, 0, 0)
    ops = raw_exchange(ct, huge_in, [(0xFFFFFFFF, wire.REGION_READ), (0, wire.REGION_WRITE)])
    assert ops == [(wire.OP_DONE, 0, errno.EINVAL, 0)]
    huge_out = SEND_COMMAND.pack(ID_GET_LSA, 0, 0, 0, 8, 0, 0x1000, 0x80000000, 0, 0x2000)
    ops = raw_exchange(ct, huge_out, [(8, wire.REGION_READ), (0x80000000, wire.REGION_WRITE)])
    assert ops == [(wire.OP_READ, 1, 0, 8), (wire.OP_DONE, 0, errno.ENOMEM, 0)]  # vmemdup_user() comes first
    # CXL_VARIABLE_PAYLOAD as out.size: the payload size, no more
    variable = SEND_COMMAND.pack(ID_GET_LSA, 0, 0, 0, 8, 0, 0x1000, 0xFFFFFFFF, 0, 0x2000)
    ops = raw_exchange(ct, variable, [(8, wire.REGION_READ), (0xFFFFFFFF, wire.REGION_WRITE)])
    assert ops[1:] == [(wire.OP_WRITE, 2, 0, PAYLOAD_MAX), (wire.OP_WRITE, 0, 0, 48), (wire.OP_DONE, 0, 0, 0)]


def test_query_writes_at_most_the_kernels_table(ct) -> None:  # type: ignore[no-untyped-def]
    """n_commands = 0 returns the count alone; a larger n_commands than the table fills only
    the table's 21 entries; a smaller one only what it asked for."""
    count = victim(ct, CXL_MEM_QUERY_COMMANDS, bytes(8))
    assert (count["rc"], bytes.fromhex(str(count["arg"]))[:4]) == (0, struct.pack("<I", ID_MAX))
    assert count["outside_intact"]
    query = victim(ct, CXL_MEM_QUERY_COMMANDS, struct.pack("<II", 1000, 0) + b"\xa5" * (16 * ID_MAX + 16))
    after = bytes.fromhex(str(query["arg"]))
    assert after[8 + 16 * ID_MAX:] == b"\xa5" * 16  # nothing past the table
    assert struct.unpack_from("<I", after, 8 + 16 * ID_GET_LSA)[0] == ID_GET_LSA
    short = victim(ct, CXL_MEM_QUERY_COMMANDS, struct.pack("<II", 3, 0) + b"\xa5" * (16 * 4))
    assert bytes.fromhex(str(short["arg"]))[8 + 16 * 3:] == b"\xa5" * 16
    assert short["outside_intact"] and query["outside_intact"]


def test_an_unloaded_memdev_answers_enxio(tmp_path, make_mount) -> None:  # type: ignore[no-untyped-def]
    """`modprobe -r cxl_test` with /dev/cxl/mem0 open: cxl_memdev_ioctl() finds the memdev
    shut down and answers ENXIO, for any command."""
    m = make_mount(CXL_TEST)
    out = victim(m, CXL_MEM_QUERY_COMMANDS, bytes(8), before="modprobe -r cxl_test")
    assert (out["rc"], out["errno"]) == (-1, errno.ENXIO)
    assert out["outside_intact"]


def test_the_python_client_carries_both_payloads(ct) -> None:  # type: ignore[no-untyped-def]
    """wire.call() (tests' and tools' client) declares the two buffers as the library does: a
    SET_LSA then a GET_LSA of the same bytes, at the end of mem5's label area."""
    # SET_LSA is cxl_pmem's while it holds mem5's nvdimm (EBUSY): disable the memdev first
    res = ct.run("cxl", "disable-memdev", "--force", "mem5")
    assert res.returncode == 0, res.stderr
    data = os.urandom(40)
    payload_in = struct.pack("<II", LSA_SIZE - 40, 0) + data
    arg = bytearray(SEND_COMMAND.pack(ID_SET_LSA, 0, 0, 0, len(payload_in), 0, 0, 0, 0, 0))
    got = wire.call(socket_of(ct), ct.dev / "cxl/mem5", CXL_MEM_SEND_COMMAND, arg, payload_in=payload_in,
                    payload_out=bytearray())
    assert (got.ret, got.errno) == (0, 0)
    out = bytearray(40)
    arg = bytearray(SEND_COMMAND.pack(ID_GET_LSA, 0, 0, 0, 8, 0, 0, 40, 0, 0))
    got = wire.call(socket_of(ct), ct.dev / "cxl/mem5", CXL_MEM_SEND_COMMAND, arg,
                    payload_in=struct.pack("<II", LSA_SIZE - 40, 40), payload_out=out)
    assert (got.ret, got.errno, bytes(out)) == (0, 0, data)
    assert SEND_COMMAND.unpack(arg)[7] == 40  # out.size
