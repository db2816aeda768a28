"""The preload library and the ioctl channel, attacked as a user of the same host would.

Each test plays the attacker: a forged `user.vnvdimm` attribute with a listening socket, a
fake daemon on the mount's socket that asks for more than the argument, a daemon run by
someone else, a client that lies about its access mode or stalls mid-ioctl, a connection
flood with the daemon out of descriptors, envelope sizes that wrap. What is asserted is what
the victim observes: errno, its memory, what the attacker's socket received, whether the
mount keeps answering."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mount_kit import WITH_VNVDIMM, have_ndctl, wait_for
from reliability_kit import fake_daemon
from topologies import SMALL_NFIT

from vnvdimm.ioctl import wire
from vnvdimm.preload import library_path

pytestmark = pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")

CALL = 3 << 30 | 64 << 16 | ord("N") << 8 | 10  # ND_IOCTL_CALL
ARS_START = 3 << 30 | 32 << 16 | ord("N") << 8 | 2  # ND_IOCTL_ARS_START: nd_cmd_ars_start is 32 bytes
SET_CONFIG_DATA = 3 << 30 | 8 << 16 | ord("N") << 8 | 6
BLKGETSIZE64 = 0x80081272
SMART_SIZE = 64 + 4 + 128  # nd_cmd_pkg + the Intel SMART payload


def smart_package(size_in: int = 0, size_out: int = 132) -> bytes:
    """ND_CMD_CALL of the Intel family's SMART (function 1)."""
    return struct.pack("<QQII40x", 0, 1, size_in, size_out) + bytes(132)


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VNVDIMM_MOUNT_DEV")}
    out["VNVDIMM_BLOCKDEVS"] = "0"  # the library's /dev/pmemN, not loop devices
    out.update(extra)
    return out


def in_mount(mnt, code: str, *args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """Python code run under with-vnvdimm MNT (the preload library loaded, MNT trusted)."""
    return subprocess.run([str(WITH_VNVDIMM), str(mnt.root), "--", sys.executable, "-c", code, *args],
                          capture_output=True, text=True, timeout=timeout, env=env(**extra))


# The victim: an ioctl on NODE whose argument sits in the middle of a mapping filled with a
# canary; reports the result and whether any byte outside the argument changed.
VICTIM = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
node, request, data, flags = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), int(sys.argv[4])
fd = os.open(node, flags)
area = ctypes.create_string_buffer(b"\xa5" * 12288, 12288)
at = 4096
ctypes.memmove(ctypes.addressof(area) + at, data, len(data))
ctypes.set_errno(0)
rc = libc.ioctl(fd, request, ctypes.c_void_p(ctypes.addressof(area) + at))
err = ctypes.get_errno() if rc < 0 else 0
raw = area.raw
outside = raw[:at] + raw[at + len(data):]
print(json.dumps({"rc": rc, "errno": err, "after": raw[at:at + len(data)].hex(),
                  "outside_intact": outside == b"\xa5" * len(outside)}))
