"""Error injection end to end: `vnvdimm inject-error`, the bus's control attributes, what the
kernel's badblocks files and the real ndctl report, EIO on reads, clearing by writes."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

import pytest
from tooltest import VNVDIMM, holder

CONTROL = "sys/devices/platform/e820_pmem/ndbus0/vnvdimm"


def inject(m, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VNVDIMM, "inject-error", str(m.root), *args], capture_output=True, text=True, timeout=60)


def data_offset_sectors(m, namespace: str) -> int:
    """Sectors between the region start and the namespace's data (after info block and memmap)."""
    pers = holder(m, namespace)
    region = namespace.replace("namespace", "region").split(".")[0]
    res = int(m.read(f"sys/bus/nd/devices/{pers}/resource"), 16)
    return (res - int(m.read(f"sys/bus/nd/devices/{region}/resource"), 16)) // 512


def test_fsdax_bad_blocks_everywhere_the_kernel_shows_them(mnt) -> None:
    res = inject(mnt, "namespace0.0", "--block", "42", "--count", "8")
    assert res.returncode == 0, res.stderr
    base = data_offset_sectors(mnt, "namespace0.0")
    assert base > 0  # fsdax map=dev: the memmap sits before the data
    assert mnt.read("sys/bus/nd/devices/region0/badblocks") == f"{base + 42} 8\n"
    assert mnt.read("sys/block/pmem0/badblocks") == "42 8\n"
    assert mnt.read("sys/bus/nd/devices/region1/badblocks") == ""
    # The real ndctl: region offsets from the region start, namespace offsets from its data.
    (doc,) = mnt.ndctl("list", "-RNM", "-r", "region0")["regions"]
    assert doc["badblock_count"] == 8
    assert doc["badblocks"] == [{"offset": base + 42, "length": 8}]
    (ns,) = doc["namespaces"]
    assert ns["badblock_count"] == 8 and ns["badblocks"] == [{"offset": 42, "length": 8}]
    status = inject(mnt, "namespace0.0", "--status")
    assert json.loads(status.stdout) == {"dev": "namespace0.0", "badblocks": [{"block": 42, "count": 8}]}


