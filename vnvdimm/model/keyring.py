"""The kernel keyring, as libnvdimm's security code reads it (drivers/nvdimm/security.c).

The kernel takes a DIMM passphrase from an `encrypted` key: `nvdimm_lookup_user_key()` looks
the serial a writer of `nmemN/security` gives up in the writer's keyrings, and
`nvdimm_request_key()` (the unlock at probe) searches them for `nvdimm:<dimm id>`; either way the
passphrase is the key's 32-byte decrypted payload. The daemon is a user-space process, so it
cannot look into the writer's keyrings, and the decrypted payload of an encrypted key never
leaves the kernel. What it does instead, step by step (docs/limits.md says the same for users):

1. The writer is the process behind the FUSE request (`Caller`: pid, uid, gid), set by the
   file-system adapter around each store.
2. KEYCTL_DESCRIBE of the serial: the key must exist, be of type `encrypted` and be owned by
   the writer's uid.
3. KEYCTL_SEARCH of the daemon's user keyring for that type and description must find the same
   serial: the key is linked in the user keyring of that uid, where ndctl puts its keys. (A
   key only in the writer's session, process or thread keyring is not found: the kernel
   would take it, the daemon answers ENOKEY.)
4. KEYCTL_READ of the key: the encrypted blob `<format> <master> <len> <hex>` (what
   `keyctl pipe` prints), then KEYCTL_READ of the `user` master key it names, found the same
   way. The blob is checked and decrypted as security/keys/encrypted-keys does it: the
   HMAC-SHA256 of the blob under the master's derived authentication key, then AES-256-CBC
   under its derived encryption key. The plaintext of a 32-byte key is the passphrase.

The daemon's own threads reach the user keyring's keys as a possessor by joining an anonymous
session keyring linked to it (`keyctl new_session; keyctl link @u @s`), once per thread. Where
the host forbids the keyctl system calls (a container's seccomp profile), every lookup fails,
which is the kernel's "no key": ENOKEY.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import hashlib
import hmac
import os
import platform
import threading
from collections.abc import Iterator
from dataclasses import dataclass

NVDIMM_PASSPHRASE_LEN = 32

# keyctl(2) operations and special keyring ids (include/uapi/linux/keyctl.h)
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_DESCRIBE = 6
KEYCTL_LINK = 8
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4

_SYSCALLS = {"x86_64": 250, "aarch64": 219, "i686": 288, "i386": 288, "ppc64le": 271, "s390x": 280,
             "riscv64": 219}
_SYS_KEYCTL = _SYSCALLS.get(platform.machine())
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long

AES_BLOCK = 16
HASH_SIZE = 32


@dataclass(frozen=True)
class Caller:
    """The process a request comes from (the FUSE request's context)."""

    pid: int
    uid: int
    gid: int


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("vnvdimm_caller", default=None)


def current_caller() -> Caller:
    """The writer of the store being served; the daemon itself outside a request."""
    return _caller.get() or Caller(os.getpid(), os.geteuid(), os.getegid())


@contextlib.contextmanager
def serving(caller: Caller) -> Iterator[None]:
    token = _caller.set(caller)
    try:
        yield
    finally:
        _caller.reset(token)


class KeyctlError(OSError):
    pass


def _keyctl(op: int, *args: int | bytes | ctypes.Array[ctypes.c_char] | None) -> int:
    if _SYS_KEYCTL is None:
        raise KeyctlError(38, f"keyctl: no system call number known for {platform.machine()}")
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    res = _libc.syscall(ctypes.c_long(_SYS_KEYCTL), ctypes.c_long(op), *cargs)
    if res < 0:
        e = ctypes.get_errno()
        raise KeyctlError(e, f"keyctl({op}): {os.strerror(e)}")
    return int(res)


class _Possession(threading.local):
    joined = False  # this thread joined the session keyring that possesses the user keyring


_thread = _Possession()


def _possess_user_keyring() -> None:
    """Join an anonymous session keyring linked to the user keyring, once per thread, so that
    keys in the user keyring are possessed (readable) by this thread."""
    if _thread.joined:
        return
    _keyctl(KEYCTL_JOIN_SESSION_KEYRING, None)
    _keyctl(KEYCTL_LINK, KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING)
    _thread.joined = True


def _describe(serial: int) -> tuple[str, int, int, str]:
    """(type, uid, gid, description) of a key."""
    buf = ctypes.create_string_buffer(4096)
    n = _keyctl(KEYCTL_DESCRIBE, serial, buf, len(buf))
    text = buf.raw[:max(0, n - 1)].decode("utf-8", "replace")
    kind, uid, gid, _perm, desc = text.split(";", 4)
    return kind, int(uid), int(gid), desc


def _search_user_keyring(kind: str, desc: str) -> int:
    return _keyctl(KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, kind.encode() + b"\0", desc.encode() + b"\0", 0)


def _read(serial: int) -> bytes:
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = _keyctl(KEYCTL_READ, serial, buf, size)
        if n <= size:
            return buf.raw[:n]
        size = n


def _derived_key(kind: bytes, master: bytes) -> bytes:
    """get_derived_key(): SHA-256 of the type name (with its NUL) and the master key, in a
    buffer sized for "AUTH_KEY" and at least HASH_SIZE, zero-filled."""
    length = max(len(b"AUTH_KEY") + 1 + len(master), HASH_SIZE)
    buf = (kind + b"\0" + master).ljust(length, b"\0")
    return hashlib.sha256(buf).digest()


def decrypt_blob(blob: bytes, master: bytes) -> bytes:
    """The decrypted payload of an encrypted key from its KEYCTL_READ blob and its master key's
    payload. Raises ValueError if the blob is malformed or its HMAC does not verify."""
    parts = blob.rstrip(b"\0\n").split(b" ")
    if len(parts) != 4:
        raise ValueError("not an encrypted key blob")
    fmt, master_desc, datalen_text, hexdata = parts
    datalen = int(datalen_text)
    enc_len = -(-datalen // AES_BLOCK) * AES_BLOCK
    raw = bytes.fromhex(hexdata.decode())
    if len(raw) != AES_BLOCK + 1 + enc_len + HASH_SIZE:
        raise ValueError(f"blob of {len(raw)} bytes for a {datalen}-byte key")
    iv, encrypted, mac = raw[:AES_BLOCK], raw[AES_BLOCK + 1:AES_BLOCK + 1 + enc_len], raw[-HASH_SIZE:]
    # The HMAC covers the payload's strings as the kernel lays them out (NUL-separated), the
    # iv, the byte after it and the encrypted data.
    signed = b"\0".join((fmt, master_desc, datalen_text)) + b"\0" + raw[:AES_BLOCK + 1 + enc_len]
    if not hmac.compare_digest(hmac.new(_derived_key(b"AUTH_KEY", master), signed, hashlib.sha256).digest(), mac):
        raise ValueError("HMAC mismatch: wrong master key")
    plain = _aes256_cbc_decrypt(_derived_key(b"ENC_KEY", master), iv, encrypted)
    return plain[:datalen]


_crypto: ctypes.CDLL | None = None


def _libcrypto() -> ctypes.CDLL:
    global _crypto
    if _crypto is None:
        name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
        lib = ctypes.CDLL(name)
        lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
        lib.EVP_aes_256_cbc.restype = ctypes.c_void_p
        lib.EVP_DecryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_char_p, ctypes.c_char_p]
        lib.EVP_CIPHER_CTX_set_padding.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.EVP_DecryptUpdate.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int),
                                          ctypes.c_char_p, ctypes.c_int]
        lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
        _crypto = lib
    return _crypto


