"""The drivers of the nd and dax buses, with the kernel's match and probe rules:
nd_bus, nvdimm, nd_region, nd_pmem (pmem.c), dax_pmem (dax/pmem.c), device_dax, kmem."""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vnvdimm.model.base import (
    PAGE_SIZE,
    SZ_4K,
    Attr,
    Device,
    Driver,
    Entry,
    cstring,
    fail,
    streq_text,
    sysfs_streq,
    uevent_store,
)
from vnvdimm.model.infoblock import (
    ARENA_MIN_SIZE,
    DAX_SIG,
    PFN_SIG,
    BttArena,
    BttInfo,
    PfnInfo,
    btt_arenas,
    btt_log_init,
)

if TYPE_CHECKING:
    from vnvdimm.model.namespace import Namespace
    from vnvdimm.model.personality import Btt, Pfn
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm.model")


class BusDriver(Driver):
    """A driver with the sysfs entries of /sys/bus/<bus>/drivers/<name>/."""

    module = "libnvdimm"

    def entries(self) -> list[Entry]:
        return [
            Attr("bind", 0o200, store=self._bind_store, blocking=True),
            Attr("unbind", 0o200, store=self._unbind_store, blocking=True),
            Attr("uevent", 0o200, store=uevent_store),
        ]

    def _bind_store(self, buf: bytes) -> None:
        with self.system.lock:
            self.system.bind(self, buf)

    def _unbind_store(self, buf: bytes) -> None:
        with self.system.lock:
            self.system.unbind(self, buf)

    def bound_devices(self) -> Iterator[Device]:
        return (d for d in self.system.bus_devices(self.bus_name) if d.driver is self)


# ---------------------------------------------------------------- nd bus


class NdBusDriver(BusDriver):
    def matches(self, dev: Device) -> bool:
        from vnvdimm.model.bus import NvdimmBus

        return isinstance(dev, NvdimmBus)

    def probe(self, dev: Device) -> None:
        pass


class NvdimmDriver(BusDriver):
    def matches(self, dev: Device) -> bool:
        from vnvdimm.model.dimm import Nvdimm

        return isinstance(dev, Nvdimm)

    def probe(self, dev: Device) -> None:
        from vnvdimm.model.dimm import Nvdimm

        assert isinstance(dev, Nvdimm)
        dev.probe()

    def remove(self, dev: Device) -> None:
        from vnvdimm.model.dimm import Nvdimm

        assert isinstance(dev, Nvdimm)
        dev.remove()


class NdRegionDriver(BusDriver):
    def matches(self, dev: Device) -> bool:
        from vnvdimm.model.region import Region

        return isinstance(dev, Region)

    def probe(self, dev: Device) -> None:
        from vnvdimm.model.region import Region

        assert isinstance(dev, Region)
        dev.probe()

    def remove(self, dev: Device) -> None:
        from vnvdimm.model.region import Region

        assert isinstance(dev, Region)
        dev.remove()


class NdPmemDriver(BusDriver):
    """nd_pmem: raw namespaces, pfn (fsdax) and btt (sector) devices."""

    module = "nd_pmem"

    def matches(self, dev: Device) -> bool:
        from vnvdimm.model.namespace import Namespace
        from vnvdimm.model.personality import Btt, Dax, Pfn

        return isinstance(dev, Namespace | Btt) or (isinstance(dev, Pfn) and not isinstance(dev, Dax))

    def probe(self, dev: Device) -> None:
        from vnvdimm.model.namespace import Namespace
        from vnvdimm.model.personality import Btt

        if isinstance(dev, Btt):
            attach_btt(dev)
        elif isinstance(dev, Namespace):
            probe_namespace(dev)
        else:
            attach_pfn(dev)  # type: ignore[arg-type]

    def remove(self, dev: Device) -> None:
        from vnvdimm.model.personality import Pfn

        disk = getattr(dev, "disk", None)
        if disk is not None:
            disk.close()
            dev.disk = None  # type: ignore[attr-defined]
        if isinstance(dev, Pfn):
            dev.stop_memmap()
            dev.geometry = None


