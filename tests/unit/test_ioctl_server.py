"""The ioctl server alone (a stand-in for the model behind it): a thread that cannot be
started costs its connection only, and an accept() error costs a retry, not the channel."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vnvdimm.ioctl import server, wire


def echo_answer(system: Any, name: str, accmode: int, request: int, user: Any) -> int:
    """Reads 8 bytes, writes them back reversed; returns the node's name length."""
    user.write(0, user.read(0, 8)[::-1])
    return len(name)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[server.IoctlServer, Path]]:
    monkeypatch.setattr(server, "answer", echo_answer)
    (tmp_path / "dev").mkdir()
    node = tmp_path / "dev" / "nmem0"
    node.write_bytes(b"")
    srv = server.IoctlServer(None, tmp_path / "ioctl.sock")  # type: ignore[arg-type]
    yield srv, node
    srv.close()


def call(srv: server.IoctlServer, node: Path) -> tuple[wire.Result, bytearray]:
    arg = bytearray(b"12345678")
    return wire.call(str(srv.path), node, 0, arg, timeout=30), arg


def test_a_thread_that_cannot_start_costs_its_connection_only(served: tuple[server.IoctlServer, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A process limit that refuses the thread of a connection: that connection is closed,
    the accept loop goes on and the next ioctl is answered."""
    srv, node = served
    real_start = threading.Thread.start
    refusals = [RuntimeError("can't start new thread")] * 2

    def start(self: threading.Thread) -> None:
        if self.name == "vnvdimm-ioctl-conn" and refusals:
            raise refusals.pop()
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    srv.start()
    srv.mount_dev = os.stat(node).st_dev
    for _ in range(2):
        with pytest.raises(ConnectionError):
            call(srv, node)
    assert call(srv, node) == (wire.Result(5, 0), bytearray(b"87654321"))


def test_accept_errors_are_retried(served: tuple[server.IoctlServer, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    srv, node = served
    failures = [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ECONNABORTED]
    real_accept = server.socket.socket.accept

    def accept(self: Any) -> Any:
        if failures:
            raise OSError(failures.pop(0), "injected")
        return real_accept(self)

    monkeypatch.setattr(server.socket.socket, "accept", accept)
    srv.start()
    srv.mount_dev = os.stat(node).st_dev
    assert call(srv, node) == (wire.Result(5, 0), bytearray(b"87654321"))
    assert not failures


def test_a_call_waits_for_room_in_a_full_backlog(served: tuple[server.IoctlServer, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A stalled accept loop and a listen backlog full of idle connections: a call waits
    for room, as the preload library's blocking connect does, and does not fail at once
    with EAGAIN. (CI met this after a flood beside an out-of-descriptors daemon.)"""
    srv, node = served
    stalled = threading.Event()
    real_accept = server.socket.socket.accept

    def accept(self: Any) -> Any:
        stalled.wait()
        return real_accept(self)

    monkeypatch.setattr(server.socket.socket, "accept", accept)
    srv.start()
    srv.mount_dev = os.stat(node).st_dev
    flood: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        flood.append(s)
        try:
            s.connect(str(srv.path))
        except BlockingIOError:
            break
    assert len(flood) > 1

    def release() -> None:
        for s in flood:
            s.close()
        stalled.set()

    threading.Timer(0.5, release).start()
    try:
        assert call(srv, node) == (wire.Result(5, 0), bytearray(b"87654321"))
    finally:
        release()


def test_only_files_of_the_mount_are_answered(served: tuple[server.IoctlServer, Path], tmp_path: Path) -> None:
    srv, node = served
    srv.start()
    srv.mount_dev = os.stat(node).st_dev + 1  # the node is not on "the mount"
    assert call(srv, node)[0] == wire.Result(0, errno.ENOTTY)


ND_IOCTL_SMART = 0xC004_4E01  # _IOWR('N', ND_CMD_SMART, ...): a query
ND_IOCTL_SET_CONFIG_DATA = 0xC008_4E06  # _IOWR('N', ND_CMD_SET_CONFIG_DATA, ...): writes labels


@pytest.mark.parametrize(("request_number", "changes"), [(ND_IOCTL_SET_CONFIG_DATA, True), (ND_IOCTL_SMART, False)])
def test_values_change_before_an_ioctl_is_answered_unless_it_is_a_query(
        served: tuple[server.IoctlServer, Path], request_number: int, changes: bool) -> None:
    """Sysfs values may have changed after any ioctl but a query: the /sys connection hears
    of it before the caller gets its answer (a read right after the ioctl is fresh)."""
    srv, node = served
    heard: list[float] = []

    def values_changed() -> None:
        time.sleep(0.2)  # a slow invalidation: the answer must still come after it
        heard.append(time.monotonic())

    srv.on_values_changed = values_changed
    srv.start()
    srv.mount_dev = os.stat(node).st_dev
    arg = bytearray(b"12345678")
    assert wire.call(str(srv.path), node, request_number, arg, timeout=30) == wire.Result(5, 0)
    answered = time.monotonic()
    assert len(heard) == (1 if changes else 0)
    assert all(t <= answered for t in heard)


def test_a_sysfs_connection_request_must_carry_dev_fuse(served: tuple[server.IoctlServer, Path]) -> None:
    """ATTACH_SYSFS with any other descriptor (here a file of the mount) is refused with
    EBADF and nothing is served; with /dev/fuse, the request reaches on_attach, which owns
    the descriptor it is given."""
    srv, node = served
    attached: list[server.SysfsAttach] = []

    def on_attach(request: server.SysfsAttach) -> None:
        attached.append(request)
        os.close(request.fd)

    srv.on_attach = on_attach
    srv.start()
    srv.mount_dev = os.stat(node).st_dev
    target = bytearray(b"/somewhere/sys")
    assert wire.call(str(srv.path), node, wire.ATTACH_SYSFS, target, timeout=30) == wire.Result(0, errno.EBADF)
    assert attached == []
    fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert wire.call(str(srv.path), fuse_fd, wire.ATTACH_SYSFS, target, timeout=30) == wire.Result(0, 0)
    finally:
        os.close(fuse_fd)
    assert [(a.target, a.pid, a.uid) for a in attached] == [("/somewhere/sys", os.getpid(), os.getuid())]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_have_a_sysfs_connection_served() -> None:
    """The attacker: uid 65534, with a /dev/fuse descriptor of its own, asks root's daemon to
    serve it as a /sys connection (it would then be the root of what it mounts: every
    attribute writable). Refused before a byte is read: nothing is attached, no answer comes."""
    attached: list[server.SysfsAttach] = []

    def on_attach(request: server.SysfsAttach) -> None:
        attached.append(request)
        os.close(request.fd)

    # (the runtime dir is private: here the peer check is all that stands in the way)
    with tempfile.TemporaryDirectory(prefix="vnvdimm-attach-") as tmp:
        os.chmod(tmp, 0o755)
        srv = server.IoctlServer(None, Path(tmp) / "ioctl.sock")  # type: ignore[arg-type]
        srv.on_attach = on_attach
        srv.start()
        try:
            os.chmod(srv.path, 0o666)
            attacker = subprocess.run([sys.executable, "-c", """
import array, os, socket, struct, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
fd = os.open("/dev/fuse", os.O_RDWR)
target = b"/tmp/attacker/sys"
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
header = struct.pack("<IIIIQQ", 0x564E5644, 3, 0x564E5301, 0, len(target), len(target))
try:
    s.sendmsg([header + target], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
    print("answered" if s.recv(64) else "hung up")
except (BrokenPipeError, ConnectionResetError):
    print("hung up")
""", str(srv.path)], capture_output=True, text=True, timeout=30)
        finally:
            srv.close()
    assert attacker.returncode == 0, attacker.stderr
    assert attacker.stdout.strip() == "hung up"
    assert attached == []
