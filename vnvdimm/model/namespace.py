"""Namespaces (drivers/nvdimm/namespace_devs.c): IO namespaces of label-less regions and
labelled pmem namespaces, with the claim attributes of claim.c."""

from __future__ import annotations

import errno
import uuid as uuidlib
from typing import TYPE_CHECKING

from vnvdimm.model.base import (
    NULL_UUID,
    Device,
    Entry,
    fail,
    kstrtobool,
    kstrtoull,
    nd_size_select_show,
    nd_size_select_store,
    parse_uuid,
    ro,
    rw,
    strim,
    sysfs_streq,
)
from vnvdimm.model.infoblock import INFO_BLOCK_OFFSET, INFO_BLOCK_SIZE
from vnvdimm.model.nd import CLAIM_BTT, CLAIM_CLASSES, CLAIM_MODE, CLAIM_PFN, ND_BUS, GivenUuid, NdDeviceType

if TYPE_CHECKING:
    from vnvdimm.model.disk import Disk
    from vnvdimm.model.personality import Personality
    from vnvdimm.model.region import Region

NSLABEL_NAME_LEN = 64
PMEM_LBASIZES = (512, 4096)


class Namespace(Device):
    bus_name = ND_BUS

    def __init__(self, region: Region, ns_id: int, offset: int, size: int) -> None:
        super().__init__(region.system, f"namespace{region.id}.{ns_id}", region)
        self.region = region
        self.id = ns_id
        self.offset = offset  # from the region's start (and its media's offset 0)
        self.size = size
        self.claim: Personality | None = None
        self.claim_class = ""
        # The kernel's NVDIMM_CCLASS_BTT2 (holder_class shows "btt" for it too): a BTT here is
        # version 2.0 at offset 0 rather than 1.1 at 4 KiB (nd_btt_version())
        self.claim_btt2 = False
        self.force_raw = False
        self.disk: Disk | None = None
        self._uuid: uuidlib.UUID | None = None
        self.alt_name = ""
        self.lbasize = 512

    uuid = GivenUuid()
    _uuid_held: int | None = None  # the value GivenUuid counts in the bus's index
    _uuid_released = False  # release_uuid(): it left the bus, its uuid no longer counts

    # -- geometry
    @property
    def start(self) -> int:
        return self.region.start + self.offset

    @property
    def parent_uuid(self) -> uuidlib.UUID:
        """nd_dev_to_uuid(): what an info block records as its parent."""
        return self.uuid or NULL_UUID

    def disk_name(self, suffix: str = "") -> str:
        """nvdimm_namespace_disk_name(): pmem<region>[.<ns id>] (+ 's' under a BTT)."""
        if isinstance(self, NamespacePmem) and self.id:
            return f"pmem{self.region.id}.{self.id}{suffix}"
        return f"pmem{self.region.id}{suffix}"

    def read_info_block(self) -> bytes:
        return self.region.media.pread(INFO_BLOCK_SIZE, self.offset + INFO_BLOCK_OFFSET)

    def write_media(self, data: bytes, offset: int) -> None:
        self.region.media.pwrite(data, self.offset + offset)

    # -- sysfs
    def mode_name(self) -> str:
        claim = self.claim
        if claim is not None:
            return CLAIM_MODE[claim.claim_class]
        if self.region.pagemap and not self.force_raw:
            return "memory"  # pmem_should_map_pages(): a legacy e820 namespace maps its pages
        return "raw"

    def entries(self) -> list[Entry]:
        return [
            *super().entries(),
            ro("nstype", lambda: f"{self.nd_type}\n"),
            ro("mode", lambda: f"{self.mode_name()}\n"),
            ro("holder", lambda: f"{self.claim.name if self.claim else ''}\n"),
            rw("holder_class", lambda: f"{self.claim_class}\n", self._holder_class_store),
            rw("force_raw", lambda: f"{int(self.force_raw)}\n", self._force_raw_store),
            ro("resource", self._resource_show, mode=0o400),
            ro("numa_node", lambda: f"{self.region.numa_node}\n"),
            ro("target_node", lambda: f"{self.region.target_node}\n"),
        ]

    def _resource_show(self) -> str:
        if self.size == 0:
            raise fail(errno.ENXIO, "no address to convey if the namespace has no allocation")
        return f"{self.start:#x}\n"

    def _busy(self) -> None:
        if self.driver is not None or self.claim is not None:
            raise fail(errno.EBUSY, f"{self.name} is active or claimed")

    def _holder_class_store(self, buf: bytes) -> None:
        self._busy()
        for cls in CLAIM_CLASSES:
            if sysfs_streq(buf, cls):
                # __holder_class_store(): "btt" takes the class btt_claim_class() chooses
                self.claim_btt2 = cls == CLAIM_BTT and self.region.btt_claim_is_v2()
                self.claim_class = cls
                self.system.changed()
                # holder_class_store(): the claim class is recorded in the labels (v1.2)
                self.region.update_labels(self)
                return
        raise fail(errno.EINVAL, "holder_class must be btt, pfn, dax or empty")

    def _force_raw_store(self, buf: bytes) -> None:
        self.force_raw = kstrtobool(buf)
        self.system.changed()

    def capacity(self) -> int:
        return self.size


