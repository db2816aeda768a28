"""The ioctl commands answered by the model, without a mount: the kernel's envelope rules
(sizes, masks, families, read-only opens) and their errno, ARS and error injection, the Intel
health and firmware commands, and a fuzz of malformed buffers."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_kit import E820_FOUR, NFIT_TWO, Machine

from vnvdimm.model.commands.dispatch import answer
from vnvdimm.model.system import System


class Buffer:
    """The ioctl argument: a bytearray; addresses past its end are EFAULT."""

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self.data = bytearray(data)

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > len(self.data):
            raise OSError(errno.EFAULT, "past the buffer")
        return bytes(self.data[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.data):
            raise OSError(errno.EFAULT, "past the buffer")
        self.data[offset:offset + len(data)] = data


def iowr(nr: int, size: int) -> int:
    return 3 << 30 | size << 16 | ord("N") << 8 | nr


ARS_CAP, ARS_START, ARS_STATUS, CLEAR_ERROR, CALL = iowr(1, 32), iowr(2, 32), iowr(3, 48), iowr(4, 32), iowr(10, 64)
SMART_LEGACY, DIMM_FLAGS, VENDOR = iowr(1, 132), iowr(3, 8), iowr(9, 8)


def pkg(family: int, func: int, payload: bytes, size_out: int) -> bytearray:
    size_in = len(payload)
    return bytearray(struct.pack("<QQII36xI", family, func, size_in, size_out, 0) + payload + bytes(size_out))


def ioctl(system: System, name: str, request: int, buf: Buffer, accmode: int = os.O_RDWR) -> int:
    """The errno (0 on success)."""
    try:
        answer(system, name, accmode, request, buf)
    except OSError as e:
        return e.errno or -1
    return 0


@pytest.fixture
def nfit(tmp_path: Path) -> Iterator[System]:
    m = Machine(tmp_path / "state", NFIT_TWO)
    yield m.boot()
    m.shutdown()


@pytest.fixture
def e820(tmp_path: Path) -> Iterator[System]:
    m = Machine(tmp_path / "state", E820_FOUR)
    yield m.boot()
    m.shutdown()


def test_envelope_errno(nfit: System) -> None:
    assert ioctl(nfit, "nmem0", VENDOR, Buffer(bytes(64))) == errno.ENOTTY  # not advertised
    assert ioctl(nfit, "nmem0", DIMM_FLAGS, Buffer(bytes(64))) == errno.ENOTTY
    assert ioctl(nfit, "nmem0", iowr(0, 0), Buffer()) == errno.ENOTTY  # ND_CMD_IMPLEMENTED has no payload
    assert ioctl(nfit, "nmem0", iowr(11, 8), Buffer(bytes(64))) == errno.ENOTTY  # beyond ND_CMD_CALL
    assert ioctl(nfit, "ndctl0", ARS_CAP, Buffer(bytes(31))) == errno.EFAULT  # the kernel reads 32 bytes
    assert ioctl(nfit, "ndctl0", ARS_START, Buffer(bytes(32)), os.O_RDONLY) == errno.EPERM
    assert ioctl(nfit, "ndctl0", ARS_CAP, Buffer(bytes(32)), os.O_RDONLY) == 0  # reading is fine
    assert ioctl(nfit, "nmem0", CALL, Buffer(pkg(6, 1, b"", 132))) == errno.EINVAL  # > NVDIMM_FAMILY_MAX
    assert ioctl(nfit, "nmem0", CALL, Buffer(pkg(1, 1, b"", 132))) == errno.EINVAL  # HPE1: not this bus's
    assert ioctl(nfit, "ndctl0", CALL, Buffer(pkg(2, 7, b"", 21))) == errno.EINVAL  # > NVDIMM_BUS_FAMILY_MAX
    assert ioctl(nfit, "nmem0", CALL, Buffer(pkg(0, 19, b"", 8))) == errno.EOPNOTSUPP  # security: the kernel's
    assert ioctl(nfit, "nmem0", CALL, Buffer(pkg(0, 30, b"", 8))) == errno.EOPNOTSUPP  # firmware activation too
    assert ioctl(nfit, "ndctl0", CALL, Buffer(pkg(1, 1, b"", 8))) == errno.EOPNOTSUPP  # Intel bus family
    assert ioctl(nfit, "nmem0", CALL, Buffer(pkg(0, 11, b"", 8))) == errno.ENOTTY  # not advertised
    assert ioctl(nfit, "nmem0", CALL, Buffer(b"\0" * 10)) == errno.EFAULT  # no room for the package
    assert ioctl(nfit, "nmem9", CALL, Buffer(pkg(0, 1, b"", 132))) == errno.ENXIO  # no such node
    assert ioctl(nfit, "nmem0", CALL, Buffer(pkg(0, 1, b"", 4))) == errno.EINVAL  # SMART wants 132 bytes
    # ARS_STATUS sizes its records from out_length: 7 makes the u32 size UINT_MAX (EFAULT), 5 a
    # huge one: the envelope's 248 bytes of it must be readable, then the total is too big
    assert ioctl(nfit, "ndctl0", ARS_STATUS, Buffer(struct.pack("<II", 0, 7) + bytes(40))) == errno.EFAULT
    assert ioctl(nfit, "ndctl0", ARS_STATUS, Buffer(struct.pack("<II", 0, 5) + bytes(40))) == errno.EFAULT
    assert ioctl(nfit, "ndctl0", ARS_STATUS, Buffer(struct.pack("<II", 0, 5) + bytes(248))) == errno.EINVAL


def test_a_bus_without_firmware_has_no_commands(e820: System) -> None:
    assert ioctl(e820, "ndctl0", ARS_CAP, Buffer(bytes(32))) == errno.ENOTTY
    assert ioctl(e820, "ndctl0", CALL, Buffer(pkg(0, 7, bytes(21), 0))) == errno.EINVAL
    assert ioctl(e820, "dax1.0", ARS_CAP, Buffer(bytes(32))) == errno.ENOTTY  # device-dax: no ioctls


def test_block_ioctls(e820: System) -> None:
    buf = Buffer(bytes(8))
    assert ioctl(e820, "pmem0", 0x80081272, buf) == 0  # BLKGETSIZE64
    (size,) = struct.unpack("<Q", buf.data)
    disk = next(d.disk for d in e820.all_devices() if getattr(getattr(d, "disk", None), "name", "") == "pmem0")
    assert size == disk.data.size
    buf = Buffer(bytes(4))
    assert ioctl(e820, "pmem3s", 0x1268, buf) == 0  # BLKSSZGET: the BTT's sector size
    assert struct.unpack("<i", buf.data) == (4096,)
    assert ioctl(e820, "pmem0", 0x1268, Buffer(bytes(2))) == errno.EFAULT
    # BLKROSET: the block device's own read-only policy, which BLKROGET and writes then see
    assert ioctl(e820, "pmem0", 0x125D, Buffer(struct.pack("<i", 1))) == 0
    ro = Buffer(bytes(4))
    assert ioctl(e820, "pmem0", 0x125E, ro) == 0 and struct.unpack("<i", ro.data) == (1,)
    with pytest.raises(OSError) as refused:
        disk.data.write(b"x" * 512, 0)
    assert refused.value.errno == errno.EPERM  # blkdev_write_iter() on a read-only bdev
    assert ioctl(e820, "pmem0", 0x125D, Buffer(struct.pack("<i", 0))) == 0
    assert ioctl(e820, "pmem0", 0x125E, ro) == 0 and struct.unpack("<i", ro.data) == (0,)
    assert disk.data.write(b"x" * 512, 0) == 512
    assert ioctl(e820, "pmem0", 0x125D, Buffer(bytes(2))) == errno.EFAULT


def test_ars_reports_injected_errors_and_clear_error_clears_them(nfit: System) -> None:
    bus = nfit.buses[0]
    region = bus.regions[0]
    addr = region.start + (1 << 20)
    inj = Buffer(pkg(0, 7, struct.pack("<QQB", addr, 512, 0), 4))
    assert ioctl(nfit, "ndctl0", CALL, inj) == 0
    cap = Buffer(struct.pack("<QQ", region.start, region.size) + bytes(16))
    assert ioctl(nfit, "ndctl0", ARS_CAP, cap) == 0
    status, max_out, clear_unit = struct.unpack_from("<III", cap.data, 16)
    assert (status >> 16, clear_unit) == (3, 256)
    assert ioctl(nfit, "ndctl0", ARS_START, Buffer(struct.pack("<QQH", region.start, region.size, 2) + bytes(14))) == 0
    ars = Buffer(struct.pack("<II", 0, max_out - 4) + bytes(max_out - 8))
    assert ioctl(nfit, "ndctl0", ARS_STATUS, ars) == 0
    (n,) = struct.unpack_from("<I", ars.data, 44)
    assert n == 1
    assert struct.unpack_from("<QQ", ars.data, 48 + 8) == (addr, 512)
    # misaligned clears are refused; an aligned one empties the platform's list
    assert ioctl(nfit, "ndctl0", CLEAR_ERROR, Buffer(struct.pack("<QQ", addr + 1, 512) + bytes(16))) == errno.EINVAL
    clear = Buffer(struct.pack("<QQ", addr, 512) + bytes(16))
    assert ioctl(nfit, "ndctl0", CLEAR_ERROR, clear) == 0
    assert struct.unpack_from("<Q", clear.data, 24) == (512,)
    get = Buffer(pkg(0, 9, b"", 8 + 16 * 4))
    assert ioctl(nfit, "ndctl0", CALL, get) == 0
    assert struct.unpack_from("<II", get.data, 64) == (0, 0)


def test_fail_cmd_makes_the_chosen_function_fail(nfit: System) -> None:
    fw = nfit.buses[0].firmware.of(nfit.buses[0].dimms[0])  # type: ignore[attr-defined]
    smart = pkg(0, 1, b"", 132)
    assert ioctl(nfit, "nmem0", CALL, Buffer(smart)) == 0
    fw.fail_cmd = 1 << 1
    assert ioctl(nfit, "nmem0", CALL, Buffer(smart)) == errno.EIO
    fw.fail_cmd_code = -errno.ENXIO
    assert ioctl(nfit, "nmem0", CALL, Buffer(smart)) == errno.ENXIO
    assert ioctl(nfit, "nmem1", CALL, Buffer(smart)) == 0


ALLOWED = {0, errno.ENOTTY, errno.EINVAL, errno.ENXIO, errno.EFAULT, errno.EPERM, errno.EBUSY, errno.EIO,
           errno.EOPNOTSUPP}
NAMES = ["ndctl0", "nmem0", "nmem3", "pmem0", "region0", "bogus", ""]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(NAMES), nr=st.integers(0, 16), size=st.integers(0, 0x3FFF),
       direction=st.integers(0, 3), raw=st.booleans(), request=st.integers(0, 2**32 - 1),
       accmode=st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR]),
       data=st.binary(max_size=600),
       family=st.integers(0, 8), func=st.integers(0, 70), size_in=st.integers(0, 300), size_out=st.integers(0, 300))
def test_malformed_ioctls_get_an_errno_never_an_exception(nfit: System, name: str, nr: int, size: int,
                                                          direction: int, raw: bool, request: int, accmode: int,
                                                          data: bytes, family: int, func: int, size_in: int,
                                                          size_out: int) -> None:
    if not raw:
        request = direction << 30 | size << 16 | ord("N") << 8 | nr
    buf = bytearray(data)
    if request & 0xFF == 10 and len(buf) >= 24:  # a plausible package often enough to go deep
        struct.pack_into("<QQII", buf, 0, family, func, size_in, size_out)
    assert ioctl(nfit, name, request, Buffer(buf), accmode) in ALLOWED
    # the model still answers
    smart = Buffer(pkg(0, 1, b"", 132))
    assert ioctl(nfit, "nmem1", CALL, smart) == 0
