"""The attributes the adapter answers GETATTR with: never those of an older tree."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest
from model_kit import machine

from vnvdimm.fuse.ops import VnvdimmOperations
from vnvdimm.sysfs.kernfs import KDir, KLink
from vnvdimm.sysfs.tree import Snapshot, Tree

BUS = "/sys/devices/platform/e820_pmem/ndbus0"


def test_a_changed_tree_is_never_answered_from_an_older_one(tmp_path: Path) -> None:
    with machine(tmp_path) as m:
        ops = VnvdimmOperations(Tree(m.sys))
        driver = f"{BUS}/region2/namespace2.0/driver"
        assert stat.S_ISLNK(ops.getattr(driver)["st_mode"])
        size = ops.getattr("/dev/pmem2")["st_size"]
        assert size > 0
        m.write("drivers/nd_pmem/unbind", "namespace2.0")
        with pytest.raises(OSError) as e:
            ops.getattr(driver)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(OSError):
            ops.getattr("/dev/pmem2")
        m.write("drivers/nd_pmem/bind", "namespace2.0")
        assert stat.S_ISLNK(ops.getattr(driver)["st_mode"])
        assert ops.getattr("/dev/pmem2")["st_size"] == size
        # a device dax node without its driver: same name, no device behind it (size 0)
        assert ops.getattr("/dev/dax1.0")["st_size"] > 0
        m.write("dax/drivers/device_dax/unbind", "dax1.0")
        assert ops.getattr("/dev/dax1.0")["st_size"] == 0


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
    assert ops.getattr("/sys/x")["st_size"] == 4
    tree.snap = tree_with(2, KLink("../abcdef"))  # retargeted
    assert ops.getattr("/sys/x")["st_size"] == 9
    tree.snap = tree_with(3, KDir())  # another kind
    assert stat.S_ISDIR(ops.getattr("/sys/x")["st_mode"])
    tree.snap = Snapshot(4)  # vanished
    with pytest.raises(OSError) as e:
        ops.getattr("/sys/x")
    assert e.value.errno == errno.ENOENT
