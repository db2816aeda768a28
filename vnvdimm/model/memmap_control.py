"""The async memmap series of a pfn/dax device: its memmap job and what the series publishes
about it (`memmap_state`, the `memmap/` group), beside `memmap_pause` (the pause marks).

A device's memmap starts when its driver maps the namespace (devm_memremap_pages()) and
returns at once: background workers initialize the `struct page`s while the device is
already usable, and every access waits only for the pages it touches (the series' design,
the engine in vnvdimm.memmap). In sync mode (`[memmap] mode = "sync"`, the pre-series
kernel) the enabling write returns only once every page is initialized; it waits after the
store, outside the model lock, so other stores and reads go on meanwhile.

The settings survive disable/enable, as the kernel keeps a device's attributes: a new job
starts with the device's `ns_per_page` and pause mark.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from vnvdimm.memmap import DevStorage, JobSpec, MemmapJob, MemStorage
from vnvdimm.model.base import PAGE_SIZE, Attr, BinAttr, Device, Entry, Group, fail, kstrtoull, ro, rw, sysfs_streq
from vnvdimm.model.host_memory import format_bytes
from vnvdimm.model.infoblock import MAX_STRUCT_PAGE_SIZE, PFN_MODE_PMEM, PfnGeometry
from vnvdimm.model.memmap_pause import NEVER, parse_permille

if TYPE_CHECKING:
    from vnvdimm.model.personality import Pfn
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm.model")

PGMAP_BASE = 0xFFFF888100000000  # where the emulated struct dev_pagemap pointers start

# memmap/{kpageflags,kpagecount,records}: name, bytes per page, the job's reader
PAGE_VIEWS: tuple[tuple[str, int, Callable[[MemmapJob, int, int], bytes]], ...] = (
    ("kpageflags", 8, MemmapJob.kpageflags),
    ("kpagecount", 8, MemmapJob.kpagecount),
    ("records", 64, MemmapJob.raw_records),
)

#: (first device page, pages, job) of each piece of a device's memmap, in device page order
Pieces = Callable[[], Iterable[tuple[int, int, MemmapJob]]]


def pgmap_of(start: int) -> int:
    """The emulated struct dev_pagemap pointer of a mapping starting at physical `start`."""
    return PGMAP_BASE + (start >> 12 << 6) % (1 << 32)


def page_views(total_pages: Callable[[], int], pieces: Pieces) -> list[BinAttr]:
    """The memmap's per-page views of a device, in device page order, from its pieces' jobs
    (one for a pfn/dax device, one per range for a dynamic dax instance)."""
    out = []
    for name, record_size, reader in PAGE_VIEWS:
        def size(record_size: int = record_size) -> int:
            return total_pages() * record_size

        def read(offset: int, count: int, record_size: int = record_size,
                 reader: Callable[[MemmapJob, int, int], bytes] = reader) -> bytes:
            data = bytearray()
            end = min(offset + count, size(record_size))
            for first_page, npages, job in list(pieces()):
                lo, hi = first_page * record_size, (first_page + npages) * record_size
                a, b = max(offset, lo), min(end, hi)
                if a >= b:
                    continue
                first, last = (a - lo) // record_size, (b - lo + record_size - 1) // record_size
                records = reader(job, first, last - first)
                skip = (a - lo) - first * record_size
                data += records[skip: skip + (b - a)]
            return bytes(data)

        out.append(BinAttr(name, 0o400, size, read))
    return out


def sync_store(buf: bytes, jobs: Iterable[MemmapJob]) -> None:
    """memmap_state: writing `sync` waits until the device's memmap is complete."""
    if not sysfs_streq(buf, "sync"):
        raise fail(errno.EINVAL, "memmap_state only accepts 'sync'")
    for job in list(jobs):
        job.wait()


def start_job(system: System, dev: Device, spec: JobSpec) -> MemmapJob:
    """Start a memmap job for `dev`: pollers of its memmap_state wake when it ends, and in sync
    mode the enabling write waits for it once it lets go of the model lock."""
    assert system.engine is not None
    job = system.engine.create_job(spec)
    job.subscribe(lambda _job: system.notify(dev, "memmap_state"))
    if system.memmap.mode == "sync":
        system.defer(job.wait)
    return job


def log_memmap_end(job: MemmapJob) -> None:
    """One line when a memmap goes idle: how many pages, how long, how fast (or how far a
    cancelled one got)."""
    if job.cancelled:
        log.info("%s: memmap cancelled after %d of %d pages (%.3f s)", job.name, job.pages_done, job.pages_total,
                 job.elapsed)
    elif job.error is not None:
        log.info("%s: memmap failed after %d of %d pages: %s", job.name, job.pages_done, job.pages_total, job.error)
    else:
        log.info("%s: memmap of %d pages done in %.3f s (%.0f pages/s)", job.name, job.pages_total, job.elapsed,
                 job.rate)


