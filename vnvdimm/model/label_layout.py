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

This module is the format: the structures, their checksums and the index blocks' validation
(__nd_label_validate()); what the kernel does with them is label_format.py.
"""

from __future__ import annotations

import functools
import struct
import uuid as uuidlib
from dataclasses import dataclass

from vnvdimm.model.infoblock import fletcher64

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
