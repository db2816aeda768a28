"""Namespace labels as the kernel handles them (drivers/nvdimm/label.c, namespace_devs.c),
over the on-media format of label_layout.py.

`DimmLabelData` is the kernel's nvdimm_drvdata for one DIMM (the area as read at DIMM probe,
the current and next index); `InterleaveSetLabels` is what a region does with the labels of
its DIMMs: scan them into namespaces at probe (scan_labels(), create_namespace_pmem()) and
write them when a namespace changes (nd_pmem_namespace_label_update(), del_labels()).
"""

from __future__ import annotations

import errno
import logging
import struct
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from vnvdimm.model.base import fail
from vnvdimm.model.infoblock import fletcher64
from vnvdimm.model.label_layout import (
    INDEX_CHECKSUM_OFFSET,
    INDEX_HEADER,
    LABEL_SIZES,
    NSINDEX_SIGNATURE,
    NSLABEL_FLAG_UPDATING,
    NSLABEL_NAME_LEN,
    NULL_GUID,
    UUID_PERSISTENT_MEMORY,
    IndexBlock,
    Label,
    abstraction_guid,
    label_checksum_ok,
    nd_inc_seq,
    num_label_slots,
    sizeof_namespace_index,
    validate_index,
)

log = logging.getLogger("vnvdimm.model")

# ---------------------------------------------------------------- one DIMM (nvdimm_drvdata)


class RawArea(Protocol):
    size: int
    max_xfer: int

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...