class MemmapControl:
    """The memmap series of one pfn/dax device: its job while the driver holds it, its
    settings (ns_per_page, pause_at) and their sysfs files. It is what `memmap_pause`
    tracks (name, job, pause_mark)."""

    def __init__(self, dev: Pfn) -> None:
        self.dev = dev
        self.system = dev.system
        self.job: MemmapJob | None = None
        self.pause_mark = NEVER  # memmap/pause_at
        self.ns_per_page_override: int | None = None  # memmap/ns_per_page, once written
        self.refused = False  # the last start failed for want of host memory (map=mem)

    @property
    def name(self) -> str:
        return self.dev.name

    # -- sysfs
    def entries(self) -> list[Entry]:
        return [
            Attr("memmap_state", 0o644, show=self._state_show, store=self._state_store, blocking=True),
            self._group(),
        ]

    def _state_show(self) -> str:
        job = self.job
        return "active\n" if job is not None and job.active else "idle\n"

    def _state_store(self, buf: bytes) -> None:
        sync_store(buf, [self.job] if self.job is not None else [])

    def _group(self) -> Group:
        def stat(read: Callable[[MemmapJob], object]) -> Callable[[], str]:
            def show() -> str:
                job = self.job
                return f"{read(job) if job is not None else 0}\n"
            return show

        def total_pages() -> int:
            ndns = self.dev.ndns
            return ndns.size // PAGE_SIZE if ndns is not None else 0

        def pieces() -> list[tuple[int, int, MemmapJob]]:
            # one: every page of the namespace (pages_total leaves out the altmap reserve)
            job = self.job
            return [(0, total_pages(), job)] if job is not None else []

        engine = self.system.engine
        return Group("memmap", [
            ro("pages_done", stat(lambda job: job.pages_done), volatile=True),
            ro("pages_total", stat(lambda job: job.pages_total)),
            ro("elapsed_us", stat(lambda job: round(job.elapsed * 1e6)), volatile=True),
            ro("pages_per_sec", stat(lambda job: round(job.rate)), volatile=True),
            ro("workers", lambda: f"{engine.workers if engine else 0}\n"),
            ro("start_pfn", lambda: f"{self.dev.ndns.start // PAGE_SIZE if self.dev.ndns else 0:#x}\n"),
            rw("ns_per_page", lambda: f"{self.effective_ns_per_page()}\n", self._ns_per_page_store),
            rw("pause_at", lambda: f"{self.pause_mark}\n", self._pause_at_store),
            *page_views(total_pages, pieces),
        ])

    def _ns_per_page_store(self, buf: bytes) -> None:
        value = kstrtoull(buf)
        if value > 10**9:
            raise fail(errno.EINVAL, "ns_per_page above one second")
        self.ns_per_page_override = value
        if self.job is not None:
            self.job.ns_per_page = value

    def _pause_at_store(self, buf: bytes) -> None:
        self.pause_mark = parse_permille(buf)
        self.system.memmap_pause.mark_changed(self)

    def effective_ns_per_page(self) -> int:
        if self.job is not None:
            return int(self.job.ns_per_page)
        if self.ns_per_page_override is not None:
            return self.ns_per_page_override
        return self.system.memmap.ns_per_page

    # -- the driver's side
    def start(self, geometry: PfnGeometry) -> None:
        """devm_memremap_pages() with the series' async state: returns at once (sync mode:
        the enabling write waits once it lets go of the model lock)."""
        dev = self.dev
        ndns = dev.ndns
        assert ndns is not None
        if self.system.engine is None:
            return
        npages = ndns.size // PAGE_SIZE
        on_media = dev.mode == PFN_MODE_PMEM
        self.refused = False
        if not on_media:
            self.check_host_memory(npages)
        spec = JobSpec(
            name=dev.name,
            first_pfn=ndns.start // PAGE_SIZE,
            npages=npages,
            reserve_pages=2 if on_media else 0,  # altmap->reserve: the 8 KiB info-block area
            altmap_pages=geometry.dataoff // PAGE_SIZE if on_media else 0,
            align_pages=max(1, dev.align // PAGE_SIZE),
            nid=dev.region.numa_node,
            pgmap=pgmap_of(ndns.start),
            storage=(DevStorage(path=str(dev.region.media.path), offset=ndns.offset + 8192) if on_media
                     else MemStorage()),
            ns_per_page=self.effective_ns_per_page(),
            # a mark in force when the job starts holds it from its first run (memmap_pause.py)
            hold_permille=self.system.memmap_pause.mark_of(self),
        )
        started = time.monotonic()
        job = start_job(self.system, dev, spec)
        self.job = job
        log.info("%s: memmap of %d pages started (%s, %.1f ms)", dev.name, npages,
                 "map=dev" if on_media else "map=mem", (time.monotonic() - started) * 1e3)
        job.subscribe(log_memmap_end)
        self.system.notify(dev, "memmap_state")
        self.system.memmap_pause.track(self)

    def check_host_memory(self, npages: int) -> None:
        """devm_memremap_pages() of a map=mem device: its struct pages come from RAM, the
        host's here (see host_memory.py). ENOMEM, as vmemmap_populate() fails the probe, when
        they would not fit in what the host has available less the margin, once the memmaps
        of this machine still being filled in have taken what they will."""
        need = npages * MAX_STRUCT_PAGE_SIZE
        pending = sum((c.job.pages_total - c.job.pages_done) * MAX_STRUCT_PAGE_SIZE
                      for c in self.system.memmap_pause.running()
                      if isinstance(c, MemmapControl) and c is not self and c.job is not None and c.job.active
                      and c.dev.mode != PFN_MODE_PMEM)
        host = self.system.host_memory()
        if need + pending > host.usable:
            others = f", {format_bytes(pending)} promised to memmaps still being filled in" if pending else ""
            message = (f"{self.name}: memmap of {npages} pages (map=mem) needs {format_bytes(need)} of host "
                       f"memory; the host has {format_bytes(host.available)} available (MemAvailable), less a "
                       f"margin of {format_bytes(host.margin)}{others}: probe failed (ENOMEM)")
            log.warning("%s", message)
            self.dev.geometry = None
            self.refused = True
            raise fail(errno.ENOMEM, message.removesuffix(" (ENOMEM)"))

    def stop(self) -> None:
        job, self.job = self.job, None
        if job is not None:
            job.cancel()
            self.system.memmap_pause.untrack(self)
            self.system.notify(self.dev, "memmap_state")