def _aes256_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-256-CBC without padding (the kernel's cbc(aes) skcipher), through libcrypto."""
    lib = _libcrypto()
    ctx = lib.EVP_CIPHER_CTX_new()
    if not ctx:
        raise MemoryError
    try:
        out = ctypes.create_string_buffer(len(data) + AES_BLOCK)
        n = ctypes.c_int(0)
        if (lib.EVP_DecryptInit_ex(ctx, lib.EVP_aes_256_cbc(), None, key, iv) != 1
                or lib.EVP_CIPHER_CTX_set_padding(ctx, 0) != 1
                or lib.EVP_DecryptUpdate(ctx, out, ctypes.byref(n), data, len(data)) != 1):
            raise ValueError("AES decryption failed")
        return out.raw[:n.value]
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)


def _passphrase_of(serial: int, caller: Caller) -> bytes | None:
    kind, uid, _gid, desc = _describe(serial)  # the owner may view its keys: no possession needed
    if kind != "encrypted" or uid != caller.uid:
        return None
    _possess_user_keyring()
    if _search_user_keyring(kind, desc) != serial:
        return None
    blob = _read(serial)
    master_ref = blob.split(b" ")[1].decode() if blob.count(b" ") >= 3 else ""
    master_type, _, master_desc = master_ref.partition(":")
    if master_type != "user" or not master_desc:
        return None  # a trusted (TPM-sealed) master cannot be read from user space
    master = _read(_search_user_keyring("user", master_desc))
    data = decrypt_blob(blob, master)
    return data if len(data) == NVDIMM_PASSPHRASE_LEN else None


def lookup_user_key(serial: int) -> bytes | None:
    """nvdimm_lookup_user_key(): the 32-byte passphrase of the writer's encrypted key
    `serial`, or None (the kernel's -ENOKEY) if there is no such key the writer may use."""
    try:
        return _passphrase_of(serial, current_caller())
    except (OSError, ValueError):
        return None


def request_key(description: str) -> bytes | None:
    """nvdimm_request_key(): the passphrase of the writer's encrypted key `description`
    (nvdimm:<dimm id>), or None when there is none."""
    try:
        _possess_user_keyring()
        serial = _search_user_keyring("encrypted", description)
        return _passphrase_of(serial, current_caller())
    except (OSError, ValueError):
        return None


def keyctl_available() -> str | None:
    """None if the keyctl system calls work here, else why not (e.g. a seccomp profile)."""
    try:
        _keyctl(KEYCTL_DESCRIBE, KEY_SPEC_USER_KEYRING, None, 0)
    except OSError as e:
        return f"the keyctl system call fails here: {e.strerror}"
    return None


def user_keyring_links() -> set[int]:
    """The serials linked in the calling user's user keyring (KEYCTL_READ of a keyring)."""
    raw = _read(KEY_SPEC_USER_KEYRING)
    return {int.from_bytes(raw[i:i + 4], "little", signed=True) for i in range(0, len(raw) - 3, 4)}


def unlink_from_user_keyring(serial: int) -> None:
    _keyctl(KEYCTL_UNLINK, serial, KEY_SPEC_USER_KEYRING)
