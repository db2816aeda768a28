"""struct cxl_memdev memN (drivers/cxl/core/memdev.c), with the mock device behind its
mailbox (cxl_mailbox.MockMemdevFirmware), where its label storage lives."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from vnvdimm.model.base import (
    Device,
    DevNode,
    Entry,
    Group,
    ro,
)
from vnvdimm.model.cxl.common import (
    CXL_DEVICE_MEMORY_EXPANSION,
    CXL_MEM_MAJOR,
    CxlDev,
    PlatformDev,
    c_hex,
)
from vnvdimm.model.cxl.security import MockSecurity
from vnvdimm.model.cxl_mailbox import MockMemdevFirmware

if TYPE_CHECKING:
    from vnvdimm.model.cxl.port import CxlPort, CxlTopology

class CxlMemdev(CxlDev):
    """struct cxl_memdev memN, below its cxl_mem.N platform device; /dev/cxl/memN."""

    devtype = "cxl_memdev"
    cxl_type = CXL_DEVICE_MEMORY_EXPANSION

    def __init__(self, topo: CxlTopology, memdev_id: int, pdev: PlatformDev, serial: int, ram_size: int,
                 pmem_size: int, lsa_size: int, payload_max: int, firmware_version: str) -> None:
        super().__init__(topo.system, f"mem{memdev_id}", pdev)
        self.topo = topo
        self.id = memdev_id
        self.pdev = pdev
        self.serial = serial
        self.ram_size = ram_size
        self.pmem_size = pmem_size
        self.lsa_size = lsa_size
        self.payload_max = payload_max
        self.firmware_version = firmware_version
        self.devt = (CXL_MEM_MAJOR, memdev_id)
        self.endpoint: CxlPort | None = None
        self.cxl_nvd: Device | None = None  # pmemN, cxl_mem's bridge to the memdev's nmem
        # the device behind the mailbox (mem.c's mock): the label area lives there
        self.firmware = MockMemdevFirmware(ram_size, pmem_size, lsa_size, payload_max, firmware_version)
        self.mock_security = MockSecurity()  # and its security state (mem.c's)
        pdev.driver_entries = self.mock_security.platform_entries
        pdev.kids.append(self)

    def entries(self) -> list[Entry]:
        return [
            *super().entries(),
            ro("dev", lambda: f"{self.devt[0]}:{self.devt[1]}\n"),
            ro("firmware_version", lambda: f"{self.firmware_version[:16]}\n"),
            ro("payload_max", lambda: f"{self.payload_max}\n"),
            ro("label_storage_size", lambda: f"{self.lsa_size}\n"),
            ro("serial", lambda: f"{c_hex(self.serial)}\n"),
            ro("numa_node", lambda: f"{self.pdev.numa_node}\n"),
            Group("ram", [ro("size", lambda: f"{c_hex(self.ram_size)}\n")]),
            Group("pmem", [ro("size", lambda: f"{c_hex(self.pmem_size)}\n")]),
        ]

    def exclusive_commands(self) -> frozenset[int]:
        """mds->exclusive_cmds: while cxl_pmem's nvdimm driver holds pmemN, SET_LSA and
        SET_SHUTDOWN_STATE are the kernel's (the mailbox ioctl flags them exclusive in
        QUERY_COMMANDS and refuses them with EBUSY)."""
        return frozenset(self.firmware.exclusive_commands)

    def devnode(self) -> DevNode:
        """/dev/cxl/memN (cxl_memdev_alloc(): "cxl/%s" in devtmpfs): ioctls only."""
        return DevNode(f"cxl/{self.name}", self.devt, control=True)

    def children(self) -> Iterable[Device]:
        return [self.cxl_nvd] if self.cxl_nvd is not None else []

    def uevent(self) -> str:
        return f"MAJOR={self.devt[0]}\nMINOR={self.devt[1]}\nDEVNAME=cxl/{self.name}\n" + super().uevent()


