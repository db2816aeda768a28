"""What every room of the device model shares, in the role of the kernel's nd.h and
uapi/linux/ndctl.h: the nd device types, the bus names, the device numbers, and the names
under which a namespace's claim is known.

Modules low in the model (namespaces, disks, media errors) import these instead of the
classes above them, so the imports of `vnvdimm.model` only run one way:

    base, nd -> system, media, badblocks, infoblock, labels, memmap_pause
             -> disk, dimm, namespace, personality, dax -> region -> bus -> drivers

`vnvdimm.topology` sits above all of them: it registers the drivers and builds the buses.
"""

from __future__ import annotations

import uuid as uuidlib
from enum import IntEnum
from typing import Any


class NdDeviceType(IntEnum):
    """ND_DEVICE_* (uapi/linux/ndctl.h): what to_nd_device_type() answers for a device on
    the nd bus, shown as its modalias `nd:t<N>`. A driver binds the set of these it declares
    (ND_DRIVER_* = 1 << ND_DEVICE_*), tested by nvdimm_bus_match()."""

    DIMM = 1
    REGION_PMEM = 2
    REGION_BLK = 3
    NAMESPACE_IO = 4
    NAMESPACE_PMEM = 5
    NAMESPACE_BLK = 6
    DAX_PMEM = 7


ND_BUS = "nd"  # /sys/bus/nd: buses, DIMMs, regions, namespaces, pfn/dax/btt devices
DAX_BUS = "dax"  # /sys/bus/dax: device-dax instances

# Character/block majors. The kernel allocates the nd ones dynamically; these are the values
# a typical x86_64 machine ends up with.
NDCTL_MAJOR = 240
NMEM_MAJOR = 241
DAX_MAJOR = 242
BLKEXT_MAJOR = 259

# A namespace's claim class (holder_class) and what `mode` reports for a claim of that class.
CLAIM_BTT = "btt"
CLAIM_PFN = "pfn"
CLAIM_DAX = "dax"
CLAIM_CLASSES = ("", CLAIM_BTT, CLAIM_PFN, CLAIM_DAX)
CLAIM_MODE = {CLAIM_BTT: "safe", CLAIM_DAX: "dax", CLAIM_PFN: "memory"}


class UuidIndex:
    """How many devices of a bus hold each uuid (as ints): a uuid not in it is unique without
    nd_is_uuid_unique()'s walk over the bus (which made creating n namespaces cost n²); one in
    it is looked up the kernel's way. Only devices that exist count: a uuid is dropped with
    the last device holding it, so the index is as large as the bus, whatever was created and
    destroyed before."""

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}

    def __contains__(self, value: int) -> bool:
        return value in self._holders

    def __len__(self) -> int:
        return len(self._holders)

    def hold(self, value: int) -> None:
        self._holders[value] = self._holders.get(value, 0) + 1

    def drop(self, value: int) -> None:
        left = self._holders[value] - 1
        if left:
            self._holders[value] = left
        else:
            del self._holders[value]


class GivenUuid:
    """The `uuid` of a namespace or of a pfn/dax/btt device, counted in its bus's index
    (`region.bus.uuids_given`) while the device exists: a new value replaces the old one there,
    and `release_uuid()` takes it out when the device is unregistered. The owner declares
    `_uuid_held` (None) and `_uuid_released` (False)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> uuidlib.UUID | None:
        return getattr(obj, self.slot)

    def __set__(self, obj: Any, value: uuidlib.UUID | None) -> None:
        setattr(obj, self.slot, value)
        index: UuidIndex = obj.region.bus.uuids_given
        if obj._uuid_held is not None:
            index.drop(obj._uuid_held)
        held = value.int if value is not None and not obj._uuid_released else None
        if held is not None:
            index.hold(held)
        obj._uuid_held = held


def release_uuid(obj: Any) -> None:
    """A device with a GivenUuid leaves its bus: its uuid no longer counts (a store through a
    file still open on it changes the device, not the index)."""
    if obj._uuid_held is not None:
        obj.region.bus.uuids_given.drop(obj._uuid_held)
    obj._uuid_held = None
    obj._uuid_released = True
