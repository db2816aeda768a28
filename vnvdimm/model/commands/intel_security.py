"""The Intel DIMM security functions (NVDIMM_INTEL_GET_SECURITY_STATE .. MASTER_SECURE_ERASE) as
nfit_test's firmware answers them (tools/testing/nvdimm/test/nfit.c, nd_intel_test_cmd_*).

The kernel keeps these functions for itself (acpi_nfit_clear_to_send() refuses them from user
space); libnvdimm's security code (vnvdimm.model.security) sends them when `nmemN/security` is
written, exactly as drivers/acpi/nfit/intel.c packs them. Payloads are the packed structs of
the kernel's intel.h; each ends in a 32-bit firmware status, 0 on success."""

from __future__ import annotations

import errno
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vnvdimm.model.commands.envelope import CommandError
from vnvdimm.model.security import PassphraseType, SecFlag, bit

if TYPE_CHECKING:
    from vnvdimm.model.commands.platform import DimmFirmware

NVDIMM_INTEL_GET_SECURITY_STATE = 19
NVDIMM_INTEL_SET_PASSPHRASE = 20
NVDIMM_INTEL_DISABLE_PASSPHRASE = 21
NVDIMM_INTEL_UNLOCK_UNIT = 22
NVDIMM_INTEL_FREEZE_LOCK = 23
NVDIMM_INTEL_SECURE_ERASE = 24
NVDIMM_INTEL_OVERWRITE = 25
NVDIMM_INTEL_QUERY_OVERWRITE = 26
NVDIMM_INTEL_SET_MASTER_PASSPHRASE = 27
NVDIMM_INTEL_MASTER_SECURE_ERASE = 28
SECURITY_FUNCS = frozenset(range(NVDIMM_INTEL_GET_SECURITY_STATE, NVDIMM_INTEL_MASTER_SECURE_ERASE + 1))

# security state bits (state) and extended (master passphrase) state bits (extended_state)
SEC_STATE_ENABLED = 0x02
SEC_STATE_LOCKED = 0x04
SEC_STATE_FROZEN = 0x08
SEC_STATE_PLIMIT = 0x10
SEC_STATE_UNSUPPORTED = 0x20
SEC_STATE_OVERWRITE = 0x40
SEC_ESTATE_ENABLED = 0x01
SEC_ESTATE_PLIMIT = 0x02

STATUS_NOT_SUPPORTED = 1
STATUS_RETRY = 5
STATUS_NOT_READY = 9
STATUS_INVALID_STATE = 10
STATUS_INVALID_PASS = 11
STATUS_OVERWRITE_UNSUPPORTED = 0x10007
STATUS_OQUERY_INPROGRESS = 0x10007
STATUS_OQUERY_SEQUENCE_ERR = 0x20007

PASSPHRASE_SIZE = 32
ZERO_KEY = bytes(PASSPHRASE_SIZE)
STATUS_SIZE = 4
GET_SECURITY_STATE = struct.Struct("<IB3xB3x")  # status, extended_state, state
OVERWRITE_SECONDS = 5.0  # nfit_test: an overwrite ends 5 s after it started


@dataclass
class IntelSecurity:
    """nfit_test_sec: one DIMM's security state as its firmware keeps it. nfit_security_init()
    starts every DIMM of nfit_test.0 with security disabled and the master passphrase
    enabled (all zeros)."""

    state: int = 0
    ext_state: int = SEC_ESTATE_ENABLED
    old_state: int = 0
    passphrase: bytes = ZERO_KEY
    master_passphrase: bytes = ZERO_KEY
    overwrite_end: float = 0.0

    def lock(self) -> None:
        """nfit_test's lock_dimm: the DIMM as after a power cycle with a passphrase set."""
        self.state = SEC_STATE_ENABLED | SEC_STATE_LOCKED


def payload_sizes(func: int) -> tuple[int, int]:
    """(nd_size_in, nd_size_out) the kernel's intel.c sends with each function."""
    pass_in = {NVDIMM_INTEL_UNLOCK_UNIT, NVDIMM_INTEL_DISABLE_PASSPHRASE, NVDIMM_INTEL_SECURE_ERASE,
               NVDIMM_INTEL_OVERWRITE, NVDIMM_INTEL_MASTER_SECURE_ERASE}
    if func == NVDIMM_INTEL_GET_SECURITY_STATE:
        return 0, GET_SECURITY_STATE.size
    if func in (NVDIMM_INTEL_SET_PASSPHRASE, NVDIMM_INTEL_SET_MASTER_PASSPHRASE):
        return 2 * PASSPHRASE_SIZE, STATUS_SIZE
    if func in pass_in:
        return PASSPHRASE_SIZE, STATUS_SIZE
    return 0, STATUS_SIZE


def _status(buf: memoryview, at: int, value: int) -> None:
    struct.pack_into("<I", buf, at, value)


