"""The cxl_pmem bridge's nmems in the model (no FUSE): an nmem's label commands and the memdev's mailbox
(the ioctl /dev/cxl/memN answers) are two views of the same label storage bytes; the bridge's
devices follow the CXL devices they hang below."""

from __future__ import annotations

import errno
import os
import posixpath
import struct

import pytest
from test_cxl_mailbox import Arg
from test_cxl_topology import read, real, write

from vnvdimm.model import drivers
from vnvdimm.model.commands.envelope import (
    ND_CMD_ARS_CAP,
    ND_CMD_GET_CONFIG_DATA,
    ND_CMD_GET_CONFIG_SIZE,
    ND_CMD_SET_CONFIG_DATA,
    ND_CMD_SMART,
    CommandError,
    Request,
)
from vnvdimm.model.cxl import CxlMemdev
from vnvdimm.model.cxl.pmem import CxlNmem, CxlNvdimmBus
from vnvdimm.model.cxl.security import CxlSecurityOps
from vnvdimm.model.cxl_mailbox import CXL_MEM_SEND_COMMAND, ID_GET_LSA, ID_SET_LSA, ID_SET_SHUTDOWN_STATE, memdev_ioctl
from vnvdimm.model.security import ZERO_KEY, PassphraseType, SecFlag, bit
from vnvdimm.model.system import System
from vnvdimm.sysfs.tree import Tree
from vnvdimm.topology import cxl_test

LSA_SIZE = 128 << 10
IN_PTR, OUT_PTR = 0x10000, 0x100000


class Caller:
    """The calling process's two payload buffers: the input it offers and room for the output."""

    def __init__(self, payload_in: bytes, out_size: int) -> None:
        self.payload_in = payload_in
        self.out = bytearray(out_size)

    def read_input(self, length: int) -> bytes:
        return self.payload_in[:length]

    def write_output(self, data: bytes) -> None:
        self.out[:len(data)] = data


def mailbox(memdev: CxlMemdev, cmd_id: int, payload_in: bytes, out_size: int) -> bytes:
    """One CXL_MEM_SEND_COMMAND on /dev/cxl/memN, as `cxl read-labels`/`write-labels` send it."""
    caller = Caller(payload_in, out_size)
    arg = Arg(struct.pack("<IIIIiIQiIQ", cmd_id, 0, 0, 0, len(payload_in), 0, IN_PTR, out_size, 0, OUT_PTR))
    memdev_ioctl(memdev.firmware, CXL_MEM_SEND_COMMAND, arg, caller)
    (size_out,) = struct.unpack_from("<i", arg.buf, 32)
    return bytes(caller.out[:size_out])


@pytest.fixture
def tree() -> Tree:
    system = System()
    drivers.register(system)
    cxl_test.build(system)
    return Tree(system)


def cxl_bus(tree: Tree) -> CxlNvdimmBus:
    (bus,) = [b for b in tree.system.buses if isinstance(b, CxlNvdimmBus)]
    return bus


def nmem_and_memdev(tree: Tree, memdev_name: str) -> tuple[CxlNmem, CxlMemdev]:
    bus = cxl_bus(tree)
    nmem = next(d for d in bus.dimms if isinstance(d, CxlNmem) and d.cxl_nvd.memdev.name == memdev_name)
    return nmem, nmem.cxl_nvd.memdev


def exists(tree: Tree, path: str) -> bool:
    return tree.lookup(real(tree, path)) is not None


def ctl(tree: Tree, nmem: CxlNmem, cmd: int, buf: bytes) -> tuple[int, bytearray]:
    req = Request(cmd, cmd, bytearray(buf))
    rc = cxl_bus(tree).firmware.ctl_dimm(nmem, req)
    return rc, req.buf


