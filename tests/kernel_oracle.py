"""What the kernel's store functions do with a buffer, written here independently of vnvdimm
(regular expressions over the C string the store sees), for the fuzz tests: each oracle
returns OK (with the value that will show) or the errno. Sources: lib/kstrtox.c,
lib/string.c, drivers/nvdimm/{core,claim,pfn_devs,namespace_devs,region_devs}.c,
drivers/dax/bus.c, lib/kobject_uevent.c."""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from hypothesis import strategies as st

U64 = 1 << 64


@dataclass(frozen=True)
class Ok:
    value: object = None


@dataclass(frozen=True)
class Err:
    errno: int


Verdict = Ok | Err


def c_string(buf: bytes) -> bytes:
    return buf.split(b"\0", 1)[0]


def streq(buf: bytes) -> bytes:
    """What sysfs_streq() compares: the C string minus one trailing newline."""
    s = c_string(buf)
    return s[:-1] if s.endswith(b"\n") else s


def kstrtoull(buf: bytes) -> Verdict:
    s = c_string(buf)
    s = s[1:] if s.startswith(b"+") else s
    if re.match(rb"0[xX][0-9a-fA-F]", s):
        base, s = 16, s[2:]
        digits = re.match(rb"[0-9a-fA-F]*", s).group()  # type: ignore[union-attr]
    elif s.startswith(b"0"):
        base, digits = 8, re.match(rb"[0-7]*", s).group()  # type: ignore[union-attr]
    else:
        base, digits = 10, re.match(rb"[0-9]*", s).group()  # type: ignore[union-attr]
    value = 0
    for d in digits:
        value = value * base + int(chr(d), 16)
        if value >= U64:
            return Err(errno.ERANGE)
    if not digits or s[len(digits):] not in (b"", b"\n"):
        return Err(errno.EINVAL)
    return Ok(value)


def kstrtol(buf: bytes) -> Verdict:
    s = c_string(buf)
    if s.startswith(b"-"):
        v = kstrtoull(s[1:]) if not s[1:].startswith(b"+") else Err(errno.EINVAL)
        if isinstance(v, Ok) and v.value > 1 << 63:  # type: ignore[operator]
            return Err(errno.ERANGE)
        return Ok(-v.value) if isinstance(v, Ok) else v  # type: ignore[operator]
    v = kstrtoull(s)
    if isinstance(v, Ok) and v.value >= 1 << 63:  # type: ignore[operator]
        return Err(errno.ERANGE)
    return v


def kstrtobool(buf: bytes) -> Verdict:
    s = c_string(buf)
    if re.match(rb"[yYtT1]|[oO][nN]", s):
        return Ok(True)
    if re.match(rb"[nNfF0]|[oO][fF]", s):
        return Ok(False)
    return Err(errno.EINVAL)


def uuid_parse(buf: bytes) -> Verdict:
    m = re.match(rb"((?:[0-9a-fA-F]{2}[-:\n\0]?){15}[0-9a-fA-F]{2})", buf)
    if not m:
        return Err(errno.EINVAL)
    hexdigits = re.sub(rb"[-:\n\0]", b"", m.group(1)).decode().lower()
    return Ok(f"{hexdigits[:8]}-{hexdigits[8:12]}-{hexdigits[12:16]}-{hexdigits[16:20]}-{hexdigits[20:]}")


def choice(buf: bytes, words: tuple[str, ...]) -> Verdict:
    s = streq(buf)
    for w in words:
        if s == w.encode():
            return Ok(w)
    return Err(errno.EINVAL)


def size_select(buf: bytes, supported: tuple[int, ...]) -> Verdict:
    v = kstrtoull(buf)
    if isinstance(v, Err):
        return v
    return Ok(v.value) if v.value in supported else Err(errno.EINVAL)


def c_strncmp(a: bytes, b: bytes, n: int) -> int:
    """strncmp() of two C strings (a NUL where each ends)."""
    for i in range(n):
        ca = a[i] if i < len(a) else 0
        cb = b[i] if i < len(b) else 0
        if ca != cb:
            return ca - cb
        if ca == 0:
            return 0
    return 0