def call(sec: IntelSecurity, func: int, buf: memoryview) -> int:
    """One security function on its payload `buf` (input then output); returns the command's
    return code (0: the answer is in the payload's status)."""
    size_in, size_out = payload_sizes(func)
    if len(buf) < size_in + size_out:
        raise CommandError(errno.EINVAL, f"security function {func}: payload of {len(buf)} bytes")
    if func == NVDIMM_INTEL_GET_SECURITY_STATE:
        GET_SECURITY_STATE.pack_into(buf, 0, 0, sec.ext_state, sec.state)
        return 0
    pw = bytes(buf[:PASSPHRASE_SIZE])
    if func == NVDIMM_INTEL_UNLOCK_UNIT:
        if not sec.state & SEC_STATE_LOCKED or sec.state & SEC_STATE_FROZEN:
            status = STATUS_INVALID_STATE
        elif pw != sec.passphrase:
            status = STATUS_INVALID_PASS
        else:
            sec.state, status = SEC_STATE_ENABLED, 0
        _status(buf, PASSPHRASE_SIZE, status)
    elif func == NVDIMM_INTEL_SET_PASSPHRASE:
        new = bytes(buf[PASSPHRASE_SIZE:2 * PASSPHRASE_SIZE])
        if sec.state & SEC_STATE_FROZEN:
            status = STATUS_INVALID_STATE
        elif pw != sec.passphrase:
            status = STATUS_INVALID_PASS
        else:
            sec.passphrase, status = new, 0
            sec.state |= SEC_STATE_ENABLED
        _status(buf, 2 * PASSPHRASE_SIZE, status)
    elif func == NVDIMM_INTEL_FREEZE_LOCK:
        if not sec.state & SEC_STATE_ENABLED:
            _status(buf, 0, STATUS_INVALID_STATE)
        else:
            sec.state |= SEC_STATE_FROZEN
            _status(buf, 0, 0)
    elif func == NVDIMM_INTEL_DISABLE_PASSPHRASE:
        if not sec.state & SEC_STATE_ENABLED or sec.state & SEC_STATE_FROZEN:
            status = STATUS_INVALID_STATE
        elif pw != sec.passphrase:
            status = STATUS_INVALID_PASS
        else:
            sec.passphrase, sec.state, status = ZERO_KEY, 0, 0
        _status(buf, PASSPHRASE_SIZE, status)
    elif func == NVDIMM_INTEL_SECURE_ERASE:
        if sec.state & SEC_STATE_FROZEN:
            _status(buf, PASSPHRASE_SIZE, STATUS_INVALID_STATE)
        elif pw != sec.passphrase:
            _status(buf, PASSPHRASE_SIZE, STATUS_INVALID_PASS)
        elif not sec.state & SEC_STATE_ENABLED and pw != ZERO_KEY:
            # nfit_test returns here without touching the status word (unreachable: the
            # passphrase of a disabled DIMM is the zero key)
            return 0
        else:
            sec.passphrase = sec.master_passphrase = ZERO_KEY
            sec.state, sec.ext_state = 0, SEC_ESTATE_ENABLED
            _status(buf, PASSPHRASE_SIZE, 0)
    elif func == NVDIMM_INTEL_OVERWRITE:
        if sec.state & SEC_STATE_ENABLED and pw != sec.passphrase:
            _status(buf, PASSPHRASE_SIZE, STATUS_INVALID_PASS)
        else:
            sec.old_state, sec.state = sec.state, SEC_STATE_OVERWRITE
            sec.overwrite_end = time.monotonic() + OVERWRITE_SECONDS
            # nfit_test leaves the status word as the kernel sent it (zeroed)
    elif func == NVDIMM_INTEL_QUERY_OVERWRITE:
        if not sec.state & SEC_STATE_OVERWRITE:
            _status(buf, 0, STATUS_OQUERY_SEQUENCE_ERR)
        elif time.monotonic() > sec.overwrite_end:
            sec.overwrite_end, sec.state, sec.old_state = 0.0, sec.old_state, 0
            sec.ext_state = SEC_ESTATE_ENABLED
        else:
            _status(buf, 0, STATUS_OQUERY_INPROGRESS)
    elif func in (NVDIMM_INTEL_SET_MASTER_PASSPHRASE, NVDIMM_INTEL_MASTER_SECURE_ERASE):
        at = 2 * PASSPHRASE_SIZE if func == NVDIMM_INTEL_SET_MASTER_PASSPHRASE else PASSPHRASE_SIZE
        if not sec.ext_state & SEC_ESTATE_ENABLED:
            status = STATUS_NOT_SUPPORTED
        elif sec.ext_state & SEC_ESTATE_PLIMIT:
            status = STATUS_INVALID_STATE
        elif pw != sec.master_passphrase:
            status = STATUS_INVALID_PASS
        elif func == NVDIMM_INTEL_SET_MASTER_PASSPHRASE:
            sec.master_passphrase, sec.ext_state, status = bytes(buf[PASSPHRASE_SIZE:at]), SEC_ESTATE_ENABLED, 0
        else:  # the master passphrase itself is never erased
            sec.ext_state, sec.passphrase, sec.state, status = SEC_ESTATE_ENABLED, ZERO_KEY, 0, 0
        _status(buf, at, status)
    else:
        raise CommandError(errno.ENOTTY, f"Intel function {func}")
    return 0


