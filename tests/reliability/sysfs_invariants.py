"""What must hold in the sysfs tree whatever was written to it (checked after every step of
the bad-input tests, through a real mount or through the model's Tree):

* every /sys/bus/nd/devices link resolves to a device directory;
* an enabled region has its pfn/dax/btt seeds (and a namespace seed when labelled), each an
  existing, disabled device of that region; a disabled region has no child device;
* claims are symmetric: namespace.holder = P  <=>  P.namespace = namespace, in the same
  region, and the namespace's mode follows its holder (pfn: memory, dax: dax, btt: safe);
* an enabled personality claims a namespace that is not enabled itself; an enabled
  namespace has no holder; enabled block devices have a block/ entry and a /dev file;
* sizes: namespaces lie within their region, labelled ones do not overlap and
  available_size is what they leave; a pfn/dax/btt device is no bigger than its namespace;
* the info block on the media (read from the state dir's media file) of every enabled
  pfn/dax (btt) device is valid, with the device's uuid, mode, offset and size.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import posixpath
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import kernel_oracle as K

# Where a namespace's info block lives (SZ_4K into it: the first 4 KiB are left alone) and its size.
INFO_BLOCK_OFFSET, INFO_BLOCK_SIZE = 4096, 4096


@functools.lru_cache(maxsize=4096)
def pfn_info(block: bytes, signature: bytes) -> dict[str, object] | None:
    """The block as the kernel validates it (kernel_oracle, not vnvdimm's own unpacker)."""
    return K.decode_pfn_sb(block, signature)


@functools.lru_cache(maxsize=4096)
def btt_info(block: bytes) -> dict[str, object] | None:
    return K.decode_btt_sb(block)


PERSONALITY = re.compile(r"(pfn|dax|btt)(\d+)\.(\d+)")
NAMESPACE = re.compile(r"namespace(\d+)\.(\d+)")
MODE_OF_HOLDER = {"pfn": "memory", "dax": "dax", "btt": "safe"}


class View:
    """Read access to a sysfs tree by path relative to the mount root ('sys/...')."""

    def listdir(self, rel: str) -> list[str]:
        raise NotImplementedError

    def read(self, rel: str) -> str | int:
        """The content, or the errno of the open/read."""
        raise NotImplementedError

    def readlink(self, rel: str) -> str | None:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError


class MountView(View):
    def __init__(self, root: Path) -> None:
        self.root = root

    def listdir(self, rel: str) -> list[str]:
        return sorted(os.listdir(self.root / rel))

    def read(self, rel: str) -> str | int:
        try:
            fd = os.open(self.root / rel, os.O_RDONLY)
        except OSError as e:
            return e.errno or -1
        try:
            return os.read(fd, 4096).decode("latin-1")
        except OSError as e:
            return e.errno or -1
        finally:
            os.close(fd)

    def readlink(self, rel: str) -> str | None:
        try:
            return os.readlink(self.root / rel)
        except OSError:
            return None

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.root / rel)


class TreeView(View):
    """The model's Tree (no mount): the same nodes the FUSE adapter serves."""

    def __init__(self, tree) -> None:  # type: ignore[no-untyped-def]
        from vnvdimm.sysfs.kernfs import KAttr, KDir, KLink

        self.nodes = tree.snapshot().nodes  # one check = one snapshot (nothing changes meanwhile)
        self.KAttr, self.KDir, self.KLink = KAttr, KDir, KLink

    def _node(self, rel: str):  # type: ignore[no-untyped-def]
        return self.nodes.get("/" + rel)

    def listdir(self, rel: str) -> list[str]:
        node = self._node(rel)
        if not isinstance(node, self.KDir):
            raise OSError(errno.ENOTDIR, rel)
        return sorted(node.children)

    def read(self, rel: str) -> str | int:
        node = self._node(rel)
        if node is None:
            return errno.ENOENT
        if not isinstance(node, self.KAttr):
            return errno.EISDIR
        try:
            return node.show().decode("latin-1")
        except OSError as e:
            return e.errno or -1

    def readlink(self, rel: str) -> str | None:
        node = self._node(rel)
        return node.target if isinstance(node, self.KLink) else None

    def exists(self, rel: str) -> bool:
        return self._node(rel) is not None


