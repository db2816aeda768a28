"""A device file ends where the device does: a write at or past the end of /dev/pmemN or
/dev/daxR.M fails with ENOSPC (the block layer's and device-dax's answer), one that straddles
the end writes what fits, and nothing lands beyond it."""

from __future__ import annotations

import errno
import os

import pytest
from mount_kit import SMALL_E820, mounted, sync_memmaps

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def mnt(request):  # type: ignore[no-untyped-def]
    with mounted(request, SMALL_E820) as m:
        sync_memmaps(m.sys)
        yield m


@pytest.mark.parametrize("dev", ["pmem0", "dax1.0"])
def test_a_write_at_or_past_the_end_is_enospc(mnt, dev: str) -> None:  # type: ignore[no-untyped-def]
    fd = os.open(mnt.dev / dev, os.O_RDWR)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        sysfs_size = (int(mnt.read(f"sys/bus/dax/devices/{dev}/size")) if dev.startswith("dax")
                      else int(mnt.read(f"sys/block/{dev}/size")) * 512)
        assert size > 0 and size == sysfs_size
        for offset in (size, size + 4096, size + (1 << 30)):
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"\xa5" * 4096, offset)
            assert e.value.errno == errno.ENOSPC, (dev, offset - size)
        # a write across the end writes the part that fits, and says so
        assert os.pwrite(fd, b"\x5a" * 8192, size - 4096) == 4096
        assert os.pread(fd, 8192, size - 4096) == b"\x5a" * 4096
        assert os.pread(fd, 4096, size) == b""
        assert os.fstat(fd).st_size == size  # the device did not grow
    finally:
        os.close(fd)


def test_a_read_only_disk_opens_for_writing_and_refuses_each_write(make_mount) -> None:  # type: ignore[no-untyped-def]
    """As the kernel's block layer: bdev_open() lets a read-only disk open for writing (ndctl
    opens /dev/pmemN O_RDWR|O_EXCL to see whether it is busy before disabling it); each
    write is refused by blkdev_write_iter() with EPERM, and the media keeps its bytes."""
    m = make_mount()
    read_only = m.sys / "bus/nd/devices/region0/read_only"
    dev = m.dev / "pmem0"
    with open(dev, "rb") as f:
        before = f.read(4096)
    read_only.write_bytes(b"1")
    fd = os.open(dev, os.O_RDWR | os.O_EXCL)
    try:
        with pytest.raises(OSError) as refused:
            os.pwrite(fd, b"\xa5" * 4096, 0)
        assert refused.value.errno == errno.EPERM
    finally:
        os.close(fd)
    with open(dev, "rb") as f:
        assert f.read(4096) == before
    read_only.write_bytes(b"0")
    fd = os.open(dev, os.O_RDWR | os.O_EXCL)
    try:
        assert os.pwrite(fd, b"\xa5" * 4096, 0) == 4096
    finally:
        os.close(fd)
    with open(dev, "rb") as f:
        assert f.read(4096) == b"\xa5" * 4096
