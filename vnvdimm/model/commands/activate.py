"""Firmware activation (the kernel's nvdimm_fw_ops / nvdimm_bus_fw_ops as acpi_nfit's Intel
code drives them, with nfit_test's emulated platform answers).

sysfs, not ioctls (the kernel refuses the activation DSMs from userspace):

* ``ndbusN/firmware/capability`` (0444): ``quiesce`` (the platform activates with the OS
  quiesced, ndctl calls that "suspend");
* ``ndbusN/firmware/activate`` (0644): ``idle`` / ``armed`` / ``overflow`` (more DIMMs armed
  than the platform can activate within its quiesce time: one second each, three at most) /
  ``busy`` (for three seconds after an activation); writing ``quiesce`` or ``live``
  activates the armed DIMMs;
* ``nmemN/firmware/activate`` (0644): ``idle`` / ``armed`` / ``busy``; writing ``arm`` or
  ``disarm``;
* ``nmemN/firmware/result`` (0444): after an activation, ``success`` for a DIMM whose staged
  image became the running one, ``not_staged`` for one armed without an image; else ``none``.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vnvdimm.model.base import Attr, Group, fail, ro, streq_text
from vnvdimm.model.commands.intel import FwState

if TYPE_CHECKING:
    from vnvdimm.model.commands.platform import DimmFirmware, PlatformFirmware

ACTIVATE_SECONDS_PER_DIMM = 1.0  # nfit_test's activate_tmo: one second per armed DIMM
MAX_QUIESCE_SECONDS = 3.0
BUSY_SECONDS = 3.0  # after an activation the platform reports busy this long


class Activation:
    """The platform side (nfit_test's businfo / activate / dimminfo / arm answers)."""

    def __init__(self, firmware: PlatformFirmware, busy_ended: Callable[[], None] | None = None) -> None:
        self.firmware = firmware
        self.busy_ended = busy_ended  # told when "busy" turns "idle" (nothing else changes then)
        self.last_activate = 0.0  # monotonic time of the last activation, 0 for never
        self.generation = 0  # which activation a DIMM's result refers to

    def _dimms(self) -> list[DimmFirmware]:
        return [fw for fw in self.firmware.dimms.values() if fw.activatable]

    def bus_state(self) -> str:
        armed = sum(fw.armed for fw in self._dimms())
        if armed:
            return "overflow" if armed * ACTIVATE_SECONDS_PER_DIMM > MAX_QUIESCE_SECONDS else "armed"
        if self.last_activate and time.monotonic() < self.last_activate + BUSY_SECONDS:
            return "busy"
        return "idle"

    def dimm_state(self, fw: DimmFirmware) -> str:
        bus = self.bus_state()
        if bus in ("busy", "idle"):
            return bus
        return "armed" if fw.armed else "idle"

    def dimm_result(self, fw: DimmFirmware) -> str:
        if self.generation and fw.activated == self.generation and self.dimm_state(fw) == "idle":
            return "not_staged" if fw.missed_activate else "success"
        return "none"

    def arm(self, fw: DimmFirmware, buf: bytes) -> None:
        """activate_store() of a DIMM: intel_fwa_arm()"""
        text = streq_text(buf)
        if text not in ("arm", "disarm"):
            raise fail(errno.EINVAL, "arm or disarm")
        if self.bus_state() == "busy":
            raise fail(errno.EBUSY, "an activation is in progress")
        fw.armed = text == "arm"

    def activate(self, buf: bytes) -> None:
        """activate_store() of the bus: intel_bus_fwa_activate()"""
        if streq_text(buf) not in ("quiesce", "live"):
            raise fail(errno.EINVAL, "quiesce or live")
        state = self.bus_state()
        if state == "busy":
            raise fail(errno.EBUSY, "an activation is in progress")
        if state == "idle":
            raise fail(errno.EINVAL, "no DIMM is armed")
        # (overflow: the platform times out, but activates what it can, as nfit_test does)
        self.last_activate = time.monotonic()
        self.generation += 1
        if self.busy_ended is not None:
            timer = threading.Timer(BUSY_SECONDS, self.busy_ended)
            timer.daemon = True
            timer.start()
        for fw in self._dimms():
            if not fw.armed:
                continue
            fw.missed_activate = fw.intel.fw.state != FwState.UPDATED
            if not fw.missed_activate:
                fw.intel.fw.state = FwState.NEW
            fw.armed = False
            fw.activated = self.generation

    # ------------------------------------------------------------ sysfs

    def bus_group(self) -> Group:
        return Group("firmware", [
            ro("capability", lambda: "quiesce\n"),
            Attr("activate", 0o644, show=lambda: f"{self.bus_state()}\n", store=self.activate),
        ])

    def dimm_group(self, fw: DimmFirmware) -> Group:
        return Group("firmware", [
            Attr("activate", 0o644, show=lambda: f"{self.dimm_state(fw)}\n", store=lambda buf: self.arm(fw, buf)),
            ro("result", lambda: f"{self.dimm_result(fw)}\n"),
        ])
