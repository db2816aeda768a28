"""The nd and dax buses' types and drivers, with the kernel's match and probe rules:
nvdimm_bus_match() and nvdimm_bus_probe() (bus.c), dax_bus_match() (dax/bus.c), and the
drivers nd_bus, nvdimm, nd_region (region.c), nd_pmem (pmem.c), dax_pmem (dax/pmem.c),
device_dax and kmem. `register()` plugs them into a System, as module init does.

Each nd driver declares the nd device types it binds (`types`); a device carries its type
(`Device.nd_type`, to_nd_device_type()); the bus matches the two.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vnvdimm.model.base import (
    PAGE_SIZE,
    Attr,
    BusType,
    Device,
    Driver,
    Entry,
    cstring,
    fail,
    probing,
    streq_text,
    sysfs_streq,
    uevent_store,
)
from vnvdimm.model.btt import (
    BTT_V1_1,
    BTT_V2_0,
    BttDataPath,
    BttEngine,
    BttError,
    BttVersion,
    arena_is_valid,
    convert_in_place_v1_1,
)
from vnvdimm.model.bus import NvdimmBus
from vnvdimm.model.dax import DaxRegion, DevDax
from vnvdimm.model.dimm import Nvdimm
from vnvdimm.model.disk import DataPath, Disk
from vnvdimm.model.hmem import HmemDevDax
from vnvdimm.model.infoblock import (
    BTT_SECTOR_SIZES,
    DAX_SIG,
    INFO_BLOCK_SIZE,
    PFN_SIG,
    BttSuperblock,
    PfnInfo,
    btt_arenas,
)
from vnvdimm.model.namespace import Namespace, NamespaceIo, NamespacePmem
from vnvdimm.model.nd import DAX_BUS, ND_BUS, NdDeviceType
from vnvdimm.model.personality import Btt, Dax, Personality, Pfn
from vnvdimm.model.region import Region

if TYPE_CHECKING:
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


class NvdimmBusType(BusType):
    """The nd bus (bus.c's nvdimm_bus_type)."""

    def __init__(self) -> None:
        super().__init__(ND_BUS)

    def match(self, dev: Device, drv: Driver) -> bool:
        """nvdimm_bus_match(): the bus device binds nd_bus only; any other device binds the
        drivers whose type set holds its nd device type."""
        if isinstance(dev, NvdimmBus):
            return isinstance(drv, NdBusDriver)
        return dev.nd_type is not None and dev.nd_type in drv.types

    def probe(self, drv: Driver, dev: Device) -> None:
        """nvdimm_bus_probe(): the driver's probe; once a device below a region probed, the
        region replaces the seed it was (nd_region_advance_seeds())."""
        drv.probe(dev)
        if isinstance(dev.parent, Region):
            dev.parent.advance_seeds(dev)


class NdBusDriver(BusDriver):
    """nd_bus: binds the bus device itself (the kernel creates the ndctl device here)."""

    def probe(self, dev: Device) -> None:
        pass


class NvdimmDriver(BusDriver):
    types = frozenset({NdDeviceType.DIMM})

    def probe(self, dev: Device) -> None:
        assert isinstance(dev, Nvdimm)
        dev.probe()

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, Nvdimm)
        dev.remove()


class NdRegionDriver(BusDriver):
    """nd_region (region.c)."""

    types = frozenset({NdDeviceType.REGION_PMEM, NdDeviceType.REGION_BLK})

    def probe(self, dev: Device) -> None:
        """nd_region_probe(): register namespaces and seeds, then let the namespaces probe
        (which re-creates pfn/dax/btt personalities from their info blocks)."""
        assert isinstance(dev, Region)
        region = dev
        for m in region.mappings:  # nd_region_activate(): not while a DIMM is being overwritten
            if m.dimm.security is not None and m.dimm.security.in_overwrite:
                raise fail(errno.EBUSY, f"{m.dimm.name}: overwrite in progress")
        if not region.labelled:
            new: list[Namespace] = [region.add_namespace(NamespaceIo(region, region.ns_ida.get(), 0, region.size))]
        else:
            new = []
            for label in region.valid_labels():
                ns = NamespacePmem(region, region.ns_ida.get(), label.offset, label.size)
                ns.uuid, ns.lbasize = label.uuid, label.lbasize
                ns.alt_name = label.name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                # create_namespace_pmem(): the claim class of a v1.2 label (BTT2 shows as btt)
                ns.claim_class = "btt" if label.claim_class == "btt2" else label.claim_class
                ns.claim_btt2 = label.claim_class == "btt2"
                new.append(region.add_namespace(ns))
            if not new:  # scan_labels(): publish a zero-sized namespace for userspace to configure
                new.append(region.add_namespace(NamespacePmem(region, region.ns_ida.get(), 0, 0)))
        # nd_region_register_namespaces(): the first namespace is the seed; once it (or the
        # personality claiming it) probes, a labelled region plants a fresh zero-sized seed.
        region.ns_seed = new[0]
        region.ns_active = region.ns_count = len(new)
        region.create_seed(Btt)
        region.create_seed(Pfn)
        region.create_seed(Dax)
        for ns in new:
            region.system.device_add(ns)

    def remove(self, dev: Device) -> None:
        """nd_region_remove(): every child device is unregistered."""
        assert isinstance(dev, Region)
        region = dev
        for child in list(region.personalities):
            region.unregister_personality(child)
        for ns in list(region.namespaces):
            region.unregister_namespace(ns)
        region.ns_seed = region.pfn_seed = region.dax_seed = region.btt_seed = None
        region.labels = None
        region.system.changed()


