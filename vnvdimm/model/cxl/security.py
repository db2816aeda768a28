"""DIMM security of the CXL nmems: the kernel's cxl_security_ops (drivers/cxl/security.c),
which turn libnvdimm's security operations into the CXL persistent-memory security mailbox
commands, and the cxl_test mock device answering them (tools/testing/cxl/test/mem.c: its
security state, passphrases and try limits, and the `security_lock` attribute of its
cxl_mem.N platform device that locks it behind the kernel's back).

A failed mock command is -ENXIO (the mailbox's security error), as the kernel's op returns it.
"""

from __future__ import annotations

import errno
import struct

from vnvdimm.model.base import Attr, Entry, fail, kstrtol
from vnvdimm.model.security import NVDIMM_PASSPHRASE_LEN, PassphraseType, SecFlag, bit

# include/cxl/mailbox.h / drivers/cxl/cxlmem.h
MBOX_OP_GET_SECURITY_STATE = 0x4500
MBOX_OP_SET_PASSPHRASE = 0x4501
MBOX_OP_DISABLE_PASSPHRASE = 0x4502
MBOX_OP_UNLOCK = 0x4503
MBOX_OP_FREEZE_SECURITY = 0x4504
MBOX_OP_PASSPHRASE_SECURE_ERASE = 0x4505

SEC_STATE_USER_PASS_SET = 0x01
SEC_STATE_MASTER_PASS_SET = 0x02
SEC_STATE_LOCKED = 0x04
SEC_STATE_FROZEN = 0x08
SEC_STATE_USER_PLIMIT = 0x10
SEC_STATE_MASTER_PLIMIT = 0x20

PASS_MASTER = 0  # CXL_PMEM_SEC_PASS_MASTER
PASS_USER = 1
PASS_TRY_LIMIT = 3
SET_PASS = struct.Struct("<B31s32s32s")  # struct cxl_set_pass: type, reserved, old, new
TYPED_PASS = struct.Struct("<B31s32s")  # struct cxl_disable_pass / cxl_pass_erase: type, reserved, pass


def security_error(what: str) -> OSError:
    return fail(errno.ENXIO, f"security: {what}")


