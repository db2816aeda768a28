"""`vnvdimm umount` never loses data: a mount whose device files are open, mapped or behind a
loop device (a real ext4 on it) is refused with the devices and processes named; `--lazy`
detaches and the daemon serves the open files until they are closed (what is written through
them is on the media afterwards); `--force` names what it breaks and stops at once."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_kit import kill_group, needs_root

from vnvdimm.daemon import ioctl_socket
from vnvdimm.mounts import is_mounted, mount_record, process_alive, wait_exit

pytestmark = pytest.mark.mount

VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]

HOLDER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
mfd = os.open(sys.argv[2], os.O_RDWR)
mapping = mmap.mmap(mfd, 2 << 20)
os.close(mfd)  # only the mapping keeps dax1.0 in use
mapping[0]
print("ready", flush=True)
line = sys.stdin.readline()
try:
    os.pread(fd, 4096, 0)
    print("read ok", flush=True)
except OSError as e:
    print(f"errno {e.errno}", flush=True)
"""


def umount(m, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([*VNVDIMM, "umount", *args, str(m.root)], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def holder(m) -> Iterator[subprocess.Popen[str]]:  # type: ignore[no-untyped-def]
    """A process with MNT/dev/pmem0 open and MNT/dev/dax1.0 mapped (its descriptor closed)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(m.dev / "pmem0"), str(m.dev / "dax1.0")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n", p.stderr.read() if p.stderr else ""
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_umount_refuses_open_and_mapped_device_files(mnt) -> None:  # type: ignore[no-untyped-def]
    with holder(mnt) as p:
        res = umount(mnt)
        assert res.returncode == 1, res
        assert "busy, device files in use" in res.stderr
        assert f"/dev/pmem0: open by pid {p.pid}" in res.stderr, res.stderr
        assert f"/dev/dax1.0: mapped by pid {p.pid}" in res.stderr, res.stderr
        # Nothing changed: still mounted, still served.
        assert mnt.is_mounted() and process_alive(mnt.pid)
        assert mnt.read("sys/bus/nd/devices/region0/size").strip().isdigit()
        p.communicate("read\n", timeout=30)
    res = umount(mnt)
    assert res.returncode == 0, res.stderr
    assert not mnt.is_mounted() and wait_exit(mnt.pid, 5)


@pytest.fixture
def loop_ext4(mnt, tmp_path: Path) -> Iterator[tuple[str, Path]]:  # type: ignore[no-untyped-def]
    """A real ext4 on a loop device over MNT/dev/pmem0, mounted at a temp dir; always torn down."""
    dev = mnt.dev / "pmem0"
    loop = subprocess.run(["losetup", "--find", "--show", str(dev)], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()
    target = tmp_path / "ext4"
    target.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True, timeout=120)
        subprocess.run(["mount", loop, str(target)], check=True, capture_output=True, timeout=60)
        yield loop, target
    finally:
        if is_mounted(target):
            subprocess.run(["umount", str(target)], capture_output=True, timeout=60)
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=60)


def detach_loop(loop: str) -> None:
    """losetup -d, then wait for the detach: while anything still holds the loop device (udev
    probes it after the umount of its file system), the kernel only marks it autoclear and
    detaches it at the last close; until then its backing file still counts as held."""
    subprocess.run(["losetup", "-d", loop], check=True, capture_output=True, timeout=60)
    backing = Path(f"/sys/block/{Path(loop).name}/loop/backing_file")
    deadline = time.monotonic() + 60
    while backing.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not backing.exists(), f"{loop} still attached 60 s after losetup -d"


@needs_root("losetup, mkfs.ext4 and mount of a loop device over MNT/dev/pmem0")
def test_ext4_on_a_loop_device_blocks_umount_and_keeps_its_data(mnt, loop_ext4) -> None:  # type: ignore[no-untyped-def]
    loop, target = loop_ext4
    payload = os.urandom(1 << 20)
    (target / "data").write_bytes(payload)  # in ext4's page cache: not written back yet
    res = umount(mnt)
    assert res.returncode == 1, res
    assert f"/dev/pmem0: backing loop device {loop} (mounted on {target})" in res.stderr, res.stderr
    assert mnt.is_mounted() and process_alive(mnt.pid)
    for mode in ("normal", "lazy"):  # the test bed's and the fixtures' teardown take the same view
        assert mnt.is_mounted()
        subprocess.run(["umount", str(target)], check=True, capture_output=True, timeout=60)
        detach_loop(loop)
        res = umount(mnt) if mode == "normal" else umount(mnt, "--lazy")
        assert res.returncode == 0, res.stderr
        assert not mnt.is_mounted() and wait_exit(mnt.pid, 5)
        # Everything ext4 wrote is on the media: a fresh mount, a fresh loop device, a clean fsck.
        mnt.remount()
        again = subprocess.run(["losetup", "--find", "--show", str(mnt.dev / "pmem0")], capture_output=True,
                               text=True, check=True, timeout=60).stdout.strip()
        try:
            fsck = subprocess.run(["e2fsck", "-f", "-n", again], capture_output=True, text=True, timeout=120)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            subprocess.run(["mount", again, str(target)], check=True, capture_output=True, timeout=60)
            assert (target / "data").read_bytes() == payload
        finally:
            if mode == "lazy":
                subprocess.run(["umount", str(target)], capture_output=True, timeout=60)
                subprocess.run(["losetup", "-d", again], capture_output=True, timeout=60)
        loop = again  # the fixture's teardown takes the second one down


def test_lazy_umount_serves_open_files_and_their_writes_reach_the_media(mnt) -> None:  # type: ignore[no-untyped-def]
    payload = os.urandom(64 << 10)
    fd = os.open(mnt.dev / "pmem0", os.O_RDWR)
    try:
        res = umount(mnt, "--lazy")
        assert res.returncode == 0, res.stderr
        assert f"/dev/pmem0: open by pid {os.getpid()}" in res.stderr, res.stderr
        assert not mnt.is_mounted() and process_alive(mnt.pid)
        # Still served after the detach: written, read back.
        assert os.pwrite(fd, payload, 8 << 20) == len(payload)
        assert os.pread(fd, len(payload), 8 << 20) == payload
        # Mounting there again waits for the old daemon (its exit would unmount the path).
        res = mnt.mount()
        assert res.returncode != 0 and "still serves files" in res.stderr, res
    finally:
        os.close(fd)
    assert wait_exit(mnt.pid, 5), "the daemon did not exit once its last file was closed"
    mnt.remount()
    fd = os.open(mnt.dev / "pmem0", os.O_RDONLY)
    try:
        assert os.pread(fd, len(payload), 8 << 20) == payload
    finally:
        os.close(fd)


def test_force_names_what_it_breaks(mnt) -> None:  # type: ignore[no-untyped-def]
    with holder(mnt) as p:
        res = umount(mnt, "--force")
        assert res.returncode == 0, res.stderr
        assert "--force: stopping the daemon under these" in res.stderr
        assert f"/dev/pmem0: open by pid {p.pid}" in res.stderr, res.stderr
        assert not mnt.is_mounted() and wait_exit(mnt.pid, 5)
        out, _ = p.communicate("read\n", timeout=30)
        assert out.strip() in {f"errno {e}" for e in (errno.ENXIO, errno.ENOTCONN, errno.ECONNABORTED)}, out
    mnt.pid = None


def test_sigterm_with_an_open_file_detaches_and_serves_it(mnt) -> None:  # type: ignore[no-untyped-def]
    fd = os.open(mnt.dev / "pmem0", os.O_RDWR)
    try:
        os.kill(mnt.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while is_mounted(mnt.root) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not is_mounted(mnt.root)
        assert os.pwrite(fd, b"still here", 4096) == 10
        assert process_alive(mnt.pid)
    finally:
        os.close(fd)
    assert wait_exit(mnt.pid, 5)
    mnt.pid = None


def test_umount_of_a_mount_nothing_uses(mnt) -> None:  # type: ignore[no-untyped-def]
    res = umount(mnt)
    assert (res.returncode, res.stderr) == (0, "")
    assert not mnt.is_mounted() and wait_exit(mnt.pid, 5)
    res = umount(mnt)
    assert res.returncode == 1 and "not mounted" in res.stderr


def in_private_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """`script` (sh) in a mount namespace of its own: whatever it mounts or unmounts there
    goes with it, so a `vnvdimm umount` that wrongly unmounted would not harm this machine."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private mount namespace needs root and unshare")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)


