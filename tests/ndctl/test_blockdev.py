"""As root, inside with-vnvdimm, /dev/pmemN are real block devices (the daemon's loop devices
over the disks' bytes): the flow every pmem guide teaches works (mkfs.ext4, mount, fsck, parted,
blockdev), reads still wait for the memmap, a namespace whose file system is mounted cannot
be disabled (EBUSY), and no loop device outlives its user, also when the command is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mount_kit import ROOT_BLOCK_DEVICES, SMALL_E820, WITH_VNVDIMM, have_ndctl, needs_root

from vnvdimm.mounts import loop_devices, process_alive, wait_exit

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="ndctl not installed")]

KPF_NOPAGE = 1 << 20
VNVDIMM = [sys.executable, "-m", "vnvdimm.cli"]


def loops_over(m) -> list[str]:  # type: ignore[no-untyped-def]
    """Loop devices backed by a file of the mount (the kernel's view, whatever namespace)."""
    dev = os.stat(m.root).st_dev
    return [loop for loop, bdev, _, _ in loop_devices() if bdev == (os.major(dev), os.minor(dev))]


def wait_no_loops(m, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while loops_over(m):
        assert time.monotonic() < deadline, f"loop devices left behind: {loops_over(m)}"
        time.sleep(0.02)


@needs_root(ROOT_BLOCK_DEVICES)
def test_mkfs_mount_fsck_parted_blockdev(mnt) -> None:  # type: ignore[no-untyped-def]
    sectors = int(mnt.read("sys/block/pmem0/size"))
    script = """
        set -e
        test -b /dev/pmem0
        blockdev --getsize64 /dev/pmem0
        mkfs.ext4 -q -F /dev/pmem0
        mkdir -p /tmp/pmem-fs && mount /dev/pmem0 /tmp/pmem-fs
        echo 'persistent' > /tmp/pmem-fs/hello
        umount /tmp/pmem-fs
        fsck.ext4 -f -n /dev/pmem0 >/dev/null
        parted -s /dev/pmem0 print
    """
    res = mnt.run("sh", "-c", script)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert int(lines[0]) == sectors * 512
    assert any(line.split()[-1:] == ["ext4"] for line in lines), res.stdout  # parted sees the file system
    wait_no_loops(mnt)
    # On the media: after a remount of the platform, the file system and its file are there.
    mnt.remount()
    res = mnt.run("sh", "-c", "mkdir -p /tmp/pmem-fs && mount -o ro /dev/pmem0 /tmp/pmem-fs && cat /tmp/pmem-fs/hello")
    assert (res.returncode, res.stdout) == (0, "persistent\n"), res.stderr
    wait_no_loops(mnt)


@needs_root(ROOT_BLOCK_DEVICES)
def test_disabling_a_namespace_with_a_mounted_file_system_is_ebusy(mnt) -> None:  # type: ignore[no-untyped-def]
    script = """
        set -e
        mkfs.ext4 -q -F /dev/pmem0
        mkdir -p /tmp/pmem-fs && mount /dev/pmem0 /tmp/pmem-fs
        if ndctl disable-namespace namespace0.0 2>/tmp/err; then echo disabled; else cat /tmp/err; fi
        umount /tmp/pmem-fs
        ndctl disable-namespace namespace0.0
    """
    res = mnt.run("sh", "-c", script)
    assert res.returncode == 0, res.stderr
    assert "Device or resource busy" in res.stdout and "disabled\n" not in res.stdout, res.stdout
    assert "disabled 1 namespace" in res.stderr, res.stderr  # once unmounted, it goes
    assert "namespace0.0" not in [ns["dev"] for ns in mnt.ndctl("list", "-N") or []]  # (-i lists disabled ones)
    wait_no_loops(mnt)


def test_reads_through_the_block_device_wait_for_the_memmap(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(SLOW)
    pfn = "sys/bus/nd/devices/pfn0.1"
    start_pfn = int(m.read(f"{pfn}/memmap/start_pfn"), 16)
    first_data_page = int(m.read(f"{pfn}/resource"), 16) // 4096 - start_pfn
    offset = (int(m.read("sys/block/pmem0/size")) * 512 * 3 // 4) // (2 << 20) * (2 << 20)
    res = m.run("dd", "if=/dev/pmem0", "of=/dev/null", "bs=4096", "count=1", f"skip={offset // 4096}", "iflag=direct")
    assert res.returncode == 0, res.stderr
    page = first_data_page + offset // 4096
    with open(m.path(f"{pfn}/memmap/kpageflags"), "rb") as f:
        f.seek(page * 8)
        flags = int.from_bytes(f.read(8), "little")
    assert not flags & KPF_NOPAGE, "the page read through the loop device was not initialized"
    assert m.read(f"{pfn}/memmap_state") == "active\n"  # the rest is still being initialized
    wait_no_loops(m)


# The small platform, its memmaps at 1 ms a page: half a minute; a read initializes its block (0.5 s).
SLOW = SMALL_E820.replace("[memmap]\n", "[memmap]\nns_per_page = 1000000\n", 1)


def test_the_block_device_follows_a_reconfigured_namespace(mnt) -> None:  # type: ignore[no-untyped-def]
    """ndctl create-namespace -f replaces pmem0 (and writes its new info block through
    /dev/pmem0 in raw mode): the loop device set up before serves the new device."""
    script = """
        set -e
        ndctl create-namespace -e namespace0.0 -m fsdax -M mem -f >/dev/null
        printf 'after reconfigure' | dd of=/dev/pmem0 bs=4096 conv=sync oflag=direct status=none
        dd if=/dev/pmem0 bs=17 count=1 status=none
    """
    res = mnt.run("sh", "-c", script)
    assert (res.returncode, res.stdout) == (0, "after reconfigure"), res.stderr
    assert mnt.ndctl("list", "-N")[0]["map"] == "mem"
    wait_no_loops(mnt)


@needs_root(ROOT_BLOCK_DEVICES)
def test_no_loop_device_outlives_a_killed_command(mnt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ready = tmp_path / "ready"
    env = {**os.environ}
    for kill_all in (True, False):
        ready.unlink(missing_ok=True)
        p = subprocess.Popen([str(WITH_VNVDIMM), str(mnt.root), "--", "sh", "-c",
                              f"mkfs.ext4 -q -F /dev/pmem0 && mkdir -p /tmp/k && mount /dev/pmem0 /tmp/k "
                              f"&& touch {ready} && exec sleep 600"], env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not ready.exists():
                assert p.poll() is None and time.monotonic() < deadline, "the command did not get ready"
                time.sleep(0.05)
            assert loops_over(mnt), "no loop device while the command runs"
            if kill_all:
                os.killpg(p.pid, signal.SIGKILL)  # the helper, the shell, sleep: all at once
            else:
                p.send_signal(signal.SIGKILL)  # the helper only: sleep keeps the namespace alive
                p.wait(timeout=30)  # its descriptors are closed: only the mounted file system holds the loop
                assert loops_over(mnt), "detached under a mounted file system"
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            wait_no_loops(mnt)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@needs_root(ROOT_BLOCK_DEVICES)
def test_umount_refuses_while_a_file_system_on_pmem0_is_mounted(mnt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """ext4 mounted on /dev/pmem0 inside with-vnvdimm: `vnvdimm umount MNT` refuses (exit 1,
    naming /dev/pmem0 and its loop device) and changes nothing; once the file system is
    unmounted there, the unmount goes through and the file system on the media is clean."""
    ready, go, fs = tmp_path / "ready", tmp_path / "go", tmp_path / "fs"
    fs.mkdir()
    script = f"""
        set -e
        mkfs.ext4 -q -F /dev/pmem0
        mount /dev/pmem0 {fs}
        yes persistent | head -c 1048576 > {fs}/data
        touch {ready}
        while [ ! -e {go} ]; do sleep 0.05; done
        umount {fs}
    """
    p = subprocess.Popen([str(WITH_VNVDIMM), str(mnt.root), "--", "sh", "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        res = subprocess.run([*VNVDIMM, "umount", str(mnt.root)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 1, res
        assert "/dev/pmem0: backing loop device /dev/loop" in res.stderr, res.stderr
        assert mnt.is_mounted() and process_alive(mnt.pid)
        go.touch()
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    wait_no_loops(mnt)
    res = subprocess.run([*VNVDIMM, "umount", str(mnt.root)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not mnt.is_mounted() and wait_exit(mnt.pid, 10)
    mnt.remount()
    res = mnt.run("sh", "-c", f"fsck.ext4 -f -n /dev/pmem0 >/dev/null && mount -o ro /dev/pmem0 {fs} && "
                              f"wc -c < {fs}/data && head -n 1 {fs}/data")
    assert (res.returncode, res.stdout) == (0, "1048576\npersistent\n"), res.stderr
    wait_no_loops(mnt)
