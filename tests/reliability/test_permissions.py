"""Who may do what: the mount uses default_permissions (the kernel checks the modes the
daemon reports); attribute modes are the kernel's; device files are 0600 and owned by the
mounting user, like /dev/pmem*. Without --allow-other no other user can even look at the
mount; with it, a real unprivileged user (created for the test) reads 0444/0644 attributes
and gets EACCES on stores, on 0400 files and on the device files."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from mount_kit import TEST_USERS
from reliability_kit import SMALL, e820

from vnvdimm.mounts import fuse_mounts_under, lazy_unmount, mount_entry

PFN = "sys/bus/nd/devices/pfn0.1"
R0 = "sys/bus/nd/devices/region0"
NS0 = "sys/bus/nd/devices/namespace0.0"

# Modes as drivers/nvdimm, drivers/dax and the driver core declare them.
KERNEL_MODES = {
    f"{R0}/size": 0o444, f"{R0}/nstype": 0o444, f"{R0}/mappings": 0o444, f"{R0}/read_only": 0o644,
    f"{R0}/align": 0o644, f"{R0}/pfn_seed": 0o444, f"{R0}/dax_seed": 0o444, f"{R0}/btt_seed": 0o444,
    f"{R0}/resource": 0o400, f"{R0}/init_namespaces": 0o444, f"{R0}/badblocks": 0o444,
    f"{R0}/max_available_extent": 0o444, f"{R0}/uevent": 0o644, f"{R0}/modalias": 0o444,
    f"{NS0}/mode": 0o444, f"{NS0}/holder": 0o444, f"{NS0}/holder_class": 0o644, f"{NS0}/force_raw": 0o644,
    f"{NS0}/resource": 0o400, f"{NS0}/size": 0o444, f"{NS0}/nstype": 0o444,
    f"{PFN}/mode": 0o644, f"{PFN}/uuid": 0o644, f"{PFN}/align": 0o644, f"{PFN}/namespace": 0o644,
    f"{PFN}/resource": 0o400, f"{PFN}/size": 0o444, f"{PFN}/supported_alignments": 0o444,
    f"{PFN}/memmap_state": 0o644,
    "sys/bus/nd/drivers/nd_pmem/bind": 0o200, "sys/bus/nd/drivers/nd_pmem/unbind": 0o200,
    "sys/bus/dax/drivers/device_dax/new_id": 0o200, "sys/bus/dax/drivers/device_dax/remove_id": 0o200,
    "sys/bus/dax/devices/dax1.0/size": 0o444, "sys/bus/dax/devices/dax1.0/resource": 0o400,
    "sys/devices/platform/e820_pmem/ndbus0/wait_probe": 0o444,
    "sys/devices/platform/e820_pmem/ndbus0/provider": 0o444,
    "sys/class/nd/ndctl0/dev": 0o444, "sys/block/pmem0/size": 0o444,
}


@pytest.fixture
def other_user():  # type: ignore[no-untyped-def]
    """A real unprivileged user, removed afterwards."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None:
        pytest.skip("needs root, useradd and runuser to create an unprivileged user")
    name = f"vnvdimm-test-{secrets.token_hex(4)}"
    res = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"useradd failed: {res.stderr.strip()}")
    TEST_USERS[name] = pwd.getpwnam(name).pw_uid
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def open_dir():  # type: ignore[no-untyped-def]
    """A 0755 directory outside the session's 0700 temp dir, so another user can reach the
    mount point."""
    path = Path(tempfile.mkdtemp(prefix="vnvdimm-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for mount in fuse_mounts_under(path):  # never let rmtree walk into a mount
            lazy_unmount(mount)
        shutil.rmtree(path, ignore_errors=True)


def mount_at(make_mount, base: Path, *args: str):  # type: ignore[no-untyped-def]
    m = make_mount(e820(*SMALL), *args, mount=False)
    m.root = base / "mnt"
    m.root.mkdir(mode=0o755)
    m.root.chmod(0o755)
    m.sys, m.dev = m.root / "sys", m.root / "dev"
    res = m.mount()
    assert res.returncode == 0, res.stderr
    return m


def as_user(user: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", "sh", "-c", script], capture_output=True, text=True,
                          timeout=30, cwd="/")


def options(m) -> set[str]:  # type: ignore[no-untyped-def]
    entry = mount_entry(m.root)
    assert entry is not None, f"{m.root} not mounted"
    return set(entry.options)


def test_modes_and_owners_are_the_kernels(mnt, figures) -> None:  # type: ignore[no-untyped-def]
    assert "default_permissions" in options(mnt)
    assert "allow_other" not in options(mnt)
    wrong = {}
    # Root's mount: sysfs's owner, root; an ordinary user's: every file is theirs (README,
    # "Without root"), so they may do what root may on the kernel.
    owner = 0 if os.geteuid() == 0 else os.getuid()
    for rel, mode in KERNEL_MODES.items():
        st = os.stat(mnt.path(rel))
        if stat.S_IMODE(st.st_mode) != mode or st.st_uid != owner:
            wrong[rel] = (oct(stat.S_IMODE(st.st_mode)), st.st_uid)
    assert not wrong, wrong
    for dev in ("dev/pmem0", "dev/dax1.0", "dev/ndctl0"):
        st = os.lstat(mnt.path(dev))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid() and st.st_gid == os.getgid(), dev
    for dev in ("dev/null", "dev/zero", "dev/urandom"):
        assert stat.S_IMODE(os.lstat(mnt.path(dev)).st_mode) == 0o666
    # chmod / chown of anything is refused, even for root (sysfs modes are the driver's).
    for rel in (f"{R0}/size", "dev/pmem0"):
        for call in (lambda p: os.chmod(p, 0o666), lambda p: os.chown(p, 1, 1)):
            with pytest.raises(PermissionError):
                call(mnt.path(rel))
    figures.add(checks=len(KERNEL_MODES) + 9)


def test_other_users_cannot_see_a_default_mount(make_mount, open_dir, other_user, figures) -> None:  # type: ignore[no-untyped-def]
    m = mount_at(make_mount, open_dir)
    try:
        assert "allow_other" not in options(m)
        for script in (f"ls {m.root}/sys", f"stat {m.root}/sys/bus", f"cat {m.path(R0)}/size",
                       f"dd if={m.path('dev/pmem0')} of=/dev/null bs=4096 count=1"):
            res = as_user(other_user, script)
            assert res.returncode != 0 and "Permission denied" in res.stderr, (script, res)
        # The mounting user (root here) is not affected.
        assert m.read(f"{R0}/size") == f"{64 << 20}\n"
        figures.add(denied=4)
    finally:
        m.umount()


def test_allow_other_reads_but_no_stores(make_mount, open_dir, other_user, figures) -> None:  # type: ignore[no-untyped-def]
    m = mount_at(make_mount, open_dir, "--allow-other")
    try:
        assert {"allow_other", "default_permissions"} <= options(m)
        root = m.root
        readable = [f"{R0}/size", f"{NS0}/mode", f"{PFN}/memmap_state", f"{PFN}/mode", f"{PFN}/memmap/pages_done",
                    "sys/devices/platform/e820_pmem/ndbus0/provider"]
        for rel in readable:
            res = as_user(other_user, f"cat {root / rel}")
            assert res.returncode == 0 and res.stdout == m.read(rel), (rel, res)
        res = as_user(other_user, f"ls {root}/sys/bus/nd/devices && readlink {root}/sys/bus/nd/devices/region0")
        assert res.returncode == 0 and "region0" in res.stdout, res
        denied = {
            "read a 0400 attribute": f"cat {root / PFN}/resource",
            "read a 0400 binary view": f"cat {root / PFN}/memmap/records > /dev/null",
            "store to a 0644 attribute": f"printf sync > {root / PFN}/memmap_state",
            "store read_only": f"printf 1 > {root / R0}/read_only",
            "bind": f"printf 'pfn0.1\\0' > {root}/sys/bus/nd/drivers/nd_pmem/bind",
            "unbind": f"printf 'pfn0.1\\0' > {root}/sys/bus/nd/drivers/nd_pmem/unbind",
            "read /dev/pmem0": f"dd if={root}/dev/pmem0 of=/dev/null bs=4096 count=1",
            "write /dev/pmem0": f"dd if=/dev/zero of={root}/dev/pmem0 bs=4096 count=1 conv=notrunc",
            "read /dev/dax1.0": f"dd if={root}/dev/dax1.0 of=/dev/null bs=4096 count=1",
            "create a file": f"touch {root}/sys/newfile",
            "chmod": f"chmod 666 {root / R0}/size",
        }
        for what, script in denied.items():
            res = as_user(other_user, script)
            assert res.returncode != 0, (what, res)
            assert "Permission denied" in res.stderr or "Operation not permitted" in res.stderr, (what, res)
        # Nothing changed: the refused stores never reached the model.
        assert m.read(f"{R0}/read_only") == "0\n"
        assert os.path.islink(m.path(f"{PFN}/driver"))
        # The mounting user still can.
        assert m.write(f"{PFN}/memmap_state", b"sync") == 4
        with open(m.path("dev/pmem0"), "rb") as f:
            assert len(f.read(4096)) == 4096
        figures.add(denied=len(denied), allowed_reads=len(readable) + 1)
    finally:
        m.umount()
        with contextlib.suppress(OSError):
            m.root.rmdir()