def common_probe(dev: Device) -> None:
    """nvdimm_namespace_common_probe()."""
    from vnvdimm.model.namespace import Namespace, NamespacePmem
    from vnvdimm.model.personality import Personality

    if isinstance(dev, Personality):
        ndns = dev.ndns
        if ndns is None:
            raise fail(errno.ENODEV, f"{dev.name} has no namespace")
        if ndns.driver is not None:
            raise fail(errno.EBUSY, f"{ndns.name} is active, can't bind {dev.name}")
    else:
        assert isinstance(dev, Namespace)
        ndns = dev
        if ndns.claim is not None:
            raise fail(errno.ENXIO, f"{ndns.name} is claimed by {ndns.claim.name}")
    if ndns.capacity() < PAGE_SIZE:
        raise fail(errno.ENODEV, f"{ndns.name} is too small")
    if isinstance(ndns, NamespacePmem) and ndns.uuid is None:
        raise fail(errno.ENODEV, f"{ndns.name} has no uuid")


def probe_namespace(ndns: object) -> None:
    """nd_pmem_probe() of a namespace: a personality found on the media claims it (and the
    probe answers ENXIO, as the kernel does); else the namespace is attached as a raw disk."""
    from vnvdimm.model.disk import DataPath, Disk
    from vnvdimm.model.namespace import Namespace
    from vnvdimm.model.personality import Btt, Dax, Pfn

    assert isinstance(ndns, Namespace)
    common_probe(ndns)
    region = ndns.region
    if not ndns.force_raw:
        block = ndns.read_info_block()
        found: type[Btt] | type[Pfn] | None = None
        if ndns.claim_class in ("", "btt") and btt_info(block, ndns) is not None:
            found = Btt
        elif ndns.claim_class in ("", "pfn") and PfnInfo.unpack(block, PFN_SIG) is not None:
            found = Pfn
        elif ndns.claim_class in ("", "dax") and PfnInfo.unpack(block, DAX_SIG) is not None:
            found = Dax
        if found is not None:
            dev = region.create_personality(found)
            dev.attach(ndns)
            region.system.device_add(dev)
            if dev.driver is None:  # the info block did not validate: nd_detach_and_reset()
                refused = dev.probe_errno
                dev.detach_and_reset()
                if refused == errno.EOPNOTSUPP:
                    # nd_pmem_probe(): a pfn/dax block that is there but cannot be used (bad
                    # offset, misaligned data range, settings mismatch) fails the namespace
                    raise fail(errno.EOPNOTSUPP, f"{ndns.name}: {dev.name} found on the media is unusable")
            else:
                raise fail(errno.ENXIO, f"{ndns.name} is claimed by {dev.name} found on the media")
    ndns.disk = Disk(region.system, ndns.disk_name(), ndns,
                     DataPath(region.media, ndns.size, ndns.offset, read_only=lambda: region.read_only))


def attach_pfn(pfn: Pfn) -> None:
    """pmem_attach_disk() for a pfn device: info block, memmap, then the disk."""
    from vnvdimm.model.disk import DataPath, Disk

    common_probe(pfn)
    geometry = pfn.setup()
    pfn.geometry = geometry
    pfn.start_memmap(geometry)
    assert pfn.ndns is not None
    pfn.disk = Disk(pfn.system, pfn.ndns.disk_name(), pfn, DataPath(**pfn.data_path_args(geometry)))  # type: ignore[arg-type]


def btt_info(block: bytes, ndns: Namespace) -> dict[str, object] | None:
    """nd_btt_version() for a v1.1 BTT (info block at 4 KiB): nd_btt_arena_is_valid()
    (signature, checksum, a parent_uuid that is null or the namespace's) and version 1.1."""
    from vnvdimm.model.base import NULL_UUID

    info = BttInfo.unpack(block)
    if info is None or (info["version_major"], info["version_minor"]) != (1, 1):
        return None
    if info["parent_uuid"] not in (NULL_UUID, ndns.parent_uuid):
        return None
    return info


