"""Device-dax (drivers/dax/bus.c, device.c, pmem.c): the static dax_region of an nd dax
device and its single device-dax instance on the dax bus."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vnvdimm.model.base import Device, DevNode, Entry, Group, ro, rw, uevent_store
from vnvdimm.model.nd import DAX_BUS, DAX_MAJOR

if TYPE_CHECKING:
    from vnvdimm.model.disk import DataPath
    from vnvdimm.model.personality import Dax


class DaxRegion:
    """alloc_dax_region(..., IORESOURCE_DAX_STATIC): shown as the `dax_region/` group."""

    def __init__(self, region_id: int, start: int, size: int, align: int) -> None:
        self.id = region_id
        self.start = start
        self.size = size
        self.align = align

    def group(self) -> Group:
        # dax_region_visible(): a static region hides available_size, create, seed and delete;
        # its align is 0400 (dev_attr_region_align).
        return Group("dax_region", [
            ro("id", lambda: f"{self.id}\n"),
            ro("size", lambda: f"{self.size}\n"),
            ro("align", lambda: f"{self.align}\n", mode=0o400),
        ])


def dax_devnode(dev: Device, devt: tuple[int, int], data: DataPath | None, align: int) -> DevNode:
    """/dev/daxR.M: the node exists as long as the instance does (devtmpfs at device_add());
    only device_dax adds the cdev behind it, so without it (unbound, or kmem) opens fail."""
    bound = dev.driver is not None and dev.driver.name == "device_dax"
    return DevNode(dev.name, devt, data=data if bound else None, align=align)


class DevDax(Device):
    """daxR.M: named after the namespace id, bound to device_dax (or kmem)."""

    bus_name = DAX_BUS

    def __init__(self, nd_dax: Dax, instance_id: int, region: DaxRegion, data: DataPath) -> None:
        super().__init__(nd_dax.system, f"dax{region.id}.{instance_id}", nd_dax)
        self.nd_dax = nd_dax
        self.region = region
        self.data = data
        self.devt: tuple[int, int] = (DAX_MAJOR, nd_dax.system.minors[DAX_MAJOR].get())
        self.align = region.align

    def devnode(self) -> DevNode:
        return dax_devnode(self, self.devt, self.data, self.align)

    def entries(self) -> list[Entry]:
        r = self.region
        return [
            ro("modalias", lambda: "dax:t0*\n"),
            ro("dev", lambda: f"{self.devt[0]}:{self.devt[1]}\n"),
            rw("uevent", lambda: f"MAJOR={self.devt[0]}\nMINOR={self.devt[1]}\nDEVNAME={self.name}\n",
               uevent_store),
            ro("size", lambda: f"{r.size}\n"),
            # dev_dax_visible(): size and align are 0444 on a static (nd pmem) dax region
            ro("align", lambda: f"{self.align}\n"),
            ro("target_node", lambda: f"{self.nd_dax.region.target_node}\n"),
            ro("numa_node", lambda: f"{self.nd_dax.region.numa_node}\n"),
            ro("resource", lambda: f"{r.start:#x}\n", mode=0o400),
            Group("mapping0", [
                ro("start", lambda: f"{r.start:#x}\n", mode=0o400),
                ro("end", lambda: f"{r.start + r.size - 1:#x}\n", mode=0o400),
                ro("page_offset", lambda: "0x0\n", mode=0o400),
            ]),
        ]

    def close(self) -> None:
        self.data.closed = True
        self.system.minors[DAX_MAJOR].put(self.devt[1])