class IntelSecurityOps:
    """intel_security_ops (drivers/acpi/nfit/intel.c): each libnvdimm security operation as
    the DSM it sends through the DIMM's firmware, and the firmware status as the errno the
    kernel returns for it."""

    def __init__(self, fw: DimmFirmware) -> None:
        self.fw = fw

    def _ctl(self, func: int, data: bytes = b"") -> bytearray:
        """nvdimm_ctl(ND_CMD_CALL): ENOTTY unless the DIMM advertises the function; the
        payload back, or the command's negative return as OSError."""
        if not self.fw.dsm_mask >> func & 1:
            raise CommandError(errno.ENOTTY, f"Intel function {func} not advertised")
        size_in, size_out = payload_sizes(func)
        buf = bytearray(size_in + size_out)
        buf[:len(data)] = data
        rc = self.fw.override(func, call(self.fw.security, func, memoryview(buf)))
        if rc < 0:
            raise CommandError(-rc, f"Intel function {func}")
        return buf

    @staticmethod
    def _status(buf: bytearray) -> int:
        return int(struct.unpack_from("<I", buf, len(buf) - STATUS_SIZE)[0])

    def get_flags(self, ptype: PassphraseType, in_overwrite: bool) -> int:
        if not self.fw.dsm_mask >> NVDIMM_INTEL_GET_SECURITY_STATE & 1:
            return 0
        if in_overwrite and ptype == PassphraseType.USER:
            return bit(SecFlag.OVERWRITE)  # indeterminate until the overwrite completes
        try:
            buf = self._ctl(NVDIMM_INTEL_GET_SECURITY_STATE)
        except OSError:
            return 0
        status, ext_state, state = GET_SECURITY_STATE.unpack_from(buf, 0)
        if status:
            return 0
        if ptype == PassphraseType.MASTER:
            flags = bit(SecFlag.UNLOCKED) if ext_state & SEC_ESTATE_ENABLED else bit(SecFlag.DISABLED)
            return flags | (bit(SecFlag.FROZEN) if ext_state & SEC_ESTATE_PLIMIT else 0)
        if state & SEC_STATE_UNSUPPORTED:
            return 0
        if not state & SEC_STATE_ENABLED:
            return bit(SecFlag.DISABLED)
        flags = bit(SecFlag.FROZEN) if state & (SEC_STATE_FROZEN | SEC_STATE_PLIMIT) else 0
        return flags | bit(SecFlag.LOCKED if state & SEC_STATE_LOCKED else SecFlag.UNLOCKED)

    def freeze(self) -> None:
        if self._status(self._ctl(NVDIMM_INTEL_FREEZE_LOCK)):
            raise CommandError(errno.EIO, "freeze lock refused")

    def change_key(self, old: bytes, new: bytes, ptype: PassphraseType) -> None:
        func = NVDIMM_INTEL_SET_MASTER_PASSPHRASE if ptype == PassphraseType.MASTER else NVDIMM_INTEL_SET_PASSPHRASE
        status = self._status(self._ctl(func, old + new))
        _raise_for(status, {STATUS_INVALID_PASS: errno.EINVAL, STATUS_NOT_SUPPORTED: errno.EOPNOTSUPP}, errno.EIO)

    def unlock(self, key: bytes) -> None:
        status = self._status(self._ctl(NVDIMM_INTEL_UNLOCK_UNIT, key))
        _raise_for(status, {STATUS_INVALID_PASS: errno.EINVAL}, errno.EIO)

    def disable(self, key: bytes) -> None:
        status = self._status(self._ctl(NVDIMM_INTEL_DISABLE_PASSPHRASE, key))
        _raise_for(status, {STATUS_INVALID_PASS: errno.EINVAL}, errno.ENXIO)

    def erase(self, key: bytes, ptype: PassphraseType) -> None:
        func = NVDIMM_INTEL_MASTER_SECURE_ERASE if ptype == PassphraseType.MASTER else NVDIMM_INTEL_SECURE_ERASE
        status = self._status(self._ctl(func, key))
        _raise_for(status, {STATUS_NOT_SUPPORTED: errno.EOPNOTSUPP, STATUS_INVALID_PASS: errno.EINVAL}, errno.ENXIO)

    def overwrite(self, key: bytes) -> None:
        status = self._status(self._ctl(NVDIMM_INTEL_OVERWRITE, key))
        _raise_for(status, {STATUS_OVERWRITE_UNSUPPORTED: ENOTSUPP, STATUS_INVALID_PASS: errno.EINVAL}, errno.ENXIO)

    def query_overwrite(self) -> None:
        status = self._status(self._ctl(NVDIMM_INTEL_QUERY_OVERWRITE))
        _raise_for(status, {STATUS_OQUERY_INPROGRESS: errno.EBUSY}, errno.ENXIO)


ENOTSUPP = 524  # the kernel-internal "operation not supported" (no libc name)


def _raise_for(status: int, known: dict[int, int], otherwise: int) -> None:
    if status:
        code = known.get(status, otherwise)
        raise CommandError(code, f"firmware status {status:#x}")
