"""Helpers of the reliability suite: process trees, bounded waits, small topologies
and memmap record checks. (A module of its own: test modules cannot import a conftest by
name, tests/unit has one too.)

Durations: ``VNVDIMM_STRESS_SECONDS`` (default 8) scales the stress tests; the full length is
``VNVDIMM_STRESS_SECONDS=30``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import topologies
from mount_kit import alive, children, kill_group, memmap_state, process_group, wait_for  # noqa: F401 (re-exported)

from vnvdimm.ioctl import wire

WITH_VNVDIMM = Path(__file__).resolve().parents[2] / "mountscripts" / "with-vnvdimm"
STRESS_SECONDS = float(os.environ.get("VNVDIMM_STRESS_SECONDS", "8"))


def e820(*regions: str, workers: int = 2, ns_per_page: int = 0, mode: str = "async") -> str:
    """topologies.e820 with every [memmap] key written out."""
    return topologies.e820(*regions, workers=workers, ns_per_page=ns_per_page, mode=mode)


# The small platform most tests use: pmem0 (fsdax, map=dev, pfn0.1) and dax1.0 (devdax,
# map=mem, dax1.1), 64 MiB each = 16384 pages per memmap.
SMALL = ("64M fsdax dev", "64M devdax mem")
PFN = "sys/bus/nd/devices/pfn0.1"
DAX = "sys/bus/nd/devices/dax1.1"


def worker_in_run(pid: int) -> bool:
    """A memmap worker inside a run: it sleeps for the ns_per_page floor in select (pselect6
    on x86_64), where an idle (or still starting) worker waits in recvmsg, or runs Python."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0] in ("23", "270")
    return False


# ---------------------------------------------------------------- memmap records


def check_records(m: Any, dev: str) -> int:
    """`dev` (a pfn/dax device dir) reads idle and every record is the kernel's (the
    memmap_state invariant, mount_kit.memmap_state). Returns the number of records verified."""
    assert memmap_state(m.root, dev) == "idle", f"{dev}: memmap still active"
    return int(m.read(f"{dev}/memmap/pages_total"))


@contextlib.contextmanager
def fake_daemon(path: str, behave: Callable[[socket.socket], None]) -> Iterator[list[bytes]]:
    """A mount's ioctl socket answered by `behave` after each request (its header, the
    regions' descriptors, the readable argument), the real one set aside meanwhile: the
    daemon as an attacker would write it. Yields what each connection sent."""
    os.rename(path, path + ".real")
    received: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                got = b""
                with contextlib.suppress(OSError, ConnectionError):
                    header, _, _, _ = conn.recvmsg(wire.REQUEST.size, socket.CMSG_SPACE(16))
                    got = header
                    if len(header) == wire.REQUEST.size:
                        _, _, request, regions, _, readable = wire.REQUEST.unpack(header)
                        got += wire.recv_exact(conn, regions * wire.REGION.size + readable)
                        if request == wire.ATTACH_SYSFS:
                            # with-vnvdimm asking for its /sys connection: not what this
                            # daemon is about; refused, /sys is MNT/sys
                            conn.sendall(wire.OP.pack(wire.OP_DONE, 0, errno.ENOTTY, 0))
                            continue
                        behave(conn)
                        conn.shutdown(socket.SHUT_WR)
                        while chunk := conn.recv(4096):
                            got += chunk
                received.append(got)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(30)
        os.unlink(path)
        os.rename(path + ".real", path)