def test_label_commands_and_the_mailbox_share_the_label_storage(tree: Tree) -> None:
    nmem, memdev = nmem_and_memdev(tree, "mem5")
    # cxl_pmem_get_config_size(): the LSA size, a payload less the SET_LSA header per transfer
    _, buf = ctl(tree, nmem, ND_CMD_GET_CONFIG_SIZE, bytes(12))
    assert struct.unpack("<III", buf) == (0, LSA_SIZE, 4096 - 8)

    # written as ndctl write-labels does (SET_CONFIG_DATA), read through the mailbox (GET_LSA)
    data = os.urandom(4000)
    rc, _ = ctl(tree, nmem, ND_CMD_SET_CONFIG_DATA, struct.pack("<II", 8192, len(data)) + data + bytes(4))
    assert rc == 0
    assert mailbox(memdev, ID_GET_LSA, struct.pack("<II", 8192, len(data)), len(data)) == data

    # while cxl_pmem holds the nvdimm, SET_LSA is the kernel's: EBUSY, and nothing written
    other = os.urandom(1024)
    set_lsa = struct.pack("<II", LSA_SIZE - len(other), 0) + other
    with pytest.raises(OSError) as busy:
        mailbox(memdev, ID_SET_LSA, set_lsa, 0)
    assert busy.value.errno == errno.EBUSY
    assert memdev.firmware.lsa[-len(other):] == bytes(len(other))
    # with the memdev disabled (its nvdimm gone) the mailbox writes; the nmem of the next
    # enable reads it as ndctl read-labels does (GET_CONFIG_DATA)
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/unbind", b"mem5")
    assert mailbox(memdev, ID_SET_LSA, set_lsa, 0) == b""
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/bind", b"mem5")
    nmem, _ = nmem_and_memdev(tree, "mem5")
    rc, buf = ctl(tree, nmem, ND_CMD_GET_CONFIG_DATA,
                  struct.pack("<III", LSA_SIZE - len(other), len(other), 0xFFFF) + bytes(len(other)))
    assert rc == 0 and struct.unpack_from("<I", buf, 8) == (0,) and bytes(buf[12:]) == other
    # and the nvdimm driver's own reads (label_area, in max_xfer pieces) see both
    assert nmem.label_area is not None
    whole = nmem.label_area.read(0, LSA_SIZE)
    assert whole[8192:8192 + len(data)] == data and whole[-len(other):] == other

    # another memdev's label storage is its own
    nmem2, _ = nmem_and_memdev(tree, "mem6")
    assert nmem2.label_area is not None and nmem2.label_area.read(8192, len(data)) == bytes(len(data))


def test_the_nmem_answers_only_its_label_commands(tree: Tree) -> None:
    nmem, _ = nmem_and_memdev(tree, "mem0")
    for cmd in (ND_CMD_SMART, ND_CMD_ARS_CAP):
        with pytest.raises(CommandError) as e:
            ctl(tree, nmem, cmd, bytes(128))
        assert e.value.errno == errno.ENOTTY
    with pytest.raises(CommandError) as e:
        cxl_bus(tree).firmware.ctl_bus(Request(ND_CMD_ARS_CAP, ND_CMD_ARS_CAP, bytearray(32)))
    assert e.value.errno == errno.ENOTTY
    # a read past the label area is refused and returns nothing
    with pytest.raises(OSError) as e2:
        ctl(tree, nmem, ND_CMD_GET_CONFIG_DATA, struct.pack("<III", LSA_SIZE, 16, 0) + bytes(16))
    assert e2.value.errno == errno.EINVAL


def test_bridge_devices_follow_the_cxl_devices(tree: Tree) -> None:
    bus = cxl_bus(tree)
    assert bus.provider == "cxl_test" and len(bus.dimms) == 10
    assert real(tree, f"/sys/bus/nd/devices/{bus.name}") == \
        "/sys/devices/platform/cxl_acpi.0/root0/nvdimm-bridge0/" + bus.name
    nmem, memdev = nmem_and_memdev(tree, "mem2")
    assert read(tree, f"/sys/bus/nd/devices/{nmem.name}/cxl/provider") == "pmem2\n"
    assert read(tree, f"/sys/bus/nd/devices/{nmem.name}/cxl/id") == "2\n"
    assert real(tree, "/sys/bus/cxl/devices/pmem2").endswith("/cxl_mem.2/mem2/pmem2")

    # the memdev disabled: its pmemN and nmem go; enabled again: they come back
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/unbind", b"mem2")
    assert nmem not in bus.dimms and memdev.cxl_nvd is None
    assert not exists(tree, "/sys/bus/cxl/devices/pmem2")
    assert not exists(tree, f"/sys/bus/nd/devices/{nmem.name}")
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/bind", b"mem2")
    assert read(tree, "/sys/bus/cxl/devices/pmem2/devtype") == "cxl_nvdimm\n"
    assert len(bus.dimms) == 10

    # cxl_acpi unbound: the bridge, the bus and its nmems are gone
    write(tree, "/sys/bus/platform/drivers/cxl_acpi/unbind", b"cxl_acpi.0")
    assert not [b for b in tree.system.buses if isinstance(b, CxlNvdimmBus)]
    assert not exists(tree, "/sys/bus/cxl/devices/nvdimm-bridge0")
    assert not exists(tree, f"/sys/bus/nd/devices/{bus.name}")


