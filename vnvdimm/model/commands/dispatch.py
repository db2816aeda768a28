"""From a device node's name to the code that answers its ioctls, as the character and block
drivers do: nd_ioctl() for /dev/ndctlN (bus) and /dev/nmemN (DIMM), blkdev_ioctl() for
/dev/pmemN[s]; device-dax has no ioctls (ENOTTY)."""

from __future__ import annotations

import errno
import logging
import os
import struct
from typing import TYPE_CHECKING

from vnvdimm.model.bus import NdCtl, NvdimmBus
from vnvdimm.model.commands.block import disk_ioctl
from vnvdimm.model.commands.envelope import (
    ND_CMD_ARS_CAP,
    ND_CMD_CALL,
    ND_CMD_CLEAR_ERROR,
    ND_CMD_DIMM_FLAGS,
    ND_CMD_GET_CONFIG_DATA,
    ND_CMD_GET_CONFIG_SIZE,
    ND_CMD_SET_CONFIG_DATA,
    ND_CMD_SMART,
    ND_CMD_SMART_THRESHOLD,
    CommandError,
    Request,
    UserMemory,
    nd_ioctl,
)
from vnvdimm.model.commands.intel import ND_INTEL_FW_GET_INFO, ND_INTEL_SMART, ND_INTEL_SMART_THRESHOLD
from vnvdimm.model.commands.intel_security import NVDIMM_INTEL_GET_SECURITY_STATE
from vnvdimm.model.commands.platform import NVDIMM_FAMILY_INTEL
from vnvdimm.model.dimm import Nvdimm
from vnvdimm.model.disk import Disk
from vnvdimm.model.personality import Dax

if TYPE_CHECKING:
    from vnvdimm.model.base import Device
    from vnvdimm.model.system import System

log = logging.getLogger("vnvdimm.model")


class _NoCommands:
    """A bus without a firmware interface (e820): no command, no family."""

    def __init__(self, is_dimm: bool) -> None:
        self.is_dimm = is_dimm

    def cmd_mask(self) -> int:
        return 0

    def family_mask(self) -> int:
        return 0


ND_IOCTL_TYPE = ord("N")
# What ndctl asks of every DIMM and bus when it lists them: answers that change nothing sysfs
# shows. Any other ioctl may (labels, ARS, injections, security, firmware updates...).
_DIMM_QUERIES = frozenset({ND_CMD_SMART, ND_CMD_SMART_THRESHOLD, ND_CMD_DIMM_FLAGS, ND_CMD_GET_CONFIG_SIZE,
                           ND_CMD_GET_CONFIG_DATA})
_INTEL_QUERIES = frozenset({ND_INTEL_SMART, ND_INTEL_SMART_THRESHOLD, ND_INTEL_FW_GET_INFO,
                            NVDIMM_INTEL_GET_SECURITY_STATE})
_BUS_QUERIES = frozenset({ND_CMD_ARS_CAP})


def is_query(name: str, request: int, arg: bytes) -> bool:
    """Whether the ioctl `request` on /dev/`name` (its argument as sent: `arg`) is a pure
    query, after which every sysfs value is what it was (a server caching values keeps them)."""
    if (request >> 8) & 0xFF != ND_IOCTL_TYPE:
        return False
    command = request & 0xFF
    if name.startswith("nmem"):
        if command == ND_CMD_CALL and len(arg) >= 16:
            family, function = struct.unpack_from("<QQ", arg)
            return family == NVDIMM_FAMILY_INTEL and function in _INTEL_QUERIES
        return command in _DIMM_QUERIES
    return name.startswith("ndctl") and command in _BUS_QUERIES


def find_node(system: System, name: str) -> Device | None:
    """The device whose /dev node is `name` (the node carries the name the kernel gave it)."""
    with system.lock:
        return next((dev for dev, node in system.device_nodes() if node.name == name), None)


def clear_to_send(bus: NvdimmBus, dimm: Nvdimm | None, req: Request) -> None:
    """nd_cmd_clear_to_send(): the provider's refusals first; labels of a busy DIMM belong
    to the kernel; a CLEAR_ERROR that would cover an enabled namespace entirely must go
    through its driver (a write)."""
    firmware = bus.firmware
    if firmware is not None:
        firmware.clear_to_send(dimm, req)
    if dimm is not None:
        if req.func == ND_CMD_SET_CONFIG_DATA and dimm.busy():
            raise CommandError(errno.EBUSY, f"{dimm.name} is in use by an enabled region")
        return
    if req.cmd != ND_CMD_CLEAR_ERROR or len(req.buf) < 16:
        return
    address, length = struct.unpack_from("<QQ", req.buf, 0)
    for region in bus.regions:
        for ns in region.namespaces:
            claim = ns.claim
            holder = claim if claim is not None and claim.driver is not None else ns
            if holder.driver is None or isinstance(holder, Dax):
                continue
            start = region.start + ns.offset
            if ns.size and start >= address and start + ns.size <= address + length:
                raise CommandError(errno.EBUSY, f"{ns.name} is enabled over the whole range")


def answer(system: System, name: str, accmode: int, request: int, user: UserMemory) -> int:
    """One ioctl on the node `name` opened with `accmode` (O_RDONLY/O_WRONLY/O_RDWR).
    Returns its return value; raises OSError with the kernel's errno."""
    dev = find_node(system, name)
    if dev is None:
        raise CommandError(errno.ENXIO, f"no device {name}")
    if isinstance(dev, Disk):
        with system.lock:
            return disk_ioctl(dev, request, user)
    if not isinstance(dev, NdCtl | Nvdimm):
        raise CommandError(errno.ENOTTY, f"{name} has no ioctls")
    dimm = dev if isinstance(dev, Nvdimm) else None
    bus = dev.parent
    assert isinstance(bus, NvdimmBus)
    firmware = bus.firmware
    read_only = accmode == os.O_RDONLY
    if firmware is None:
        return nd_ioctl(_NoCommands(dimm is not None), read_only, request, user, _refuse)
    target = firmware.dimm_target(dimm) if dimm is not None else firmware.bus_target()

    def respond(req: Request) -> int:
        with system.lock:
            clear_to_send(bus, dimm, req)
            if dimm is not None:
                return firmware.ctl_dimm(dimm, req)
            return firmware.ctl_bus(req)

    return nd_ioctl(target, read_only, request, user, respond)


def _refuse(req: Request) -> int:
    raise CommandError(errno.ENOTTY, f"command {req.cmd}")
