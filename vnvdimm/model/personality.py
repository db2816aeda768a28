"""Namespace personalities: pfn (fsdax), nd dax (devdax) and btt (sector) devices
(pfn_devs.c, dax_devs.c, btt_devs.c, claim.c): their attributes and the info block's
validation. A pfn/dax device's memmap (the series' memmap_state and memmap/) is its
`memmap` controller's (memmap_control.py)."""

from __future__ import annotations

import errno
import logging
import uuid as uuidlib
from typing import TYPE_CHECKING

from vnvdimm.model.badblocks import SECTOR
from vnvdimm.model.base import (
    PAGE_SIZE,
    SUPPORTED_ALIGNMENTS,
    SZ_2M,
    SZ_4K,
    SZ_8K,
    SZ_16M,
    Device,
    Entry,
    fail,
    nd_size_select_show,
    nd_size_select_store,
    parse_uuid,
    ro,
    rstrim,
    rw,
)
from vnvdimm.model.infoblock import (
    BTT_SECTOR_SIZES,
    DAX_SIG,
    INFO_BLOCK_OFFSET,
    INFO_BLOCK_SIZE,
    MAX_STRUCT_PAGE_SIZE,
    MEMREMAP_COMPAT_ALIGN,
    PFN_MODE_NONE,
    PFN_MODE_PMEM,
    PFN_MODE_RAM,
    PFN_SIG,
    PfnGeometry,
    PfnInfo,
    pfn_geometry,
)
from vnvdimm.model.memmap_control import MemmapControl
from vnvdimm.model.nd import CLAIM_BTT, CLAIM_DAX, CLAIM_PFN, ND_BUS, GivenUuid, NdDeviceType

if TYPE_CHECKING:
    from vnvdimm.model.btt import BttEngine
    from vnvdimm.model.dax import DaxRegion, DevDax
    from vnvdimm.model.disk import Disk
    from vnvdimm.model.namespace import Namespace
    from vnvdimm.model.region import Region

log = logging.getLogger("vnvdimm.model")

PFN_MODES = {"none": PFN_MODE_NONE, "ram": PFN_MODE_RAM, "pmem": PFN_MODE_PMEM}
PFN_MODE_NAMES = {v: k for k, v in PFN_MODES.items()}


def c_strncmp_eq(buf: bytes, word: str, n: int) -> bool:
    """strncmp(buf, word, n) == 0 for the NUL-terminated buffer a store receives."""
    if n < 0:
        n = len(buf) + 1  # size_t wrap-around: compare the whole strings
    a = (buf + b"\0")[:n]
    b = (word.encode() + b"\0")[:n]
    for x, y in zip(a, b, strict=False):
        if x != y:
            return False
        if x == 0:
            return True
    return True  # n bytes compared equal (b ends in its NUL before a could run past it)


class Personality(Device):
    """What pfn, dax and btt devices share: a claim on one namespace (claim.c)."""

    bus_name = ND_BUS
    claim_class = ""

    def __init__(self, region: Region, prefix: str, dev_id: int) -> None:
        super().__init__(region.system, f"{prefix}{region.id}.{dev_id}", region)
        self.region = region
        self.id = dev_id
        self.ndns: Namespace | None = None
        self._uuid: uuidlib.UUID | None = None
        self.disk: Disk | None = None

    uuid = GivenUuid()
    _uuid_held: int | None = None  # the value GivenUuid counts in the bus's index
    _uuid_released = False  # release_uuid(): it left the bus, its uuid no longer counts

    @property
    def nd_type(self) -> NdDeviceType:  # type: ignore[override]
        """to_nd_device_type() of a device below a region: the region's namespace type."""
        return self.region.nstype

    def _namespace_store(self, buf: bytes) -> None:
        """nd_namespace_store()."""
        if self.driver is not None:
            raise fail(errno.EBUSY, f"{self.name} is active")
        name = rstrim(buf)  # kstrndup() + strim() with its result ignored: leading spaces stay
        if name and not name.startswith("namespace"):
            raise fail(errno.EINVAL, f"{name!r} is not a namespace")
        if not name:
            self.detach_and_reset()
            return
        if self.ndns is not None:
            raise fail(errno.EBUSY, f"{self.name} already claims {self.ndns.name}")
        ndns = next((ns for ns in self.region.namespaces if ns.name == name), None)
        if ndns is None:
            raise fail(errno.ENODEV, f"{name} not found under {self.region.name}")
        if ndns.claim_class not in ("", self.claim_class):
            raise fail(errno.EBUSY, f"{ndns.name} is reserved for {ndns.claim_class}")
        if ndns.capacity() < SZ_16M:
            raise fail(errno.ENXIO, f"{ndns.name} is too small to host a {self.claim_class}")
        if ndns.claim is not None:
            raise fail(errno.EBUSY, f"{ndns.name} is already claimed by {ndns.claim.name}")
        self.attach(ndns)

    def attach(self, ndns: Namespace) -> None:
        ndns.claim = self
        self.ndns = ndns
        self.system.changed()

    def detach_and_reset(self) -> None:
        """nd_detach_and_reset(): drop the claim; an idle non-seed device goes away."""
        if self.ndns is not None:
            self.ndns.claim = None
            self.ndns = None
        if not self.is_seed() and self.driver is None:
            self.region.unregister_personality(self)
        else:
            self.reset()
        self.system.changed()

    def is_seed(self) -> bool:
        return self in (self.region.pfn_seed, self.region.dax_seed, self.region.btt_seed)

    def reset(self) -> None:
        self.uuid = None

    def _uuid_store(self, buf: bytes) -> None:
        if self.driver is not None:
            raise fail(errno.EBUSY, f"{self.name} is active")
        self.uuid = parse_uuid(buf)

    def _namespace_show(self) -> str:
        return f"{self.ndns.name if self.ndns else ''}\n"