def test_umount_of_a_tmpfs_says_it_is_not_vnvdimm_and_leaves_it(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    cli = " ".join(shlex.quote(a) for a in VNVDIMM)
    res = in_private_namespace(f"mount -t tmpfs vnvdimm-test {t} && echo kept > {t}/file && {cli} umount {t}; "
                               f"echo rc=$?; cat {t}/file; findmnt -n -o FSTYPE {t}")
    assert res.stdout.split() == ["rc=1", "kept", "tmpfs"], (res.stdout, res.stderr)
    assert res.stderr == f"vnvdimm: {t} is not a vnvdimm mount (it is a tmpfs); nothing was unmounted\n"


@pytest.mark.parametrize("flag", [[], ["--lazy"], ["--force"]])
def test_umount_of_proc_is_refused_whatever_the_flag(flag: list[str]) -> None:
    cli = " ".join(shlex.quote(a) for a in [*VNVDIMM, "umount", *flag, "/proc"])
    res = in_private_namespace(f"{cli}; echo rc=$?; findmnt -n -o FSTYPE /proc; cat /proc/self/comm")
    assert res.stdout.split() == ["rc=1", "proc", "cat"], (res.stdout, res.stderr)
    assert res.stderr == "vnvdimm: /proc is not a vnvdimm mount (it is a proc); nothing was unmounted\n"


def test_a_killed_daemons_records_are_cleaned_by_the_next_mount_and_umount(make_mount) -> None:  # type: ignore[no-untyped-def]
    records = []
    for _ in range(2):
        m = make_mount()
        record, sock = mount_record(m.root), ioctl_socket(m.root)
        assert record.exists() and sock.exists()
        kill_group(m.pid)
        assert wait_exit(m.pid, 30)
        assert record.exists() and sock.exists()  # SIGKILL: the daemon cleaned nothing
        records.append((record, sock))
    (record, sock), (record2, sock2) = records
    other = make_mount()  # the next mount
    assert not record.exists() and not sock.exists() and not record2.exists() and not sock2.exists()
    assert mount_record(other.root).exists() and ioctl_socket(other.root).exists()  # a live one is kept
    kill_group(other.pid)
    assert wait_exit(other.pid, 30)
    res = subprocess.run([*VNVDIMM, "umount", str(other.root)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not mount_record(other.root).exists() and not ioctl_socket(other.root).exists()
    assert not other.is_mounted()


def test_a_state_dir_in_use_says_where_it_is_mounted(make_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = make_mount(state_dir=tmp_path / "shared-state")
    second = make_mount(state_dir=tmp_path / "shared-state", mount=False)
    res = second.mount()
    assert res.returncode == 1 and not second.is_mounted()
    assert res.stderr == (f"vnvdimm: {tmp_path / 'shared-state'}: state dir in use by vnvdimm pid {first.pid}, "
                          f"mounted on {first.root}; unmount it first (vnvdimm umount {first.root}), or mount "
                          "with another --state-dir\n")