class NdPmemDriver(BusDriver):
    """nd_pmem: raw namespaces, pfn (fsdax) and btt (sector) devices (all of which carry
    their region's namespace type)."""

    module = "nd_pmem"
    types = frozenset({NdDeviceType.NAMESPACE_IO, NdDeviceType.NAMESPACE_PMEM})

    def probe(self, dev: Device) -> None:
        if isinstance(dev, Btt):
            attach_btt(dev)
        elif isinstance(dev, Namespace):
            probe_namespace(dev)
        else:
            attach_pfn(dev)  # type: ignore[arg-type]

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, Namespace | Personality)
        if dev.disk is not None:
            dev.disk.close()
            dev.disk = None
        if isinstance(dev, Btt):
            dev.engine = None
        if isinstance(dev, Pfn):
            dev.memmap.stop()
            dev.geometry = None


def common_probe(dev: Device) -> None:
    """nvdimm_namespace_common_probe()."""
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
    locked = [m.dimm.name for m in ndns.region.mappings if m.dimm.locked]
    if locked:  # nvdimm_namespace_locked(): enumerated, never probed, while a DIMM is locked
        raise fail(errno.EACCES, f"{ndns.name}: {', '.join(locked)} locked")
    if ndns.capacity() < PAGE_SIZE:
        raise fail(errno.ENODEV, f"{ndns.name} is too small")
    if isinstance(ndns, NamespacePmem) and ndns.uuid is None:
        raise fail(errno.ENODEV, f"{ndns.name} has no uuid")


def probe_namespace(ndns: Namespace) -> None:
    """nd_pmem_probe() of a namespace: a personality found on the media claims it (and the
    probe answers ENXIO, as the kernel does); else the namespace is attached as a raw disk."""
    common_probe(ndns)
    region = ndns.region
    if not ndns.force_raw:
        if legacy_vnvdimm_btt(ndns):
            with contextlib.suppress(OSError):  # refused: logged, and the namespace comes up raw
                convert_legacy_btt(ndns)
        block = ndns.read_info_block()
        found: type[Btt] | type[Pfn] | None = None
        if ndns.claim_class in ("", "btt") and btt_info(ndns) is not None:
            found = Btt
        elif ndns.claim_class in ("", "pfn") and PfnInfo.unpack(block, PFN_SIG) is not None:
            found = Pfn
        elif ndns.claim_class in ("", "dax") and PfnInfo.unpack(block, DAX_SIG) is not None:
            found = Dax
        if found is not None:
            dev = region.create_personality(found)
            dev.attach(ndns)
            region.system.device_add(dev)
            if dev.driver is None and isinstance(dev, Pfn) and dev.memmap.refused:
                # The block validated, the memmap could not be allocated: as in the kernel, where
                # the personality is registered once nd_pfn_validate() passed and probed later,
                # it stays (unbound) and keeps its claim on the namespace.
                log.info("%s: claimed by %s, found on its media (which failed to probe)", ndns.name, dev.name)
                raise probing(errno.ENXIO, f"{ndns.name} is claimed by {dev.name} found on the media")
            if dev.driver is None:  # the info block did not validate: nd_detach_and_reset()
                refused = dev.probe_errno
                dev.detach_and_reset()
                if refused == errno.EOPNOTSUPP:
                    # nd_pmem_probe(): a pfn/dax block that is there but cannot be used (bad
                    # offset, misaligned data range, settings mismatch) fails the namespace
                    raise fail(errno.EOPNOTSUPP, f"{ndns.name}: {dev.name} found on the media is unusable")
            else:
                log.info("%s: claimed by %s, found on its media", ndns.name, dev.name)
                raise probing(errno.ENXIO, f"{ndns.name} is claimed by {dev.name} found on the media")
    # the namespace's sector size cannot change while its driver holds it (EBUSY)
    ndns.disk = Disk(region.system, ndns.disk_name(), ndns,
                     DataPath(region.media, ndns.size, ndns.offset, read_only=lambda: region.read_only),
                     lbasize=ndns.lbasize)


