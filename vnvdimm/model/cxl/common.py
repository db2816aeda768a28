"""What the CXL model's modules share (drivers/cxl/cxl.h, core/port.c): the bus names and
device type numbers, the CFMWS window and its interleave encodings, the kernel's number
formats, the platform devices of cxl_test and the base of every cxl bus device.

Errors are OSError(errno) where the kernel returns -errno.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnvdimm.model.base import (
    Device,
    Entry,
    Link,
    fail,
    kstrtol,
    ro,
)

if TYPE_CHECKING:
    from vnvdimm.model.system import System

CXL_BUS = "cxl"
PLATFORM_BUS = "platform"
# Modules whose /sys/module/<name> exists while cxl_test is loaded (libkmod finds them live
# instead of inserting the host's).
CXL_MODULES = ("cxl_core", "cxl_acpi", "cxl_port", "cxl_mem", "cxl_pmem", "cxl_mock", "cxl_mock_mem")
CXL_MEM_MAJOR = 250  # the memdevs' char major (dynamic in the kernel; fixed here)

# drivers/cxl/cxl.h: CXL_DEVICE_*, what cxl drivers match (modalias "cxl:t%d")
CXL_DEVICE_NONE = 0
CXL_DEVICE_PORT = 3
CXL_DEVICE_ROOT = 4
CXL_DEVICE_MEMORY_EXPANSION = 5


def granularity(eig: int) -> int:
    """eig_to_granularity(): the CFMWS encoding 0..6 -> 256 B..16 KiB."""
    return 256 << eig


def ways(eiw: int) -> int:
    """eiw_to_ways(): 0..4 -> 1, 2, 4, 8, 16; 8..10 -> 3, 6, 12."""
    return 1 << eiw if eiw <= 4 else 3 << (eiw - 8)


@dataclass(frozen=True)
class Window:
    """A CFMWS window: what a root decoder decodes."""

    eiw: int  # encoded interleave ways
    eig: int  # encoded granularity
    ram: bool  # ACPI_CEDT_CFMWS_RESTRICT_VOLATILE, else _PMEM
    size: int
    targets: tuple[int, ...]  # host-bridge uids
    xor: bool = False


# ---------------------------------------------------------------- the platform devices


class PlatformDev(Device):
    """A platform device of cxl_test (cxl_acpi.0, cxl_host_bridge.N, ...): where the cxl
    devices hang in /sys/devices/platform."""

    bus_name = PLATFORM_BUS

    def __init__(self, system: System, kind: str, pdev_id: int, parent: PlatformDev | None,
                 numa_node: int = -1, physical_node: bool = False) -> None:
        super().__init__(system, f"{kind}.{pdev_id}", parent)
        self.kind = kind
        self.pdev_id = pdev_id
        self.numa_node = numa_node
        self.physical_node = physical_node  # cxl_test links host bridges to themselves
        self.kids: list[Device] = []
        # the attributes its driver adds (cxl_mock_mem's security_lock on cxl_mem.N)
        self.driver_entries: Callable[[], list[Entry]] | None = None
        if parent is not None:
            parent.kids.append(self)

    @property
    def sysfs_dir(self) -> str:
        return f"/devices/platform/{self.name}"

    def entries(self) -> list[Entry]:
        out: list[Entry] = [
            ro("modalias", lambda: f"platform:{self.kind}\n"),
            ro("numa_node", lambda: f"{self.numa_node}\n"),
            ro("driver_override", lambda: "(null)\n"),
        ]
        if self.physical_node:
            out.append(Link("physical_node", self))
        if self.driver_entries is not None:
            out += self.driver_entries()
        return super().entries() + out

    def uevent(self) -> str:
        driver = f"DRIVER={self.driver.name}\n" if self.driver else ""
        return f"{driver}MODALIAS=platform:{self.kind}\n"

    def children(self) -> Iterable[Device]:
        return list(self.kids)


# ---------------------------------------------------------------- cxl bus devices


class CxlDev(Device):
    bus_name = CXL_BUS
    cxl_type = CXL_DEVICE_NONE

    def entries(self) -> list[Entry]:
        return [
            ro("devtype", lambda: f"{self.devtype}\n"),
            ro("modalias", lambda: f"cxl:t{self.cxl_type}\n"),
            *[e for e in super().entries() if e.name == "uevent"],
        ]

    def uevent(self) -> str:
        driver = f"DRIVER={self.driver.name}\n" if self.driver else ""
        return f"DEVTYPE={self.devtype}\n{driver}MODALIAS=cxl:t{self.cxl_type}\n"


SZ_256M = 256 << 20

# region.c's enum cxl_config_state
CXL_CONFIG_IDLE = 0
CXL_CONFIG_INTERLEAVE_ACTIVE = 1
CXL_CONFIG_ACTIVE = 2
CXL_CONFIG_RESET_PENDING = 3
CXL_CONFIG_COMMIT = 4
CXL_DEVICE_REGION = 6
MAX_REGION_TARGETS = 16  # CXL_DECODER_MAX_INTERLEAVE


def eig_of(gran: int) -> int:
    """granularity_to_eig(): 256 B..16 KiB, powers of 2; EINVAL otherwise."""
    if gran < 256 or gran > 16384 or gran & (gran - 1):
        raise fail(errno.EINVAL, f"granularity {gran}")
    return gran.bit_length() - 9


def eiw_of(iw: int) -> int:
    """ways_to_eiw(): 1, 2, 4, 8, 16, 3, 6, 12; EINVAL otherwise."""
    table = {1: 0, 2: 1, 4: 2, 8: 3, 16: 4, 3: 8, 6: 9, 12: 10}
    if iw not in table:
        raise fail(errno.EINVAL, f"interleave ways {iw}")
    return table[iw]


def c_hex(value: int) -> str:
    """printf("%#llx"): 0x-prefixed, except zero, which prints as "0"."""
    return f"{value:#x}" if value else "0"


def c_phys(value: int) -> str:
    """printk's "%pa" of a resource_size_t: 0x and 16 zero-padded hex digits."""
    return f"0x{value:016x}"


def kstrtoint(buf: bytes) -> int:
    value = kstrtol(buf, 0)
    if not -(1 << 31) <= value < 1 << 31:
        raise fail(errno.ERANGE, "number out of range")
    return value


