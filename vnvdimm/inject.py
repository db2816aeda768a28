"""`vnvdimm inject-error`: media errors through the bus's `vnvdimm/inject_error` control.

This is what ``ndctl inject-error`` does with the ACPI error-injection DSMs (on an NFIT
platform the daemon feeds the same platform error list and scrub): BLOCK and COUNT are 512-byte
blocks counted as ndctl counts them, from the data area of an fsdax/devdax namespace, from the
namespace start otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from vnvdimm import mounts
from vnvdimm.client import NotAMount, Root, read_attr, read_int

SECTOR = 512


class InjectError(RuntimeError):
    pass


def namespace_dir(root: Root, namespace: str) -> Path:
    if not namespace.startswith("namespace") or "/" in namespace:
        raise InjectError(f"{namespace}: not a namespace name (namespaceR.N)")
    path = root.nd_devices / namespace
    if not os.path.lexists(path):
        raise InjectError(f"{namespace}: no such namespace")
    return Path(os.path.realpath(path))


def control_file(ns_dir: Path, name: str) -> Path:
    bus_dir = ns_dir.parent.parent  # namespace -> region -> bus
    return bus_dir / "vnvdimm" / name


def on_trusted_mount(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and mounts.trusted_vnvdimm_dev(st.st_dev)


def open_control(root: Root, path: Path) -> int:
    """The control file, opened for writing only if it is one of a vnvdimm mount of root's or
    the caller's: the way to it follows the tree's links, and in a tree someone else made
    (a directory that looks like a mount) they could lead anywhere, e.g. to a file of root's."""
    refused = InjectError(f"{root.sys.parent}: not a vnvdimm mount of yours or root's ({path} is not on one); "
                          "nothing was written")
    try:
        if not on_trusted_mount(os.stat(path)):
            raise refused
        # O_NONBLOCK: a FIFO swapped in meanwhile does not hang us (it is refused below)
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InjectError(f"{path}: {e.strerror}") from None
    if not on_trusted_mount(os.fstat(fd)):
        os.close(fd)
        raise refused
    return fd


def request(root: Root, namespace: str, block: int, count: int, uninject: bool = False, clear: bool = False) -> None:
    """Inject media errors, take the injection back (the kernel's bad blocks stay, as with
    ndctl inject-error --uninject) or clear them (as ndctl clear-errors)."""
    if block < 0 or count < 1:
        raise InjectError("--block must be >= 0 and --count >= 1")
    ns_dir = namespace_dir(root, namespace)
    control = "clear_error" if clear else "uninject_error" if uninject else "inject_error"
    path = control_file(ns_dir, control)
    fd = open_control(root, path)
    try:
        os.write(fd, f"{namespace} {block} {count}\n".encode())
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise InjectError(f"{namespace}: blocks {block}..{block + count - 1} are out of range: "
                              f"{valid_blocks(root, ns_dir)}") from None
        raise InjectError(f"{namespace}: {e.strerror}") from None
    finally:
        os.close(fd)


def valid_blocks(root: Root, ns_dir: Path) -> str:
    """The blocks ndctl inject-error can name in the namespace, as the daemon counts them: the
    data area of the fsdax/devdax device that claims it (its `size`), else the namespace."""
    holder = read_attr(ns_dir / "holder") or ""
    size = read_int(root.nd_devices / holder / "size") if holder.startswith(("pfn", "dax")) else None
    where = f"the data area of {holder}" if size is not None else ns_dir.name
    if size is None:
        size = read_int(ns_dir / "size")
    if not size or size < SECTOR:
        return f"{where} has no blocks"
    return f"{where} has blocks 0..{size // SECTOR - 1} ({size // SECTOR} blocks of {SECTOR} bytes)"


def namespace_badblocks(root: Root, namespace: str) -> list[dict[str, int]]:
    """The namespace's bad blocks as `ndctl inject-error --status` lists them (block, count),
    from the region's badblocks over the namespace's injection window."""
    ns_dir = namespace_dir(root, namespace)
    region_dir = ns_dir.parent
    holder = read_attr(ns_dir / "holder")
    window = ns_dir
    if holder and holder.startswith(("pfn", "dax")) and os.path.islink(region_dir / holder / "driver"):
        window = region_dir / holder
    begin = read_int(window / "resource")
    size = read_int(window / "size")
    region_begin = read_int(region_dir / "resource")
    if begin is None or size is None or region_begin is None:
        raise InjectError(f"{namespace}: cannot read its resource and size (are you root?)")
    first, nblocks = (begin - region_begin) // SECTOR, size // SECTOR
    out = []
    for line in (read_attr(region_dir / "badblocks") or "").splitlines():
        start, count = (int(x) for x in line.split()[:2])
        lo, hi = max(start, first), min(start + count, first + nblocks)
        if lo < hi:
            if out and out[-1]["block"] + out[-1]["count"] == lo - first:
                out[-1]["count"] += hi - lo  # badblocks_show() splits long ranges: join them back
            else:
                out.append({"block": lo - first, "count": hi - lo})
    return out


def run(mountpoint: str, namespace: str, block: int | None, count: int, uninject: bool, status: bool,
        clear: bool = False) -> int:
    try:
        root = Root.of(mountpoint)
        if status:
            doc: dict[str, Any] = {"dev": namespace, "badblocks": namespace_badblocks(root, namespace)}
            print(json.dumps(doc, indent=2))
            return 0
        if block is None:
            raise InjectError("--block is required (or --status)")
        if uninject and clear:
            raise InjectError("--uninject and --clear exclude each other")
        request(root, namespace, block, count, uninject, clear)
    except (NotAMount, InjectError) as e:
        print(f"vnvdimm: {e}", file=sys.stderr)
        return 1
    verb = "cleared" if clear else "uninjected" if uninject else "injected"
    print(f"{verb} {count} bad block(s) at block {block} of {namespace}", file=sys.stderr)
    if uninject:
        print("the kernel's bad blocks stay until the blocks are written or cleared (--clear), "
              "as after ndctl inject-error --uninject", file=sys.stderr)
    return 0