def _bit(bitmap: bytes | bytearray, n: int) -> bool:
    return bool(bitmap[n // 8] >> (n % 8) & 1)


class DimmLabelData:
    """The label area of one DIMM as the nvdimm driver holds it after probe: a copy of the
    area, the current and the next index block, and the label size in use."""

    def __init__(self, area: RawArea, name: str = "") -> None:
        self.area = area
        self.name = name  # the DIMM's (nmemN), for log lines
        self.config_size = area.size
        self.label_size = 128
        self.data = bytearray()
        self.ns_current = self.ns_next = -1
        # Every label update looks up labels by uuid among the active ones, and the kernel walks
        # (and checksums) all of them for that: n updates cost n². Here the active labels of the
        # current index are kept by slot and by uuid, brought up to date from the slots whose
        # used bit changed, and each slot's bytes are parsed once while they stay the same.
        self._parsed: dict[int, tuple[bytes, Label | None]] = {}
        self._active: dict[int, Label] | None = None
        self._active_used = 0  # the used-slot bitmap `_active` was read for
        self._by_uuid: dict[uuidlib.UUID, dict[int, Label]] = {}
        self.load()

    def load(self) -> None:
        """nd_label_data_init() + nd_label_validate(): the valid index with the best sequence
        number, or none (then the label size stays at v1.2's 256, as the kernel leaves it)."""
        if sizeof_namespace_index(self.config_size, 128) == 0:
            raise fail(errno.ENXIO, f"label area of {self.config_size} bytes is too small")
        data = bytearray()
        while len(data) < self.config_size:
            data += self.area.read(len(data), min(self.area.max_xfer, self.config_size - len(data)))
        self.data = data
        self.ns_current = self.ns_next = -1
        self._forget_parsed()
        faults: dict[int, list[str]] = {}
        for size in LABEL_SIZES:
            self.label_size = size
            current = validate_index(self.data, self.config_size, size, faults.setdefault(size, []))
            if current >= 0:
                break
        else:
            self._log_no_index(faults)
            return
        self.ns_current, self.ns_next = current, 1 - current
        # the next index starts as a copy of the current one; free slots read as zeroes
        isize = self.index_size
        self.data[self.ns_next * isize:(self.ns_next + 1) * isize] = self.data[current * isize:(current + 1) * isize]
        index = self.index(current)
        assert index is not None
        free = self.free_bitmap(current)
        for slot in range(index.nslot):
            if _bit(free, slot):
                off = index.labeloff + slot * self.label_size
                self.data[off:off + self.label_size] = bytes(len(self.data[off:off + self.label_size]))

    def _log_no_index(self, faults: dict[int, list[str]]) -> None:
        """Neither index block is valid (for either label size): the kernel says why at debug
        level and leaves the DIMM unlabelled (ns_current -1). A blank area (no signature) is
        what a new DIMM has; a damaged one (a block with the signature that fails a later
        check) is worth a line at info level."""
        for size, reasons in faults.items():
            for reason in reasons:
                log.debug("%s: %s (%d-byte labels)", self.name, reason, size)
        # per block, the reason under the label size the block itself claims
        said: dict[str, str] = {}
        for reasons in faults.values():
            for reason in reasons:
                block, _, what = reason.partition(" ")
                if not what.startswith("labelsize") and (block not in said or said[block].startswith("signature")):
                    said[block] = what
        damaged = {block: what for block, what in said.items() if not what.startswith("signature")}
        if damaged:
            log.info("%s: both namespace index blocks invalid (%s): the label area is not used, the DIMM has no "
                     "labelled namespaces until its labels are initialized", self.name,
                     ", ".join(f"{block} {what}" for block, what in sorted(said.items())))
        else:
            log.debug("%s: no namespace index (blank label area)", self.name)

    # -- geometry
    @property
    def index_size(self) -> int:
        return sizeof_namespace_index(self.config_size, self.label_size)

    @property
    def label_base(self) -> int:
        return 2 * self.index_size

    @property
    def version(self) -> tuple[int, int] | None:
        index = self.index(self.ns_current)
        return None if index is None else (index.major, index.minor)

    def index(self, which: int) -> IndexBlock | None:
        if which < 0:
            return None
        return IndexBlock.unpack(self.data[which * self.index_size:(which + 1) * self.index_size])

    def free_bitmap(self, which: int) -> bytearray:
        """A copy of the free bitmap of index block `which`."""
        start = which * self.index_size + INDEX_HEADER.size
        return self.data[start:(which + 1) * self.index_size]

    def _set_free_bit(self, which: int, slot: int, free: bool) -> bool:
        pos = which * self.index_size + INDEX_HEADER.size + slot // 8
        was = bool(self.data[pos] >> (slot % 8) & 1)
        if free:
            self.data[pos] |= 1 << (slot % 8)
        else:
            self.data[pos] &= ~(1 << (slot % 8)) & 0xFF
        return was

    def label_at(self, slot: int) -> bytes:
        off = self.label_base + slot * self.label_size
        return bytes(self.data[off:off + self.label_size])

    # -- reading (nd_label_active_count(), nd_label_active(), slot_valid())
    def active_labels(self) -> list[Label]:
        """The valid labels of the current index, in slot order."""
        active = self._refresh_active()
        return [active[slot] for slot in sorted(active)]

    def active_labels_of(self, uuid: uuidlib.UUID) -> list[Label]:
        """The valid labels of the current index naming `uuid`, in slot order."""
        self._refresh_active()
        found = self._by_uuid.get(uuid)
        return [found[slot] for slot in sorted(found)] if found else []

    def _forget_parsed(self) -> None:
        self._parsed.clear()
        self._active = None
        self._by_uuid.clear()

    def _refresh_active(self) -> dict[int, Label]:
        index = self.index(self.ns_current)
        if index is None:
            self._active = None
            self._by_uuid.clear()
            return {}
        free = int.from_bytes(self.free_bitmap(self.ns_current), "little")
        used = ~free & ((1 << index.nslot) - 1)
        if self._active is None:
            self._active, changed = {}, used
            self._by_uuid.clear()
        else:
            changed = used ^ self._active_used
        while changed:
            low = changed & -changed
            changed ^= low
            slot = low.bit_length() - 1
            old = self._active.pop(slot, None)
            if old is not None:
                same = self._by_uuid[old.uuid]
                del same[slot]
                if not same:
                    del self._by_uuid[old.uuid]
            label = self._valid_label(slot) if used & low else None
            if label is not None:
                self._active[slot] = label
                self._by_uuid.setdefault(label.uuid, {})[slot] = label
        self._active_used = used
        return self._active

    def _valid_label(self, slot: int) -> Label | None:
        """slot_valid(): the label in `slot` if it names its slot and its checksum holds;
        parsed once for as long as the slot's bytes stay the same."""
        raw = self.label_at(slot)
        cached = self._parsed.get(slot)
        if cached is not None and cached[0] == raw:
            return cached[1]
        label: Label | None = Label.unpack(raw, self.label_size)
        if label is not None and (label.slot != slot or not label_checksum_ok(raw, self.label_size)):
            label = None
        self._parsed[slot] = (raw, label)
        return label

    def nfree(self) -> int:
        """nd_label_nfree(): free slots in the next index (all slots without an index)."""
        index = self.index(self.ns_next)
        if index is None:
            return num_label_slots(self.config_size, self.label_size)
        free = self.free_bitmap(self.ns_next)
        return sum(_bit(free, s) for s in range(index.nslot))

    # -- writing
    def alloc_slot(self) -> int | None:
        index = self.index(self.ns_next)
        if index is None:
            return None
        free = self.free_bitmap(self.ns_next)
        for slot in range(index.nslot):
            if _bit(free, slot):
                self._set_free_bit(self.ns_next, slot, False)
                return slot
        return None

    def free_slot(self, slot: int) -> bool:
        index = self.index(self.ns_next)
        if index is None or slot >= index.nslot:
            return False
        return not self._set_free_bit(self.ns_next, slot, True)

    def write_label(self, slot: int, label: Label) -> None:
        raw = label.pack(self.label_size)
        off = self.label_base + slot * self.label_size
        self.area.write(off, raw)
        self.data[off:off + self.label_size] = raw
        if self._active_used >> slot & 1:  # a slot the current index uses (the kernel never
            self._active = None  # writes one; kept right all the same)

    def write_index(self, which: int, seq: int, init: bool = False) -> None:
        """nd_label_write_index(): fill in index block `which`, checksum it and write it; an
        update (not init) then makes it the current one and the other one the next."""
        isize = self.index_size
        start = which * isize
        nslot = num_label_slots(self.config_size, self.label_size) if init else self.index(which).nslot  # type: ignore[union-attr]
        block = bytearray(self.data[start:start + isize])
        INDEX_HEADER.pack_into(block, 0, NSINDEX_SIGNATURE, b"\0\0\0", self.label_size >> 8, seq,
                               start, isize, (1 - which) * isize, self.label_base, nslot, 1,
                               1 if self.label_size < 256 else 2, 0)
        if init:
            nfree = -(-nslot // 64) * 64
            bitmap = bytearray(b"\xff" * (nfree // 8))
            for bit in range(nslot, nfree):
                bitmap[bit // 8] &= ~(1 << (bit % 8)) & 0xFF
            block[INDEX_HEADER.size:INDEX_HEADER.size + len(bitmap)] = bitmap
        struct.pack_into("<Q", block, INDEX_CHECKSUM_OFFSET, fletcher64(bytes(block)))
        self.area.write(start, bytes(block))
        self.data[start:start + isize] = block
        if init:
            return
        cur = self.ns_current * isize
        self.data[cur:cur + isize] = block
        self.ns_current, self.ns_next = self.ns_next, self.ns_current

    def init_index(self) -> None:
        """init_labels(): a DIMM without a valid index gets two fresh ones (seq 3 and 2)."""
        if self.ns_current >= 0 and self.ns_next >= 0:
            return
        self.data[:] = bytes(self.config_size)
        self._forget_parsed()
        self.write_index(0, 3, init=True)
        self.write_index(1, 2, init=True)
        self.ns_current, self.ns_next = 0, 1


# ---------------------------------------------------------------- one region (interleave set)


@dataclass(frozen=True)
class InterleaveSet:
    """nd_interleave_set: the cookies acpi_nfit_init_interleave_set() computes, and the SPA
    range type the labels of v1.2 must carry."""

    cookie1: int  # v1.1 labels
    cookie2: int  # v1.2 labels
    altcookie: int  # v1.1 labels made with the old sort order
    type_guid: uuidlib.UUID = UUID_PERSISTENT_MEMORY


@dataclass(frozen=True)
class LabelMapping:
    """A DIMM's share of the region: its label data and the DPA range the NFIT maps."""

    dimm: DimmLabelData
    start: int
    size: int


@dataclass(frozen=True)
class ScannedNamespace:
    """A namespace as create_namespace_pmem() builds it from a complete label set."""

    uuid: uuidlib.UUID
    name: bytes
    offset: int  # in region space
    size: int
    lbasize: int
    claim_class: str


class InterleaveSetLabels:
    def __init__(self, mappings: Sequence[LabelMapping], iset: InterleaveSet) -> None:
        self.mappings = list(mappings)
        self.iset = iset

    @property
    def ways(self) -> int:
        return len(self.mappings)

    def cookie(self, index: IndexBlock | None) -> int:
        """nd_region_interleave_set_cookie(): v1.1 index blocks select cookie1."""
        if index is not None and index.major == 1 and index.minor == 1:
            return self.iset.cookie1
        return self.iset.cookie2

    def _label_ok(self, dimm: DimmLabelData, label: Label, cookie: int, uuid: uuidlib.UUID) -> bool:
        if label.isetcookie != cookie or label.uuid != uuid:
            return False
        return dimm.label_size < 256 or label.type_guid == self.iset.type_guid

    def _positions_found(self, uuid: uuidlib.UUID, cookie: int) -> set[int]:
        """The positions has_uuid_at_pos() finds the uuid's labels at, all at once (asked position
        by position, it walks the DIMMs each time: ways² for a wide set): walking the DIMMs in
        order, each one's label for the set counts, up to a DIMM that holds two labels of the
        uuid (a duplicate: has_uuid_at_pos() gives up there)."""
        found: set[int] = set()
        for m in self.mappings:
            ok = [label for label in m.dimm.active_labels_of(uuid) if self._label_ok(m.dimm, label, cookie, uuid)]
            if len(ok) > 1:
                break  # duplicate entry for uuid
            if ok and ok[0].nlabel == self.ways:
                found.add(ok[0].position)
        return found

    def _complete(self, uuid: uuidlib.UUID, cookie: int) -> bool:
        """Every position has the uuid's label, with the set's cookie or its alternative."""
        missing = set(range(self.ways)) - self._positions_found(uuid, cookie)
        return not missing or not missing - self._positions_found(uuid, self.iset.altcookie)

    def _missing(self, uuid: uuidlib.UUID, cookie: int) -> str:
        """The DIMM at the first position without the uuid's label (the one the kernel names)."""
        found = self._positions_found(uuid, cookie) | self._positions_found(uuid, self.iset.altcookie)
        first = min(set(range(self.ways)) - found, default=0)
        return self.mappings[first].dimm.name or f"position {first}"

    def scan(self) -> list[ScannedNamespace]:
        """scan_labels(): the namespaces the labels of mapping 0 describe, completed by the
        other DIMMs. Labels of another interleave set are skipped; a set with a label missing
        at some position, duplicated, or outside a DIMM's mapped range makes the whole scan
        fail with ENODEV (the region does not probe), as in the kernel."""
        if not self.mappings:
            return []
        m0 = self.mappings[0]
        cookie = self.cookie(m0.dimm.index(m0.dimm.ns_current))
        if cookie == 0:
            raise fail(errno.ENODEV, "invalid interleave-set-cookie")
        found: dict[uuidlib.UUID, ScannedNamespace] = {}
        for label in m0.dimm.active_labels():
            if label.dpa < m0.start or label.dpa > m0.start + m0.size - 1:
                continue  # an extent outside this region
            if label.uuid in found:
                raise fail(errno.ENODEV, f"conflicting extents for uuid {label.uuid}")
            if label.isetcookie != cookie and label.isetcookie != self.iset.altcookie:
                continue  # another interleave set's label
            if not self._complete(label.uuid, cookie):
                missing = self._missing(label.uuid, cookie)
                raise fail(errno.ENODEV, f"{missing} missing label for {label.uuid}")
            found[label.uuid] = self._create(label.uuid)
        return sorted(found.values(), key=lambda ns: ns.offset)

    def _create(self, uuid: uuidlib.UUID) -> ScannedNamespace:
        """select_pmem_id() and the size/identity part of create_namespace_pmem()."""
        size = 0
        first: Label | None = None
        dpa0 = 0
        for i, m in enumerate(self.mappings):
            label = next(iter(m.dimm.active_labels_of(uuid)), None)
            if label is None:
                raise fail(errno.ENODEV, f"label for {uuid} not found")
            end = label.dpa + label.rawsize
            if not (m.start <= label.dpa < m.start + m.size and m.start < end <= m.start + m.size):
                raise fail(errno.ENODEV, f"invalid label for {uuid}: outside the mapped DPA range")
            if i == 0:
                dpa0 = label.dpa
            size += label.rawsize
            if label.position == 0 and first is None:
                first = label
        if first is None:
            raise fail(errno.ENODEV, f"no label at position 0 for {uuid}")
        return ScannedNamespace(uuid=first.uuid, name=first.name, offset=(dpa0 - self.mappings[0].start) * self.ways,
                                size=size, lbasize=first.lbasize,
                                claim_class=first.claim_class if self.mappings[0].dimm.label_size >= 256 else "")

    # -- writing

    def update(self, ns: ScannedNamespace, old_uuid: uuidlib.UUID | None = None) -> None:
        """nd_pmem_namespace_label_update() for a namespace with an allocation: on every DIMM a
        new label flagged UPDATING replaces the old ones, then a second pass clears the flag
        (UEFI 2.7). `old_uuid` is the uuid the namespace had before a rename (its labels are
        reaped too, as namespace_update_uuid() marks them)."""
        if ns.size == 0:
            self.delete(ns.uuid)
            return
        for dimm in {id(m.dimm): m.dimm for m in self.mappings}.values():
            dimm.init_index()
        for flags in (NSLABEL_FLAG_UPDATING, 0):
            for pos, m in enumerate(self.mappings):
                self._label_update(m, ns, pos, flags, old_uuid)

    def _label_update(self, m: LabelMapping, ns: ScannedNamespace, pos: int, flags: int,
                      old_uuid: uuidlib.UUID | None) -> None:
        """__pmem_label_update()."""
        dimm = m.dimm
        index = dimm.index(dimm.ns_next)
        if index is None:
            raise fail(errno.ENXIO, "no label index")
        victims = sorted({lab.slot for uuid in (ns.uuid, old_uuid) if uuid is not None
                          for lab in dimm.active_labels_of(uuid)})
        slot = dimm.alloc_slot()
        if slot is None:
            raise fail(errno.ENXIO, "no free label slot")
        previous = next(iter(dimm.active_labels_of(ns.uuid)), None)
        label = Label(
            uuid=ns.uuid, name=ns.name, flags=flags, nlabel=self.ways, position=pos,
            isetcookie=self.cookie(index), lbasize=ns.lbasize, dpa=m.start + ns.offset // self.ways,
            rawsize=ns.size // self.ways, slot=slot,
            type_guid=self.iset.type_guid if dimm.label_size >= 256 else NULL_GUID,
            abstraction_guid=abstraction_guid(ns.claim_class, previous.abstraction_guid if previous
                                              else NULL_GUID) if dimm.label_size >= 256
            else NULL_GUID,
        )
        dimm.write_label(slot, label)
        for victim in victims:
            dimm.free_slot(victim)
        dimm.write_index(dimm.ns_next, nd_inc_seq(index.seq))

    def delete(self, uuid: uuidlib.UUID) -> None:
        """del_labels() on every DIMM: free the namespace's slots, write the next index."""
        for m in self.mappings:
            dimm = m.dimm
            index = dimm.index(dimm.ns_next)
            if index is None:
                continue
            for label in dimm.active_labels_of(uuid):
                dimm.free_slot(label.slot)
            dimm.write_index(dimm.ns_next, nd_inc_seq(index.seq))

    def described(self) -> dict[uuidlib.UUID, ScannedNamespace]:
        """What the labels describe now, without failing on damage (for diffing updates)."""
        try:
            return {ns.uuid: ns for ns in self.scan()}
        except OSError:
            return {}


def with_name(ns: ScannedNamespace, name: str) -> ScannedNamespace:
    return replace(ns, name=name.encode("utf-8", "surrogateescape")[:NSLABEL_NAME_LEN])
