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