def test_reads_fail_with_eio_and_whole_sector_writes_clear(mnt) -> None:
    assert inject(mnt, "namespace0.0", "-B", "42", "-n", "8").returncode == 0
    fd = os.open(mnt.dev / "pmem0", os.O_RDWR | os.O_DIRECT)
    try:
        import mmap

        aligned = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
        with pytest.raises(OSError) as e:
            os.preadv(fd, [aligned], 42 * 512)
        assert e.value.errno == errno.EIO
        assert os.preadv(fd, [aligned], 50 * 512) == 4096  # right after the bad range: fine
        assert os.preadv(fd, [aligned], 34 * 512) == 4096  # right before: fine
        # Buffered reads of the page holding the bad sectors fail too.
        bfd = os.open(mnt.dev / "pmem0", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(bfd, 512, 44 * 512)
            assert e.value.errno == errno.EIO
        finally:
            os.close(bfd)
        # A write that covers part of a bad sector cannot clear it: EIO, nothing written.
        wfd = os.open(mnt.dev / "pmem0", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pwrite(wfd, b"x" * 100, 43 * 512 + 10)
            assert e.value.errno == errno.EIO
        finally:
            os.close(wfd)
        assert mnt.read("sys/block/pmem0/badblocks") == "42 8\n"
        # Whole sectors written: cleared (pmem_do_write clears poison), data readable.
        aligned[:1024] = b"A" * 1024
        assert os.pwritev(fd, [memoryview(aligned)[:1024]], 44 * 512) == 1024
        assert mnt.read("sys/block/pmem0/badblocks") == "42 2\n46 4\n"
        assert os.preadv(fd, [memoryview(aligned)[:1024]], 44 * 512) == 1024 and aligned[:1024] == b"A" * 1024
    finally:
        os.close(fd)


def test_devdax_reads_fail_until_cleared_and_uninject_leaves_them(mnt) -> None:
    """As on the kernel: --uninject takes the injection back but the bad blocks stay listed
    and reads of them keep failing (ndctl warns so); --clear (ndctl clear-errors) removes them."""
    assert inject(mnt, "namespace1.0", "-B", "0x10", "-n", "1000").returncode == 0
    base = data_offset_sectors(mnt, "namespace1.0")
    # badblocks_show() prints ranges of at most 512 sectors, as the kernel stores them.
    assert mnt.read("sys/bus/nd/devices/region1/badblocks") == f"{base + 16} 512\n{base + 528} 488\n"
    (ns,) = mnt.ndctl("list", "-NM", "-n", "namespace1.0")
    assert ns["badblock_count"] == 1000
    status = json.loads(subprocess.run([*VNVDIMM, "status", str(mnt.root), "--json"], capture_output=True,
                                       text=True, timeout=60).stdout)
    region1 = status["buses"][0]["regions"][1]
    assert region1["badblock_count"] == region1["namespaces"][0]["badblock_count"] == 1000
    fd = os.open(mnt.dev / "dax1.0", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 16 * 512)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    res = inject(mnt, "namespace1.0", "-B", "16", "-n", "1000", "--uninject")
    assert res.returncode == 0 and "bad blocks stay" in res.stderr, res.stderr
    assert mnt.read("sys/bus/nd/devices/region1/badblocks") == f"{base + 16} 512\n{base + 528} 488\n"
    fd = os.open(mnt.dev / "dax1.0", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 16 * 512)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert inject(mnt, "namespace1.0", "-B", "16", "-n", "1000", "--clear").returncode == 0
    assert mnt.read("sys/bus/nd/devices/region1/badblocks") == ""
    fd = os.open(mnt.dev / "dax1.0", os.O_RDONLY)  # a new open: the page cache was dropped
    try:
        assert len(os.pread(fd, 4096, 16 * 512)) == 4096
    finally:
        os.close(fd)


def test_control_attributes_are_write_only_and_strict(mnt) -> None:
    ctl = mnt.path(CONTROL)
    for name in ("inject_error", "uninject_error", "clear_error"):
        assert stat.S_IMODE(os.stat(ctl / name).st_mode) == 0o200
        with pytest.raises(PermissionError):
            (ctl / name).read_text()
    bad = {
        b"namespace0.0 1\n": errno.EINVAL,  # missing COUNT
        b"namespace0.0 1 0\n": errno.EINVAL,  # COUNT 0
        b"namespace0.0  1 1\n": errno.EINVAL,  # two spaces
        b" namespace0.0 1 1\n": errno.EINVAL,
        b"namespace0.0 1 1 1\n": errno.EINVAL,
        b"namespace0.0 1 1\n\n": errno.EINVAL,
        b"namespace0.0 -1 1\n": errno.EINVAL,
        b"namespace0.0 1x 1\n": errno.EINVAL,
        b"region0 1 1\n": errno.EINVAL,
        b"namespace7.0 1 1\n": errno.ENODEV,
        b"namespace0.0 511999 2\n": errno.EINVAL,  # past the end of the namespace's data
    }
    for data, code in bad.items():
        with pytest.raises(OSError) as e:
            mnt.write(f"{CONTROL}/inject_error", data)
        assert e.value.errno == code, data
    assert mnt.read("sys/bus/nd/devices/region0/badblocks") == ""
    # What ndctl writes (value plus NUL) and hex numbers are accepted.
    assert mnt.write(f"{CONTROL}/inject_error", b"namespace0.0 0x8 1\n\0") == len(b"namespace0.0 0x8 1\n\0")
    assert mnt.read("sys/block/pmem0/badblocks") == "8 1\n"
    # Every refusal is in the daemon's log with device, attribute and reason.
    log = (mnt.state_dir / "vnvdimm.log").read_text()
    assert "store refused: device ndbus0, attribute vnvdimm/inject_error, value 'namespace7.0 1 1': " \
           "namespace7.0 not found on ndbus0 (ENODEV)" in log


def test_command_errors(mnt) -> None:
    res = inject(mnt, "namespace0.0", "--block", "511999", "--count", "2")
    # the valid range, as the daemon counts it: the fsdax device's data area (250 MiB)
    assert res.returncode == 1 and "blocks 511999..512000 are out of range" in res.stderr, res.stderr
    assert f"the data area of {holder(mnt, 'namespace0.0')} has blocks 0..511999 (512000 blocks of 512 bytes)" \
        in res.stderr, res.stderr
    assert inject(mnt, "namespace0.0", "--block", "511999", "--count", "1").returncode == 0  # the last one is valid
    assert inject(mnt, "namespace0.0", "--block", "511999", "--uninject").returncode == 0
    res = inject(mnt, "namespace5.0", "--block", "1")
    assert res.returncode == 1 and "no such namespace" in res.stderr
    res = inject(mnt, "namespace0.0")
    assert res.returncode == 1 and "--block is required" in res.stderr


def test_sector_mode_disk_has_no_badblocks_attribute(mnt) -> None:
    mnt.ndctl("create-namespace", "-e", "namespace0.0", "-m", "sector", "-f")
    assert not mnt.path("sys/block/pmem0s/badblocks").exists()  # btt: disk->bb is NULL
    # Blocks count from the namespace start for sector mode, as ndctl counts them: the first
    # 64 KiB hold the BTT info block and the first data blocks.
    assert inject(mnt, "namespace0.0", "-B", "0", "-n", "128").returncode == 0
    assert mnt.read("sys/bus/nd/devices/region0/badblocks") == "0 128\n"
    fd = os.open(mnt.dev / "pmem0s", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 0)
        assert e.value.errno == errno.EIO
        assert len(os.pread(fd, 4096, 1 << 20)) == 4096
    finally:
        os.close(fd)