"""


def victim(mnt, node: str, request: int, data: bytes, flags: int = os.O_RDWR, **extra: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    res = in_mount(mnt, VICTIM, node, str(request), data.hex(), str(flags), **extra)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    out["stderr"] = res.stderr
    return out  # type: ignore[no-any-return]


@pytest.fixture
def nfit(make_mount):  # type: ignore[no-untyped-def]
    return make_mount(SMALL_NFIT)


def socket_of(mnt) -> str:  # type: ignore[no-untyped-def]
    return os.getxattr(mnt.dev / "nmem0", "user.vnvdimm").decode().split()[4]


# ---------------------------------------------------------------- a forged attribute


@pytest.mark.parametrize("where", ["dev-shm", "tmp"])
def test_a_forged_attribute_outside_the_mount_gets_nothing(mnt, tmp_path: Path, where: str) -> None:  # type: ignore[no-untyped-def]
    """The issue's attack: a user's file (tmpfs /dev/shm, or ext4) carries the attribute and
    names the user's socket; root runs `lsattr FILE` and `stat FILE` under with-vnvdimm. They
    answer as without the library, and the socket is never even connected to."""
    base = Path("/dev/shm") if where == "dev-shm" else tmp_path
    forged = base / f"vnvdimm-forged-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(tmp_path / "attacker.sock"))
        listener.listen(8)
        listener.setblocking(False)
        forged.write_bytes(b"")
        try:
            os.setxattr(forged, "user.vnvdimm", f"b 259:0 pmem0 0 {tmp_path / 'attacker.sock'}".encode())
        except OSError as e:
            pytest.skip(f"{base} takes no user xattrs here: {e.strerror}")
        probe = f"lsattr {forged}; echo rc=$?; stat -c %F {forged}"
        under = subprocess.run([str(WITH_VNVDIMM), str(mnt.root), "--", "sh", "-c", probe],
                               capture_output=True, text=True, timeout=60, env=env())
        plain = subprocess.run(["sh", "-c", probe], capture_output=True, text=True, timeout=60, env=env())
        assert (under.stdout, under.stderr) == (plain.stdout, plain.stderr)
        assert under.stdout.splitlines()[-1] == "regular empty file"
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()
        forged.unlink(missing_ok=True)


def test_the_library_trusts_only_the_mount_it_was_given(mnt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Without VNVDIMM_MOUNT_DEV, or with one that names another file system, the mount's own
    nodes are plain files: the environment narrows what is trusted, never widens it."""
    node = str(mnt.dev / "ndctl0")
    code = "import os, stat, sys; print(stat.S_ISCHR(os.stat(sys.argv[1]).st_mode))"
    own = os.stat(mnt.dev)
    other = os.stat(tmp_path)

    def chardev(**extra: str) -> str:
        res = subprocess.run([sys.executable, "-c", code, node], capture_output=True, text=True, timeout=60,
                             env=env(LD_PRELOAD=str(library_path()), **extra))
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    assert chardev(VNVDIMM_MOUNT_DEV=f"{os.major(own.st_dev)}:{os.minor(own.st_dev)}") == "True"  # control
    assert chardev() == "False"
    assert chardev(VNVDIMM_MOUNT_DEV=f"{os.major(other.st_dev)}:{os.minor(other.st_dev)}") == "False"
    assert chardev(VNVDIMM_MOUNT_DEV=f"{os.major(own.st_dev)}:{os.minor(own.st_dev)}junk") == "False"


# ---------------------------------------------------------------- a fake daemon


def write_op(offset: int, data: bytes) -> bytes:
    return wire.OP.pack(wire.OP_WRITE, 0, offset, len(data)) + data


@pytest.mark.parametrize("attack", ["past-the-end", "before-the-start", "second-write", "read-op"])
def test_a_fake_daemon_cannot_reach_past_the_argument(nfit, attack: str) -> None:  # type: ignore[no-untyped-def]
    """The daemon's socket is the attacker's: it asks to write beyond the 196 bytes of a
    SMART call, before them, twice, or to read (an op that no longer exists). The library
    refuses (EFAULT), says so on stderr, and not a byte outside the argument changes; what
    the attacker received is exactly the argument, nothing more."""
    ops = {
        "past-the-end": write_op(SMART_SIZE - 4, b"\x00" * 8),
        "before-the-start": write_op(2**64 - 8, b"\x00" * 8),
        "second-write": write_op(0, b"\x01" * 4) + write_op(4, b"\x01" * 4),
        "read-op": struct.pack("<IIQQ", 1, 0, SMART_SIZE, 4096),
    }[attack]

    def behave(conn: socket.socket) -> None:
        conn.sendall(ops)
        with contextlib.suppress(OSError):  # the status of a first, legitimate write
            conn.recv(4)

    package = smart_package()
    with fake_daemon(socket_of(nfit), behave) as received:
        out = victim(nfit, "/dev/nmem0", CALL, package)
    assert (out["rc"], out["errno"]) == (-1, errno.EFAULT)
    assert out["outside_intact"]
    assert "refused" in out["stderr"]  # type: ignore[operator]
    (sent,) = received
    header = wire.REQUEST.unpack(sent[:wire.REQUEST.size])
    assert header[4:] == (SMART_SIZE, SMART_SIZE)  # window, readable: the kernel's size
    assert sent[wire.REQUEST.size:wire.REQUEST.size + SMART_SIZE] == package
    assert len(sent) <= wire.REQUEST.size + SMART_SIZE + 4  # at most the status of a first write


