"""DIMM security: libnvdimm's side (drivers/nvdimm/security.c and the security attributes of
dimm_devs.c). The DIMM's firmware is reached through `SecurityOps` (nvdimm_security_ops: for
the Intel family, vnvdimm.model.commands.intel_security), the passphrases through the kernel
keyring (vnvdimm.model.keyring).

`nmemN/security` reads the user passphrase state (overwrite, disabled, unlocked, locked) and
takes `freeze`, `disable <key>`, `update <old> <new>`, `erase <key>`, `overwrite <key>`,
`master_update <old> <new>` and `master_erase <key>`, keys being key serials (0: the zero
key, as the base key only). `frozen` reads 1 once the security state is frozen.

What a secure erase and an overwrite do to the DIMM's contents (nfit_test leaves its buffers
alone; a real DIMM does not): a crypto erase replaces the media key, so every byte of the
DIMM's capacity reads as cipher text under the new key; the labels are kept. An overwrite
wipes the capacity and the label area. vnvdimm's media are per region, not per DIMM, and a
region's data is interleaved over its DIMMs, so the whole of every region the DIMM is part of
changes: random bytes after an erase, zeros (and a zeroed label area) once an overwrite is
done.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import threading
from enum import IntEnum
from typing import TYPE_CHECKING, Protocol

from vnvdimm.model import keyring
from vnvdimm.model.base import Attr, Entry, cstring, fail, kstrtoull

if TYPE_CHECKING:
    from vnvdimm.model.dimm import Nvdimm

log = logging.getLogger("vnvdimm.model")

NVDIMM_PASSPHRASE_LEN = 32
ZERO_KEY = bytes(NVDIMM_PASSPHRASE_LEN)


class SecFlag(IntEnum):
    """enum nvdimm_security_bits: bit numbers of the security flags."""

    DISABLED = 0
    UNLOCKED = 1
    LOCKED = 2
    FROZEN = 3
    OVERWRITE = 4


class PassphraseType(IntEnum):
    USER = 0
    MASTER = 1


def bit(flag: SecFlag) -> int:
    return 1 << flag


class SecurityOps(Protocol):
    """nvdimm_security_ops: each returns 0 or raises OSError with the kernel's errno."""

    def get_flags(self, ptype: PassphraseType, in_overwrite: bool) -> int: ...
    def freeze(self) -> None: ...
    def change_key(self, old: bytes, new: bytes, ptype: PassphraseType) -> None: ...
    def unlock(self, key: bytes) -> None: ...
    def disable(self, key: bytes) -> None: ...
    def erase(self, key: bytes, ptype: PassphraseType) -> None: ...
    def overwrite(self, key: bytes) -> None: ...
    def query_overwrite(self) -> None: ...  # raises EBUSY while in progress


# security_store()'s commands and how many words each takes (the command included)
OPS = {"freeze": 1, "disable": 2, "update": 3, "erase": 2, "overwrite": 2, "master_update": 3,
       "master_erase": 2}
SEC_CMD_SIZE, KEY_ID_SIZE = 32, 10
OVERWRITE_TMO_STEP, OVERWRITE_TMO_MAX = 10, 15 * 60  # seconds


