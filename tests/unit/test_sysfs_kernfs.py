"""kernfs semantics, without a mount: one store() per write with the kernel's buffer rules,
show() per read at offset 0 (seq_file), EACCES for the wrong direction, PAGE_SIZE limits, and
the FUSE adapter's mapping of those (st_size 4096, open flags, errno)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from model_kit import machine

from vnvdimm.fuse.libfuse import _libfuse, bufvec_type, memory_bufvec
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
_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]


def read(o: VnvdimmOperations, h: SimpleNamespace, size: int, offset: int) -> bytes:
    """A READ as libfuse makes it: the reply buffer read_reply() hands over, copied out as
    libfuse copies it into the reply, then freed as libfuse frees it."""
    address = o.read_reply(h.fh, size, offset)
    try:
        length = _libfuse.fuse_buf_size(address)
        mem = ctypes.create_string_buffer(length)
        dst = bufvec_type(1)()
        dst.count = 1
        dst.buf[0].size, dst.buf[0].mem = length, ctypes.addressof(mem)
        assert _libfuse.fuse_buf_copy(ctypes.byref(dst), address, 0) == length
        return mem.raw
    finally:
        vec = bufvec_type(1).from_address(address)
        if vec.count and vec.buf[0].fd < 0:  # a memory reply: its copy is malloc()ed too
            _libc.free(vec.buf[0].mem)
        _libc.free(address)


def write(o: VnvdimmOperations, h: SimpleNamespace, data: bytes, offset: int) -> int:
    """A WRITE as libfuse makes it: its bytes in a struct fuse_bufvec handed to write_from()."""
    address = memory_bufvec(data)
    try:
        return o.write_from(h.fh, address, offset)
    finally:
        _libc.free(bufvec_type(1).from_address(address).buf[0].mem)
        _libc.free(address)


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
    for op in (lambda: read(o, h, 16, 0), lambda: write(o, h, b"x", 0)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EINVAL


def test_read_write_through_the_adapter(ops) -> None:  # type: ignore[no-untyped-def]
    o, m = ops
    h = fi(os.O_RDWR)
    o.open(f"{REGION0}/read_only", h)
    assert h.direct_io == 1
    assert read(o, h, 4096, 0) == b"0\n"
    assert o.truncate(f"{REGION0}/read_only", 0, h) == 0  # echo > attr opens with O_TRUNC: ignored
    assert write(o, h, b"1\n", 0) == 2
    assert read(o, h, 4096, 0) == b"1\n"
    with pytest.raises(OSError) as e:
        write(o, h, b"maybe", 0)
    assert e.value.errno == errno.EINVAL
    o.close(h.fh)
    assert m.read("region0/read_only") == "1\n"


def test_reads_fail_with_the_show_errno(ops) -> None:  # type: ignore[no-untyped-def]
    o, _ = ops
    h = fi(os.O_RDONLY)
    o.open(f"{REGION0}/pfn0.0/resource", h)
    with pytest.raises(OSError) as e:
        read(o, h, 4096, 0)
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


def test_device_bytes_through_the_adapter(ops) -> None:  # type: ignore[no-untyped-def]
    """read_reply() answers a device read with the media file's ranges (libfuse splices
    them), write_from() moves a write's bytes into them; both cut at the device's end."""
    o, m = ops
    size = o.getattr("/dev/pmem0")["st_size"]
    h = fi(os.O_RDWR)
    o.open("/dev/pmem0", h)
    payload = os.urandom(5000)
    assert write(o, h, payload, 12345) == 5000
    assert read(o, h, 5000, 12345) == payload
    assert write(o, h, b"tail" * 4, size - 6) == 6  # cut at the end
    assert read(o, h, 100, size - 6) == b"tailta"
    assert read(o, h, 100, size) == b""
    with pytest.raises(OSError) as e:
        write(o, h, b"x", size)
    assert e.value.errno == errno.ENOSPC
    o.close(h.fh)
    assert m.dev("pmem0").data.read(5000, 12345) == payload  # type: ignore[attr-defined]


def test_a_device_write_clears_the_bad_sectors_it_covers(ops) -> None:  # type: ignore[no-untyped-def]
    o, m = ops
    m.write("pmem0/badblocks", b"8 2\n")
    h = fi(os.O_RDWR)
    o.open("/dev/pmem0", h)
    with pytest.raises(OSError) as e:
        read(o, h, 512, 8 * 512)
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:  # part of a bad sector: refused (pmem_do_write())
        write(o, h, bytes(100), 8 * 512)
    assert e.value.errno == errno.EIO
    assert write(o, h, b"\x5a" * 512, 8 * 512) == 512
    assert read(o, h, 512, 8 * 512) == b"\x5a" * 512
    assert m.read("pmem0/badblocks") == "9 1\n"
    o.close(h.fh)


def test_a_short_write_clears_only_the_sectors_it_reached(ops) -> None:  # type: ignore[no-untyped-def]
    """DataPath.written() with fewer bytes than the extents hold (libfuse moved part of a
    request): only whole sectors within what reached the media turn good."""
    _, m = ops
    data = m.dev("pmem0").data  # type: ignore[attr-defined]
    m.write("pmem0/badblocks", b"8 4\n")
    extents = data.write_extents(8 * 512, 4 * 512)
    data.written(extents, 512 + 100)  # sector 8 whole, 100 bytes of sector 9
    assert m.read("pmem0/badblocks") == "9 3\n"