def test_a_silent_daemon_costs_a_timeout_not_a_hang(nfit) -> None:  # type: ignore[no-untyped-def]
    with fake_daemon(socket_of(nfit), lambda conn: time.sleep(5)):
        out = victim(nfit, "/dev/nmem0", CALL, smart_package(), VNVDIMM_IOCTL_TIMEOUT_MS="1000")
    assert (out["rc"], out["errno"]) == (-1, errno.EIO)
    assert "did not answer an ioctl in time" in out["stderr"]  # type: ignore[operator]
    assert out["outside_intact"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to serve the socket as another user")
def test_a_socket_served_by_another_user_is_refused(nfit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Whoever takes the socket's path must also be root or the mount's owner: a listener of
    uid 65534 gets connections (with-vnvdimm's /sys request, the ioctl's), sees no byte of
    any, and the ioctl fails with EIO."""
    path = socket_of(nfit)
    os.rename(path, path + ".real")
    squatter = subprocess.Popen([sys.executable, "-c", """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s.listen(8)  # its credentials, as the peer sees them, are taken here
while True:
    c, _ = s.accept()
    c.settimeout(20)
    got = b""
    try:
        while chunk := c.recv(4096):
            got += chunk
    except OSError:
        pass
    c.close()
    print(len(got), flush=True)
""", path], stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(path), 30, "the squatter's socket")
        time.sleep(0.5)  # its listen()
        out = victim(nfit, "/dev/nmem0", CALL, smart_package())
        assert (out["rc"], out["errno"]) == (-1, errno.EIO)
        assert "not served by root or the mount's owner" in out["stderr"]  # type: ignore[operator]
    finally:
        squatter.kill()
        stdout, _ = squatter.communicate(timeout=30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rename(path + ".real", path)
    sizes = stdout.split()
    assert sizes and set(sizes) == {"0"}, sizes


# ---------------------------------------------------------------- the daemon's side


def test_the_access_mode_comes_from_the_descriptor(nfit) -> None:  # type: ignore[no-untyped-def]
    """A mutating command on a read-only open fails with EPERM, through the library and from
    a raw client alike: the daemon reads the mode from the descriptor it is sent."""
    start = struct.pack("<QQHB5x", 0, 4096, 2, 0) + bytes(8)
    set_config = struct.pack("<II", 0, 4) + b"\x00" * 4 + bytes(4)
    assert victim(nfit, "/dev/ndctl0", ARS_START, start, os.O_RDONLY)["errno"] == errno.EPERM
    assert victim(nfit, "/dev/nmem0", SET_CONFIG_DATA, set_config, os.O_RDONLY)["errno"] == errno.EPERM
    assert wire.call(socket_of(nfit), nfit.dev / "ndctl0", ARS_START, bytearray(start),
                     os.O_RDONLY).errno == errno.EPERM
    # a descriptor of another file, or none at all: no node to answer for
    other = nfit.root.parent / "other"
    other.write_bytes(b"")
    assert wire.call(socket_of(nfit), other, ARS_START, bytearray(start)).errno == errno.ENOTTY
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(socket_of(nfit))
        s.sendall(wire.REQUEST.pack(wire.MAGIC, wire.VERSION, ARS_START, 0, 32, 0))
        op, _, code, _ = wire.OP.unpack(wire.recv_exact(s, wire.OP.size))
        assert (op, code) == (wire.OP_DONE, errno.EBADF)


def test_envelope_sizes_that_wrap_are_sized_as_the_kernel_sizes_them(nfit) -> None:  # type: ignore[no-untyped-def]
    """nd_size_in = 0xFFFFFFC0 wraps the kernel's u32 in_len to 0: the output envelope is
    read from the argument's start, never 4 GiB past it (the daemon used to ask for that).
    Every huge size gets the kernel's errno, and the daemon keeps answering."""
    for size_in, size_out in ((0xFFFFFFC0, 132), (0xFFFFFFFF, 0xFFFFFFFF), (0x7FFFFFFF, 0), (0, 0x80000000)):
        out = victim(nfit, "/dev/nmem0", CALL, smart_package(size_in, size_out))
        assert out["errno"] in (errno.EINVAL, errno.EFAULT, errno.ENXIO), out
        assert out["outside_intact"]
        got = wire.call(socket_of(nfit), nfit.dev / "nmem0", CALL, bytearray(smart_package(size_in, size_out)))
        assert got.errno in (0, errno.EINVAL, errno.EFAULT, errno.ENXIO), got
    wrapped = victim(nfit, "/dev/nmem0", CALL, smart_package(0xFFFFFFC0, 132))
    assert wrapped["errno"] != errno.EFAULT  # the bytes the kernel reads are all there
    ok = victim(nfit, "/dev/nmem0", CALL, smart_package())
    assert (ok["rc"], ok["errno"]) == (0, 0)


def test_a_stalled_client_in_a_block_ioctl_stalls_nobody(nfit) -> None:  # type: ignore[no-untyped-def]
    """A client that stops in the middle of BLKGETSIZE64 (it never acknowledges the answer's
    write: a process stopped with Ctrl-Z) holds only its own connection: sysfs reads of the
    mount answer while it waits, long before its exchange times out."""
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.open(nfit.dev / "pmem0", os.O_RDONLY)
    try:
        stalled.settimeout(30)
        stalled.connect(socket_of(nfit))
        wire.send_request(stalled, BLKGETSIZE64, fd, bytes(8))
        op, _, offset, length = wire.OP.unpack(wire.recv_exact(stalled, wire.OP.size))
        assert (op, offset, length) == (wire.OP_WRITE, 0, 8)  # the answer came; we never ack it
        reads = threading.Event()

        def read_sysfs() -> None:
            for _ in range(20):
                for path in nfit.sys.glob("bus/nd/devices/region*/size"):
                    path.read_bytes()
            reads.set()

        threading.Thread(target=read_sysfs, daemon=True).start()
        assert reads.wait(20), "sysfs reads waited for a stalled ioctl client"
    finally:
        os.close(fd)
        stalled.close()


def test_a_stopped_process_in_block_ioctls_stalls_nobody(nfit) -> None:  # type: ignore[no-untyped-def]
    """The same with a real process: a loop of BLKGETSIZE64 through the library, stopped with
    SIGSTOP wherever it is; sysfs reads go on."""
    loop = subprocess.Popen([str(WITH_VNVDIMM), str(nfit.root), "--", sys.executable, "-c", """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/dev/pmem0", os.O_RDONLY)
size = ctypes.c_uint64()
print("go", flush=True)
while libc.ioctl(fd, ctypes.c_ulong(0x80081272), ctypes.byref(size)) == 0:
    pass
"""], stdout=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    try:
        assert loop.stdout is not None and loop.stdout.readline().strip() == "go"
        time.sleep(0.2)
        os.killpg(loop.pid, 19)  # SIGSTOP, mid-ioctl or between two
        reads = threading.Event()

        def read_sysfs() -> None:
            for _ in range(20):
                for path in nfit.sys.glob("bus/nd/devices/region*/size"):
                    path.read_bytes()
            reads.set()

        threading.Thread(target=read_sysfs, daemon=True).start()
        assert reads.wait(20), "sysfs reads waited for a stopped ioctl client"
    finally:
        os.killpg(loop.pid, 9)
        loop.wait(30)


def test_a_connection_flood_with_the_daemon_out_of_descriptors(nfit) -> None:  # type: ignore[no-untyped-def]
    """Idle connections beyond the pool, while the daemon cannot open one more descriptor
    (accept() fails with EMFILE): once they are gone and descriptors are back, an ioctl
    answers. The daemon used to lose its accept loop for good on the first such error."""
    assert nfit.pid is not None
    soft, hard = resource.prlimit(nfit.pid, resource.RLIMIT_NOFILE)
    flood: list[socket.socket] = []
    try:
        in_use = len(os.listdir(f"/proc/{nfit.pid}/fd"))
        resource.prlimit(nfit.pid, resource.RLIMIT_NOFILE, (in_use + 2, hard))
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            flood.append(s)
            with contextlib.suppress(BlockingIOError):  # the backlog is full: that one waits no more
                s.connect(socket_of(nfit))
        time.sleep(1)  # accept() meets EMFILE, again and again
    finally:
        for s in flood:
            s.close()
        resource.prlimit(nfit.pid, resource.RLIMIT_NOFILE, (soft, hard))
    buf = bytearray(smart_package())
    assert wire.call(socket_of(nfit), nfit.dev / "nmem0", CALL, buf, timeout=60) == wire.Result(0, 0)
    ok = victim(nfit, "/dev/nmem0", CALL, smart_package())
    assert (ok["rc"], ok["errno"]) == (0, 0)


# ---------------------------------------------------------------- the library's own edges


NODE_EDGES = r"""
import ctypes, errno, json, os, stat, sys
libc = ctypes.CDLL(None, use_errno=True)
node = sys.argv[1]
out = {}
path_fd = os.open(node, os.O_PATH)
out["fstat_o_path"] = stat.S_ISCHR(os.fstat(path_fd).st_mode)
buf = ctypes.create_string_buffer(256)  # struct statx
libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
rc = libc.statx(path_fd, None, 0x1000, 0xfff, buf)  # AT_EMPTY_PATH, STATX_BASIC_STATS
mode = int.from_bytes(buf.raw[28:30], "little")
out["statx_null"] = [rc, stat.S_ISCHR(mode)]
libc.fstatat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
st = ctypes.create_string_buffer(144)
rc = libc.fstatat(path_fd, None, st, 0x1000)
out["fstatat_null"] = [rc, stat.S_ISCHR(int.from_bytes(st.raw[24:28], "little"))]
rc = libc.fstatat(path_fd, b"", st, 0x1000)
out["fstatat_empty"] = [rc, stat.S_ISCHR(int.from_bytes(st.raw[24:28], "little"))]
ctypes.set_errno(0)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
rc = libc.ioctl(path_fd, 0x80081272, ctypes.c_void_p(0))
out["ioctl_o_path"] = [rc, ctypes.get_errno()]
print(json.dumps(out))
"""


def test_o_path_descriptors_and_null_paths_on_a_node(nfit) -> None:  # type: ignore[no-untyped-def]
    """An O_PATH descriptor of /dev/nmem0 is a character device to fstat, to
    fstatat(AT_EMPTY_PATH) and to statx with a NULL path (which the kernel allows), and an
    ioctl on it is EBADF, as the kernel answers."""
    res = in_mount(nfit, NODE_EDGES, "/dev/nmem0")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["fstat_o_path"] is True
    assert out["statx_null"] == [0, True]
    assert out["fstatat_null"] == [0, True]
    assert out["fstatat_empty"] == [0, True]
    assert out["ioctl_o_path"] == [-1, errno.EBADF]


DAX_MAP = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
node, align = sys.argv[1], int(sys.argv[2])
fd = os.open(node, os.O_RDWR)
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANON, MAP_NOREPLACE = 0x01, 0x02, 0x10, 0x20, 0x100000
out = {}
def try_map(name, addr, flags):
    ctypes.set_errno(0)
    got = libc.mmap(addr, align, 3, flags, fd, 0)
    out[name] = ctypes.get_errno() if got in (None, 2**64 - 1) else 0
    if out[name] == 0:
        libc.munmap(ctypes.c_void_p(got), align)
base = libc.mmap(None, 4 * align, 0, MAP_PRIVATE | MAP_ANON, -1, 0)
aligned = (base + align - 1) // align * align
libc.munmap(ctypes.c_void_p(base), 4 * align)
try_map("fixed_misaligned", aligned + 4096, MAP_SHARED | MAP_FIXED)
try_map("noreplace_misaligned", aligned + 4096, MAP_SHARED | MAP_NOREPLACE)
try_map("fixed_aligned", aligned, MAP_SHARED | MAP_FIXED)
print(json.dumps(out))
"""


def test_device_dax_mmap_at_a_misaligned_fixed_address_is_einval(mnt) -> None:  # type: ignore[no-untyped-def]
    """check_vma(): a MAP_FIXED (or MAP_FIXED_NOREPLACE) address off the device's align is
    refused with EINVAL; the same mapping at an aligned address works."""
    (dax,) = [p for p in mnt.dev.glob("dax*") if p.name != "dax"]
    align = int((mnt.sys / "bus/dax/devices" / dax.name / "align").read_text())
    res = in_mount(mnt, DAX_MAP, f"/dev/{dax.name}", str(align))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"fixed_misaligned": errno.EINVAL, "noreplace_misaligned": errno.EINVAL,
                                      "fixed_aligned": 0}
