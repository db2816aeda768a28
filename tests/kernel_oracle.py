"""What the kernel does, written here independently of vnvdimm, for the tests to compare
against:

* what the store functions do with a buffer (regular expressions over the C string the store
  sees): each oracle returns OK (with the value that will show) or the errno. Sources:
  lib/kstrtox.c, lib/string.c, drivers/nvdimm/{core,claim,pfn_devs,namespace_devs,region_devs}.c,
  drivers/dax/bus.c, lib/kobject_uevent.c;
* the ``struct page`` records memmap_init_one() leaves and what /proc/kpageflags shows of them
  (include/linux/mm_types.h, page-flags-layout.h, poison.h, fs/proc/page.c, x86_64 4.18);
* the pfn/dax info block (drivers/nvdimm/pfn.h ``struct nd_pfn_sb``, pfn_devs.c
  nd_pfn_validate()) and the BTT info block (btt.h ``struct btt_sb``, btt.c), decoded from
  their byte offsets.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

U64 = 1 << 64


@dataclass(frozen=True)
class Ok:
    value: object = None


@dataclass(frozen=True)
class Err:
    errno: int


Verdict = Ok | Err


def c_string(buf: bytes) -> bytes:
    return buf.split(b"\0", 1)[0]


def streq(buf: bytes) -> bytes:
    """What sysfs_streq() compares: the C string minus one trailing newline."""
    s = c_string(buf)
    return s[:-1] if s.endswith(b"\n") else s


def kstrtoull(buf: bytes) -> Verdict:
    s = c_string(buf)
    s = s[1:] if s.startswith(b"+") else s
    if re.match(rb"0[xX][0-9a-fA-F]", s):
        base, s = 16, s[2:]
        digits = re.match(rb"[0-9a-fA-F]*", s).group()  # type: ignore[union-attr]
    elif s.startswith(b"0"):
        base, digits = 8, re.match(rb"[0-7]*", s).group()  # type: ignore[union-attr]
    else:
        base, digits = 10, re.match(rb"[0-9]*", s).group()  # type: ignore[union-attr]
    value = 0
    for d in digits:
        value = value * base + int(chr(d), 16)
        if value >= U64:
            return Err(errno.ERANGE)
    if not digits or s[len(digits):] not in (b"", b"\n"):
        return Err(errno.EINVAL)
    return Ok(value)


def kstrtol(buf: bytes) -> Verdict:
    s = c_string(buf)
    if s.startswith(b"-"):
        v = kstrtoull(s[1:]) if not s[1:].startswith(b"+") else Err(errno.EINVAL)
        if isinstance(v, Ok) and v.value > 1 << 63:  # type: ignore[operator]
            return Err(errno.ERANGE)
        return Ok(-v.value) if isinstance(v, Ok) else v  # type: ignore[operator]
    v = kstrtoull(s)
    if isinstance(v, Ok) and v.value >= 1 << 63:  # type: ignore[operator]
        return Err(errno.ERANGE)
    return v


def kstrtobool(buf: bytes) -> Verdict:
    s = c_string(buf)
    if re.match(rb"[yYtT1]|[oO][nN]", s):
        return Ok(True)
    if re.match(rb"[nNfF0]|[oO][fF]", s):
        return Ok(False)
    return Err(errno.EINVAL)


def uuid_parse(buf: bytes) -> Verdict:
    m = re.match(rb"((?:[0-9a-fA-F]{2}[-:\n\0]?){15}[0-9a-fA-F]{2})", buf)
    if not m:
        return Err(errno.EINVAL)
    hexdigits = re.sub(rb"[-:\n\0]", b"", m.group(1)).decode().lower()
    return Ok(f"{hexdigits[:8]}-{hexdigits[8:12]}-{hexdigits[12:16]}-{hexdigits[16:20]}-{hexdigits[20:]}")


def choice(buf: bytes, words: tuple[str, ...]) -> Verdict:
    s = streq(buf)
    for w in words:
        if s == w.encode():
            return Ok(w)
    return Err(errno.EINVAL)


def size_select(buf: bytes, supported: tuple[int, ...]) -> Verdict:
    v = kstrtoull(buf)
    if isinstance(v, Err):
        return v
    return Ok(v.value) if v.value in supported else Err(errno.EINVAL)


def c_strncmp(a: bytes, b: bytes, n: int) -> int:
    """strncmp() of two C strings (a NUL where each ends)."""
    for i in range(n):
        ca = a[i] if i < len(a) else 0
        cb = b[i] if i < len(b) else 0
        if ca != cb:
            return ca - cb
        if ca == 0:
            return 0
    return 0


def pfn_mode(buf: bytes) -> Verdict:
    """mode_store(): strncmp(buf, "pmem\\n", len - 1) == 0 || strncmp(buf, "pmem", len - 1) == 0,
    then ram, then none."""
    n = len(buf) - 1
    s = c_string(buf)
    for word in ("pmem", "ram", "none"):
        if c_strncmp(s, (word + "\n").encode(), n) == 0 or c_strncmp(s, word.encode(), n) == 0:
            return Ok(word)
    return Err(errno.EINVAL)


KSPACE = b" \t\n\v\f\r\xa0"


def namespace_store(buf: bytes, region_namespaces: dict[str, Verdict]) -> Verdict:
    """nd_namespace_store() on an unbound personality: trailing isspace() trimmed only; ''
    detaches; otherwise the name must start with "namespace" and be a namespace of the region
    (region_namespaces: name -> the verdict of claiming it)."""
    name = c_string(buf).rstrip(KSPACE)
    if name == b"":
        return Ok("")
    if not name.startswith(b"namespace"):
        return Err(errno.EINVAL)
    return region_namespaces.get(name.decode("latin-1"), Err(errno.ENODEV))


def device_name(buf: bytes, verdicts: dict[str, Verdict], default: Verdict) -> Verdict:
    """bus_find_device_by_name() (sysfs_streq) then what binding/unbinding that device does."""
    return verdicts.get(streq(buf).decode("latin-1"), default)


def dax_id(buf: bytes) -> Verdict:
    m = re.fullmatch(rb"dax(-?(?:0|[1-9][0-9]*))\.(-?(?:0|[1-9][0-9]*))", streq(buf))
    if not m or any(g == b"-0" or not -(1 << 31) <= int(g) < 1 << 31 for g in m.groups()):
        return Err(errno.EINVAL)
    return Ok(streq(buf).decode())


UEVENT_ACTIONS = (b"add", b"remove", b"change", b"move", b"online", b"offline", b"bind", b"unbind")
_ARGS = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
                   rb"(?: [0-9A-Za-z]+=[0-9A-Za-z]+)*")


def uevent(buf: bytes) -> Verdict:
    body = buf[:-1] if buf[-1:] in (b"\n", b"\0") else buf
    action, sep, _ = body.partition(b" ")
    if action not in UEVENT_ACTIONS:
        return Err(errno.EINVAL)
    if not sep:
        return Ok(action.decode())
    args = buf[len(action) + 1:]
    args = args[:-1] if args[-1:] in (b"\n", b"\0") else args
    return Ok(action.decode()) if _ARGS.fullmatch(args) else Err(errno.EINVAL)


# ---------------------------------------------------------------- input strategies


def _mutate(t: tuple[bytes, int, bytes, str]) -> bytes:
    word, pos, extra, how = t
    pos = pos % (len(word) + 1)
    if how == "insert":
        return word[:pos] + extra + word[pos:]
    if how == "delete":
        return word[:pos] + word[pos + 1:]
    if how == "replace":
        return word[:pos] + extra + word[pos + len(extra):]
    if how == "prefix":
        return extra + word
    return word + extra


def near(words: list[bytes]) -> st.SearchStrategy[bytes]:
    """Valid-looking inputs with one edit, and the ways writers end them (newline, NUL)."""
    edited = st.tuples(st.sampled_from(words), st.integers(0, 64), st.binary(min_size=1, max_size=3),
                       st.sampled_from(["insert", "delete", "replace", "prefix", "suffix"])).map(_mutate)
    ends = st.sampled_from([b"", b"\n", b"\0", b"\n\0", b"\n\n", b" ", b"\t\n", b"\0junk"])
    return st.tuples(st.one_of(edited, st.sampled_from(words)), ends).map(lambda t: t[0] + t[1])


def inputs(words: list[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes (with and without NUL and newline) and near-valid inputs."""
    raw = st.binary(min_size=1, max_size=40)
    # (an empty write never reaches a store: kernfs returns 0 for it)
    return st.one_of(raw, raw.map(lambda b: b + b"\n"), raw.map(lambda b: b + b"\0"),
                     near(words).filter(len))