class MockSecurity:
    """The security part of mem.c's cxl_mockmem_data and its mailbox handlers."""

    def __init__(self) -> None:
        self.state = 0
        self.user_pass = bytes(NVDIMM_PASSPHRASE_LEN)
        self.master_pass = bytes(NVDIMM_PASSPHRASE_LEN)
        self.user_limit = 0
        self.master_limit = 0

    def execute(self, opcode: int, payload: bytes) -> bytes:
        handlers = {MBOX_OP_GET_SECURITY_STATE: self._get_state, MBOX_OP_SET_PASSPHRASE: self._set_passphrase,
                    MBOX_OP_DISABLE_PASSPHRASE: self._disable_passphrase, MBOX_OP_UNLOCK: self._unlock,
                    MBOX_OP_FREEZE_SECURITY: self._freeze, MBOX_OP_PASSPHRASE_SECURE_ERASE: self._erase}
        handler = handlers.get(opcode)
        if handler is None:
            raise fail(errno.EIO, f"opcode {opcode:#x} not implemented by the mock")
        return handler(payload)

    def _user_tried(self) -> None:
        self.user_limit += 1
        if self.user_limit >= PASS_TRY_LIMIT:
            self.state |= SEC_STATE_USER_PLIMIT

    def _master_tried(self) -> None:
        self.master_limit += 1
        if self.master_limit >= PASS_TRY_LIMIT:
            self.state |= SEC_STATE_MASTER_PLIMIT

    def _get_state(self, payload: bytes) -> bytes:
        return struct.pack("<I", self.state)

    def _set_passphrase(self, payload: bytes) -> bytes:
        if len(payload) != SET_PASS.size:
            raise fail(errno.EINVAL, "set passphrase: payload size")
        ptype, _, old, new = SET_PASS.unpack(payload)
        if self.state & SEC_STATE_FROZEN:
            raise security_error("frozen")
        if ptype == PASS_MASTER:
            if self.state & SEC_STATE_MASTER_PLIMIT:
                raise security_error("master passphrase try limit reached")
            if self.state & SEC_STATE_USER_PASS_SET:
                raise security_error("the master passphrase is set only while no user passphrase is")
            if old != self.master_pass:
                self._master_tried()
                raise security_error("wrong master passphrase")
            self.master_pass = new
            self.state |= SEC_STATE_MASTER_PASS_SET
        elif ptype == PASS_USER:
            if self.state & SEC_STATE_USER_PLIMIT:
                raise security_error("user passphrase try limit reached")
            if old != self.user_pass:
                self._user_tried()
                raise security_error("wrong user passphrase")
            self.user_pass = new
            self.state |= SEC_STATE_USER_PASS_SET
        else:
            raise fail(errno.EINVAL, f"passphrase type {ptype}")
        return b""

    def _disable_passphrase(self, payload: bytes) -> bytes:
        if len(payload) != TYPED_PASS.size:
            raise fail(errno.EINVAL, "disable passphrase: payload size")
        ptype, _, passphrase = TYPED_PASS.unpack(payload)
        if self.state & SEC_STATE_FROZEN:
            raise security_error("frozen")
        if ptype == PASS_MASTER:
            if self.state & SEC_STATE_MASTER_PLIMIT or not self.state & SEC_STATE_MASTER_PASS_SET:
                raise security_error("no usable master passphrase")
            if passphrase != self.master_pass:
                self._master_tried()
                raise security_error("wrong master passphrase")
            self.master_limit = 0
            self.master_pass = bytes(NVDIMM_PASSPHRASE_LEN)
            self.state &= ~SEC_STATE_MASTER_PASS_SET
        elif ptype == PASS_USER:
            if self.state & SEC_STATE_USER_PLIMIT or not self.state & SEC_STATE_USER_PASS_SET:
                raise security_error("no usable user passphrase")
            if passphrase != self.user_pass:
                self._user_tried()
                raise security_error("wrong user passphrase")
            self.user_limit = 0
            self.user_pass = bytes(NVDIMM_PASSPHRASE_LEN)
            self.state &= ~(SEC_STATE_USER_PASS_SET | SEC_STATE_LOCKED)
        else:
            raise fail(errno.EINVAL, f"passphrase type {ptype}")
        return b""

    def _freeze(self, payload: bytes) -> bytes:
        self.state |= SEC_STATE_FROZEN
        return b""

    def _unlock(self, payload: bytes) -> bytes:
        if len(payload) != NVDIMM_PASSPHRASE_LEN:
            raise fail(errno.EINVAL, "unlock: payload size")
        if self.state & (SEC_STATE_FROZEN | SEC_STATE_USER_PLIMIT) or \
                not self.state & SEC_STATE_USER_PASS_SET or not self.state & SEC_STATE_LOCKED:
            raise security_error("not in a state to unlock")
        if payload != self.user_pass:
            self._user_tried()
            raise security_error("wrong user passphrase")
        self.user_limit = 0
        self.state &= ~SEC_STATE_LOCKED
        return b""

    def _erase(self, payload: bytes) -> bytes:
        if len(payload) != TYPED_PASS.size:
            raise fail(errno.EINVAL, "secure erase: payload size")
        ptype, _, passphrase = TYPED_PASS.unpack(payload)
        if self.state & SEC_STATE_FROZEN:
            raise security_error("frozen")
        if ptype == PASS_MASTER:
            if self.state & SEC_STATE_MASTER_PLIMIT:
                raise security_error("master passphrase try limit reached")
            if not self.state & SEC_STATE_MASTER_PASS_SET:
                raise fail(errno.EINVAL, "secure erase with a master passphrase that is not set")
            if passphrase != self.master_pass:
                self._master_tried()
                raise security_error("wrong master passphrase")
            self.master_limit = 0
        elif ptype == PASS_USER:
            if self.state & SEC_STATE_USER_PLIMIT:
                raise security_error("user passphrase try limit reached")
            if self.state & SEC_STATE_USER_PASS_SET and passphrase != self.user_pass:
                self._user_tried()
                raise security_error("wrong user passphrase")
        else:
            raise fail(errno.EINVAL, f"passphrase type {ptype}")
        # the erase removes the user passphrase (and the lock with it)
        self.user_limit = 0
        self.user_pass = bytes(NVDIMM_PASSPHRASE_LEN)
        self.state &= ~(SEC_STATE_USER_PASS_SET | SEC_STATE_LOCKED)
        return b""

    # -- the cxl_mem.N platform device's attribute (mem.c's security_lock)
    def platform_entries(self) -> list[Entry]:
        return [Attr("security_lock", 0o644, show=lambda: f"{int(bool(self.state & SEC_STATE_LOCKED))}\n",
                     store=self._security_lock_store)]

    def _security_lock_store(self, buf: bytes) -> None:
        if kstrtol(buf, 0) != 1:
            raise fail(errno.EINVAL, "security_lock takes 1")
        if not self.state & SEC_STATE_USER_PASS_SET:
            raise fail(errno.ENXIO, "no user passphrase to lock with")
        self.state |= SEC_STATE_LOCKED
        self.state &= ~(SEC_STATE_FROZEN | SEC_STATE_USER_PLIMIT | SEC_STATE_MASTER_PLIMIT)


