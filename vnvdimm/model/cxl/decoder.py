"""struct cxl_decoder (drivers/cxl/core/port.c, hdm.c, region.c): root decoders (one per
CFMWS window, where regions are created and deleted), switch and endpoint HDM decoders (DPA
reservation on endpoint decoders, commit and reset in decoder order)."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from vnvdimm.model.base import (
    Attr,
    Device,
    Entry,
    cstring,
    fail,
    kstrtoull,
    ro,
    rw,
    streq_text,
    sysfs_streq,
)
from vnvdimm.model.cxl.common import (
    SZ_256M,
    CxlDev,
    Window,
    c_hex,
    c_phys,
    granularity,
    ways,
)
from vnvdimm.model.cxl.memdev import CxlMemdev
from vnvdimm.model.cxl.region import CxlRegion

if TYPE_CHECKING:
    from vnvdimm.model.cxl.port import CxlPort

class CxlDecoder(CxlDev):
    """struct cxl_decoder: a root (CFMWS), switch or endpoint HDM decoder."""

    def __init__(self, port: CxlPort, index: int, kind: str, window: Window | None = None,
                 start: int = 0) -> None:
        super().__init__(port.system, f"decoder{port.id}.{index}", port)
        self.port = port
        self.index = index
        self.kind = kind  # "root", "switch", "endpoint"
        self.devtype = f"cxl_decoder_{kind}"
        self.window = window
        self.start = start if window else 0
        self.size = window.size if window else 0  # hpa_range 0..-1: range_len() 0
        self.interleave_ways = ways(window.eiw) if window else 1
        self.interleave_granularity = granularity(window.eig) if window else 256
        self.enabled = window is not None  # CXL_DECODER_F_ENABLE (root decoders: the firmware's)
        self.region: CxlRegion | None = None
        self.regions: list[CxlRegion] = []  # root decoders: the regions below them
        self.region_id = -1  # root decoders: cxlrd->region_id, the next region's name
        # endpoint decoders: the partition their DPA comes from and the DPA range
        self.mode = "none"
        self.dpa_resource = 0
        self.dpa_size = 0
        self.skip = 0
        self.pos = -1
        # switch decoders target the port's dports (cxlsd->target[] from the target map)
        self.targets: list[int] = list(window.targets) if window else sorted(port.dports)[:1]
        self.nr_targets = len(window.targets) if window else len(port.dports)

    def reset_range(self) -> None:
        self.start, self.size = 0, 0

    def children(self) -> Iterable[Device]:
        return list(self.regions)

    def kill_region(self) -> None:
        """cxl_decoder_kill_region(): the decoder goes away, its region loses it."""
        if self.region is not None and self.kind == "endpoint":
            self.region.detach(self.pos)

    def entries(self) -> list[Entry]:
        out: list[Entry] = [
            *super().entries(),
            ro("start", lambda: f"{c_hex(self.start)}\n"),
            ro("size", lambda: f"{c_hex(self.size)}\n"),
            ro("locked", lambda: "0\n"),
            ro("interleave_granularity", lambda: f"{self.interleave_granularity}\n"),
            ro("interleave_ways", lambda: f"{self.interleave_ways}\n"),
        ]
        if self.kind == "root":
            ram = self.window is not None and self.window.ram
            out += [
                ro("cap_pmem", lambda: f"{int(not ram)}\n"),
                ro("cap_ram", lambda: f"{int(ram)}\n"),
                ro("cap_type2", lambda: "0\n"),
                ro("cap_type3", lambda: "1\n"),
                ro("target_list", self._target_list),
                rw("create_ram_region" if ram else "create_pmem_region", lambda: f"region{self.region_id}\n",
                   self._create_region_store),
                Attr("delete_region", 0o200, store=self._delete_region_store),
            ]
            if self.window is not None and self.window.xor:
                out.append(ro("interleave_arithmetic", lambda: "1\n"))
        else:
            out += [ro("target_type", lambda: "expander\n"),
                    ro("region", lambda: f"{self.region.name if self.region else ''}\n")]
            if self.kind == "switch":
                out.append(ro("target_list", self._target_list))
            else:
                out += [
                    rw("mode", lambda: f"{self.mode}\n", self._mode_store),
                    ro("dpa_resource", lambda: f"{c_hex(self.dpa_resource)}\n"),
                    rw("dpa_size", lambda: f"{c_phys(self.dpa_size)}\n", self._dpa_size_store),
                ]
        return out

    def _target_list(self) -> str:
        # emit_target_list(): the first interleave_ways targets, comma separated
        return ",".join(str(t) for t in self.targets[:self.interleave_ways]) + "\n"

    # -- root decoders: regions (region.c create_pmem_region_store(), delete_region_store())
    def _create_region_store(self, buf: bytes) -> None:
        m = re.fullmatch(rb"region(\d+)\n?", cstring(buf))
        if m is None:
            raise fail(errno.EINVAL, "expected regionN")
        region_id = int(m.group(1))
        if region_id != self.region_id:
            raise fail(errno.EBUSY, f"region{region_id} is not the next region of {self.name}")
        self.region_id = self.port.topo.memregion_alloc()
        assert self.window is not None
        region = CxlRegion(self, region_id, "ram" if self.window.ram else "pmem")
        self.regions.append(region)
        self.system.device_add(region)

    def _delete_region_store(self, buf: bytes) -> None:
        name = streq_text(buf)
        region = next((r for r in self.regions if r.name == name), None)
        if region is None:
            raise fail(errno.ENODEV, f"no {name} below {self.name}")
        region.unregister()

    # -- endpoint decoders: DPA (hdm.c cxl_dpa_set_mode(), cxl_dpa_alloc(), cxl_dpa_free())
    @property
    def memdev(self) -> CxlMemdev:
        assert isinstance(self.port.uport, CxlMemdev)
        return self.port.uport

    def _mode_store(self, buf: bytes) -> None:
        if sysfs_streq(buf, "ram"):
            mode = "ram"
        elif sysfs_streq(buf, "pmem"):
            mode = "pmem"
        else:
            raise fail(errno.EINVAL, "mode is ram or pmem")
        if self.enabled or self.dpa_size:
            raise fail(errno.EBUSY, f"{self.name} is enabled or has DPA")
        if not (self.memdev.pmem_size if mode == "pmem" else self.memdev.ram_size):
            raise fail(errno.ENXIO, f"{self.memdev.name} has no {mode} capacity")
        self.mode = mode

    def _dpa_size_store(self, buf: bytes) -> None:
        try:
            size = kstrtoull(buf, 0)
        except OSError:
            raise fail(errno.EINVAL, "not a size") from None
        if size % SZ_256M:
            raise fail(errno.EINVAL, "DPA size must be 256 MiB aligned")
        self.dpa_free()
        if size:
            self.dpa_alloc(size)

    def dpa_free(self) -> None:
        if not self.dpa_size:
            return
        if self.region is not None:
            raise fail(errno.EBUSY, f"{self.name} is assigned to {self.region.name}")
        if self.enabled:
            raise fail(errno.EBUSY, f"{self.name} is enabled")
        if self.index != self.port.hdm_end:
            raise fail(errno.EBUSY, f"expected decoder{self.port.id}.{self.port.hdm_end}")
        self.dpa_resource = self.dpa_size = self.skip = 0
        self.port.hdm_end -= 1

    def dpa_alloc(self, size: int) -> None:
        if self.region is not None or self.enabled:
            raise fail(errno.EBUSY, f"{self.name} is busy")
        mem = self.memdev
        allocated = [d for d in self.port.decoders if d.dpa_size]
        ram_end = max((d.dpa_resource + d.dpa_size for d in allocated if d.mode == "ram"), default=0)
        pmem_allocs = [d for d in allocated if d.mode == "pmem"]
        pmem_end = max((d.dpa_resource + d.dpa_size for d in pmem_allocs), default=mem.ram_size)
        if self.mode == "ram":
            start, avail, skip = ram_end, mem.ram_size - ram_end, 0
        elif self.mode == "pmem":
            start, avail = pmem_end, mem.ram_size + mem.pmem_size - pmem_end
            skip = 0 if pmem_allocs else start - ram_end
        else:
            raise fail(errno.EINVAL, "mode not set")
        if size > avail:
            raise fail(errno.ENOSPC, f"{self.name}: {size:#x} exceeds the free {self.mode} capacity {avail:#x}")
        if self.port.hdm_end + 1 != self.index:
            raise fail(errno.EBUSY, f"expected decoder{self.port.id}.{self.port.hdm_end + 1}")
        self.dpa_resource, self.dpa_size, self.skip = start, size, skip
        self.port.hdm_end = self.index

    # -- commit (mock_decoder_commit(), mock_decoder_reset())
    def commit(self) -> None:
        if self.enabled:
            return
        if self.port.commit_end + 1 != self.index:
            raise fail(errno.EBUSY, f"{self.name}: out of order commit, expected "
                                    f"decoder{self.port.id}.{self.port.commit_end + 1}")
        self.port.commit_end += 1
        self.enabled = True

    def reset(self) -> None:
        if not self.enabled:
            return
        if self.port.commit_end == self.index:
            self.port.commit_end -= 1
        self.enabled = False


