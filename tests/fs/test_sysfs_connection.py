"""with-vnvdimm's /sys: a FUSE connection of its own in the command's namespace, served with
no OPEN or RELEASE, its attribute pages cached by the kernel across opens. What must hold
(vnvdimm/fuse/sysfs_ops.py): no value changed between two opens is ever served stale (a
store through this /sys, through the mount's own MNT/sys, an ioctl, a sysfs_notify(), a
volatile value), each write(2) is one store answered with its errno, and poll() wakes on the
change with the next read fresh. Each test runs a Python script in the namespace; the test
itself changes values through MNT/sys, the other connection."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mount_kit import WITH_VNVDIMM, Mount, wait_for
from topologies import SMALL_NFIT, e820

from vnvdimm.ioctl import wire

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not Path("/proc/self/ns/user").exists(),
                                reason="with-vnvdimm needs root or user namespaces")

SLOW_DEVDAX = e820("64M devdax dev", workers=1)


def inside(m: Mount, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`script` (Python) in with-vnvdimm's namespace of `m`; its stdout's last line is JSON."""
    return subprocess.run([str(WITH_VNVDIMM), str(m.root), "--", sys.executable, "-c", textwrap.dedent(script),
                           *args], capture_output=True, text=True, timeout=timeout, check=False)


def result(res: subprocess.CompletedProcess[str]) -> object:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_sys_is_a_connection_of_its_own_and_ends_with_the_namespace(make_mount: Callable[..., Mount]) -> None:
    """/sys and /dev are two file systems there, as sysfs and devtmpfs; /sys is vnvdimm's
    (fuse.vnvdimm, nosuid, nodev, noexec as sysfs) and reads what MNT/sys reads. The daemon
    stops serving it when the command is gone."""
    m = make_mount()
    got = result(inside(m, """
        import json, os
        sys_line = [l for l in open("/proc/self/mountinfo") if l.split()[4] == "/sys"][-1]  # the top one
        print(json.dumps({"fstype": sys_line.split(" - ")[1].split()[0], "options": sys_line.split()[5],
                          "sys_dev": os.stat("/sys").st_dev, "dev_dev": os.stat("/dev").st_dev,
                          "size": open("/sys/bus/nd/devices/region0/size").read()}))
    """))
    assert isinstance(got, dict)
    assert got["fstype"] == "fuse.vnvdimm"
    assert {"nosuid", "nodev", "noexec"} <= set(got["options"].split(","))
    assert got["sys_dev"] != got["dev_dev"] == os.stat(m.root).st_dev
    assert got["size"] == m.read("sys/bus/nd/devices/region0/size")
    log = m.state_dir / "vnvdimm.log"
    wait_for(lambda: "a /sys connection ended" in log.read_text(), 10, "the /sys connection to end")