# ---------------------------------------------------------------- struct page (x86_64, 4.18)

# struct page is 64 bytes: flags @0, lru (next @8, prev @16; ZONE_DEVICE overlays pgmap on
# lru.next and hmm_data on lru.prev), mapping @24, index @32, private @40, _mapcount @48 (s32),
# _refcount @52 (s32), mem_cgroup @56.
STRUCT_PAGE = np.dtype({"names": ["flags", "lru_next", "lru_prev", "mapping", "index", "private",
                                  "mapcount", "refcount", "mem_cgroup"],
                        "formats": ["<u8", "<u8", "<u8", "<u8", "<u8", "<u8", "<i4", "<i4", "<u8"],
                        "offsets": [0, 8, 16, 24, 32, 40, 48, 52, 56], "itemsize": 64})
# page-flags-layout.h with SECTION_IN_PAGE_FLAGS, MAX_PHYSMEM_BITS 46, SECTION_SIZE_BITS 27,
# NODES_SHIFT 6, MAX_NR_ZONES 5: | section (19) | node (6) | zone (3) | ... | flags |
SECTION_SHIFT_IN_FLAGS, NODE_SHIFT_IN_FLAGS, ZONE_SHIFT_IN_FLAGS = 45, 39, 36
PFN_SECTION_SHIFT = 27 - 12
ZONE_DEVICE = 4  # DMA, DMA32, NORMAL, MOVABLE, DEVICE
PG_RESERVED = 11
LIST_POISON2 = 0xDEAD000000000000 + 0x200  # POISON_POINTER_DELTA + 0x200
VMEMMAP_START = 0xFFFFEA0000000000  # x86_64 vmemmap_base without KASLR
KPF_NOPAGE, KPF_RESERVED = 20, 32
# The address of a device's struct dev_pagemap is the emulator's choice (there is no kernel
# heap): vnvdimm places it at this direct-map base plus the device's start pfn times 64, modulo
# 4 GiB.
PGMAP_BASE = 0xFFFF888100000000


