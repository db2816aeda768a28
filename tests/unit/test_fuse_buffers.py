"""The libfuse buffer structures the adapter declares itself (the binding's fuse_bufvec has
a pointer where libfuse has an inline array): libfuse's own fuse_buf_copy() and
fuse_buf_size() must read them as the adapter means them, file ranges and memory alike."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from vnvdimm.fuse.libfuse import MEMORY_BUFVEC, FuseBuf, _libfuse, bufvec_type, file_bufvec, memory_bufvec


def memory_target(size: int) -> tuple[ctypes.Structure, ctypes.Array[ctypes.c_char]]:
    mem = ctypes.create_string_buffer(size)
    vec = bufvec_type(1)()
    vec.count = 1
    vec.buf[0].size, vec.buf[0].mem = size, ctypes.addressof(mem)
    return vec, mem


def test_layout_is_fuse_common_h() -> None:
    # struct fuse_buf { size_t size; enum flags; void *mem; int fd; off_t pos; } on LP64
    assert ctypes.sizeof(FuseBuf) == 40
    assert [FuseBuf.size.offset, FuseBuf.flags.offset, FuseBuf.mem.offset, FuseBuf.fd.offset,
            FuseBuf.pos.offset] == [0, 8, 16, 24, 32]
    # struct fuse_bufvec { size_t count, idx, off; struct fuse_buf buf[1]; }
    assert ctypes.sizeof(bufvec_type(1)) == 24 + 40 and ctypes.sizeof(bufvec_type(3)) == 24 + 3 * 40
    assert MEMORY_BUFVEC.size == ctypes.sizeof(bufvec_type(1))


def test_file_ranges_are_read_by_libfuse(tmp_path: Path) -> None:
    content = os.urandom(1 << 16)
    path = tmp_path / "media"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = [(4096, 100), (60000, 5000), (7, 1)]  # as a BTT map gives them: out of order
        src = file_bufvec(fd, extents)
        assert _libfuse.fuse_buf_size(ctypes.byref(src)) == 5101
        dst, mem = memory_target(5101)
        assert _libfuse.fuse_buf_copy(ctypes.byref(dst), ctypes.byref(src), 0) == 5101
        assert mem.raw == content[4096:4196] + content[60000:65000] + content[7:8]
    finally:
        os.close(fd)


def test_file_ranges_are_written_by_libfuse(tmp_path: Path) -> None:
    path = tmp_path / "media"
    path.write_bytes(bytes(8192))
    data = os.urandom(3000)
    src, mem = memory_target(len(data))
    ctypes.memmove(mem, data, len(data))
    fd = os.open(path, os.O_RDWR)
    try:
        dst = file_bufvec(fd, [(5000, 2000), (100, 1000)])
        assert _libfuse.fuse_buf_copy(ctypes.byref(dst), ctypes.byref(src), 0) == 3000
    finally:
        os.close(fd)
    media = path.read_bytes()
    assert media[5000:7000] == data[:2000] and media[100:1100] == data[2000:]
    assert media[:100] == bytes(100) and media[7000:] == bytes(1192)


def test_memory_buffer_holds_its_copy() -> None:
    address = memory_bufvec(b"idle\n")
    try:
        assert _libfuse.fuse_buf_size(address) == 5
        dst, mem = memory_target(5)
        assert _libfuse.fuse_buf_copy(ctypes.byref(dst), address, 0) == 5
        assert mem.raw == b"idle\n"
    finally:
        vec = bufvec_type(1).from_address(address)
        libc = ctypes.CDLL(None)
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free(vec.buf[0].mem)  # what libfuse does after the reply
        libc.free(address)
