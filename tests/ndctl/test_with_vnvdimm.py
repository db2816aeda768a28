"""mountscripts/with-vnvdimm: CMD runs with MNT/sys over /sys and MNT/dev over /dev, where the
standard nodes, /dev/pts, /dev/shm and Python multiprocessing keep working, devices created
later appear at once, and CMD's exit status is passed through."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mount_kit import ROOT_BLOCK_DEVICES, WITH_VNVDIMM, have_ndctl, needs_root

pytestmark = [pytest.mark.ndctl]


def test_the_issue_2_check(mnt) -> None:  # type: ignore[no-untyped-def]
    res = mnt.run("sh", "-c", 'echo x >/dev/null; python3 -c "import multiprocessing as m; m.Pool(2).map(abs,[1])"')
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""


def test_exit_status_is_passed_through(mnt) -> None:  # type: ignore[no-untyped-def]
    for status in (0, 1, 7, 255):
        assert mnt.run("sh", "-c", f"exit {status}").returncode == status
    res = mnt.run("sh", "-c", "kill -TERM $$")
    assert res.returncode == -15  # CMD is exec'd: its death by a signal is with-vnvdimm's own


def test_the_emulated_trees_are_sys_and_dev(mnt) -> None:  # type: ignore[no-untyped-def]
    res = mnt.run("sh", "-c", "cat /sys/class/nd/ndctl0/dev; cat /sys/bus/nd/devices/region0/size; ls /dev; "
                  "head -c 4 /dev/zero | od -An -tx1; ls -d /dev/pts /dev/shm; test -c /dev/null && echo chr")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert lines[:2] == ["240:0", "268435456"]
    assert {"null", "zero", "pmem0", "dax1.0", "ndctl0", "pts", "shm"} <= set(lines)
    assert "00 00 00 00" in res.stdout and "/dev/pts" in res.stdout and res.stdout.rstrip().endswith("chr")


def test_host_pts_and_shm_are_bound_in(mnt) -> None:  # type: ignore[no-untyped-def]
    res = mnt.run("python3", "-c", "import os, multiprocessing.shared_memory as s; m = s.SharedMemory(create=True, "
                  "size=4096); print(os.path.exists('/dev/shm/' + m.name)); m.close(); m.unlink(); "
                  "print(sorted(os.listdir('/dev/pts')) == sorted(os.listdir('/proc/self/root/dev/pts')))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True"]


@pytest.mark.skipif(not have_ndctl(), reason="needs ndctl")
def test_devices_created_later_appear_at_once(mnt) -> None:  # type: ignore[no-untyped-def]
    # With the device files themselves (VNVDIMM_BLOCKDEVS=0; always so without root: block
    # devices through the preload library) names come and go.
    res = subprocess.run([str(WITH_VNVDIMM), str(mnt.root), "--", "sh", "-c",
                          "test -b /dev/pmem0 && ! test -e /dev/pmem0s && "
                          "ndctl create-namespace -e namespace0.0 -m sector -f >/dev/null && "
                          "test -e /dev/pmem0s && ! test -e /dev/pmem0 && echo ok"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "VNVDIMM_BLOCKDEVS": "0"})
    assert res.returncode == 0, res.stderr
    assert res.stdout == "ok\n"


@pytest.mark.skipif(not have_ndctl(), reason="needs ndctl")
@needs_root(ROOT_BLOCK_DEVICES)
def test_block_devices_follow_the_namespaces_during_the_command(mnt) -> None:  # type: ignore[no-untyped-def]
    """As root, the block devices come and go with the disks while the command runs, as
    udev makes them: after a reconfiguration to sector mode, /dev/pmem0 is gone and
    /dev/pmem0s is a block device at once, with the BTT's capacity."""
    res = mnt.run("sh", "-c", "test -b /dev/pmem0 && ! test -e /dev/pmem0s && "
                  "ndctl create-namespace -e namespace0.0 -m sector -f >/dev/null && "
                  "test -b /dev/pmem0s && ! test -e /dev/pmem0 && blockdev --getsize64 /dev/pmem0s && "
                  "cat /sys/block/pmem0s/size")
    assert res.returncode == 0, res.stderr
    size, sectors = res.stdout.split()
    assert int(size) == int(sectors) * 512 > 0


def test_usage_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run([str(WITH_VNVDIMM)], capture_output=True, text=True)
    assert res.returncode == 2 and "with-vnvdimm MNT [-- CMD [ARG...]]" in res.stderr
    res = subprocess.run([str(WITH_VNVDIMM), str(tmp_path), "--", "true"], capture_output=True, text=True)
    assert res.returncode == 2
    assert f"{tmp_path} is not a vnvdimm mount" in res.stderr


def test_vnvdimm_run_is_with_vnvdimm_from_the_package(mnt) -> None:  # type: ignore[no-untyped-def]
    """`vnvdimm run` needs nothing of the checkout: the script, its shims and the preload
    library come from the installed package, and the venv's bin need not be on the PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VNVDIMM", "VNVDIMM_PRELOAD")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    res = subprocess.run([sys.executable, "-m", "vnvdimm.cli", "run", str(mnt.root), "--", "sh", "-c",
                          "command -v modprobe; test -c /dev/ndctl0 && echo chardev; echo \"$LD_PRELOAD\""],
                         capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert res.returncode == 0, res.stderr
    shim, chardev, preload = res.stdout.splitlines()
    assert shim.endswith("/vnvdimm/scripts/shims/modprobe")
    assert chardev == "chardev"
    assert "/vnvdimm/preload/_vnvdimm_preload" in preload
    assert "no preload library" not in res.stderr


def test_no_command_opens_a_shell(mnt) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run([str(WITH_VNVDIMM), str(mnt.root)], input="test -d /sys/bus/nd && echo in-platform\n",
                         capture_output=True, text=True, env={**os.environ, "SHELL": "/bin/sh"}, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "in-platform\n"
