"""Soft-reserved memory (dax_hmem): dynamic device-dax regions (drivers/dax/bus.c).

Memory the firmware marks soft-reserved (EFI_MEMORY_SP) becomes a platform device `hmem.N`
whose dax_hmem driver makes a dax region of the whole range, with one device-dax instance
(`daxN.0`) holding all of it. Unlike an nd dax device's static region, this region is dynamic:
its `create`, `seed` and `delete` carve its capacity into more instances, each of any size (a
multiple of its `align`) made of one or more ranges (`mappingN/{start,end,page_offset}`),
resized through `size` and placed range by range through `mapping`, all while unbound. Binding
an instance to device_dax maps its ranges (devm_memremap_pages()): vnvdimm's memmap engine
initializes their struct pages as for an nd dax device (`memmap_state`, `memmap/`).

The memory is RAM: its contents last as long as the daemon (an anonymous memory file), and the
instances come back at each mount as dax_hmem makes them, one holding the whole range.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnvdimm.memmap import JobSpec, MemStorage
from vnvdimm.model.base import (
    PAGE_SIZE,
    SUPPORTED_ALIGNMENTS,
    SZ_2M,
    Attr,
    Device,
    DevNode,
    Entry,
    Group,
    Ida,
    cstring,
    fail,
    kstrtol,
    kstrtoull,
    ro,
    rw,
    streq_text,
    sysfs_streq,
    uevent_store,
)
from vnvdimm.model.dax import dax_devnode
from vnvdimm.model.disk import DataPath
from vnvdimm.model.memmap_control import page_views, pgmap_of, start_job, sync_store
from vnvdimm.model.nd import DAX_BUS, DAX_MAJOR

if TYPE_CHECKING:
    from vnvdimm.memmap.job import MemmapJob
    from vnvdimm.model.media import Media
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm.model")

HMEM_ALIGN = SZ_2M  # dax_hmem_probe(): alloc_dax_region(..., PMD_SIZE, ...)
MEMREMAP_COMPAT_ALIGN = 2 << 20  # memremap_compat_align(): a subsection on x86-64


def kernfs_name_hash(name: str) -> int:
    """kernfs_name_hash() with no namespace: partial_name_hash() over the bytes, then
    hash_long(, 32), kept within [2, INT_MAX - 1]."""
    mask = (1 << 64) - 1
    h = 0
    for c in name.encode("utf-8", "surrogateescape"):
        h = ((h + (c << 4) + (c >> 4)) * 11) & mask
    h = (((h * 0x61C8864680B583EB) & mask) >> 32) & 0x7FFFFFFF
    return min(max(h, 2), 0x7FFFFFFE)


def dax_align_valid(align: int) -> bool:
    """dax_align_valid(): 4K, or 2M / 1G where transparent huge pages of that size exist."""
    return align in SUPPORTED_ALIGNMENTS


@dataclass
class DaxRange:
    """dev_dax_range: a physical range of the region, the device page offset it starts at, and
    the id of its mappingN device."""

    start: int
    end: int
    pgoff: int
    mapping_id: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1


class HmemRegion(Device):
    """hmem.N: the platform device and its dynamic dax region (dax_region/)."""

    def __init__(self, system: System, region_id: int, start: int, size: int, media: Media,
                 target_node: int = 0) -> None:
        super().__init__(system, f"hmem.{region_id}", None)
        self.id = region_id
        self.sysfs_dir = f"/devices/platform/hmem.{region_id}"
        self.start = start
        self.size = size
        self.end = start + size - 1
        self.media = media
        self.target_node = target_node
        self.align = HMEM_ALIGN
        self.ids = Ida()
        self.devices: list[HmemDevDax] = []
        self.seed: HmemDevDax | None = None
        self.youngest: HmemDevDax | None = None

    # -- capacity
    def allocations(self) -> list[tuple[DaxRange, HmemDevDax]]:
        """The region's child resources, by address (what __request_region() keeps)."""
        return sorted(((r, d) for d in self.devices for r in d.ranges), key=lambda rd: rd[0].start)

    def available(self) -> int:
        """dax_region_avail_size()."""
        return self.size - sum(r.size for d in self.devices for r in d.ranges)

    def is_free(self, start: int, size: int) -> bool:
        end = start + size - 1
        return (self.start <= start and end <= self.end
                and all(end < r.start or start > r.end for r, _ in self.allocations()))

    # -- devices
    def create_device(self, size: int) -> HmemDevDax:
        """__devm_create_dev_dax() with a dynamic id; its first range at the region's start."""
        dev = HmemDevDax(self, self.ids.get())
        if size:
            dev.alloc_range(self.start, size)
        self.devices.append(dev)
        self.system.device_add(dev)
        return dev

    def children(self) -> Iterable[Device]:
        # in the order readdir shows them in the kernel (kernfs keeps a directory's entries by
        # name hash): daxctl acts on a region's devices in the reverse of that order, and
        # reports the errno of the last one (destroy-device all meets daxN.0's EBUSY early)
        return sorted(self.devices, key=lambda d: kernfs_name_hash(d.name))

    def entries(self) -> list[Entry]:
        return [
            rw("uevent", lambda: "DRIVER=hmem\nMODALIAS=platform:hmem\n", uevent_store),
            ro("modalias", lambda: "platform:hmem\n"),
            ro("numa_node", lambda: f"{self.target_node}\n"),
            Group("dax_region", [
                ro("available_size", lambda: f"{self.available()}\n"),
                ro("size", lambda: f"{self.size}\n"),
                ro("align", lambda: f"{self.align}\n", mode=0o400),
                rw("create", lambda: f"{self.youngest.name if self.youngest else ''}\n", self._create_store),
                ro("seed", lambda: f"{self.seed.name if self.seed else ''}\n"),
                Attr("delete", 0o200, store=self._delete_store),
                ro("id", lambda: f"{self.id}\n"),
            ]),
        ]

    def _create_store(self, buf: bytes) -> None:
        """create_store(): "1" makes a zero-sized instance, the seed if there is none."""
        if kstrtol(buf) != 1:
            raise fail(errno.EINVAL, "create takes 1")
        if self.available() == 0:
            raise fail(errno.ENOSPC, f"{self.name}: no capacity left")
        dev = self.create_device(0)
        if self.seed is None:
            self.seed = dev
        self.youngest = dev

    def _delete_store(self, buf: bytes) -> None:
        """delete_store(): an unbound, zero-sized instance other than daxN.0 goes."""
        name = cstring(buf).decode("utf-8", "surrogateescape")
        victim = next((d for d in self.devices if d.name == name), None)
        if victim is None:
            raise fail(errno.ENXIO, f"{self.name}: no device {name!r}")
        if victim.driver is not None or victim.size() or victim.id == 0:
            raise fail(errno.EBUSY, f"{victim.name} is enabled, has capacity, or is the region's first device")
        if self.seed is victim:
            self.seed = None
        if self.youngest is victim:
            self.youngest = None
        self.devices.remove(victim)
        self.ids.put(victim.id)
        victim.close()
        self.system.changed()

    def shutdown(self) -> None:
        for dev in list(self.devices):
            self.system.driver_detach(dev)