class DimmSecurity:
    """nvdimm->sec of one DIMM, and its `security` / `frozen` attributes.

    `poll_on_show`: CONFIG_NVDIMM_SECURITY_TEST (a kernel built for nfit_test): each read of
    `security` asks the firmware again, so a state changed behind the kernel's back
    (nfit_test's lock_dimm) shows at once."""

    def __init__(self, dimm: Nvdimm, ops: SecurityOps, *, poll_on_show: bool) -> None:
        self.dimm = dimm
        self.ops = ops
        self.poll_on_show = poll_on_show
        self.in_overwrite = False  # NDD_SECURITY_OVERWRITE (and NDD_WORK_PENDING)
        self.overwrite_tmo = 0
        self._timer: threading.Timer | None = None
        self.wipe: WipeTarget | None = None
        # __nvdimm_create(): the states read before the device is added decide visibility
        self.flags = self._get_flags(PassphraseType.USER)
        self.ext_flags = self._get_flags(PassphraseType.MASTER)
        self.visible = self.flags != 0

    def _get_flags(self, ptype: PassphraseType) -> int:
        return self.ops.get_flags(ptype, self.in_overwrite)

    # ------------------------------------------------------------ attributes

    def entries(self) -> list[Entry]:
        if not self.visible:
            return []  # nvdimm_visible(): no security state, no attributes
        return [Attr("security", 0o644, show=self._show, store=self._store),
                Attr("frozen", 0o444, show=lambda: f"{int(bool(self.flags & bit(SecFlag.FROZEN)))}\n")]

    def _show(self) -> str:
        if self.poll_on_show:
            self.flags = self._get_flags(PassphraseType.USER)
        for flag, word in ((SecFlag.OVERWRITE, "overwrite"), (SecFlag.DISABLED, "disabled"),
                           (SecFlag.UNLOCKED, "unlocked"), (SecFlag.LOCKED, "locked")):
            if self.flags & bit(flag):
                return f"{word}\n"
        raise fail(errno.ENOTTY, f"{self.dimm.name}: no security state")

    def _store(self, buf: bytes) -> None:
        """nvdimm_security_store(): sscanf("%32s %10s %10s"), then the operation."""
        words = [w[:n] for w, n in zip(re.split(rb"\s+", cstring(buf).strip()),
                                        (SEC_CMD_SIZE, KEY_ID_SIZE, KEY_ID_SIZE), strict=False)]
        if not words or not words[0]:
            raise fail(errno.EINVAL, "no security command")
        cmd = words[0].decode("latin-1")
        if cmd not in OPS:
            raise fail(errno.EINVAL, f"unknown security command {cmd!r}")
        keys = [_key_id(words[i] if i < len(words) else b"") for i in range(1, OPS[cmd])]
        if cmd == "freeze":
            self.freeze()
        elif cmd == "disable":
            self.disable(keys[0])
        elif cmd in ("update", "master_update"):
            self.update(keys[0], keys[1], PassphraseType.USER if cmd == "update" else PassphraseType.MASTER)
        elif cmd in ("erase", "master_erase"):
            if self.dimm.busy():
                raise fail(errno.EBUSY, f"{self.dimm.name}: unable to secure erase while DIMM active")
            self.erase(keys[0], PassphraseType.USER if cmd == "erase" else PassphraseType.MASTER)
        else:
            if self.dimm.busy():
                raise fail(errno.EBUSY, f"{self.dimm.name}: unable to overwrite while DIMM active")
            self.overwrite(keys[0])

    # ------------------------------------------------------------ keys

    def _user_key(self, serial: int, new: bool) -> bytes:
        """nvdimm_get_user_key_payload(): serial 0 is the zero key as the base key only."""
        if serial == 0:
            if not new:
                return ZERO_KEY
            raise fail(errno.ENOKEY, f"{self.dimm.name}: key 0 as the new key")
        data = keyring.lookup_user_key(serial)
        if data is None:
            raise fail(errno.ENOKEY, f"{self.dimm.name}: no usable encrypted key {serial}")
        return data

    def _check_state(self) -> None:
        """check_security_state()."""
        if self.flags & bit(SecFlag.FROZEN):
            raise fail(errno.EIO, f"{self.dimm.name}: security is frozen")
        if self.in_overwrite:
            raise fail(errno.EBUSY, f"{self.dimm.name}: security operation in progress")

    def _refresh(self) -> None:
        self.flags = self._get_flags(PassphraseType.USER)

    # ------------------------------------------------------------ operations

    def freeze(self) -> None:
        """nvdimm_security_freeze()."""
        if not self.flags:
            raise fail(errno.EIO, f"{self.dimm.name}: no security state")
        if self.in_overwrite:
            raise fail(errno.EBUSY, f"{self.dimm.name}: overwrite operation in progress")
        try:
            self.ops.freeze()
        finally:
            self._refresh()

    def disable(self, serial: int) -> None:
        self._check_state()
        key = self._user_key(serial, new=False)
        try:
            self.ops.disable(key)
        finally:
            self._refresh()

    def update(self, serial: int, new_serial: int, ptype: PassphraseType) -> None:
        self._check_state()
        key = self._user_key(serial, new=False)
        new = self._user_key(new_serial, new=True)
        try:
            self.ops.change_key(key, new, ptype)
        finally:
            if ptype == PassphraseType.MASTER:
                self.ext_flags = self._get_flags(PassphraseType.MASTER)
            else:
                self._refresh()

    def erase(self, serial: int, ptype: PassphraseType) -> None:
        self._check_state()
        if ptype == PassphraseType.MASTER and not self.ext_flags & bit(SecFlag.UNLOCKED):
            raise fail(errno.EOPNOTSUPP, f"{self.dimm.name}: secure erase in the wrong master state")
        key = self._user_key(serial, new=False)
        try:
            self.ops.erase(key, ptype)
        finally:
            self._refresh()
        if self.wipe is not None:
            self.wipe.scramble()

    def overwrite(self, serial: int) -> None:
        if self.dimm.driver is None:
            # security_overwrite(): the kernel's message says "active", the test is "unbound"
            raise fail(errno.EINVAL, f"{self.dimm.name}: unable to overwrite a disabled DIMM")
        self._check_state()
        key = self._user_key(serial, new=False)
        self.ops.overwrite(key)
        self.in_overwrite = True
        self.flags |= bit(SecFlag.OVERWRITE)
        self._schedule_query(0)

    def _schedule_query(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self._overwrite_query_work)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _overwrite_query_work(self) -> None:
        """nvdimm_security_overwrite_query(): the delayed work polling the firmware."""
        with self.dimm.system.lock:
            try:
                self.overwrite_query()
            except OSError as e:  # the media went away under it (a daemon stopping)
                log.warning("%s: overwrite query: %s", self.dimm.name, e)

    def overwrite_query(self) -> None:
        if not self.in_overwrite:
            return
        try:
            self.ops.query_overwrite()
        except OSError as e:
            if e.errno == errno.EBUSY:
                tmo = self.overwrite_tmo + OVERWRITE_TMO_STEP
                self._schedule_query(tmo)
                self.overwrite_tmo = min(OVERWRITE_TMO_MAX, tmo)
                return
            log.info("%s: overwrite failed: %s", self.dimm.name, e)
        else:
            log.info("%s: overwrite completed", self.dimm.name)
            if self.wipe is not None:
                self.wipe.zero()
        self.overwrite_tmo = 0
        self.in_overwrite = False
        self.flags = self._get_flags(PassphraseType.USER)
        # The kernel then stores the master state into sec.flags (sic): `frozen` reads the
        # master passphrase's limit bit until the next security operation.
        self.flags = self._get_flags(PassphraseType.MASTER)
        self.dimm.system.notify(self.dimm, "security")

    def unlock(self) -> None:
        """__nvdimm_security_unlock() at probe: a locked DIMM is unlocked with the key
        nvdimm:<dimm id> of the writer's keyring (the zero key when there is none)."""
        if not self.flags:
            raise fail(errno.EIO, f"{self.dimm.name}: no security state")
        if self.in_overwrite:
            raise fail(errno.EBUSY, f"{self.dimm.name}: security operation in progress")
        if self.flags & bit(SecFlag.UNLOCKED):
            return  # key revalidation: sends the same key as old and new, changes nothing
        key = keyring.request_key(f"nvdimm:{self.dimm.unique_id()}") or ZERO_KEY
        try:
            self.ops.unlock(key)
        finally:
            self._refresh()

    def cancel(self) -> None:
        """nvdimm_delete(): the pending query work is cancelled."""
        self.in_overwrite = False
        if self._timer is not None:
            self._timer.cancel()


