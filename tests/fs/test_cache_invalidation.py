"""The kernel caches lookups, attributes and symlink targets of the mount for an hour; every
change of the tree must be invalidated before the write that made it returns. Each test
first makes the kernel cache everything it will look at, changes the tree (sysfs writes,
ndctl), and checks right after the change returned that nothing stale is seen: vanished
devices are gone (stat, open, listings), new ones are there, links point where the tree says,
a device file shows its new device. The last test does so while other threads keep reading
the tree."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path

import pytest
from mount_kit import E820_BUS, have_ndctl, read_errno


def warm(mnt) -> int:  # type: ignore[no-untyped-def]
    """Look at every device of both buses (its link, the directory behind it, each entry
    there) and at /dev, so that the kernel caches them; returns how many paths."""
    seen = 0
    for bus in ("nd", "dax"):
        devices = mnt.sys / "bus" / bus / "devices"
        for name in os.listdir(devices):
            link = devices / name
            with contextlib.suppress(FileNotFoundError):
                os.readlink(link)
                for entry in os.listdir(link):
                    os.lstat(link / entry)
                    seen += 1
    for name in os.listdir(mnt.dev):
        with contextlib.suppress(FileNotFoundError):
            os.lstat(mnt.dev / name)
            seen += 1
    return seen


def gone(path: Path) -> bool:
    """Absent to stat, lstat and open (what a cached entry would still answer)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        return False
    return read_errno(path) == errno.ENOENT and not os.path.exists(path)


DAX_REGION = f"{E820_BUS}/region1"


def test_unbind_and_bind_are_seen_at_once(mnt) -> None:  # type: ignore[no-untyped-def]
    devdax_dir = mnt.sys / DAX_REGION / "dax1.1" / "dax1.0"
    devdax_link = mnt.sys / "bus/dax/devices/dax1.0"
    driver = mnt.sys / "bus/nd/devices/dax1.1/driver"
    node = mnt.dev / "dax1.0"
    pfn_driver = mnt.sys / "bus/nd/devices/pfn0.1/driver"
    for _ in range(3):
        assert warm(mnt) > 100
        before = os.stat(node)
        assert os.path.realpath(devdax_link) == str(devdax_dir)
        mnt.write("sys/bus/nd/drivers/dax_pmem/unbind", b"dax1.1\0")
        assert gone(devdax_link) and gone(devdax_dir) and gone(devdax_dir / "size") and gone(node)
        assert gone(driver) and gone(mnt.sys / "bus/nd/drivers/dax_pmem/dax1.1")
        assert "dax1.0" not in os.listdir(mnt.sys / "bus/dax/devices")
        assert (mnt.sys / "bus/nd/devices/dax1.1/namespace").read_text() == "namespace1.0\n"  # it stays

        mnt.write("sys/bus/nd/drivers/dax_pmem/bind", b"dax1.1\0")
        assert os.path.realpath(devdax_link) == str(devdax_dir)
        assert (devdax_dir / "size").read_text() == f"{os.stat(node).st_size}\n"
        assert os.readlink(driver).endswith("/drivers/dax_pmem")
        after = os.stat(node)
        assert after.st_mtime_ns != before.st_mtime_ns  # another device behind the name

        warm(mnt)
        devt = (mnt.sys / "block/pmem0/dev").read_text().strip()
        os.stat(mnt.sys / "dev/block" / devt)
        mnt.write("sys/bus/nd/drivers/nd_pmem/unbind", b"pfn0.1\0")
        assert gone(mnt.dev / "pmem0") and gone(mnt.sys / "block/pmem0") and gone(pfn_driver)
        assert gone(mnt.sys / "dev/block" / devt)
        mnt.write("sys/bus/nd/drivers/nd_pmem/bind", b"pfn0.1\0")
        assert (mnt.sys / "block/pmem0/size").read_text() == f"{os.stat(mnt.dev / 'pmem0').st_size // 512}\n"
        assert os.readlink(pfn_driver).endswith("/drivers/nd_pmem")


