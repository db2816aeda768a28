"""Data I/O on /dev/daxR.M as fio and ndctl's device-dax tests do it: a device-dax file opened
with any flags the kernel allows (fio adds O_NOATIME) maps MAP_SHARED, and what is written
through the mapping is the device's content, read back by another process; fio's dev-dax
engine writes and verifies."""

from __future__ import annotations

import errno
import shutil
import sys

import pytest
from mount_kit import have_ndctl

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]

WRITE_THROUGH_A_MAPPING = r"""
import mmap, os, sys
flags = os.O_RDWR | (os.O_NOATIME if sys.argv[1] == "noatime" else 0)
fd = os.open("/dev/dax1.0", flags)
m = mmap.mmap(fd, 2 << 20, mmap.MAP_SHARED, offset=2 << 20)
pattern = bytes(range(256)) * 8192
m[:] = pattern
m.close()
os.close(fd)
sys.stdout.write(pattern[:16].hex())
"""

READ_BACK = r"""
import os
fd = os.open("/dev/dax1.0", os.O_RDONLY)
data = os.pread(fd, 2 << 20, 2 << 20)
print(data[:16].hex(), data == bytes(range(256)) * 8192)
"""


@pytest.mark.parametrize("how", ["noatime", "plain"])
def test_a_device_dax_file_maps_shared_whatever_its_open_flags(mnt, how: str) -> None:  # type: ignore[no-untyped-def]
    res = mnt.run(sys.executable, "-c", WRITE_THROUGH_A_MAPPING, how)
    assert res.returncode == 0, res.stderr
    res2 = mnt.run(sys.executable, "-c", READ_BACK)
    assert res2.returncode == 0, res2.stderr
    assert res2.stdout.split() == [res.stdout, "True"]


FIO_JOB = """[global]
ioengine=dev-dax
direct=0
filename=/dev/dax1.0
verify=crc32c
bs=2m
size=16m

[write]
rw=write

[read]
stonewall
rw=read
"""


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_fio_writes_and_verifies_through_device_dax(mnt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    job = tmp_path / "dax.fio"
    job.write_text(FIO_JOB)
    res = mnt.run("sh", "-c", 'cd "$(dirname "$0")" && fio "$0"', str(job))  # its state files go there
    assert res.returncode == 0, res.stdout + res.stderr
    assert "err= 0" in res.stdout and "verify" not in res.stderr
    summary = [line.split(":")[0].strip() for line in res.stdout.splitlines() if "bw=" in line and "io=" in line]
    # the write job verifies what it wrote (a read pass of its own), the read job reads it again
    assert summary == ["READ", "WRITE", "READ"], res.stdout


POISON = r"""
import ctypes, errno, mmap, os, signal
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/dev/dax1.0", os.O_RDWR)
m = mmap.mmap(fd, 4 << 20, mmap.MAP_SHARED)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
page = addr + (2 << 20)
def madvise(advice):
    rc = libc.madvise(ctypes.c_void_p(page), ctypes.c_size_t(4096), advice)
    return "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
print("soft_offline", madvise(101))                      # MADV_SOFT_OFFLINE
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGBUS])
print("hwpoison", madvise(100))                          # MADV_HWPOISON
info = signal.sigtimedwait([signal.SIGBUS], 10)
print("sigbus", info.si_code if info else None)         # BUS_MCEERR_AR = 4
print("neighbour", m[(2 << 20) + 4096])                 # the next page is fine
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGBUS])
print("poisoned", flush=True)
m[2 << 20]                                               # SIGBUS: the process ends here
print("not reached")
"""


def test_poison_and_soft_offline_of_a_device_dax_page(mnt) -> None:  # type: ignore[no-untyped-def]
    """What the kernel does for ZONE_DEVICE pages: soft-offlining one fails (EIO, by madvise
    and by /sys/devices/system/memory/soft_offline_page); poisoning one sends the caller
    SIGBUS with BUS_MCEERR_AR, and touching it again is SIGBUS."""
    res = mnt.run(sys.executable, "-c", POISON)
    assert res.stdout.split("\n")[:5] == ["soft_offline EIO", "hwpoison ok", "sigbus 4", "neighbour 0", "poisoned"]
    assert res.returncode == -7, res.stderr  # killed by SIGBUS

    start = int(mnt.read("sys/bus/nd/devices/namespace1.0/resource"), 16)
    for written, expected in ((f"{start + 4096:#x}", errno.EIO), ("0x1000", errno.ENXIO), ("junk", errno.EINVAL)):
        with pytest.raises(OSError) as refused:
            mnt.write("sys/devices/system/memory/soft_offline_page", written.encode() + b"\n")
        assert refused.value.errno == expected, written
