"""Namespace labels in the label storage area, in the on-media format of the UEFI 2.7 / NVDIMM
namespace specification that the kernel reads and writes (drivers/nvdimm/label.c, label.h).

Layout of an area of `config_size` bytes holding labels of `label_size` bytes (128 for v1.1,
256 for v1.2):

    +---------------------+  0
    | index block 0       |  sizeof_namespace_index() bytes (a multiple of 256)
    +---------------------+
    | index block 1       |
    +---------------------+  labeloff = 2 * sizeof_namespace_index()
    | label slot 0 .. N-1 |  nslot = config_size // (label_size + 1)
    +---------------------+

An index block: "NAMESPACE_INDEX\\0", flags[3], labelsize (log2(size) - 7, v1.2), seq (u32:
1 -> 2 -> 3 -> 1, 0 invalid), myoff, mysize, otheroff, labeloff (u64), nslot (u32), major,
minor (u16), checksum (u64 fletcher64 of the block with the field zeroed), then a bitmap with
one bit per slot (set = free). Neither the index blocks nor the labels are updated in place:
an update writes new labels into free slots, then the *other* index block with the next
sequence number, which makes it the current one.

A label (little-endian): uuid[16], name[64], flags (u32), nlabel, position (u16), isetcookie,
lbasize, dpa, rawsize (u64), slot (u32), align (u8), reserved[3]; v1.2 adds type_guid[16],
abstraction_guid[16], reserved[88] and checksum (u64).

`DimmLabelData` is the kernel's nvdimm_drvdata for one DIMM (the area as read at DIMM probe,
the current and next index); `InterleaveSetLabels` is what a region does with the labels of
its DIMMs: scan them into namespaces at probe (scan_labels(), create_namespace_pmem()) and
write them when a namespace changes (nd_pmem_namespace_label_update(), del_labels()).
"""

from __future__ import annotations

import errno
import functools
import logging
import struct
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from vnvdimm.model.base import fail
from vnvdimm.model.infoblock import fletcher64

log = logging.getLogger("vnvdimm.model")

NSINDEX_SIGNATURE = b"NAMESPACE_INDEX\0"
NSINDEX_ALIGN = 256
NSINDEX_SEQ_MASK = 0x3
NSLABEL_NAME_LEN = 64
NSLABEL_FLAG_ROLABEL = 0x1
NSLABEL_FLAG_LOCAL = 0x2
NSLABEL_FLAG_BTT = 0x4
NSLABEL_FLAG_UPDATING = 0x8
LABEL_SIZES = (128, 256)  # nd_label_validate() probes v1.1 first, then v1.2

# struct nd_namespace_index up to (excluding) free[]
INDEX_HEADER = struct.Struct("<16s3sBIQQQQIHHQ")
INDEX_CHECKSUM_OFFSET = 64
# struct nvdimm_efi_label, the fields every version has (128 bytes) ...
LABEL_V11 = struct.Struct("<16s64sIHHQQQQIB3s")
# ... and what v1.2 adds behind them (type_guid, abstraction_guid, reserved2, checksum)
LABEL_V12_TAIL = struct.Struct("<16s16s88sQ")
LABEL_CHECKSUM_OFFSET = 248

NULL_GUID = uuidlib.UUID(int=0)
# Abstraction GUIDs (label.h) of the claim classes; stored as guid_t (little-endian fields).
CLAIM_CLASS_GUIDS = {
    "btt": uuidlib.UUID("8aed63a2-29a2-4c66-8b12-f05d15d3922a"),
    "btt2": uuidlib.UUID("18633bfc-1735-4217-8ac9-17239282d3f8"),
    "pfn": uuidlib.UUID("266400ba-fb9f-4677-bcb0-968f11d0d225"),
    "dax": uuidlib.UUID("97a86d9c-3cdd-4eda-986f-5068b4f80088"),
}
# The ACPI NFIT SPA range type of persistent memory: what a PM region's labels carry as type_guid.
UUID_PERSISTENT_MEMORY = uuidlib.UUID("66f0d379-b4f3-4074-ac43-0d3318b78cdb")


def nd_inc_seq(seq: int) -> int:
    return (0, 2, 3, 1)[seq & NSINDEX_SEQ_MASK]