def test_a_value_changed_between_two_opens_is_never_served_stale(make_mount: Callable[..., Mount]) -> None:
    """Each read in the namespace comes after a store through MNT/sys (the daemon's other
    connection) changed the value: every one must read the new value, though the kernel keeps
    the attribute's page from the read before."""
    m = make_mount()
    attr = "bus/nd/devices/region0/read_only"
    proc = subprocess.Popen([str(WITH_VNVDIMM), str(m.root), "--", sys.executable, "-c", textwrap.dedent(f"""
        import sys
        for line in sys.stdin:
            with open("/sys/{attr}") as f:
                print(f.read().strip(), flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    seen = []
    try:
        for i in range(40):
            value = str(i % 2)
            m.write(f"sys/{attr}", f"{value}\n".encode())
            proc.stdin.write("read\n")
            proc.stdin.flush()
            seen.append((value, proc.stdout.readline().strip()))
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        m.write(f"sys/{attr}", b"0\n")
    assert [want for want, _ in seen] == [got for _, got in seen]


def test_a_store_through_sys_is_read_back_at_once(make_mount: Callable[..., Mount]) -> None:
    """Write then read in one process, the attribute's page cached before each write: the
    read shows what the store made of it, never what the write left in the cached page (the
    kernel copies a write into it: "ab" over "kept" would read "abpt", "Y\\n" over "0\\n" would
    read "Y\\n" where the value is "1\\n"; 4096 bytes fill it).
    Two write(2)s on one descriptor are two stores, each with its own errno."""
    m = make_mount(SMALL_NFIT)
    got = result(inside(m, """
        import json, os
        def read(p):
            with open(p, "rb") as f:
                return f.read().decode()
        def write(p, data):
            fd = os.open(p, os.O_WRONLY)  # no O_TRUNC: that alone would drop the page
            try:
                return os.write(fd, data)
            except OSError as e:
                return -e.errno
            finally:
                os.close(fd)
        seed = read("/sys/bus/nd/devices/region1/namespace_seed").strip()  # no driver: its name may change
        alt = f"/sys/bus/nd/devices/{seed}/alt_name"
        ro = "/sys/bus/nd/devices/region0/read_only"
        out = {}
        write(alt, b"kept")
        read(alt)
        out["alt_write"] = write(alt, b"ab")
        out["alt"] = read(alt)
        out["alt_long"] = write(alt, b"a" * 4096)  # longer than a label's name: EINVAL
        out["alt_after_long"] = read(alt)
        read(ro)
        out["ro_write"] = write(ro, b"1" + b"\\n" * 4095)  # a whole page, accepted (kstrtobool)
        out["ro"] = read(ro)
        write(ro, b"0")
        read(ro)
        out["ro_yes"] = write(ro, b"Y\\n")  # as long as what it shows ("1\\n"): no size tells
        out["ro_after_yes"] = read(ro)
        fd = os.open(ro, os.O_WRONLY)
        out["first"] = os.write(fd, b"0")
        try:
            os.write(fd, b"x")
            out["second"] = "accepted"
        except OSError as e:
            out["second"] = e.errno
        os.close(fd)
        out["after"] = read(ro)
        print(json.dumps(out))
    """))
    assert got == {"alt_write": 2, "alt": "ab\n", "alt_long": -22, "alt_after_long": "ab\n",
                   "ro_write": 4096, "ro": "1\n", "ro_yes": 2, "ro_after_yes": "1\n", "first": 1, "second": 22,
                   "after": "0\n"}


def test_poll_wakes_every_reader_and_the_next_read_is_fresh(make_mount: Callable[..., Mount]) -> None:
    """Three readers of memmap_state in the namespace open and read it ("active"); two wait
    in poll(). When the memmap completes, both wake with POLLPRI and read "idle"; the third,
    which polls only after the others have read "idle", sees POLLPRI at once (its own read
    was before the change). No OPEN keeps each reader's event count here: the kernel's poll
    handle of each open file stands for it."""
    m = make_mount(SLOW_DEVDAX)
    dev = m.read("sys/bus/nd/devices/namespace0.0/holder").strip()
    d = f"sys/bus/nd/devices/{dev}"
    m.write(f"{d}/memmap/ns_per_page", b"20000\n")
    m.write(f"{d}/memmap/pause_at", b"300\n")
    m.write("sys/bus/nd/drivers/dax_pmem/unbind", dev.encode())
    m.write("sys/bus/nd/drivers/dax_pmem/bind", dev.encode())
    proc = subprocess.Popen([str(WITH_VNVDIMM), str(m.root), "--", sys.executable, "-c", textwrap.dedent(f"""
        import json, os, select, threading
        path = "/sys/{d.removeprefix('sys/')}/memmap_state"
        results = {{}}
        woken = []
        def reader(k, ready, late):
            fd = os.open(path, os.O_RDONLY)
            first = os.read(fd, 64).decode().strip()
            p = select.poll()
            p.register(fd, select.POLLPRI | select.POLLERR)
            ready.set()
            if late:
                for t in woken:
                    t.join()
            events = p.poll(5000 if late else 60000)
            os.lseek(fd, 0, os.SEEK_SET)
            results[k] = [first, [e for _, e in events], os.read(fd, 64).decode().strip()]
            os.close(fd)
        threads = []
        for k in range(3):
            ready = threading.Event()
            t = threading.Thread(target=reader, args=(k, ready, k == 2))
            t.start()
            ready.wait()
            threads.append(t)
            if k < 2:
                woken.append(t)
        print("polling", flush=True)
        for t in threads:
            t.join()
        print(json.dumps(results))
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "polling"
        time.sleep(0.3)  # the first two in poll()
        m.write(f"{d}/memmap/pause_at", b"1000\n")
        m.write(f"{d}/memmap/ns_per_page", b"0\n")
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    pollpri = 0x2
    assert {k: (first, bool(events and events[0] & pollpri), after) for k, (first, events, after) in got.items()} \
        == {k: ("active", True, "idle") for k in ("0", "1", "2")}


def test_an_ioctl_that_changes_a_value_is_seen_by_the_next_read(make_mount: Callable[..., Mount]) -> None:
    """A store is not the only writer: `ndctl inject-error` (an ioctl, ARS_INJECT_SET with its
    notification) makes the region's badblocks list a range, and a read of the badblocks
    cached just before must see it. ndctl list's ioctls (queries) in between keep nothing stale
    either."""
    m = make_mount(SMALL_NFIT)
    got = result(inside(m, """
        import json, subprocess
        def read(p):
            with open(p) as f:
                return f.read()
        bb = "/sys/bus/nd/devices/region0/badblocks"
        before = read(bb)
        subprocess.run(["ndctl", "list", "-DH"], check=True, capture_output=True)
        same = read(bb)
        subprocess.run(["ndctl", "inject-error", "-B", "8", "-n", "1", "namespace0.0"], check=True,
                       capture_output=True)
        print(json.dumps({"before": before, "same": same, "after": read(bb)}))
    """))
    assert isinstance(got, dict)
    assert got["before"] == got["same"] == ""
    assert got["after"] == m.read("sys/bus/nd/devices/region0/badblocks") != ""


def test_a_read_only_attribute_refuses_root_s_write(make_mount: Callable[..., Mount]) -> None:
    """Without OPEN nothing refuses the open itself: root's write(2) of a read-only attribute
    fails with EACCES, and the value stays."""
    m = make_mount()
    got = result(inside(m, """
        import json, os
        p = "/sys/bus/nd/devices/region0/size"
        before = open(p).read()
        fd = os.open(p, os.O_WRONLY)
        try:
            os.write(fd, b"1\\n")
            err = 0
        except OSError as e:
            err = e.errno
        os.close(fd)
        print(json.dumps({"errno": err, "same": open(p).read() == before}))
    """))
    assert got == {"errno": 13, "same": True}


def test_the_daemon_outlives_a_client_that_hangs_up_after_sys_connections_ended(
        make_mount: Callable[..., Mount]) -> None:
    """Each /sys connection's loop leaves SIGPIPE at its default action when it ends: a write
    to a client that hung up (here an ioctl's answer) must cost that client only, not kill
    the daemon without a word (the stress test saw every request fail at once)."""
    m = make_mount(SMALL_NFIT)
    for _ in range(3):
        assert inside(m, "pass").returncode == 0
    log = m.state_dir / "vnvdimm.log"
    wait_for(lambda: log.read_text().count("a /sys connection ended") >= 3, 10, "the /sys connections to end")
    path = os.getxattr(m.sys, "user.vnvdimm").decode().split()[1]
    smart = struct.pack("<QQII40x", 0, 1, 0, 132) + bytes(132)  # ND_CMD_CALL, Intel SMART
    call = 3 << 30 | 64 << 16 | ord("N") << 8 | 10
    for _ in range(20):
        fd = os.open(m.dev / "nmem0", os.O_RDWR)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                wire.send_request(sock, call, fd, smart)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            os.close(fd)
    time.sleep(0.5)
    assert m.pid is not None and os.path.exists(f"/proc/{m.pid}")
    assert m.read("sys/bus/nd/devices/region0/size").strip().isdigit()


@pytest.mark.skipif(os.geteuid() != 0, reason="block devices need root")
def test_a_write_that_clears_poison_is_seen_in_badblocks_at_once(make_mount: Callable[..., Mount]) -> None:
    """inject-error.sh's flow: an error injected (an ioctl), its badblocks read (and cached),
    the sectors written with O_DIRECT through the block device: the next read of badblocks in
    the same namespace is empty, as pmem_clear_poison() leaves it before the write returns."""
    m = make_mount(SMALL_NFIT)
    got = result(inside(m, """
        import json, subprocess
        def read(p):
            with open(p) as f:
                return f.read()
        subprocess.run(["ndctl", "inject-error", "-B", "42", "-n", "8", "namespace0.0"], check=True,
                       capture_output=True)
        before = read("/sys/block/pmem0/badblocks")
        subprocess.run(["dd", "if=/dev/zero", "of=/dev/pmem0", "bs=512", "seek=42", "count=8", "oflag=direct"],
                       check=True, capture_output=True)
        print(json.dumps({"before": before, "after": read("/sys/block/pmem0/badblocks")}))
    """))
    assert isinstance(got, dict)
    assert got["before"] == "42 8\n" and got["after"] == ""