class HmemDevDax(Device):
    """daxN.M of a dynamic region: ranges of the region, resizable while unbound."""

    bus_name = DAX_BUS

    def __init__(self, region: HmemRegion, instance_id: int) -> None:
        super().__init__(region.system, f"dax{region.id}.{instance_id}", region)
        self.region = region
        self.id = instance_id
        self.devt: tuple[int, int] = (DAX_MAJOR, region.system.minors[DAX_MAJOR].get())
        self.align = region.align
        self.ranges: list[DaxRange] = []
        self.mapping_ids = Ida()
        self.jobs: list[tuple[DaxRange, MemmapJob]] = []
        self.data: DataPath | None = None

    def devnode(self) -> DevNode:
        return dax_devnode(self, self.devt, self.data, self.align)

    def size(self) -> int:
        return sum(r.size for r in self.ranges)

    # -- ranges (alloc_dev_dax_range, adjust_dev_dax_range, dev_dax_shrink, dev_dax_resize)
    def alloc_range(self, start: int, size: int) -> None:
        if not self.region.is_free(start, size):
            raise fail(errno.ENOMEM, f"{self.name}: {start:#x}+{size:#x} is not free in {self.region.name}")
        pgoff = sum(r.size for r in self.ranges) // PAGE_SIZE
        self.ranges.append(DaxRange(start, start + size - 1, pgoff, self.mapping_ids.get()))
        self.system.changed()

    def _trim_last(self) -> None:
        r = self.ranges.pop()
        self.mapping_ids.put(r.mapping_id)
        self.system.changed()

    def _aligned(self, size: int) -> bool:
        """alloc_is_aligned(): a multiple of the larger of the device align and a subsection."""
        return size % max(self.align, MEMREMAP_COMPAT_ALIGN) == 0

    def resize(self, size: int) -> None:
        if self.driver is not None:
            raise fail(errno.EBUSY, f"{self.name} is enabled")
        current = self.size()
        if size == current:
            return
        if size > current and size - current > self.region.available():
            raise fail(errno.ENOSPC, f"{self.name}: {size - current} bytes more than the region has free")
        if size < current:
            self._shrink(current - size)
            return
        to_alloc = size - current
        while to_alloc:
            to_alloc -= self._grow_once(to_alloc)

    def _shrink(self, to_shrink: int) -> None:
        while to_shrink and self.ranges:
            last = self.ranges[-1]
            if to_shrink >= last.size:
                to_shrink -= last.size
                self._trim_last()
                continue
            last.end -= to_shrink
            return

    def _grow_once(self, to_alloc: int) -> int:
        """One pass of dev_dax_resize()'s retry loop: the first gap of the region, extending
        this device's last range in place when it ends right before the gap."""
        region = self.region
        allocs = region.allocations()
        if not allocs:
            self.alloc_range(region.start, to_alloc)
            return to_alloc
        for i, (res, owner) in enumerate(allocs):
            nxt = allocs[i + 1][0] if i + 1 < len(allocs) else None
            if i == 0 and res.start > region.start:  # space at the beginning
                alloc = min(res.start - region.start, to_alloc)
                self.alloc_range(region.start, alloc)
                return alloc
            alloc = 0
            if nxt is not None and nxt.start > res.end + 1:  # space between allocations
                alloc = min(nxt.start - (res.end + 1), to_alloc)
            if not alloc and nxt is None and res.end < region.end:  # space at the end
                alloc = min(region.end - res.end, to_alloc)
            if not alloc:
                continue
            if owner is self and self._adjust_ok(res):
                res.end += alloc
                self.system.changed()
            else:
                self.alloc_range(res.end + 1, alloc)
            return alloc
        raise fail(errno.ENOSPC, f"{self.name}: no free space in {region.name}")

    def _adjust_ok(self, res: DaxRange) -> bool:
        """adjust_ok(): only the last range grows in place, and only if no earlier range sits
        at a higher page offset."""
        return bool(self.ranges) and self.ranges[-1] is res and all(r.pgoff <= res.pgoff for r in self.ranges)

    # -- attributes
    def entries(self) -> list[Entry]:
        mappings = [Group(f"mapping{r.mapping_id}", [
            ro("start", lambda r=r: f"{r.start:#x}\n", mode=0o400),
            ro("end", lambda r=r: f"{r.end:#x}\n", mode=0o400),
            ro("page_offset", lambda r=r: f"{r.pgoff:#x}\n", mode=0o400),
        ]) for r in self.ranges]
        return [
            ro("modalias", lambda: "dax:t0*\n"),
            ro("dev", lambda: f"{self.devt[0]}:{self.devt[1]}\n"),
            rw("uevent", lambda: f"MAJOR={self.devt[0]}\nMINOR={self.devt[1]}\nDEVNAME={self.name}\n",
               uevent_store),
            rw("size", lambda: f"{self.size()}\n", self._size_store),
            Attr("mapping", 0o200, store=self._mapping_store),
            ro("target_node", lambda: f"{self.region.target_node}\n"),
            rw("align", lambda: f"{self.align}\n", self._align_store),
            ro("resource", lambda: f"{self.ranges[0].start if self.ranges else self.region.start:#x}\n", mode=0o400),
            ro("numa_node", lambda: f"{self.region.target_node}\n"),
            rw("memmap_on_memory", lambda: "0\n", self._memmap_on_memory_store),
            Attr("memmap_state", 0o644, show=self._memmap_state_show, store=self._memmap_state_store, blocking=True),
            Group("memmap", [
                ro("pages_done", lambda: f"{sum(j.pages_done for _, j in self.jobs)}\n", volatile=True),
                ro("pages_total", lambda: f"{sum(j.pages_total for _, j in self.jobs)}\n"),
                ro("ranges", lambda: f"{len(self.jobs)}\n"),
                # the ranges' own views one after the other, in page-offset order
                *page_views(lambda: sum(r.size for r, _ in self.jobs) // PAGE_SIZE,
                            lambda: [(r.pgoff, r.size // PAGE_SIZE, job) for r, job in self.jobs]),
            ]),
            *mappings,
        ]

    def _size_store(self, buf: bytes) -> None:
        value = kstrtoull(buf)
        if not self._aligned(value):
            raise fail(errno.EINVAL, f"{self.name}: size {value} is not a multiple of {self.align}")
        self.resize(value)

    def _mapping_store(self, buf: bytes) -> None:
        """mapping_store(): "start-end" in hex, allocated exactly there."""
        text = streq_text(buf)
        start_text, sep, end_text = text.partition("-")
        if not sep:
            raise fail(errno.EINVAL, "mapping takes START-END")
        start, end = kstrtoull(start_text.encode(), 16), kstrtoull(end_text.encode(), 16)
        size = end - start + 1
        if size <= 0 or not self._aligned(size):
            return  # the kernel returns the length: a misaligned range is silently not taken
        self.alloc_range(start, size)

    def _align_store(self, buf: bytes) -> None:
        try:
            value = kstrtoull(buf)
        except OSError:
            raise fail(errno.ENXIO, "align is not a number") from None
        if not dax_align_valid(value):
            raise fail(errno.EINVAL, f"align {value} is not 4K, 2M or 1G")
        if self.driver is not None:
            raise fail(errno.EBUSY, f"{self.name} is enabled")
        if any(r.size % max(value, MEMREMAP_COMPAT_ALIGN) for r in self.ranges):
            raise fail(errno.EINVAL, f"align {value} does not divide every range of {self.name}")
        self.align = value

    def _memmap_on_memory_store(self, buf: bytes) -> None:
        if not sysfs_streq(buf, "0") and not sysfs_streq(buf, "n") and not sysfs_streq(buf, "N"):
            raise fail(errno.EOPNOTSUPP, "memmap_on_memory needs memory hotplug")

    def _memmap_state_show(self) -> str:
        return "active\n" if any(j.active for _, j in self.jobs) else "idle\n"

    def _memmap_state_store(self, buf: bytes) -> None:
        sync_store(buf, [job for _, job in self.jobs])

    # -- device_dax (dev_dax_probe / dev_dax_kill)
    def probe_device_dax(self) -> None:
        """dax_bus_probe() + dev_dax_probe(): a zero-sized instance does not probe; the
        ranges are mapped (the memmap of each starts), and the seed is taken."""
        if not self.ranges:
            raise fail(errno.ENXIO, f"{self.name} has no capacity")
        engine = self.system.engine
        if engine is not None:
            for r in self.ranges:
                spec = JobSpec(
                    name=f"{self.name}/mapping{r.mapping_id}",
                    first_pfn=r.start // PAGE_SIZE,
                    npages=r.size // PAGE_SIZE,
                    align_pages=max(1, self.align // PAGE_SIZE),
                    nid=self.region.target_node,
                    pgmap=pgmap_of(r.start),
                    storage=MemStorage(),
                    ns_per_page=self.system.memmap.ns_per_page,
                )
                self.jobs.append((r, start_job(self.system, self, spec)))
        self.data = HmemDataPath(self, RangeJobs(self.jobs) if self.jobs else None)
        if self.region.seed is self:
            self.region.seed = None
        self.system.notify(self, "memmap_state")

    def remove_device_dax(self) -> None:
        jobs, self.jobs = self.jobs, []
        for _, job in jobs:
            job.cancel()
        if self.data is not None:
            self.data.closed = True
            self.data = None
        self.system.notify(self, "memmap_state")

    def _extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """Device offsets to media offsets, range by range in page-offset order."""
        for r in self.ranges:
            base = r.pgoff * PAGE_SIZE
            if length <= 0:
                return
            if offset >= base + r.size or offset < base:
                continue
            n = min(length, base + r.size - offset)
            yield r.start - self.region.start + offset - base, n
            offset += n
            length -= n

    def close(self) -> None:
        self.system.minors[DAX_MAJOR].put(self.devt[1])


class HmemDataPath(DataPath):
    """The bytes of a dynamic dax instance: its ranges, in page-offset order, over the
    region's memory."""

    def __init__(self, dev: HmemDevDax, job: RangeJobs | None) -> None:
        self.dev = dev
        super().__init__(dev.region.media, dev.size(), job=job)  # type: ignore[arg-type]

    def _extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        return self.dev._extents(offset, length)


class RangeJobs:
    """The memmap jobs of a multi-range instance seen as one (DataPath's `job`): device page
    indexes are mapped to each range's own job."""

    def __init__(self, jobs: list[tuple[DaxRange, MemmapJob]]) -> None:
        self.jobs = jobs

    def sync_range(self, first_page: int, npages: int) -> None:
        end = first_page + npages
        for r, job in self.jobs:
            lo, hi = max(first_page, r.pgoff), min(end, r.pgoff + r.size // PAGE_SIZE)
            if lo < hi:
                job.sync_range(lo - r.pgoff, hi - lo)
