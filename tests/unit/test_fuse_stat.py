"""The struct stat the adapter hands libfuse (built once per node of a tree): the same as
getattr() says, and never one of an older tree."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import mfusepy
import pytest
from model_kit import machine

from vnvdimm.fuse.ops import VnvdimmOperations
from vnvdimm.sysfs.kernfs import KDir, KLink
from vnvdimm.sysfs.tree import Snapshot, Tree

BUS = "/sys/devices/platform/e820_pmem/ndbus0"


def unpack(image: bytes) -> mfusepy.c_stat:
    return mfusepy.c_stat.from_buffer_copy(image)


def test_every_node_as_getattr_says(tmp_path: Path) -> None:
    with machine(tmp_path) as m:
        ops = VnvdimmOperations(Tree(m.sys))
        paths = list(ops.tree.snapshot().nodes)
        for path in paths * 2:  # built, then served again
            st, want = unpack(ops.stat_image(path)), ops.getattr(path)
            assert (st.st_mode, st.st_size, st.st_nlink, st.st_uid, st.st_rdev) == (
                want["st_mode"], want["st_size"], want["st_nlink"], want["st_uid"], want.get("st_rdev", 0)), path
            assert st.st_mtimespec.tv_sec * 10**9 + st.st_mtimespec.tv_nsec == want["st_mtime"], path


def test_a_changed_tree_is_never_answered_from_an_older_one(tmp_path: Path) -> None:
    with machine(tmp_path) as m:
        ops = VnvdimmOperations(Tree(m.sys))
        driver = f"{BUS}/region2/namespace2.0/driver"
        assert stat.S_ISLNK(unpack(ops.stat_image(driver)).st_mode)
        size = unpack(ops.stat_image("/dev/pmem2")).st_size
        assert size > 0
        m.write("drivers/nd_pmem/unbind", "namespace2.0")
        with pytest.raises(OSError) as e:
            ops.stat_image(driver)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(OSError):
            ops.stat_image("/dev/pmem2")
        m.write("drivers/nd_pmem/bind", "namespace2.0")
        assert stat.S_ISLNK(unpack(ops.stat_image(driver)).st_mode)
        assert unpack(ops.stat_image("/dev/pmem2")).st_size == size
        # a device dax node without its driver: same name, no device behind it (size 0)
        assert unpack(ops.stat_image("/dev/dax1.0")).st_size > 0
        m.write("dax/drivers/device_dax/unbind", "dax1.0")
        assert unpack(ops.stat_image("/dev/dax1.0")).st_size == 0


class SwappedTree:
    """A tree whose current snapshot the test replaces (as a rebuild does)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def snapshot(self) -> Snapshot:
        return self.snap


def tree_with(generation: int, node: KLink | KDir) -> Snapshot:
    snap = Snapshot(generation)
    snap.add("/sys/x", node)
    return snap


def test_the_same_path_in_a_new_tree_is_built_anew() -> None:
    tree = SwappedTree(tree_with(1, KLink("../a")))
    ops = VnvdimmOperations(tree)  # type: ignore[arg-type]
    assert unpack(ops.stat_image("/sys/x")).st_size == 4
    tree.snap = tree_with(2, KLink("../abcdef"))  # retargeted
    assert unpack(ops.stat_image("/sys/x")).st_size == 9
    tree.snap = tree_with(3, KDir())  # another kind
    assert stat.S_ISDIR(unpack(ops.stat_image("/sys/x")).st_mode)
    tree.snap = Snapshot(4)  # vanished
    with pytest.raises(OSError) as e:
        ops.stat_image("/sys/x")
    assert e.value.errno == errno.ENOENT