def attach_btt(btt: Btt) -> None:
    """nvdimm_namespace_attach_btt() + btt_init(): discover the arenas on the media or lay
    out new ones (info blocks, zeroed map, initial log)."""
    from vnvdimm.model.disk import DataPath, Disk

    common_probe(btt)
    ndns = btt.ndns
    assert ndns is not None
    initial_offset = SZ_4K  # BTT v1.1: the arena starts after the first 4 KiB
    block = ndns.read_info_block()
    info = btt_info(block, ndns)
    if info is not None:
        if btt.uuid is None:
            btt.uuid = info["uuid"]  # type: ignore[assignment]
            btt.lbasize = int(info["external_lbasize"])  # type: ignore[call-overload]
        elif info["uuid"] != btt.uuid or info["external_lbasize"] != btt.lbasize:
            info = None
    else:
        info = None
    if btt.uuid is None or btt.lbasize == 0:
        raise fail(errno.ENODEV, f"{btt.name}: incomplete btt configuration")
    rawsize = ndns.size - initial_offset
    if rawsize < ARENA_MIN_SIZE:
        raise fail(errno.ENXIO, f"{ndns.name} too small for a btt")
    arenas = btt_arenas(rawsize, btt.lbasize)
    base = ndns.offset + initial_offset
    media = btt.region.media
    if info is None:
        for arena in arenas:
            sb = BttInfo(btt.uuid, ndns.parent_uuid, arena).pack()
            media.pwrite(sb, base + arena.offset)
            media.pwrite(sb, base + arena.info2off)
            media.zero(base + arena.mapoff, arena.logoff - arena.mapoff)
            media.pwrite(btt_log_init(arena), base + arena.logoff)
    btt.size = sum(a.external_nlba for a in arenas) * btt.lbasize
    btt.disk = Disk(btt.system, ndns.disk_name("s"), btt,
                    DataPath(media, btt.size, mapper=btt_mapper(arenas, base, btt.lbasize),
                             read_only=lambda: btt.region.read_only))


def btt_mapper(arenas: list[BttArena], base: int, lbasize: int):  # type: ignore[no-untyped-def]
    """Device offset -> media extents. A fresh BTT map is the identity (premap == postmap),
    and vnvdimm writes blocks in place, so each arena's data is a strided array of blocks."""

    def extents(offset: int, length: int) -> Iterator[tuple[int, int]]:
        end = offset + length
        while offset < end:
            lba, within = divmod(offset, lbasize)
            arena = next(a for a in arenas if a.external_lba_start <= lba < a.external_lba_start + a.external_nlba)
            rel = lba - arena.external_lba_start
            media_off = base + arena.dataoff + rel * arena.internal_lbasize + within
            if arena.internal_lbasize == lbasize:
                arena_end = (arena.external_lba_start + arena.external_nlba) * lbasize
                n = min(end, arena_end) - offset
            else:
                n = min(end - offset, lbasize - within)
            yield media_off, n
            offset += n

    return extents


class DaxPmemDriver(BusDriver):
    """dax_pmem: an nd dax device becomes a static dax_region with one device-dax instance."""

    module = "dax_pmem"

    def matches(self, dev: Device) -> bool:
        from vnvdimm.model.personality import Dax

        return isinstance(dev, Dax)

    def probe(self, dev: Device) -> None:
        from vnvdimm.model.dax import DaxRegion, DevDax
        from vnvdimm.model.disk import DataPath
        from vnvdimm.model.personality import Dax

        assert isinstance(dev, Dax)
        common_probe(dev)
        geometry = dev.setup()
        dev.geometry = geometry
        ndns = dev.ndns
        assert ndns is not None
        dev.start_memmap(geometry)
        dev.dax_region = DaxRegion(dev.region.id, ndns.start + geometry.dataoff, geometry.data_size, dev.align)
        dev.dev_dax = DevDax(dev, ndns.id, dev.dax_region, DataPath(**dev.data_path_args(geometry)))  # type: ignore[arg-type]
        dev.system.device_add(dev.dev_dax)

    def remove(self, dev: Device) -> None:
        from vnvdimm.model.personality import Dax

        assert isinstance(dev, Dax)
        if dev.dev_dax is not None:
            dev.system.driver_detach(dev.dev_dax)
            dev.dev_dax.close()
            dev.dev_dax = None
            dev.system.changed()
        dev.dax_region = None
        dev.stop_memmap()
        dev.geometry = None