class NamespaceIo(Namespace):
    """A label-less namespace covering its whole region (e820, or NFIT without labels)."""

    nd_type = NdDeviceType.NAMESPACE_IO
    devtype = "nd_namespace_io"

    def entries(self) -> list[Entry]:
        return [*super().entries(), ro("size", lambda: f"{self.size}\n")]


class NamespacePmem(Namespace):
    """A labelled namespace of an interleave set: created and deleted through its attributes."""

    nd_type = NdDeviceType.NAMESPACE_PMEM
    devtype = "nd_namespace_pmem"

    def entries(self) -> list[Entry]:
        return [
            *super().entries(),
            rw("size", lambda: f"{self.size}\n", self._size_store),
            rw("uuid", lambda: f"{self.uuid}\n" if self.uuid else "\n", self._uuid_store),
            rw("alt_name", lambda: f"{self.alt_name}\n", self._alt_name_store),
            rw("sector_size", self._sector_size_show, self._sector_size_store),
            # one DPA allocation per DIMM of the interleave set once the namespace has one
            ro("dpa_extents", lambda: f"{len(self.region.mappings) if self.size and self.uuid else 0}\n"),
        ]

    def _sector_size_show(self) -> str:
        return nd_size_select_show(self.lbasize, PMEM_LBASIZES)

    def _sector_size_store(self, buf: bytes) -> None:
        self._busy()  # a claimed namespace too
        self.lbasize = nd_size_select_store(self, buf, PMEM_LBASIZES, "sector size")
        self.region.update_labels(self)

    def _uuid_store(self, buf: bytes) -> None:
        self._busy()
        new = parse_uuid(buf)
        if not uuid_is_unique(self.region, new):
            # nd_is_uuid_unique(): every namespace, btt and pfn of the bus (this namespace's
            # current uuid included, so re-writing the same uuid is refused too).
            raise fail(errno.EINVAL, "uuid already in use on this bus")
        if self.uuid is not None and self.region.iset is not None and not self.region.labels_in_use():
            # namespace_update_uuid(): renaming needs the interleave set's labels (EBUSY
            # while a DIMM of the set has none)
            raise fail(errno.EBUSY, "no labels to rename the uuid in")
        old, self.uuid = self.uuid, new
        # the labels of the old uuid are reaped when the new ones are written
        self.region.update_labels(self, old_uuid=old)

    def _alt_name_store(self, buf: bytes) -> None:
        self._busy()
        # __alt_name_store(): strim() the C string; the bytes are kept as they are (shown back
        # byte for byte: surrogateescape round-trips non-UTF-8 bytes through str).
        raw = strim(buf).encode("latin-1")
        if len(raw) + 1 > NSLABEL_NAME_LEN:
            raise fail(errno.EINVAL, "alt_name longer than 63 bytes")
        self.alt_name = raw.decode("utf-8", "surrogateescape")
        self.region.update_labels(self)

    def _size_store(self, buf: bytes) -> None:
        size = kstrtoull(buf)  # size_store() parses before it looks at the namespace
        self._busy()
        region = self.region
        if self.uuid is None:
            raise fail(errno.ENXIO, "set uuid before size")
        if size % region.align:
            raise fail(errno.EINVAL, f"size not a multiple of the region align ({region.align:#x})")
        region.resize_namespace(self, size)


def uuid_is_unique(region: Region, new: uuidlib.UUID) -> bool:
    """nd_is_uuid_unique(): no pmem namespace, btt or pfn (nd_dax devices are not looked at)
    of any region of the bus has that uuid."""
    if new.int not in region.bus.uuids_given:
        return True
    for other in region.bus.regions:
        for ns in other.namespaces:
            if isinstance(ns, NamespacePmem) and ns.uuid == new:
                return False
        for dev in other.personalities:
            if dev.claim_class in (CLAIM_BTT, CLAIM_PFN) and dev.uuid == new:
                return False
    return True