def attach_pfn(pfn: Pfn) -> None:
    """pmem_attach_disk() for a pfn device: info block, memmap, then the disk."""
    common_probe(pfn)
    geometry = pfn.setup()
    pfn.geometry = geometry
    pfn.memmap.start(geometry)
    assert pfn.ndns is not None
    pfn.disk = Disk(pfn.system, pfn.ndns.disk_name(), pfn, DataPath(**pfn.data_path_args(geometry)),  # type: ignore[arg-type]
                    dax=True)


def btt_version(ndns: Namespace) -> BttVersion:
    """nd_btt_version(): BTT 2.0 at offset 0 for the BTT2 claim class (v1.2 labels), else
    BTT 1.1 at 4 KiB (no labels, v1.1 labels, no claim class)."""
    return BTT_V2_0 if ndns.claim_class == "btt" and ndns.claim_btt2 else BTT_V1_1


def btt_info(ndns: Namespace) -> BttSuperblock | None:
    """nd_btt_version()'s check of an existing BTT: a valid info block (nd_btt_arena_is_valid():
    signature, a parent_uuid that is null or the namespace's, checksum) of the expected version
    where that version puts it."""
    version = btt_version(ndns)
    block = ndns.region.media.pread(INFO_BLOCK_SIZE, ndns.offset + version.initial_offset)
    info = arena_is_valid(block, ndns.parent_uuid)
    if info is None or info.version != (version.major, version.minor):
        return None
    return info


def legacy_vnvdimm_btt(ndns: Namespace) -> bool:
    """Whether a BTT2 namespace holds, instead of a BTT 2.0 at offset 0, the BTT 1.1 at 4 KiB
    that vnvdimm before its BTT write path laid out for every namespace: its blocks are 4 KiB
    away from where a BTT 2.0 has them, so they must not be read as one."""
    if btt_version(ndns) != BTT_V2_0 or btt_info(ndns) is not None:
        return False
    block = ndns.region.media.pread(INFO_BLOCK_SIZE, ndns.offset + BTT_V1_1.initial_offset)
    info = arena_is_valid(block, ndns.parent_uuid)
    return info is not None and info.version == (1, 1)


def convert_legacy_btt(ndns: Namespace) -> None:
    """The BTT 1.1 that an older vnvdimm left on a BTT2 namespace becomes the BTT 2.0 it
    should be (vnvdimm.model.btt.convert_in_place_v1_1(), no data moved); where that cannot be
    done, it is refused with a message (ENXIO), never read as a BTT 2.0."""
    media = ndns.region.media
    info = arena_is_valid(media.pread(INFO_BLOCK_SIZE, ndns.offset + BTT_V1_1.initial_offset), ndns.parent_uuid)
    assert info is not None
    lbasize = info.external_lbasize
    try:
        if ndns.region.read_only:
            raise BttError(errno.ENXIO, f"{ndns.name}: the BTT 1.1 an older vnvdimm wrote needs converting to "
                           "the BTT 2.0 its v1.2 labels call for, and the region is read-only")
        expected = btt_arenas(ndns.size - BTT_V1_1.initial_offset, lbasize) if lbasize in BTT_SECTOR_SIZES else []
        if len(expected) != 1 or info.nextoff != 0 or info.external_nlba != expected[0].external_nlba:
            raise BttError(errno.ENXIO, f"{ndns.name}: a BTT 1.1 not laid out as vnvdimm laid it out is where its "
                           "v1.2 labels call for a BTT 2.0: refusing to read it as one")
        convert_in_place_v1_1(media, ndns.offset, ndns.size, lbasize, info.uuid,
                              ndns.parent_uuid, name=ndns.name)
    except BttError as e:
        log.error("%s", e)
        raise fail(e.errno, str(e)) from None


