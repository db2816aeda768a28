"""The bus's `vnvdimm/` group: controls a real kernel has no sysfs file for (vnvdimm
extensions, all on `ndbusN/vnvdimm/`):

* ``inject_error`` / ``uninject_error`` / ``clear_error`` (0200): media errors, the way
  nfit_test injects them (ARS_INJECT_SET with notification), takes the injection back
  (ARS_INJECT_CLEAR: the kernel's bad blocks stay, as ndctl warns) and clears them
  (CLEAR_ERROR, what `ndctl clear-errors` ends in: the platform and the kernel forget them).
  ioctls, which ndctl's ``inject-error`` uses, cannot reach a FUSE file system. Each takes
  exactly ``namespaceR.N BLOCK COUNT`` (one line; numbers decimal or 0x-hex): BLOCK and COUNT
  are in 512-byte blocks relative to the namespace as ``ndctl inject-error`` counts them, i.e.
  from the start of the data area (pfn/dax ``resource``) for an enabled fsdax/devdax
  namespace, from the namespace start otherwise. The bad sectors are the region media's
  (`Media.badblocks`).
* ``memmap_pause_at`` (0644): the bus-level pause mark of the memmap init (memmap_pause.py).
"""

from __future__ import annotations

import errno
import logging
import re
from typing import TYPE_CHECKING

from vnvdimm.model.badblocks import SECTOR
from vnvdimm.model.base import Attr, Entry, Group, cstring, fail, kstrtoull
from vnvdimm.model.dax import DevDax
from vnvdimm.model.disk import Disk
from vnvdimm.model.personality import Pfn

if TYPE_CHECKING:
    from vnvdimm.model.bus import NvdimmBus
    from vnvdimm.model.namespace import Namespace
    from vnvdimm.model.region import Region

log = logging.getLogger("vnvdimm.model")


def bus_extension_group(bus: NvdimmBus) -> list[Entry]:
    return [Group("vnvdimm", [
        Attr("inject_error", 0o200, store=lambda buf: _apply(bus, buf, inject=True)),
        Attr("uninject_error", 0o200, store=lambda buf: _apply(bus, buf, inject=False)),
        Attr("clear_error", 0o200, store=lambda buf: _apply(bus, buf, inject=False, clear=True)),
        bus.system.memmap_pause.bus_attr(),
    ])]


def injection_window(ns: Namespace) -> tuple[int, int]:
    """Media byte offset and size of what `ndctl inject-error` counts blocks from."""
    claim = ns.claim
    if isinstance(claim, Pfn) and claim.driver is not None and claim.geometry is not None:
        return ns.offset + claim.geometry.dataoff, claim.geometry.data_size
    return ns.offset, ns.size


_REQUEST = re.compile(r"(namespace\d+\.\d+) (\S+) (\S+)")


def parse_request(buf: bytes) -> tuple[str, int, int]:
    """'namespaceR.N BLOCK COUNT' with at most one trailing newline (and ndctl's NUL)."""
    text = cstring(buf)
    if text.endswith(b"\n"):
        text = text[:-1]
    m = _REQUEST.fullmatch(text.decode("latin-1"))
    if m is None:
        raise fail(errno.EINVAL, "expected 'namespaceR.N BLOCK COUNT'")
    block = kstrtoull(m.group(2).encode())
    count = kstrtoull(m.group(3).encode())
    if count == 0:
        raise fail(errno.EINVAL, "COUNT must be at least 1")
    return m.group(1), block, count


def _find_namespace(bus: NvdimmBus, name: str) -> Namespace:
    for region in bus.regions:
        for ns in region.namespaces:
            if ns.name == name:
                return ns
    raise fail(errno.ENODEV, f"{name} not found on {bus.name}")


def _apply(bus: NvdimmBus, buf: bytes, inject: bool, clear: bool = False) -> None:
    """inject: the error is the platform's and (its notification makes the kernel scrub) a
    bad block. uninject: the platform no longer has it; the kernel's bad blocks stay until a
    write or a clear (the kernel never forgets poison it found; ndctl says so). clear: both
    forget it."""
    name, block, count = parse_request(buf)
    ns = _find_namespace(bus, name)
    offset, size = injection_window(ns)
    if (block + count) * SECTOR > size:
        raise fail(errno.EINVAL, f"blocks [{block}, {block + count}) beyond the {size // SECTOR} blocks of {name}")
    region = ns.region
    first = offset // SECTOR + block
    verb = "injected" if inject else "cleared" if clear else "uninjected"
    firmware = bus.platform
    if firmware is not None:
        # an NFIT platform: ARS_INJECT_SET with notification, ARS_INJECT_CLEAR, CLEAR_ERROR
        address, length = region.start + first * SECTOR, count * SECTOR
        if inject:
            firmware.bus.errors.add(address, length)
            firmware.notify_error()
        else:
            firmware.bus.errors.forget(address, length)
            if clear:
                firmware.bus.forget_poison(address, length)
        log.info("%s: %s %d bad block(s) at block %d through the platform", name, verb, count, block)
        return
    # e820 has no firmware: the injection is the bad block itself, and nothing but a write or a
    # clear takes it back
    bb = region.media.badblocks
    if inject:
        bb.set(first, count)
    elif clear:
        bb.clear(first, count)
    else:
        log.info("%s: uninjected %d block(s) at block %d: no platform list on %s, the bad blocks stay",
                 name, count, block, region.name)
        return
    log.info("%s: %s %d bad block(s) at block %d (%s sector %d)", name, verb, count, block, region.name, first)
    media_errors_changed(region)


def media_errors_changed(region: Region) -> None:
    """Page caches of every device file on this media drop (so reads see the poison), and
    pollers of the badblocks attributes wake (the kernel's sysfs_notify of bb_state)."""
    system = region.system
    system.notify(region, "badblocks")
    for dev in system.all_devices():
        for obj in (dev, dev.disk):  # (an unbound dax instance's too: it may be bound again)
            if isinstance(obj, Disk | DevDax) and obj.data.media is region.media:
                obj.data.contents_changed()
                if isinstance(obj, Disk):
                    system.notify(obj, "badblocks")
