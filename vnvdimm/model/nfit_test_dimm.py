"""The nfit_test_dimm class of the nfit_test module (tools/testing/nvdimm/test/nfit.c): one
device per DIMM control region, test_dimmN under the bus's platform device, through which
tests make DIMM commands fail (fail_cmd: a bitmask of ND_CMD_* numbers; fail_cmd_code: the
errno-style return they fail with) and lock a DIMM's security state (lock_dimm)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vnvdimm.model.base import Attr, Entry, kstrtol, uevent_store
from vnvdimm.model.dimm import c_hex

if TYPE_CHECKING:
    from vnvdimm.model.bus import NvdimmBus
    from vnvdimm.model.commands.intel_security import IntelSecurity


class NfitTestDimm:
    """test_dimmN: the module's per-DIMM test knobs (state kept for the command handlers)."""

    def __init__(self, bus: NvdimmBus, index: int, handle: int) -> None:
        self.bus = bus
        self.index = index
        self.handle = handle
        self.fail_cmd = 0  # dimm_fail_cmd_flags[]
        self.fail_cmd_code = 0  # dimm_fail_cmd_code[]
        # dimm_sec_info[] of this index: the DIMM firmware's security state, shared by the
        # bus's firmware (None where no DIMM of the bus answers to this handle)
        self.security: IntelSecurity | None = None

    @property
    def name(self) -> str:
        return f"test_dimm{self.index}"

    def fails(self, cmd: int) -> bool:
        """Whether ND_CMD_* number `cmd` is set to fail (override_return_code())."""
        return bool(self.fail_cmd >> cmd & 1) if 0 <= cmd < 64 else False

    def entries(self) -> list[Entry]:
        return [
            Attr("handle", 0o444, show=lambda: f"{c_hex(self.handle)}\n"),
            Attr("fail_cmd", 0o644, show=lambda: f"{c_hex(self.fail_cmd)}\n", store=self._fail_cmd_store),
            Attr("fail_cmd_code", 0o644, show=lambda: f"{self.fail_cmd_code}\n", store=self._fail_cmd_code_store),
            Attr("lock_dimm", 0o200, store=self._lock_store),
            Attr("uevent", 0o644, show=lambda: "", store=uevent_store),
        ]

    def _fail_cmd_store(self, buf: bytes) -> None:
        # kstrtol(buf, 0, &val) into an unsigned long
        self.fail_cmd = kstrtol(buf) & (2**64 - 1)

    def _fail_cmd_code_store(self, buf: bytes) -> None:
        value = kstrtol(buf)
        self.fail_cmd_code = ((value + 2**31) % 2**32) - 2**31  # stored in an int

    def _lock_store(self, buf: bytes) -> None:
        """lock_dimm_store(): the state a power cycle leaves a DIMM with a passphrase in
        (ND_INTEL_SEC_STATE_ENABLED | LOCKED), whatever was written."""
        if self.security is not None:
            self.security.lock()