def cxl_pass_type(ptype: PassphraseType) -> int:
    return PASS_MASTER if ptype == PassphraseType.MASTER else PASS_USER


class CxlSecurityOps:
    """cxl_security_ops: each op one mailbox command of the memdev's device."""

    def __init__(self, device: MockSecurity) -> None:
        self.device = device

    def get_flags(self, ptype: PassphraseType, in_overwrite: bool) -> int:
        (state,) = struct.unpack("<I", self.device.execute(MBOX_OP_GET_SECURITY_STATE, b""))
        flags = 0
        if ptype == PassphraseType.MASTER:
            flags |= bit(SecFlag.UNLOCKED) if state & SEC_STATE_MASTER_PASS_SET else bit(SecFlag.DISABLED)
            if state & SEC_STATE_MASTER_PLIMIT:
                flags |= bit(SecFlag.FROZEN)
            return flags
        if state & SEC_STATE_USER_PASS_SET:
            if state & (SEC_STATE_FROZEN | SEC_STATE_USER_PLIMIT):
                flags |= bit(SecFlag.FROZEN)
            flags |= bit(SecFlag.LOCKED) if state & SEC_STATE_LOCKED else bit(SecFlag.UNLOCKED)
        else:
            flags |= bit(SecFlag.DISABLED)
        return flags

    def freeze(self) -> None:
        self.device.execute(MBOX_OP_FREEZE_SECURITY, b"")

    def change_key(self, old: bytes, new: bytes, ptype: PassphraseType) -> None:
        self.device.execute(MBOX_OP_SET_PASSPHRASE, SET_PASS.pack(cxl_pass_type(ptype), b"", old, new))

    def unlock(self, key: bytes) -> None:
        self.device.execute(MBOX_OP_UNLOCK, key)

    def disable(self, key: bytes) -> None:
        self.device.execute(MBOX_OP_DISABLE_PASSPHRASE, TYPED_PASS.pack(PASS_USER, b"", key))

    def erase(self, key: bytes, ptype: PassphraseType) -> None:
        self.device.execute(MBOX_OP_PASSPHRASE_SECURE_ERASE, TYPED_PASS.pack(cxl_pass_type(ptype), b"", key))

    def overwrite(self, key: bytes) -> None:
        raise fail(errno.EOPNOTSUPP, "CXL has no overwrite op")

    def query_overwrite(self) -> None:
        raise fail(errno.EOPNOTSUPP, "CXL has no overwrite op")