def check(view: View, media: Callable[[int], Path] | None = None) -> list[str]:
    """Every violated invariant, in words (empty when all hold)."""
    problems: list[str] = []

    def bad(message: str) -> None:
        problems.append(message)

    def text(rel: str) -> str | None:
        value = view.read(rel)
        if isinstance(value, int):
            return None
        if not value.endswith("\n") or value.count("\n") != 1:
            bad(f"{rel}: {value!r} is not one line")
        return value.rstrip("\n")

    def number(rel: str) -> int | None:
        value = text(rel)
        if value is None:
            return None
        try:
            return int(value, 0)
        except ValueError:
            bad(f"{rel}: {value!r} is not a number")
            return None

    devices: dict[str, str] = {}  # name -> directory (relative to the mount root)
    for name in view.listdir("sys/bus/nd/devices"):
        link = view.readlink(f"sys/bus/nd/devices/{name}")
        if link is None:
            bad(f"sys/bus/nd/devices/{name} is not a link")
            continue
        target = posixpath.normpath(posixpath.join("sys/bus/nd/devices", link))
        if not view.exists(target):
            bad(f"sys/bus/nd/devices/{name} -> {link}: dangling")
            continue
        devices[name] = target

    def enabled(dev: str) -> bool:
        return view.readlink(f"{devices[dev]}/driver") is not None

    for region in sorted(d for d in devices if re.fullmatch(r"region\d+", d)):
        rdir = devices[region]
        rid = int(region[6:])
        rsize = number(f"{rdir}/size") or 0
        rstart = number(f"{rdir}/resource") or 0
        labelled = text(f"{rdir}/nstype") == "5"
        children = [c for c in view.listdir(rdir) if NAMESPACE.fullmatch(c) or PERSONALITY.fullmatch(c)]
        for child in children:
            if devices.get(child) != f"{rdir}/{child}":
                bad(f"{rdir}/{child} is not in /sys/bus/nd/devices")
        if not enabled(region):
            if children:
                bad(f"{region} is disabled but has {children}")
            continue
        seeds = ["pfn_seed", "dax_seed", "btt_seed"] + (["namespace_seed"] if labelled else [])
        for seed in seeds:
            name = text(f"{rdir}/{seed}")
            if not name or name not in children:
                bad(f"{region}/{seed} = {name!r} is not a device of the region")
            elif enabled(name):
                bad(f"{region}/{seed} = {name} is enabled")
            elif not name.startswith(seed.split("_")[0]):
                bad(f"{region}/{seed} = {name}: wrong kind")
        extents = []
        for ns in sorted(c for c in children if NAMESPACE.fullmatch(c)):
            nsdir = devices[ns]
            size = number(f"{nsdir}/size")
            start = number(f"{nsdir}/resource")
            holder = text(f"{nsdir}/holder")
            mode = text(f"{nsdir}/mode")
            if size is None or holder is None or mode is None or (start is None and size):
                bad(f"{ns}: size/resource/holder/mode unreadable")
                continue
            start = start or rstart  # a namespace of size 0 has no resource (ENXIO)
            offset = start - rstart
            if size and not (offset >= 0 and offset + size <= rsize):
                bad(f"{ns}: [{offset:#x}, +{size:#x}) outside {region} ({rsize:#x})")
            if size:
                extents.append((offset, size, ns))
            if not labelled and (offset, size) != (0, rsize):
                bad(f"{ns}: an IO namespace must cover its region")
            if holder:
                kind = PERSONALITY.fullmatch(holder)
                if holder not in children or kind is None:
                    bad(f"{ns}.holder = {holder} is not a personality of {region}")
                else:
                    back = text(f"{devices[holder]}/namespace")
                    if back != ns:
                        bad(f"{ns}.holder = {holder} but {holder}.namespace = {back!r}")
                    if mode != MODE_OF_HOLDER[kind.group(1)]:
                        bad(f"{ns}: mode {mode} with holder {holder}")
                if enabled(ns):
                    bad(f"{ns} is enabled and claimed by {holder}")
            elif mode not in ("raw", "memory"):
                bad(f"{ns}: mode {mode} without a holder")
            if enabled(ns):
                blocks = view.listdir(f"{nsdir}/block") if view.exists(f"{nsdir}/block") else []
                if len(blocks) != 1 or not view.exists(f"dev/{blocks[0]}"):
                    bad(f"{ns} is enabled without one block device and its /dev file ({blocks})")
        extents.sort()
        for (o1, s1, n1), (o2, _s2, n2) in itertools.pairwise(extents):
            if o1 + s1 > o2:
                bad(f"{n1} and {n2} overlap")
        if labelled:
            avail = number(f"{rdir}/available_size")
            used = sum(s for _, s, _ in extents)
            if avail is not None and avail != rsize - used:
                bad(f"{region}: available_size {avail} with {used} of {rsize} used")
        for dev in sorted(c for c in children if PERSONALITY.fullmatch(c)):
            kind = PERSONALITY.fullmatch(dev).group(1)  # type: ignore[union-attr]
            pdir = devices[dev]
            ns = text(f"{pdir}/namespace")
            if ns is None:
                bad(f"{dev}/namespace unreadable")
                continue
            if ns:
                if ns not in children or not NAMESPACE.fullmatch(ns):
                    bad(f"{dev}.namespace = {ns} is not a namespace of {region}")
                    continue
                if text(f"{devices[ns]}/holder") != dev:
                    bad(f"{dev}.namespace = {ns} but {ns}.holder = {text(f'{devices[ns]}/holder')!r}")
            if not enabled(dev):
                continue
            if not ns:
                bad(f"{dev} is enabled without a namespace")
                continue
            if enabled(ns):
                bad(f"{dev} and its namespace {ns} are both enabled")
            ns_size = number(f"{devices[ns]}/size") or 0
            ns_start = number(f"{devices[ns]}/resource") or 0
            size = number(f"{pdir}/size")
            # (a BTT's disk can be larger than its namespace: see the btt check below)
            if not size or (size > ns_size and kind != "btt"):
                bad(f"{dev}: size {size} for a namespace of {ns_size}")
                continue
            if kind == "pfn" and not view.exists(f"{pdir}/block"):
                bad(f"{dev} is enabled without a block device")
            if kind == "dax" and not view.exists(f"{pdir}/dax_region"):
                bad(f"{dev} is enabled without a dax_region")
            if media is None:
                continue
            path = media(rid)
            with open(path, "rb") as f:
                f.seek(ns_start - rstart)
                head = f.read(INFO_BLOCK_OFFSET + INFO_BLOCK_SIZE)
            block = head[INFO_BLOCK_OFFSET:]
            dev_uuid = text(f"{pdir}/uuid")
            if kind == "btt":
                # nd_btt_version(): BTT 1.1 at 4 KiB, or BTT 2.0 at offset 0 (v1.2 labels)
                info = btt_info(block)
                at_zero = btt_info(head[:INFO_BLOCK_SIZE])
                if info is None and at_zero is not None and at_zero["version_major"] == 2:
                    info = at_zero
                # discover_arenas() takes any info block nd_btt_arena_is_valid() accepts (its
                # parent uuid null or the namespace's, whatever the btt's own uuid and sector
                # size), and the disk has the arena's blocks of the btt's sector size
                ns_uuid = text(f"{devices[ns]}/uuid") or str(uuid.UUID(int=0))
                chosen = re.search(r"\[(\d+)\]", text(f"{pdir}/sector_size") or "")  # "512 [4096] 4104 ..."
                lbasize = int(chosen.group(1)) if chosen else 0
                if info is None:
                    bad(f"{dev} is enabled but its namespace holds no valid BTT info block")
                elif str(info["parent_uuid"]) not in (str(uuid.UUID(int=0)), ns_uuid):
                    bad(f"{dev}: BTT info block parent uuid {info['parent_uuid']} != {ns_uuid}")
                elif info["nextoff"] == 0 and size != int(info["external_nlba"]) * (  # type: ignore[call-overload]
                        4096 if lbasize >= 4096 else 512):
                    bad(f"{dev}: size {size} for {info['external_nlba']} blocks of a {lbasize}-byte btt")
                continue
            pinfo = pfn_info(block, K.PFN_SIGNATURE if kind == "pfn" else K.DAX_SIGNATURE)
            if pinfo is None:
                bad(f"{dev} is enabled but its namespace holds no valid {kind} info block")
                continue
            resource = number(f"{pdir}/resource")
            mode = text(f"{pdir}/mode")
            dataoff = int(pinfo["dataoff"])  # type: ignore[call-overload]
            if str(pinfo["uuid"]) != dev_uuid or (pinfo["mode"] == 2) != (mode == "pmem"):
                bad(f"{dev}: info block ({pinfo['uuid']}, mode {pinfo['mode']}) != device ({dev_uuid}, {mode})")
            if resource is not None and dataoff != resource - ns_start:
                bad(f"{dev}: info block data offset {dataoff:#x} != resource - namespace start")
            if dataoff + size > ns_size:
                bad(f"{dev}: data [{dataoff:#x}, +{size:#x}) beyond {ns}")
            # nd_pfn_validate(): an align of 0 (older blocks) means 1 << ilog2(dataoff).
            align = int(pinfo["align"]) or 1 << (dataoff.bit_length() - 1)  # type: ignore[call-overload]
            if align != number(f"{pdir}/align"):
                bad(f"{dev}: info block align {align} != device align {number(f'{pdir}/align')}")
            if int(pinfo["page_struct_size"]) < 64:  # type: ignore[call-overload]
                bad(f"{dev}: enabled with a struct page size of {pinfo['page_struct_size']} < 64")
            with_uuid = uuid.UUID(dev_uuid) if dev_uuid else None
            if with_uuid is None:
                bad(f"{dev} is enabled without a uuid")
    return problems