def device_pgmap(start_pfn: int) -> int:
    return PGMAP_BASE + (start_pfn << 6) % (1 << 32)


def page_records(first_pfn: int, n: int, *, nid: int, pgmap: int, has_pgmap: bool) -> np.ndarray:
    """What memmap_init_one() leaves in the records of pfns [first_pfn, first_pfn + n):
    mm_zero_struct_page(), set_page_links(ZONE_DEVICE, nid, pfn), init_page_count() (1),
    page_mapcount_reset() (-1), INIT_LIST_HEAD(&page->lru) (both words point at the record's
    own lru field), SetPageReserved(); then, for a page the device's pgmap describes (not the
    altmap pages that hold the memmap itself), page->pgmap and lru.prev = LIST_POISON2."""
    pfn = np.arange(first_pfn, first_pfn + n, dtype=np.uint64)
    out = np.zeros(n, dtype=STRUCT_PAGE)
    out["flags"] = ((pfn >> np.uint64(PFN_SECTION_SHIFT)) << np.uint64(SECTION_SHIFT_IN_FLAGS)) \
        | np.uint64(nid << NODE_SHIFT_IN_FLAGS | ZONE_DEVICE << ZONE_SHIFT_IN_FLAGS | 1 << PG_RESERVED)
    out["refcount"] = 1
    out["mapcount"] = -1
    if has_pgmap:
        out["lru_next"] = pgmap
        out["lru_prev"] = LIST_POISON2
    else:
        own_lru = np.uint64(VMEMMAP_START) + pfn * np.uint64(64) + np.uint64(8)
        out["lru_next"] = own_lru
        out["lru_prev"] = own_lru
    return out


def device_memmap(start_pfn: int, npages: int, *, nid: int, on_media: bool, data_page: int) -> np.ndarray:
    """The records of a whole pfn/dax device once its memmap is initialized. map=dev
    (``on_media``): the first two pages (the 8 KiB info-block area, altmap->reserve) are never
    initialized (zero here) and the pages up to the data (``data_page``) hold the memmap
    itself, so they are altmap pages without a pgmap. map=mem: every page has the pgmap."""
    pgmap = device_pgmap(start_pfn)
    out = np.zeros(npages, dtype=STRUCT_PAGE)
    reserve = 2 if on_media else 0
    split = max(reserve, min(data_page, npages)) if on_media else reserve
    out[reserve:split] = page_records(start_pfn + reserve, split - reserve, nid=nid, pgmap=pgmap, has_pgmap=False)
    out[split:] = page_records(start_pfn + split, npages - split, nid=nid, pgmap=pgmap, has_pgmap=True)
    return out