def best_seq(a: int, b: int) -> int:
    a &= NSINDEX_SEQ_MASK
    b &= NSINDEX_SEQ_MASK
    if a == 0 or a == b:
        return b
    if b == 0:
        return a
    return b if nd_inc_seq(a) == b else a


def num_label_slots(config_size: int, label_size: int) -> int:
    """nvdimm_num_label_slots(): a label plus its bit in the free bitmap per slot."""
    return config_size // (label_size + 1)


@functools.cache  # a pure function of two numbers, asked on every label read and write
def sizeof_namespace_index(config_size: int, label_size: int) -> int:
    """sizeof_namespace_index(): header plus bitmap, rounded to 256 bytes; 0 when two of them
    do not fit in the space the label slots leave."""
    nslot = num_label_slots(config_size, label_size)
    space = config_size - nslot * label_size
    size = -(-(INDEX_HEADER.size + -(-nslot // 8)) // NSINDEX_ALIGN) * NSINDEX_ALIGN * 2
    return size // 2 if size <= space else 0


# ---------------------------------------------------------------- the on-media structures


@dataclass(frozen=True)
class IndexBlock:
    sig: bytes
    flags: bytes
    labelsize: int
    seq: int
    myoff: int
    mysize: int
    otheroff: int
    labeloff: int
    nslot: int
    major: int
    minor: int
    checksum: int

    @classmethod
    def unpack(cls, block: bytes | bytearray) -> IndexBlock:
        return cls(*INDEX_HEADER.unpack_from(block))

    @property
    def version(self) -> int:
        return self.major * 100 + self.minor


@dataclass(frozen=True)
class Label:
    """One namespace label (struct nvdimm_efi_label)."""

    uuid: uuidlib.UUID
    name: bytes = bytes(NSLABEL_NAME_LEN)
    flags: int = 0
    nlabel: int = 0
    position: int = 0
    isetcookie: int = 0
    lbasize: int = 0
    dpa: int = 0
    rawsize: int = 0
    slot: int = 0
    align: int = 0
    type_guid: uuidlib.UUID = NULL_GUID
    abstraction_guid: uuidlib.UUID = NULL_GUID
    checksum: int = 0

    @classmethod
    def unpack(cls, raw: bytes | bytearray, label_size: int) -> Label:
        (uuid_raw, name, flags, nlabel, position, isetcookie, lbasize, dpa, rawsize, slot, align,
         _reserved) = LABEL_V11.unpack_from(raw)
        fields = dict(uuid=uuidlib.UUID(bytes=uuid_raw), name=name, flags=flags, nlabel=nlabel,
                      position=position, isetcookie=isetcookie, lbasize=lbasize, dpa=dpa,
                      rawsize=rawsize, slot=slot, align=align)
        if label_size >= 256:
            type_guid, abstraction, _reserved2, checksum = LABEL_V12_TAIL.unpack_from(raw, LABEL_V11.size)
            fields.update(type_guid=uuidlib.UUID(bytes_le=type_guid),
                          abstraction_guid=uuidlib.UUID(bytes_le=abstraction), checksum=checksum)
        return cls(**fields)  # type: ignore[arg-type]

    def pack(self, label_size: int) -> bytes:
        """The label's bytes; a v1.2 label gets its checksum computed (nsl_calculate_checksum())."""
        out = bytearray(label_size)
        LABEL_V11.pack_into(out, 0, self.uuid.bytes, self.name.ljust(NSLABEL_NAME_LEN, b"\0")[:NSLABEL_NAME_LEN],
                            self.flags, self.nlabel, self.position, self.isetcookie, self.lbasize, self.dpa,
                            self.rawsize, self.slot, self.align, b"\0\0\0")
        if label_size >= 256:
            LABEL_V12_TAIL.pack_into(out, LABEL_V11.size, self.type_guid.bytes_le, self.abstraction_guid.bytes_le,
                                     bytes(88), 0)
            struct.pack_into("<Q", out, LABEL_CHECKSUM_OFFSET, fletcher64(bytes(out)))
        return bytes(out)

    @property
    def claim_class(self) -> str:
        """guid_to_nvdimm_cclass(): '' for none, the class name, or 'unknown'."""
        if self.abstraction_guid.int == 0:
            return ""
        for name, guid in CLAIM_CLASS_GUIDS.items():
            if guid == self.abstraction_guid:
                return name
        return "unknown"


def abstraction_guid(claim_class: str, current: uuidlib.UUID) -> uuidlib.UUID:
    """to_abstraction_guid(): an unknown class keeps the GUID the label had."""
    if claim_class == "unknown":
        return current
    return CLAIM_CLASS_GUIDS.get(claim_class, NULL_GUID)


def label_checksum_ok(raw: bytes | bytearray, label_size: int) -> bool:
    if label_size < 256:  # v1.1 labels have no checksum
        return True
    saved = struct.unpack_from("<Q", raw, LABEL_CHECKSUM_OFFSET)[0]
    zeroed = bytearray(raw[:label_size])
    zeroed[LABEL_CHECKSUM_OFFSET:LABEL_CHECKSUM_OFFSET + 8] = bytes(8)
    return fletcher64(bytes(zeroed)) == saved


def validate_index(data: bytes | bytearray, config_size: int, label_size: int,
                   why: list[str] | None = None) -> int:
    """__nd_label_validate(): the index block to use (0 or 1) for labels of `label_size`
    bytes, or -1 when neither is valid. `why` gets the kernel's reason for each invalid block
    ("nsindex1 checksum invalid"), in its words."""
    isize = sizeof_namespace_index(config_size, label_size)
    if isize == 0:
        return -1
    valid = [False, False]
    blocks: list[IndexBlock | None] = [None, None]
    reasons: list[str] = []
    for i in (0, 1):
        raw = bytearray(data[i * isize:(i + 1) * isize])
        if len(raw) < isize:
            continue
        block = IndexBlock.unpack(raw)
        blocks[i] = block
        reason = index_block_fault(i, block, raw, isize, config_size, label_size)
        if reason is None:
            valid[i] = True
        else:
            reasons.append(reason)
    if why is not None:
        why.extend(reasons)
    if valid[0] and valid[1]:
        b0, b1 = blocks[0], blocks[1]
        assert b0 is not None and b1 is not None
        return 1 if best_seq(b0.seq, b1.seq) == b1.seq & NSINDEX_SEQ_MASK else 0
    if valid[0]:
        return 0
    if valid[1]:
        return 1
    return -1


def index_block_fault(i: int, block: IndexBlock, raw: bytearray, isize: int, config_size: int,
                      label_size: int) -> str | None:
    """The first check of __nd_label_validate() index block `i` fails, in the kernel's words
    (its dev_dbg()), or None when the block is valid. `raw` is the block's bytes (its
    checksum field is zeroed here)."""
    if block.sig != NSINDEX_SIGNATURE:
        return f"nsindex{i} signature invalid"
    size = 1 << (7 + block.labelsize) if block.version >= 102 else 128
    if size != label_size:
        return f"nsindex{i} labelsize {block.labelsize} invalid"
    raw[INDEX_CHECKSUM_OFFSET:INDEX_CHECKSUM_OFFSET + 8] = bytes(8)
    if fletcher64(bytes(raw)) != block.checksum:
        return f"nsindex{i} checksum invalid"
    if block.seq & NSINDEX_SEQ_MASK == 0:
        return f"nsindex{i} sequence: {block.seq:#x} invalid"
    if block.myoff != i * isize:
        return f"nsindex{i} myoff: {block.myoff:#x} invalid"
    if block.otheroff != (1 - i) * isize:
        return f"nsindex{i} otheroff: {block.otheroff:#x} invalid"
    if block.labeloff != 2 * isize:
        # the labels start right after the two index blocks, nowhere else
        return f"nsindex{i} labeloff: {block.labeloff:#x} invalid"
    if block.mysize > isize or block.mysize < INDEX_HEADER.size:
        return f"nsindex{i} mysize: {block.mysize:#x} invalid"
    if block.nslot * label_size + 2 * isize > config_size:
        return f"nsindex{i} nslot: {block.nslot} invalid, config_size: {config_size:#x}"
    return None


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