def pfn_mode(buf: bytes) -> Verdict:
    """mode_store(): strncmp(buf, "pmem\\n", len - 1) == 0 || strncmp(buf, "pmem", len - 1) == 0,
    then ram, then none."""
    n = len(buf) - 1
    s = c_string(buf)
    for word in ("pmem", "ram", "none"):
        if c_strncmp(s, (word + "\n").encode(), n) == 0 or c_strncmp(s, word.encode(), n) == 0:
            return Ok(word)
    return Err(errno.EINVAL)


KSPACE = b" \t\n\v\f\r\xa0"


def namespace_store(buf: bytes, region_namespaces: dict[str, Verdict]) -> Verdict:
    """nd_namespace_store() on an unbound personality: trailing isspace() trimmed only; ''
    detaches; otherwise the name must start with "namespace" and be a namespace of the region
    (region_namespaces: name -> the verdict of claiming it)."""
    name = c_string(buf).rstrip(KSPACE)
    if name == b"":
        return Ok("")
    if not name.startswith(b"namespace"):
        return Err(errno.EINVAL)
    return region_namespaces.get(name.decode("latin-1"), Err(errno.ENODEV))


def device_name(buf: bytes, verdicts: dict[str, Verdict], default: Verdict) -> Verdict:
    """bus_find_device_by_name() (sysfs_streq) then what binding/unbinding that device does."""
    return verdicts.get(streq(buf).decode("latin-1"), default)


def dax_id(buf: bytes) -> Verdict:
    m = re.fullmatch(rb"dax(-?(?:0|[1-9][0-9]*))\.(-?(?:0|[1-9][0-9]*))", streq(buf))
    if not m or any(g == b"-0" or not -(1 << 31) <= int(g) < 1 << 31 for g in m.groups()):
        return Err(errno.EINVAL)
    return Ok(streq(buf).decode())


UEVENT_ACTIONS = (b"add", b"remove", b"change", b"move", b"online", b"offline", b"bind", b"unbind")
_ARGS = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
                   rb"(?: [0-9A-Za-z]+=[0-9A-Za-z]+)*")


def uevent(buf: bytes) -> Verdict:
    body = buf[:-1] if buf[-1:] in (b"\n", b"\0") else buf
    action, sep, _ = body.partition(b" ")
    if action not in UEVENT_ACTIONS:
        return Err(errno.EINVAL)
    if not sep:
        return Ok(action.decode())
    args = buf[len(action) + 1:]
    args = args[:-1] if args[-1:] in (b"\n", b"\0") else args
    return Ok(action.decode()) if _ARGS.fullmatch(args) else Err(errno.EINVAL)


# ---------------------------------------------------------------- input strategies


def _mutate(t: tuple[bytes, int, bytes, str]) -> bytes:
    word, pos, extra, how = t
    pos = pos % (len(word) + 1)
    if how == "insert":
        return word[:pos] + extra + word[pos:]
    if how == "delete":
        return word[:pos] + word[pos + 1:]
    if how == "replace":
        return word[:pos] + extra + word[pos + len(extra):]
    if how == "prefix":
        return extra + word
    return word + extra


def near(words: list[bytes]) -> st.SearchStrategy[bytes]:
    """Valid-looking inputs with one edit, and the ways writers end them (newline, NUL)."""
    edited = st.tuples(st.sampled_from(words), st.integers(0, 64), st.binary(min_size=1, max_size=3),
                       st.sampled_from(["insert", "delete", "replace", "prefix", "suffix"])).map(_mutate)
    ends = st.sampled_from([b"", b"\n", b"\0", b"\n\0", b"\n\n", b" ", b"\t\n", b"\0junk"])
    return st.tuples(st.one_of(edited, st.sampled_from(words)), ends).map(lambda t: t[0] + t[1])


def inputs(words: list[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes (with and without NUL and newline) and near-valid inputs."""
    raw = st.binary(min_size=1, max_size=40)
    # (an empty write never reaches a store: kernfs returns 0 for it)
    return st.one_of(raw, raw.map(lambda b: b + b"\n"), raw.map(lambda b: b + b"\0"),
                     near(words).filter(len))