def attach_btt(btt: Btt) -> None:
    """nvdimm_namespace_attach_btt() + btt_init(): discover the arenas on the media or lay
    out new ones (map, flog, info blocks), then the disk over the BTT's read/write paths."""
    common_probe(btt)
    ndns = btt.ndns
    assert ndns is not None
    if legacy_vnvdimm_btt(ndns):
        convert_legacy_btt(ndns)
    if btt.uuid is None:
        # __nd_btt_probe(): a BTT found on the media gives its device the uuid and sector size
        info = btt_info(ndns)
        if info is not None:
            btt.uuid = info.uuid
            btt.lbasize = info.external_lbasize
    if btt.uuid is None or btt.lbasize == 0:
        raise fail(errno.ENODEV, f"{btt.name}: incomplete btt configuration")
    try:
        engine = BttEngine(btt.region.media, ndns.offset, ndns.size, btt_version(ndns), btt.lbasize, btt.uuid,
                           ndns.parent_uuid, btt.region.read_only, name=btt.name)
    except BttError as e:
        log.error("%s", e)
        raise fail(e.errno, str(e)) from None
    if not btt.region.read_only:
        engine.drop_stale_v1_1_info()
    btt.engine = engine
    btt.size = engine.size
    btt.disk = Disk(btt.system, ndns.disk_name("s"), btt,
                    BttDataPath(engine, read_only=lambda: btt.region.read_only))


class DaxPmemDriver(BusDriver):
    """dax_pmem: an nd dax device becomes a static dax_region with one device-dax instance."""

    module = "dax_pmem"
    types = frozenset({NdDeviceType.DAX_PMEM})

    def probe(self, dev: Device) -> None:
        assert isinstance(dev, Dax)
        common_probe(dev)
        geometry = dev.setup()
        dev.geometry = geometry
        ndns = dev.ndns
        assert ndns is not None
        dev.memmap.start(geometry)
        dev.dax_region = DaxRegion(dev.region.id, ndns.start + geometry.dataoff, geometry.data_size, dev.align)
        dev.dev_dax = DevDax(dev, ndns.id, dev.dax_region, DataPath(**dev.data_path_args(geometry)))  # type: ignore[arg-type]
        dev.system.device_add(dev.dev_dax)

    def remove(self, dev: Device) -> None:
        assert isinstance(dev, Dax)
        if dev.dev_dax is not None:
            dev.system.driver_detach(dev.dev_dax)
            dev.dev_dax.close()
            dev.dev_dax = None
            dev.system.changed()
        dev.dax_region = None
        dev.memmap.stop()
        dev.geometry = None


# ---------------------------------------------------------------- dax bus


class DaxBusType(BusType):
    """The dax bus (dax/bus.c)."""

    def __init__(self) -> None:
        super().__init__(DAX_BUS)

    def match(self, dev: Device, drv: Driver) -> bool:
        """dax_bus_match(): an id from the driver's new_id, else the driver's kind (device_dax
        matches every instance of a static pmem region, kmem none)."""
        assert isinstance(drv, DaxBusDriver)
        return dev.name in drv.ids or drv.default_match


class DaxBusDriver(BusDriver):
    """dax bus drivers match by their id list (new_id / remove_id) or by default."""

    module = "device_dax"
    default_match = True

    def __init__(self, system: System, name: str) -> None:
        super().__init__(system, name, DAX_BUS)
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
            for dev in list(self.system.bus_devices(DAX_BUS)):
                if dev.driver is None and self.system.match(self, dev):
                    try:
                        self.system.driver_attach(self, dev)
                    except OSError as e:
                        log.debug("%s: probe by %s failed: %s", dev.name, self.name, e)

    def _remove_id_store(self, buf: bytes) -> None:
        """do_id_store(ID_REMOVE): forget the id (an unknown one is not an error)."""
        name = dax_id(buf)
        with self.system.lock:
            self.ids.discard(name)

    def probe(self, dev: Device) -> None:
        if isinstance(dev, HmemDevDax):  # a dynamic instance maps its ranges here
            dev.probe_device_dax()

    def remove(self, dev: Device) -> None:
        if isinstance(dev, HmemDevDax):
            dev.remove_device_dax()


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


def register(system: System) -> None:
    """Register the nd and dax buses and their drivers on `system` (once)."""
    if ND_BUS in system.bus_types:
        return
    system.register_bus_type(NvdimmBusType())
    system.register_bus_type(DaxBusType())
    # Registration order = readdir order of /sys/bus/<bus>/drivers, which is ndctl's bind order.
    for drv in (
        NdBusDriver(system, "nd_bus", ND_BUS),
        NvdimmDriver(system, "nvdimm", ND_BUS),
        NdRegionDriver(system, "nd_region", ND_BUS),
        NdPmemDriver(system, "nd_pmem", ND_BUS),
        DaxPmemDriver(system, "dax_pmem", ND_BUS),
        DaxBusDriver(system, "device_dax"),
        KmemDriver(system, "kmem"),
    ):
        system.register_driver(drv)