def _key_id(word: bytes) -> int:
    """kstrtouint(keystr, 0, &key)."""
    value = kstrtoull(word)
    if value > 0xFFFF_FFFF:
        raise fail(errno.ERANGE, f"key id {word!r} out of range")
    return value


class WipeTarget:
    """What a DIMM's erase or overwrite reaches: the media of the regions it is part of, and
    its label area."""

    def __init__(self, dimm: Nvdimm) -> None:
        self.dimm = dimm

    def _media(self) -> list[object]:
        return [r.media for r in self.dimm.bus.regions if any(m.dimm is self.dimm for m in r.mappings)]

    def scramble(self) -> None:
        """A new media key: every byte of the capacity reads as cipher text."""
        rng = random.Random()
        for media in self._media():
            size: int = media.size  # type: ignore[attr-defined]
            chunk = 1 << 20
            for off in range(0, size, chunk):
                media.pwrite(rng.randbytes(min(chunk, size - off)), off)  # type: ignore[attr-defined]

    def zero(self) -> None:
        for media in self._media():
            size: int = media.size  # type: ignore[attr-defined]
            media.zero(0, size)  # type: ignore[attr-defined]
        area = self.dimm.label_area
        if area is not None:
            for off in range(0, area.size, area.max_xfer):
                area.write(off, bytes(min(area.max_xfer, area.size - off)))