def test_cxl_security_as_mem_c_answers_it(tree: Tree) -> None:
    """The nmem's `security` over the memdev's mock security: a passphrase set, guessed wrong
    until the try limit freezes it, cxl_mem.N's security_lock, unlock, freeze and erase."""
    nmem, memdev = nmem_and_memdev(tree, "mem2")
    security = f"/sys/bus/nd/devices/{nmem.name}/security"
    lock = posixpath.join(posixpath.dirname(real(tree, "/sys/bus/cxl/devices/mem2")), "security_lock")
    ops = CxlSecurityOps(memdev.mock_security)
    key, other = os.urandom(32), os.urandom(32)
    assert read(tree, security) == "disabled\n"
    with pytest.raises(OSError) as e:  # nothing to lock with yet
        write(tree, lock, b"1")
    assert e.value.errno == errno.ENXIO

    ops.change_key(ZERO_KEY, key, PassphraseType.USER)
    assert read(tree, security) == "unlocked\n" and read(tree, lock) == "0\n"
    write(tree, lock, b"1")  # behind the kernel's back: the next read asks the device
    assert read(tree, security) == "locked\n"
    with pytest.raises(OSError) as e:
        ops.unlock(other)
    assert e.value.errno == errno.ENXIO and read(tree, security) == "locked\n"
    ops.unlock(key)
    assert read(tree, security) == "unlocked\n"

    # three wrong passphrases: the user passphrase is frozen, the right one no longer works
    for _ in range(3):
        with pytest.raises(OSError):
            ops.change_key(other, other, PassphraseType.USER)
    assert ops.get_flags(PassphraseType.USER, False) & bit(SecFlag.FROZEN)
    with pytest.raises(OSError):
        ops.disable(key)
    # a lock resets the limit (mem.c's security_lock_store); a secure erase removes the passphrase
    write(tree, lock, b"1")
    ops.unlock(key)
    ops.erase(key, PassphraseType.USER)
    assert read(tree, security) == "disabled\n"

    # frozen: nothing changes any more
    ops.change_key(ZERO_KEY, key, PassphraseType.USER)
    ops.freeze()
    with pytest.raises(OSError):
        ops.disable(key)
    assert ops.get_flags(PassphraseType.USER, False) == bit(SecFlag.FROZEN) | bit(SecFlag.UNLOCKED)
    assert read(tree, security) == "unlocked\n" and read(tree, f"/sys/bus/nd/devices/{nmem.name}/frozen") == "1\n"


def test_cxl_pmem_drivers_have_no_bind_files_and_hold_the_label_writes(tree: Tree) -> None:
    for drv in ("cxl_nvdimm_bridge", "cxl_nvdimm", "cxl_pmem_region"):  # suppress_bind_attrs
        assert tree.lookup(f"/sys/bus/cxl/drivers/{drv}/uevent") is not None
        assert tree.lookup(f"/sys/bus/cxl/drivers/{drv}/bind") is None
        assert tree.lookup(f"/sys/bus/cxl/drivers/{drv}/unbind") is None
    _, memdev = nmem_and_memdev(tree, "mem1")
    # while cxl_pmem holds the memdev, SET_LSA (and SET_SHUTDOWN_STATE) are the kernel's
    assert memdev.exclusive_commands() == {ID_SET_LSA, ID_SET_SHUTDOWN_STATE}
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/unbind", b"mem1")
    assert memdev.exclusive_commands() == frozenset()