def kpageflags_of_initialized(records: np.ndarray) -> np.ndarray:
    """stable_page_flags() of records as memmap_init_one() leaves them: PG_reserved is copied
    to KPF_RESERVED; _mapcount -1 is not mapped, no other flag is set."""
    out = np.zeros(len(records), dtype=np.uint64)
    out[(records["flags"] & np.uint64(1 << PG_RESERVED)) != 0] |= np.uint64(1 << KPF_RESERVED)
    return out


# ---------------------------------------------------------------- info blocks (nd_pfn_sb, btt_sb)

PFN_SIGNATURE = b"NVDIMM_PFN_INFO\0"
DAX_SIGNATURE = b"NVDIMM_DAX_INFO\0"
BTT_SIGNATURE = b"BTT_ARENA_INFO\0\0"
SB_SIZE = 4096


def fletcher64(block: bytes) -> int:
    """nd_fletcher64(addr, len, le=true): a u32 running sum and a u64 sum of those sums over
    the little-endian 32-bit words; (hi << 32 | lo) in 64 bits."""
    words = np.frombuffer(block, dtype="<u4").astype(np.uint64)
    lo = np.cumsum(words) & np.uint64(0xFFFFFFFF)  # lo32 wraps at every step
    hi = int(lo.sum(dtype=np.uint64))  # hi32 += lo32 (u64: wraps at 2^64 like numpy)
    return ((hi << 32) | int(lo[-1])) & (U64 - 1)


def sb_checksum_ok(block: bytes) -> bool:
    """nd_sb_checksum(): the checksum field (the last 8 bytes) zeroed, fletcher64 of the 4 KiB."""
    stored = int.from_bytes(block[SB_SIZE - 8:SB_SIZE], "little")
    return stored == fletcher64(block[:SB_SIZE - 8] + bytes(8))


def _u(block: bytes, offset: int, size: int) -> int:
    return int.from_bytes(block[offset:offset + size], "little")


def decode_pfn_sb(block: bytes, signature: bytes) -> dict[str, object] | None:
    """struct nd_pfn_sb (drivers/nvdimm/pfn.h), as nd_pfn_validate() first checks it:
    signature, checksum; the fields at their offsets, with the defaults older minor versions
    imply (start_pad/end_trunc 0 before 1, align 0 before 2, page size 4K and struct page 64
    before 4)."""
    import uuid as uuidlib

    if len(block) != SB_SIZE or block[:16] != signature or not sb_checksum_ok(block):
        return None
    minor = _u(block, 54, 2)
    return {
        "uuid": uuidlib.UUID(bytes=block[16:32]), "parent_uuid": uuidlib.UUID(bytes=block[32:48]),
        "flags": _u(block, 48, 4), "version_major": _u(block, 52, 2), "version_minor": minor,
        "dataoff": _u(block, 56, 8), "npfns": _u(block, 64, 8), "mode": _u(block, 72, 4),
        "start_pad": _u(block, 76, 4) if minor >= 1 else 0, "end_trunc": _u(block, 80, 4) if minor >= 1 else 0,
        "align": _u(block, 84, 4) if minor >= 2 else 0,
        "page_size": _u(block, 88, 4) if minor >= 4 else 4096,
        "page_struct_size": _u(block, 92, 2) if minor >= 4 else 64,
    }


def decode_btt_sb(block: bytes) -> dict[str, object] | None:
    """struct btt_sb (drivers/nvdimm/btt.h), as btt.c's valid_info_block() checks it:
    signature, checksum; the fields at their offsets (offsets relative to the arena)."""
    import uuid as uuidlib

    if len(block) != SB_SIZE or block[:16] != BTT_SIGNATURE or not sb_checksum_ok(block):
        return None
    return {
        "uuid": uuidlib.UUID(bytes=block[16:32]), "parent_uuid": uuidlib.UUID(bytes=block[32:48]),
        "flags": _u(block, 48, 4), "version_major": _u(block, 52, 2), "version_minor": _u(block, 54, 2),
        "external_lbasize": _u(block, 56, 4), "external_nlba": _u(block, 60, 4),
        "internal_lbasize": _u(block, 64, 4), "internal_nlba": _u(block, 68, 4), "nfree": _u(block, 72, 4),
        "infosize": _u(block, 76, 4), "nextoff": _u(block, 80, 8), "dataoff": _u(block, 88, 8),
        "mapoff": _u(block, 96, 8), "logoff": _u(block, 104, 8), "info2off": _u(block, 112, 8),
    }
