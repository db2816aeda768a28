"""kernfs semantics, without a mount: one store() per write with the kernel's buffer rules,
show() per read at offset 0 (seq_file), EACCES for the wrong direction, PAGE_SIZE limits, and
the FUSE adapter's mapping of those (st_size 4096, open flags, errno)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from model_kit import machine

from vnvdimm.fuse.ops import VnvdimmOperations
from vnvdimm.model.base import Attr
from vnvdimm.sysfs.kernfs import Events, KAttr, OpenAttr
from vnvdimm.sysfs.tree import Tree


class Recorder:
    def __init__(self, text: str = "value\n") -> None:
        self.text = text
        self.shows = 0
        self.stores: list[bytes] = []

    def show(self) -> str:
        self.shows += 1
        return self.text

    def store(self, buf: bytes) -> None:
        self.stores.append(buf)


def kattr(rec: Recorder, mode: int = 0o644, show: bool = True, store: bool = True) -> KAttr:
    return KAttr(Attr("x", mode, show=rec.show if show else None, store=rec.store if store else None),
                 threading.RLock())


def test_store_gets_the_whole_write_and_returns_its_length() -> None:
    rec = Recorder()
    node = kattr(rec)
    assert node.store(b"1\n\0") == 3
    assert rec.stores == [b"1\n\0"]


def test_store_of_more_than_a_page_is_cut_to_a_page() -> None:
    rec = Recorder()
    assert kattr(rec).store(b"a" * 5000) == 4096
    assert rec.stores == [b"a" * 4096]


def test_empty_write_does_not_reach_the_store() -> None:
    rec = Recorder()
    assert kattr(rec).store(b"") == 0
    assert rec.stores == []


def test_wrong_direction_is_eacces() -> None:
    rec = Recorder()
    with pytest.raises(OSError) as e:
        kattr(rec, 0o444, store=False).store(b"1")
    assert e.value.errno == errno.EACCES
    with pytest.raises(OSError) as e:
        kattr(rec, 0o200, show=False).show()
    assert e.value.errno == errno.EACCES


def test_store_errors_propagate() -> None:
    def refuse(buf: bytes) -> None:
        raise OSError(errno.EBUSY, "busy")

    node = KAttr(Attr("x", 0o644, show=lambda: "", store=refuse), threading.RLock())
    with pytest.raises(OSError) as e:
        node.store(b"1")
    assert e.value.errno == errno.EBUSY


def test_show_of_a_page_or_more_keeps_page_size_minus_one() -> None:
    assert len(kattr(Recorder("x" * 4095)).show()) == 4095
    assert len(kattr(Recorder("x" * 4096)).show()) == 4095  # sysfs_kf_seq_show(): "bad count"
    assert len(kattr(Recorder("x" * 9000)).show()) == 4095


def test_show_is_byte_exact_for_bytes_a_store_kept() -> None:
    assert kattr(Recorder("\udcffname\n")).show() == b"\xffname\n"


def test_show_runs_at_offset_zero_and_the_rest_of_the_file_comes_from_its_buffer() -> None:
    rec = Recorder("0123456789\n")
    node = kattr(rec)
    events = Events()
    f = OpenAttr("/x", node, 0)
    assert f.read(4, 0, events) == b"0123"
    rec.text = "changed\n"
    assert f.read(4, 4, events) == b"4567"  # same buffer
    assert f.read(100, 8, events) == b"89\n"
    assert rec.shows == 1
    assert f.read(100, 0, events) == b"changed\n"  # offset 0: a new show
    assert rec.shows == 2
    g = OpenAttr("/x", node, 0)
    assert g.read(3, 2, events) == b"ang"  # a first read past 0 still shows once
    assert rec.shows == 3
    assert events.count("/x") == 0


def test_events_wake_pollers_once_per_notify() -> None:
    events = Events()
    woken: list[int] = []
    assert events.wait("/a", 0, lambda: woken.append(1)) is False
    events.notify("/b")
    assert woken == []
    events.notify("/a")
    assert woken == [1]
    assert events.count("/a") == 1
    assert events.wait("/a", 0, lambda: woken.append(2)) is True  # changed since 0: no waiting
    assert woken == [1]


# ---------------------------------------------------------------- the FUSE adapter, called directly


@pytest.fixture
def ops(tmp_path: Path):  # type: ignore[no-untyped-def]
    with machine(tmp_path) as m:
        yield VnvdimmOperations(Tree(m.sys)), m


def fi(flags: int) -> SimpleNamespace:
    return SimpleNamespace(flags=flags, fh=0, direct_io=0, keep_cache=0, nonseekable=0)


REGION0 = "/sys/devices/platform/e820_pmem/ndbus0/region0"


def test_getattr(ops) -> None:  # type: ignore[no-untyped-def]
    o, _ = ops
    st = o.getattr(f"{REGION0}/size")
    assert stat.S_ISREG(st["st_mode"]) and stat.S_IMODE(st["st_mode"]) == 0o444 and st["st_size"] == 4096
    st = o.getattr(f"{REGION0}/resource")
    assert stat.S_IMODE(st["st_mode"]) == 0o400 and st["st_size"] == 4096
    st = o.getattr("/sys/bus/nd/drivers/nd_pmem/bind")
    assert stat.S_IMODE(st["st_mode"]) == 0o200 and st["st_size"] == 4096
    st = o.getattr(REGION0)
    assert stat.S_ISDIR(st["st_mode"]) and stat.S_IMODE(st["st_mode"]) == 0o755
    st = o.getattr("/sys/class/nd/ndctl0")
    assert stat.S_ISLNK(st["st_mode"]) and st["st_size"] == len(o.readlink("/sys/class/nd/ndctl0"))
    st = o.getattr("/dev/null")
    assert stat.S_ISCHR(st["st_mode"]) and st["st_rdev"] == os.makedev(1, 3)
    st = o.getattr("/dev/pmem0")
    assert stat.S_ISREG(st["st_mode"]) and st["st_size"] == (64 << 20) - (2 << 20)
    with pytest.raises(OSError) as e:
        o.getattr(f"{REGION0}/nosuch")
    assert e.value.errno == errno.ENOENT


def test_open_checks_the_direction_like_kernfs_fop_open(ops) -> None:  # type: ignore[no-untyped-def]
    o, _ = ops
    for path, flags in ((f"{REGION0}/size", os.O_WRONLY), (f"{REGION0}/size", os.O_RDWR),
                        ("/sys/bus/nd/drivers/nd_pmem/bind", os.O_RDONLY),
                        ("/sys/bus/nd/drivers/nd_pmem/bind", os.O_RDWR)):
        with pytest.raises(OSError) as e:
            o.open(path, fi(flags))
        assert e.value.errno == errno.EACCES, (path, flags)
    with pytest.raises(OSError) as e:
        o.open(REGION0, fi(os.O_RDONLY))
    assert e.value.errno == errno.EISDIR
    h = fi(os.O_RDWR)
    o.open("/dev/ndctl0", h)  # ioctl-only node: it opens, but has no read() or write()
    for op in (lambda: o.read("/dev/ndctl0", 16, 0, h), lambda: o.write("/dev/ndctl0", b"x", 0, h)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EINVAL


def test_read_write_through_the_adapter(ops) -> None:  # type: ignore[no-untyped-def]
    o, m = ops
    h = fi(os.O_RDWR)
    o.open(f"{REGION0}/read_only", h)
    assert h.direct_io == 1
    assert o.read(f"{REGION0}/read_only", 4096, 0, h) == b"0\n"
    assert o.truncate(f"{REGION0}/read_only", 0, h) == 0  # echo > attr opens with O_TRUNC: ignored
    assert o.write(f"{REGION0}/read_only", b"1\n", 0, h) == 2
    assert o.read(f"{REGION0}/read_only", 4096, 0, h) == b"1\n"
    with pytest.raises(OSError) as e:
        o.write(f"{REGION0}/read_only", b"maybe", 0, h)
    assert e.value.errno == errno.EINVAL
    o.release(f"{REGION0}/read_only", h)
    assert m.read("region0/read_only") == "1\n"


def test_reads_fail_with_the_show_errno(ops) -> None:  # type: ignore[no-untyped-def]
    o, _ = ops
    h = fi(os.O_RDONLY)
    o.open(f"{REGION0}/pfn0.0/resource", h)
    with pytest.raises(OSError) as e:
        o.read(f"{REGION0}/pfn0.0/resource", 4096, 0, h)
    assert e.value.errno == errno.ENXIO


def test_readdir_and_readlink(ops) -> None:  # type: ignore[no-untyped-def]
    o, _ = ops
    assert o.readdir("/sys/bus/nd/drivers", 0) == [".", "..", "nd_bus", "nvdimm", "nd_region", "nd_pmem", "dax_pmem"]
    assert o.readlink("/sys/class/nd/ndctl0") == "../../devices/platform/e820_pmem/ndbus0/ndctl0"
    with pytest.raises(OSError) as e:
        o.readlink(f"{REGION0}/size")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        o.readdir(f"{REGION0}/size", 0)
    assert e.value.errno == errno.ENOTDIR