@pytest.mark.ndctl
@pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")
def test_reconfiguring_a_namespace_is_seen_at_once(mnt) -> None:  # type: ignore[no-untyped-def]
    ns = mnt.sys / "bus/nd/devices/namespace0.0"
    region0 = mnt.sys / E820_BUS / "region0"
    for mode in ("devdax", "fsdax", "sector", "fsdax"):
        warm(mnt)
        res = mnt.run("ndctl", "create-namespace", "-e", "namespace0.0", "-m", mode, "-f")
        assert res.returncode == 0, res.stderr
        holder = (ns / "holder").read_text().strip()
        devices = set(os.listdir(mnt.dev))
        if mode == "devdax":
            assert gone(mnt.dev / "pmem0") and gone(mnt.sys / "block/pmem0") and gone(mnt.dev / "pmem0s")
            dax = [n for n in devices if n.startswith("dax0.")]
            assert len(dax) == 1, devices
            assert os.path.realpath(mnt.sys / "bus/dax/devices" / dax[0]).startswith(str(region0 / holder))
        elif mode == "sector":
            assert gone(mnt.dev / "pmem0") and "pmem0s" in devices
            assert os.path.realpath(mnt.sys / "block/pmem0s") == str(region0 / holder / "block/pmem0s")
        else:
            assert "pmem0" in devices and gone(mnt.dev / "pmem0s") and not any(n.startswith("dax0.") for n in devices)
            # /sys/block/pmem0 follows the disk to whichever pfn device holds it now
            assert os.path.realpath(mnt.sys / "block/pmem0") == str(region0 / holder / "block/pmem0")
            assert (mnt.sys / "block/pmem0/size").read_text() == f"{os.stat(mnt.dev / 'pmem0').st_size // 512}\n"
        listed = mnt.ndctl("list", "-N", "-n", "namespace0.0")
        assert listed[0]["mode"] == mode  # type: ignore[index]


class Readers:
    """Threads that keep listing both buses and /dev and reading what they list, so that
    lookups race with the changes: a name may vanish between listing and reading it
    (ENOENT, ENXIO for a device file without a device); any other error is recorded."""

    def __init__(self, mnt, count: int = 3) -> None:  # type: ignore[no-untyped-def]
        self.mnt = mnt
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.rounds = 0
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(count)]

    def run(self) -> None:
        allowed = {errno.ENOENT, errno.ENXIO}
        while not self.stop.is_set():
            for bus in ("nd", "dax"):
                devices = self.mnt.sys / "bus" / bus / "devices"
                for name in os.listdir(devices):
                    for rel in ("uevent", "modalias", "driver", "subsystem"):
                        try:
                            if rel in ("driver", "subsystem"):
                                os.readlink(devices / name / rel)
                            else:
                                (devices / name / rel).read_bytes()
                        except OSError as e:
                            if e.errno not in allowed:
                                self.errors.append(f"{devices / name / rel}: {e}")
            for name in os.listdir(self.mnt.dev):
                with contextlib.suppress(FileNotFoundError):
                    os.lstat(self.mnt.dev / name)
            self.rounds += 1

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads)


@pytest.mark.ndctl
@pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")
def test_changes_while_others_read_the_tree(mnt) -> None:  # type: ignore[no-untyped-def]
    devices = mnt.sys / "bus/nd/devices"
    with Readers(mnt) as readers:
        for i in range(12):
            mnt.write("sys/bus/nd/drivers/dax_pmem/unbind", b"dax1.1\0")
            assert gone(mnt.dev / "dax1.0") and gone(mnt.sys / "bus/dax/devices/dax1.0")
            assert gone(devices / "dax1.1/driver")
            assert "dax1.0" not in os.listdir(mnt.sys / "bus/dax/devices")
            mnt.write("sys/bus/nd/drivers/dax_pmem/bind", b"dax1.1\0")
            assert "dax1.0" in os.listdir(mnt.sys / "bus/dax/devices")
            assert (mnt.sys / "bus/dax/devices/dax1.0/size").read_text() == f"{os.stat(mnt.dev / 'dax1.0').st_size}\n"
            if i % 4 == 0:  # the same through ndctl: namespace0.0's pfn device goes and comes back
                res = mnt.run("ndctl", "disable-namespace", "namespace0.0")
                assert res.returncode == 0, res.stderr
                assert gone(mnt.dev / "pmem0") and gone(mnt.sys / "block/pmem0")
                assert gone(devices / "pfn0.1") and "pfn0.1" not in os.listdir(devices)
                res = mnt.run("ndctl", "enable-namespace", "namespace0.0")
                assert res.returncode == 0, res.stderr
                holder = (devices / "namespace0.0/holder").read_text().strip()
                assert holder in os.listdir(devices)
                assert os.path.realpath(mnt.sys / "block/pmem0") == os.path.realpath(devices / holder / "block/pmem0")
        assert readers.rounds > 0
    assert readers.errors == []