# ---------------------------------------------------------------- dax bus


class DaxBusDriver(BusDriver):
    """dax bus drivers match by their id list (new_id / remove_id) or by default."""

    module = "device_dax"
    default_match = True

    def __init__(self, system: System, name: str) -> None:
        super().__init__(system, name, "dax")
        self.ids: set[str] = set()

    def entries(self) -> list[Entry]:
        return [*super().entries(),
                Attr("new_id", 0o200, store=self._new_id_store),
                Attr("remove_id", 0o200, store=self._remove_id_store)]

    def _new_id_store(self, buf: bytes) -> None:
        """do_id_store(ID_ADD): remember the id, then driver_attach() (probe errors ignored)."""
        name = dax_id(buf)
        with self.system.lock:
            self.ids.add(name)
            for dev in list(self.system.bus_devices("dax")):
                if dev.driver is None and self.matches(dev):
                    try:
                        self.system.driver_attach(self, dev)
                    except OSError as e:
                        log.debug("%s: probe by %s failed: %s", dev.name, self.name, e)

    def _remove_id_store(self, buf: bytes) -> None:
        """do_id_store(ID_REMOVE): forget the id (an unknown one is not an error)."""
        name = dax_id(buf)
        with self.system.lock:
            self.ids.discard(name)

    def matches(self, dev: Device) -> bool:
        """dax_bus_match(): an id from new_id, else the driver type (device_dax matches
        every instance of a pmem region, kmem none)."""
        from vnvdimm.model.dax import DevDax

        if not isinstance(dev, DevDax):
            return False
        return dev.name in self.ids or self.default_match

    def probe(self, dev: Device) -> None:
        pass


def dax_id(buf: bytes) -> str:
    """do_id_store(): sscanf(buf, "dax%d.%d") must find both numbers and the buffer must be
    sysfs_streq() to their canonical "dax%d.%d" spelling; EINVAL otherwise."""
    m = re.match(rb"dax[ \t\n\v\f\r]*([-+]?\d+)\.[ \t\n\v\f\r]*([-+]?\d+)", cstring(buf))
    if m is None:
        raise fail(errno.EINVAL, "not a dax device id")

    def c_int(digits: bytes) -> int:
        value = int(digits) & 0xFFFFFFFF  # %d into an int: wraps like the kernel's vsscanf
        return value - (1 << 32) if value >= 1 << 31 else value

    canonical = f"dax{c_int(m.group(1))}.{c_int(m.group(2))}"
    if not sysfs_streq(buf, canonical):
        raise fail(errno.EINVAL, f"{streq_text(buf)!r} is not spelled {canonical!r}")
    return canonical


class KmemDriver(DaxBusDriver):
    module = "kmem"
    default_match = False

    def probe(self, dev: Device) -> None:
        # Onlining the range as System RAM would need the real memory hotplug of the kernel.
        raise fail(errno.EOPNOTSUPP, f"{dev.name}: system-ram (kmem) is not emulated")


def nd_bus_drivers(system: System) -> list[BusDriver]:
    # Listing order = readdir order of /sys/bus/nd/drivers, which is ndctl's bind order.
    drivers: list[BusDriver] = [
        NdBusDriver(system, "nd_bus", "nd"),
        NvdimmDriver(system, "nvdimm", "nd"),
        NdRegionDriver(system, "nd_region", "nd"),
        NdPmemDriver(system, "nd_pmem", "nd"),
        DaxPmemDriver(system, "dax_pmem", "nd"),
    ]
    drivers[2].module = "libnvdimm"
    return drivers


def dax_bus_drivers(system: System) -> list[BusDriver]:
    return [DaxBusDriver(system, "device_dax"), KmemDriver(system, "kmem")]