class Pfn(Personality):
    """An nd_pfn device: fsdax, the namespace's pages get a memmap (in RAM or on the media)."""

    devtype = "nd_pfn"
    claim_class = CLAIM_PFN
    signature = PFN_SIG
    prefix = "pfn"

    def __init__(self, region: Region, dev_id: int) -> None:
        super().__init__(region, self.prefix, dev_id)
        self.mode = PFN_MODE_NONE
        self.align = SZ_2M  # nd_pfn_default_alignment(): PMD_SIZE with THP
        self.geometry: PfnGeometry | None = None
        self.memmap = MemmapControl(self)  # the series' memmap_state and memmap/

    def reset(self) -> None:
        super().reset()
        self.mode = PFN_MODE_NONE

    # -- sysfs
    def entries(self) -> list[Entry]:
        return [
            *super().entries(),
            rw("mode", lambda: f"{PFN_MODE_NAMES[self.mode]}\n", self._mode_store),
            rw("uuid", lambda: f"{self.uuid}\n" if self.uuid else "\n", self._uuid_store),
            rw("namespace", self._namespace_show, self._namespace_store),
            rw("align", lambda: f"{self.align}\n", self._align_store),
            ro("resource", self._resource_show, mode=0o400),
            ro("size", self._size_show),
            ro("supported_alignments", lambda: "".join(f"{a} " for a in SUPPORTED_ALIGNMENTS) + "\n"),
            ro("numa_node", lambda: f"{self.region.numa_node}\n"),
            ro("target_node", lambda: f"{self.region.target_node}\n"),
            *self.memmap.entries(),
        ]

    def _mode_store(self, buf: bytes) -> None:
        """pfn_devs.c mode_store(): strncmp(buf, "pmem\\n", len - 1) == 0 or
        strncmp(buf, "pmem", len - 1) == 0, then ram, then none. Only the first len - 1 bytes
        are compared (C strings: a NUL ends the comparison), so a prefix such as "p\\n", or
        any single byte, selects pmem, as on a real kernel."""
        if self.driver is not None:
            raise fail(errno.EBUSY, f"{self.name} is active")
        n = len(buf) - 1
        for name in ("pmem", "ram", "none"):
            if c_strncmp_eq(buf, name + "\n", n) or c_strncmp_eq(buf, name, n):
                self.mode = PFN_MODES[name]
                return
        raise fail(errno.EINVAL, "mode must be none, ram or pmem")

    def _align_store(self, buf: bytes) -> None:
        """nd_size_select_store() over nd_pfn_supported_alignments()."""
        self.align = nd_size_select_store(self, buf, SUPPORTED_ALIGNMENTS, "alignment")

    def _resource_show(self) -> str:
        if self.driver is None or self.ndns is None or self.geometry is None:
            raise fail(errno.ENXIO, "no address to convey while disabled")
        return f"{self.ndns.start + self.geometry.dataoff:#x}\n"

    def _size_show(self) -> str:
        if self.driver is None or self.geometry is None:
            raise fail(errno.ENXIO, "no size to convey while disabled")
        return f"{self.geometry.data_size}\n"

    def check_info_block(self, info: PfnInfo) -> None:
        """nd_pfn_validate()'s checks of a block whose signature, checksum and parent match,
        before its settings are compared: a block written by a kernel with larger pages or
        larger struct pages cannot be used for a memmap on the media, and a device-dax block
        must carry an alignment this kernel supports. Each fails the enable (EOPNOTSUPP), it
        never makes the block count as absent (which would overwrite it)."""
        if info.mode == PFN_MODE_PMEM:
            if info.page_size > PAGE_SIZE:
                raise fail(errno.EOPNOTSUPP, f"{self.name}: init failed, page size mismatch {info.page_size}")
            if info.page_struct_size < MAX_STRUCT_PAGE_SIZE:
                raise fail(errno.EOPNOTSUPP,
                           f"{self.name}: init failed, struct page size mismatch {info.page_struct_size}")
        if info.signature == DAX_SIG and info.align and info.align not in SUPPORTED_ALIGNMENTS:
            raise fail(errno.EOPNOTSUPP, f"{self.name}: init failed, alignment mismatch: {info.align:#x}")

    # -- enable / disable (nvdimm_setup_pfn + devm_memremap_pages)
    def setup(self) -> PfnGeometry:
        """nd_pfn_init(): validate the info block on the media or write a new one."""
        ndns = self.ndns
        if ndns is None:
            raise fail(errno.ENODEV, f"{self.name} has no namespace")
        if ndns.driver is not None:
            raise fail(errno.EBUSY, f"{ndns.name} is active, can't bind {self.name}")
        block = ndns.read_info_block()
        info = PfnInfo.unpack(block, self.signature)
        if info is not None and info.parent_uuid != ndns.parent_uuid:
            info = None
        if info is not None:
            self.check_info_block(info)
            if self.uuid is None:  # probed from the media: adopt its settings
                self.uuid, self.mode, self.align = info.uuid, info.mode, info.align
            elif info.uuid != self.uuid:
                info = None  # a stale block of another personality: re-initialize
            elif info.mode != self.mode or info.align != self.align:
                raise fail(errno.EOPNOTSUPP, f"{self.name}: init failed, settings mismatch")
        if info is not None:
            geometry = PfnGeometry(info.dataoff, info.npfns, info.end_trunc)
            # nd_pfn_validate() and __nvdimm_setup_pfn(): the data must start inside the
            # namespace, page and align aligned, after the 8 KiB info block area and, for
            # map=dev, after the memmap that area holds (the altmap runs out: ENOMEM).
            # Else the device's data would overlay the info block or the memmap.
            offset = info.dataoff
            if info.align > ndns.size:
                raise fail(errno.EOPNOTSUPP, f"{self.name}: alignment {info.align:#x} exceeds capacity {ndns.size:#x}")
            if offset >= ndns.size or offset % PAGE_SIZE or (
                    info.align and (ndns.start + offset + info.start_pad) % info.align):
                raise fail(errno.EOPNOTSUPP, f"{self.name}: bad offset {offset:#x}, align {info.align:#x}")
            # the data range, after the info block's padding and truncation, must start and
            # end on memremap_compat_align() (SUBSECTION_SIZE on x86): a block written for
            # another placement of the namespace is refused
            if (ndns.start + info.start_pad) % MEMREMAP_COMPAT_ALIGN:
                raise fail(errno.EOPNOTSUPP, f"{self.name}: resource start misaligned")
            if (ndns.start + ndns.size - info.end_trunc) % MEMREMAP_COMPAT_ALIGN:
                raise fail(errno.EOPNOTSUPP, f"{self.name}: resource end misaligned")
            if offset >= ndns.size - info.start_pad - info.end_trunc:
                raise fail(errno.EOPNOTSUPP, f"{self.name}: bad offset {offset:#x} with small namespace")
            if offset < SZ_8K:
                raise fail(errno.EINVAL, f"{self.name}: data offset {offset:#x} inside the info block area")
            if info.mode == PFN_MODE_PMEM and offset - SZ_8K < ndns.size // PAGE_SIZE * MAX_STRUCT_PAGE_SIZE:
                raise fail(errno.ENOMEM, f"{self.name}: {offset:#x} leaves no room for the memmap")
            if geometry.dataoff + geometry.data_size + geometry.end_trunc > ndns.size:
                raise fail(errno.ENXIO, f"{self.name}: info block does not fit {ndns.name}")
            if info.mode == PFN_MODE_PMEM:
                self.clear_memmap_errors(info.dataoff)
            return geometry
        if self.uuid is None:
            raise fail(errno.ENODEV, f"{self.name} has no uuid")
        if self.region.read_only:
            raise fail(errno.ENXIO, f"{self.region.name} is read-only, unable to init metadata")
        if self.mode == PFN_MODE_NONE:
            raise fail(errno.ENXIO, f"{self.name}: mode not set")
        if ndns.start % (2 << 20):
            raise fail(errno.EINVAL, f"{ndns.name}: start {ndns.start:#x} misaligned to 0x200000")
        geometry = pfn_geometry(ndns.start, ndns.size, self.mode, self.align)
        if geometry is None:
            raise fail(errno.ENXIO, f"{ndns.name}: unable to satisfy requested alignment")
        info = PfnInfo(self.signature, self.uuid, ndns.parent_uuid, geometry.dataoff, geometry.npfns,
                       self.mode, self.align, geometry.end_trunc)
        ndns.write_media(info.pack(), INFO_BLOCK_OFFSET)
        return geometry

    def clear_memmap_errors(self, dataoff: int) -> None:
        """nd_pfn_clear_memmap_errors(): media errors between the info block and the data
        (where the memmap of a map=dev device lives) are cleared by writing zeroes over them, so
        that the memmap can be initialized there."""
        ndns = self.ndns
        assert ndns is not None
        media = self.region.media
        meta_start = (SZ_4K + INFO_BLOCK_SIZE) // SECTOR
        first = ndns.offset // SECTOR + meta_start
        bb = media.badblocks
        for start, count in bb.within(first, dataoff // SECTOR - meta_start):
            media.pwrite(bytes(count * SECTOR), (first + start) * SECTOR)
            bb.clear(first + start, count)
            log.info("%s: cleared %d bad sectors of the memmap area at sector %d", self.name, count,
                     meta_start + start)

    def data_path_args(self, geometry: PfnGeometry) -> dict[str, object]:
        ndns = self.ndns
        assert ndns is not None
        return {
            "media": self.region.media,
            "size": geometry.data_size,
            "media_offset": ndns.offset + geometry.dataoff,
            "job": self.memmap.job,
            "first_data_page": geometry.dataoff // PAGE_SIZE,
            "read_only": lambda: self.region.read_only,
        }


class Dax(Pfn):
    """An nd_dax device: devdax; the pfn attributes are re-used (to_nd_pfn_safe())."""

    devtype = "nd_dax"
    claim_class = CLAIM_DAX
    signature = DAX_SIG
    prefix = "dax"

    def __init__(self, region: Region, dev_id: int) -> None:
        super().__init__(region, dev_id)
        self.dax_region: DaxRegion | None = None
        self.dev_dax: DevDax | None = None

    @property
    def nd_type(self) -> NdDeviceType:  # type: ignore[override]
        return NdDeviceType.DAX_PMEM

    def entries(self) -> list[Entry]:
        out = super().entries()
        if self.dax_region is not None:
            out.append(self.dax_region.group())
        return out

    def children(self):  # type: ignore[no-untyped-def]
        if self.dev_dax is not None:
            yield self.dev_dax



class Btt(Personality):
    """An nd_btt device: sector mode, block writes made atomic by the BTT on the media."""

    devtype = "nd_btt"
    claim_class = CLAIM_BTT

    def __init__(self, region: Region, dev_id: int) -> None:
        super().__init__(region, "btt", dev_id)
        self.lbasize = 0
        self.size = 0
        self.engine: BttEngine | None = None  # the live BTT while the driver is bound

    def reset(self) -> None:
        super().reset()
        self.lbasize = 0

    def entries(self) -> list[Entry]:
        return [
            *super().entries(),
            rw("sector_size", self._sector_size_show, self._sector_size_store),
            rw("uuid", lambda: f"{self.uuid}\n" if self.uuid else "\n", self._uuid_store),
            rw("namespace", self._namespace_show, self._namespace_store),
            ro("size", self._size_show),
            ro("log_zero_flags", lambda: "Y\n"),
            ro("numa_node", lambda: f"{self.region.numa_node}\n"),
            ro("target_node", lambda: f"{self.region.target_node}\n"),
        ]

    def _sector_size_show(self) -> str:
        return nd_size_select_show(self.lbasize, BTT_SECTOR_SIZES)

    def _sector_size_store(self, buf: bytes) -> None:
        self.lbasize = nd_size_select_store(self, buf, BTT_SECTOR_SIZES, "sector size")

    def _size_show(self) -> str:
        if self.driver is None:
            raise fail(errno.ENXIO, "no size while disabled")
        return f"{self.size}\n"
