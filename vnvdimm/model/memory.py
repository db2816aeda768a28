"""/sys/devices/system/memory/soft_offline_page (drivers/base/memory.c): a physical address
whose page the kernel is asked to take out of use.

Persistent memory never can be: a page of a pfn or device-dax device has a memmap but lives
in ZONE_DEVICE, never online (soft_offline_page(): EIO); any other address of the platform
has no memmap at all (pfn_valid() is false: ENXIO). Pages of the host's RAM are the host
kernel's business, not the emulated platform's: they answer ENXIO too (see docs/limits.md).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vnvdimm.model.base import PAGE_SIZE, cstring, fail
from vnvdimm.model.personality import Personality

if TYPE_CHECKING:
    from vnvdimm.model.system import System


def soft_offline_page(system: System, buf: bytes) -> None:
    try:
        address = int(cstring(buf).strip().decode("ascii"), 0)  # kstrtoull(buf, 0, ...)
    except (UnicodeDecodeError, ValueError):
        raise fail(errno.EINVAL, "soft_offline_page: not an address") from None
    if not 0 <= address < 1 << 64:
        raise fail(errno.EINVAL, "soft_offline_page: not an address")
    page = address - address % PAGE_SIZE
    with system.lock:
        for bus in system.buses:
            for region in bus.regions:
                for dev in region.personalities:
                    ndns = dev.ndns if isinstance(dev, Personality) else None
                    if dev.driver is not None and ndns is not None and ndns.start <= page < ndns.start + ndns.size:
                        raise fail(errno.EIO, f"soft_offline_page: {address:#x} is ZONE_DEVICE memory ({dev.name})")
    raise fail(errno.ENXIO, f"soft_offline_page: no memmap for {address:#x}")
