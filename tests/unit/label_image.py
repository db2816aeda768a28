"""An independent writer and reader of label storage areas, written from the on-media format
(UEFI 2.7 namespace index and labels, as drivers/nvdimm/label.h lays them out), for checking
vnvdimm's label code against images it did not make and making it read images it did not write.
Field offsets are spelled out here on purpose instead of shared with the product's structs."""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field

SIG = b"NAMESPACE_INDEX\0"
PM_GUID = uuidlib.UUID("66f0d379-b4f3-4074-ac43-0d3318b78cdb")


def fletcher(data: bytes) -> int:
    lo, hi = 0, 0
    for word in memoryview(bytes(data)).cast("I"):
        lo = (lo + word) % (1 << 32)
        hi = (hi + lo) % (1 << 64)
    return ((hi << 32) | lo) % (1 << 64)


def put(buf: bytearray, offset: int, value: int, width: int) -> None:
    buf[offset:offset + width] = value.to_bytes(width, "little")


def get(buf: bytes, offset: int, width: int) -> int:
    return int.from_bytes(buf[offset:offset + width], "little")


def geometry(config_size: int, label_size: int) -> tuple[int, int]:
    """(slots, bytes per index block)."""
    nslot = config_size // (label_size + 1)
    block = 72 + (nslot + 7) // 8
    return nslot, (block + 255) // 256 * 256


@dataclass
class ImageLabel:
    uuid: uuidlib.UUID
    slot: int
    dpa: int
    rawsize: int
    position: int = 0
    nlabel: int = 1
    cookie: int = 0
    name: bytes = b""
    flags: int = 0
    lbasize: int = 0
    abstraction: uuidlib.UUID = field(default_factory=lambda: uuidlib.UUID(int=0))
    type_guid: uuidlib.UUID = PM_GUID


def label_bytes(label_size: int, lab: ImageLabel) -> bytes:
    raw = bytearray(label_size)
    raw[0:16] = lab.uuid.bytes
    raw[16:16 + len(lab.name)] = lab.name
    put(raw, 80, lab.flags, 4)
    put(raw, 84, lab.nlabel, 2)
    put(raw, 86, lab.position, 2)
    put(raw, 88, lab.cookie, 8)
    put(raw, 96, lab.lbasize, 8)
    put(raw, 104, lab.dpa, 8)
    put(raw, 112, lab.rawsize, 8)
    put(raw, 120, lab.slot, 4)
    if label_size == 256:
        raw[128:144] = lab.type_guid.bytes_le
        raw[144:160] = lab.abstraction.bytes_le
        put(raw, 248, fletcher(raw), 8)
    return bytes(raw)


def index_bytes(config_size: int, label_size: int, which: int, seq: int, used: set[int]) -> bytes:
    nslot, isize = geometry(config_size, label_size)
    raw = bytearray(isize)
    raw[0:16] = SIG
    raw[19] = 1 if label_size == 256 else 0
    put(raw, 20, seq, 4)
    put(raw, 24, which * isize, 8)
    put(raw, 32, isize, 8)
    put(raw, 40, (1 - which) * isize, 8)
    put(raw, 48, 2 * isize, 8)
    put(raw, 56, nslot, 4)
    put(raw, 60, 1, 2)
    put(raw, 62, 2 if label_size == 256 else 1, 2)
    for slot in range(nslot):
        if slot not in used:
            raw[72 + slot // 8] |= 1 << (slot % 8)
    put(raw, 64, fletcher(raw), 8)
    return bytes(raw)


def image(config_size: int, label_size: int, labels: list[ImageLabel], seqs: tuple[int, int] = (1, 2),
          current: int = 1, previous_used: set[int] | None = None) -> bytearray:
    """An area whose index block `current` lists `labels`; the other block (older sequence
    number) lists `previous_used`."""
    _, isize = geometry(config_size, label_size)
    area = bytearray(config_size)
    used = {lab.slot for lab in labels}
    area[current * isize:(current + 1) * isize] = index_bytes(config_size, label_size, current, seqs[1], used)
    other = 1 - current
    area[other * isize:(other + 1) * isize] = index_bytes(config_size, label_size, other, seqs[0],
                                                          previous_used or set())
    for lab in labels:
        off = 2 * isize + lab.slot * label_size
        area[off:off + label_size] = label_bytes(label_size, lab)
    return area


def read_image(area: bytes) -> tuple[int, int, int, list[ImageLabel]]:
    """(label size, current block, its seq, labels in use) the way the spec says to pick the
    index: valid signature and checksum, then the newer of two by the 1 -> 2 -> 3 -> 1 cycle."""
    config_size = len(area)
    for label_size in (128, 256):
        _, isize = geometry(config_size, label_size)
        valid = []
        for which in (0, 1):
            raw = bytearray(area[which * isize:(which + 1) * isize])
            version = get(raw, 60, 2) * 100 + get(raw, 62, 2)
            size = 128 << raw[19] if version >= 102 else 128
            saved = get(raw, 64, 8)
            put(raw, 64, 0, 8)
            if raw[:16] == SIG and size == label_size and fletcher(raw) == saved and get(raw, 20, 4) & 3:
                valid.append((which, get(raw, 20, 4) & 3))
        if not valid:
            continue
        if len(valid) == 2:
            (_, s0), (_, s1) = valid
            newer = {(1, 2): 1, (2, 3): 1, (3, 1): 1, (2, 1): 0, (3, 2): 0, (1, 3): 0}
            which, seq = valid[newer.get((s0, s1), 1)]
        else:
            which, seq = valid[0]
        labels = []
        base = which * isize
        for slot in range(get(area, base + 56, 4)):
            if area[base + 72 + slot // 8] >> (slot % 8) & 1:
                continue
            raw = area[2 * isize + slot * label_size:2 * isize + (slot + 1) * label_size]
            labels.append(ImageLabel(
                uuid=uuidlib.UUID(bytes=bytes(raw[0:16])), slot=get(raw, 120, 4), dpa=get(raw, 104, 8),
                rawsize=get(raw, 112, 8), position=get(raw, 86, 2), nlabel=get(raw, 84, 2),
                cookie=get(raw, 88, 8), name=bytes(raw[16:80]).rstrip(b"\0"), flags=get(raw, 80, 4),
                lbasize=get(raw, 96, 8),
                abstraction=uuidlib.UUID(bytes_le=bytes(raw[144:160])) if label_size == 256 else uuidlib.UUID(int=0),
                type_guid=uuidlib.UUID(bytes_le=bytes(raw[128:144])) if label_size == 256 else uuidlib.UUID(int=0)))
        return label_size, which, seq, labels
    raise ValueError("no valid index block")
