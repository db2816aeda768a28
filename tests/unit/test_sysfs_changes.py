"""The tree's change feed, without a mount: which paths a rebuild reports as stale (vanished,
or changed in what a client caches: kind, mode, size, link target, device behind a device
file), that unchanged paths are never reported, that a store through the tree returns only
once its stale paths reached the sink, and the feed's delivery (order, flush, disconnect)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from model_kit import Machine, machine

from vnvdimm.model.base import Attr
from vnvdimm.sysfs.changes import ChangeFeed
from vnvdimm.sysfs.kernfs import KAttr, KLink
from vnvdimm.sysfs.tree import Tree, cached_identity

BUS = "/sys/devices/platform/e820_pmem/ndbus0"


class Recorder:
    """A sink that records what it was given (on the feed's thread)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()

    def __call__(self, paths: Sequence[str]) -> None:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(paths))

    @property
    def paths(self) -> set[str]:
        return {p for b in self.batches for p in b}


def under(paths: set[str], prefix: str) -> set[str]:
    return {p for p in paths if p == prefix or p.startswith(prefix + "/")}


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Machine, Tree, Recorder]]:
    """A booted machine, its tree, and a recorder connected to the tree's change feed."""
    with machine(tmp_path) as m:
        t = Tree(m.sys)
        sink = Recorder()
        t.changes.connect(sink)
        try:
            yield m, t, sink
        finally:
            t.changes.disconnect()


def test_an_unbind_reports_what_vanished_and_nothing_else(watched) -> None:  # type: ignore[no-untyped-def]
    m, t, sink = watched
    before = t.snapshot()
    m.write("drivers/nd_pmem/unbind", "namespace2.0")  # region2's raw namespace: pmem2 goes
    after = t.snapshot()
    assert t.changes.flush()
    stale = sink.paths
    disk = f"{BUS}/region2/namespace2.0/block/pmem2"
    assert {f"{BUS}/region2/namespace2.0/driver", "/dev/pmem2", "/sys/block/pmem2", "/sys/class/block/pmem2",
            f"{disk}/size", f"{disk}/badblocks", "/sys/bus/nd/drivers/nd_pmem/namespace2.0"} <= stale
    assert before.nodes.keys() - after.nodes.keys() <= stale  # every vanished path
    # the rest of the machine is untouched: nothing of the other regions, no attribute of
    # the namespace itself (its files stay, contents are read per read anyway)
    for region in ("region0", "region1", "region3"):
        assert not under(stale, f"{BUS}/{region}"), region
    assert f"{BUS}/region2/namespace2.0/size" not in stale
    assert "/dev/pmem0" not in stale and "/sys/bus/nd/devices" not in stale
    assert sink.threads == {"vnvdimm-sysfs-changes"}


def test_a_retargeted_link_a_new_size_and_a_new_device_are_reported(watched) -> None:  # type: ignore[no-untyped-def]
    m, t, sink = watched
    before = t.snapshot()
    kpageflags = f"{BUS}/region2/pfn2.0/memmap/kpageflags"
    assert before.identities[kpageflags] == ("bin", 0o400, 0)  # the seed claims nothing yet
    # raw -> fsdax in one go (no rebuild in between): pmem2 moves under the pfn device
    m.write("drivers/nd_pmem/unbind", "namespace2.0")
    m.write("pfn2.0/uuid", "6e0a7a29-6d0e-4c5e-9d9e-6d8a5c1c0f01")
    m.write("pfn2.0/mode", "pmem")
    m.write("pfn2.0/namespace", "namespace2.0")
    m.write("drivers/nd_pmem/bind", "pfn2.0")
    after = t.snapshot()
    assert t.changes.flush()
    link = before.nodes["/sys/block/pmem2"]
    moved = after.nodes["/sys/block/pmem2"]
    assert isinstance(link, KLink) and isinstance(moved, KLink) and link.target != moved.target
    assert after.identities[kpageflags][2] > 0
    assert before.identities["/dev/pmem2"] != after.identities["/dev/pmem2"]  # another device
    assert {"/sys/block/pmem2", "/sys/class/block/pmem2", kpageflags, "/dev/pmem2"} <= sink.paths
    assert f"{BUS}/region2/pfn2.0/mode" not in sink.paths


def test_a_mode_change_is_a_change_of_identity() -> None:
    lock = threading.RLock()
    readable = KAttr(Attr("x", 0o444, show=lambda: "1\n"), lock)
    writable = KAttr(Attr("x", 0o644, show=lambda: "1\n", store=lambda buf: None), lock)
    assert cached_identity(readable) != cached_identity(writable)
    assert cached_identity(readable) == cached_identity(KAttr(Attr("x", 0o444, show=lambda: "2\n"), lock))


def test_a_store_returns_once_its_stale_paths_were_delivered(watched) -> None:  # type: ignore[no-untyped-def]
    _, t, sink = watched
    t.snapshot()
    unbind = t.lookup("/sys/bus/nd/drivers/nd_pmem/unbind")
    read_only = t.lookup(f"{BUS}/region3/read_only")
    assert isinstance(unbind, KAttr) and isinstance(read_only, KAttr)
    assert t.store(read_only, b"1\n") == 2  # a value, not the tree: nothing to report
    assert sink.batches == []
    assert t.store(unbind, b"namespace2.0\0") == len(b"namespace2.0\0")
    assert "/dev/pmem2" in sink.paths  # delivered before the store returned


def test_feed_delivers_in_order_and_flush_waits() -> None:
    feed = ChangeFeed()
    feed.publish(["/dropped"])  # no sink: nobody caches anything
    release = threading.Event()
    got: list[list[str]] = []

    def slow_sink(paths: Sequence[str]) -> None:
        release.wait(10)
        got.append(list(paths))

    feed.connect(slow_sink)
    try:
        feed.publish(["/a"])
        assert not feed.flush(timeout=0.05)  # the sink holds: not delivered yet
        feed.publish(["/b", "/c"])
        release.set()
        assert feed.flush()
        assert [p for batch in got for p in batch] == ["/a", "/b", "/c"]
        assert feed.flush()  # nothing pending: at once
    finally:
        feed.disconnect()
    feed.publish(["/after"])
    assert feed.flush(timeout=0.05)
    assert [p for batch in got for p in batch] == ["/a", "/b", "/c"]
