"""The kernel's little input parsers, as vnvdimm's store functions use them.

Each parser is checked against a table of cases taken from the kernel sources (lib/kstrtox.c,
lib/string.c, drivers/nvdimm/core.c nd_uuid_parse()) and, with hypothesis, against an oracle
written here independently of vnvdimm (regular expressions over the C-string semantics).
A store receives the bytes of one write(2): kernfs NUL-terminates them, so C parsers stop at the
first NUL, and ndctl always sends the value plus a NUL.
"""

from __future__ import annotations

import errno
import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnvdimm.model.base import (
    cstring,
    kstrtobool,
    kstrtol,
    kstrtoull,
    parse_uuid,
    rstrim,
    strim,
    synth_uevent,
    sysfs_streq,
)

U64 = 1 << 64


def errno_of(fn, *args):  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


# ---------------------------------------------------------------- kstrtoull


@pytest.mark.parametrize("buf,value", [
    (b"0", 0),
    (b"12", 12),
    (b"12\n", 12),
    (b"12\0", 12),
    (b"12\n\0", 12),
    (b"12\0garbage after the NUL", 12),
    (b"+7", 7),
    (b"0x10", 16),
    (b"0X1f", 31),
    (b"0xABCdef\n", 0xABCDEF),
    (b"010", 8),  # a leading 0 means octal
    (b"0777", 0o777),
    (b"18446744073709551615", U64 - 1),
    (b"0xffffffffffffffff\n", U64 - 1),
    (b"2097152\n\0", 2 << 20),
])
def test_kstrtoull_accepts(buf: bytes, value: int) -> None:
    assert kstrtoull(buf) == value


@pytest.mark.parametrize("buf,code", [
    (b"", errno.EINVAL),
    (b"\n", errno.EINVAL),
    (b"\0", errno.EINVAL),
    (b"+", errno.EINVAL),
    (b"++1", errno.EINVAL),
    (b"-1", errno.EINVAL),
    (b" 1", errno.EINVAL),
    (b"1 ", errno.EINVAL),
    (b"1\n\n", errno.EINVAL),
    (b"1\r\n", errno.EINVAL),
    (b"0x", errno.EINVAL),  # base 8, then 'x' is garbage
    (b"0xg", errno.EINVAL),
    (b"08", errno.EINVAL),
    (b"09\n", errno.EINVAL),
    (b"1_000", errno.EINVAL),
    (b"\xd9\xa1", errno.EINVAL),  # Arabic-Indic digit one: not an ASCII digit
    (b"18446744073709551616", errno.ERANGE),
    (b"0x10000000000000000", errno.ERANGE),
    # _parse_integer() flags the overflow while it reads digits: ERANGE wins over the garbage after.
    (b"99999999999999999999x", errno.ERANGE),
    (b"99999999999999999999\n\n", errno.ERANGE),
])
def test_kstrtoull_rejects(buf: bytes, code: int) -> None:
    assert errno_of(kstrtoull, buf) == code


def oracle_kstrtoull(buf: bytes) -> int | tuple[str, int]:
    """lib/kstrtox.c, written as a regular expression over the C string."""
    s = cstring(buf)
    if s.startswith(b"+"):
        s = s[1:]
    m = re.match(rb"0[xX](?=[0-9a-fA-F])", s)
    if m:
        base, s = 16, s[2:]
        digits = re.match(rb"[0-9a-fA-F]*", s).group()  # type: ignore[union-attr]
    elif s.startswith(b"0"):
        base = 8
        digits = re.match(rb"[0-7]*", s).group()  # type: ignore[union-attr]
    else:
        base = 10
        digits = re.match(rb"[0-9]*", s).group()  # type: ignore[union-attr]
    value = 0
    for i in range(len(digits)):
        value = value * base + int(digits[i:i + 1], 16)
        if value >= U64:
            return ("err", errno.ERANGE)
    if not digits:
        return ("err", errno.EINVAL)
    rest = s[len(digits):]
    if rest not in (b"", b"\n"):
        return ("err", errno.EINVAL)
    return value


NUMBERISH = st.one_of(
    st.binary(max_size=24),
    st.from_regex(rb"\A\+?(0[xX])?[0-9a-fA-F]{0,22}\n?\x00?[\x00-\xff]{0,3}\Z"),
    st.integers(0, 2 * U64).map(lambda v: str(v).encode()),
    st.integers(0, 2 * U64).map(lambda v: hex(v).encode() + b"\n\0"),
)


@settings(max_examples=400, deadline=None)
@given(NUMBERISH)
def test_kstrtoull_matches_oracle(buf: bytes) -> None:
    expected = oracle_kstrtoull(buf)
    got = errno_of(kstrtoull, buf)
    if isinstance(expected, tuple):
        assert got == expected[1], buf
    else:
        assert got is None, buf
        assert kstrtoull(buf) == expected


@pytest.mark.parametrize("buf,value", [
    (b"1", 1), (b"-1", -1), (b"-0", 0), (b"0x1\n", 1),
    (b"9223372036854775807", (1 << 63) - 1), (b"-9223372036854775808", -(1 << 63)),
])
def test_kstrtol_accepts(buf: bytes, value: int) -> None:
    assert kstrtol(buf) == value


@pytest.mark.parametrize("buf,code", [
    (b"9223372036854775808", errno.ERANGE), (b"-9223372036854775809", errno.ERANGE),
    (b"-+1", errno.EINVAL), (b"--1", errno.EINVAL), (b"-", errno.EINVAL), (b"", errno.EINVAL),
])
def test_kstrtol_rejects(buf: bytes, code: int) -> None:
    assert errno_of(kstrtol, buf) == code


# ---------------------------------------------------------------- kstrtobool


@pytest.mark.parametrize("buf,value", [
    (b"1", True), (b"y", True), (b"Y", True), (b"yes", True), (b"1\n\0", True), (b"Yikes", True),
    (b"t", True), (b"T", True), (b"true\n", True),  # 't'/'f' since Linux 5.19 (Debian 12 runs 6.1)
    (b"0", False), (b"n", False), (b"N\n", False), (b"no", False), (b"f", False), (b"False", False),
    (b"on", True), (b"ON", True), (b"oN\n", True), (b"off", False), (b"oFf", False), (b"of", False),
])
def test_kstrtobool_accepts(buf: bytes, value: bool) -> None:
    assert kstrtobool(buf) is value


@pytest.mark.parametrize("buf", [b"", b"\n", b"\0y", b"o", b"o\n", b"ox", b"2", b" 1", b"-1", b"x", b"\xff"])
def test_kstrtobool_rejects(buf: bytes) -> None:
    assert errno_of(kstrtobool, buf) == errno.EINVAL


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6))
def test_kstrtobool_matches_oracle(buf: bytes) -> None:
    s = cstring(buf)
    if re.match(rb"[yYtT1]|[oO][nN]", s):
        assert kstrtobool(buf) is True
    elif re.match(rb"[nNfF0]|[oO][fF]", s):
        assert kstrtobool(buf) is False
    else:
        assert errno_of(kstrtobool, buf) == errno.EINVAL


# ---------------------------------------------------------------- sysfs_streq, strim


@pytest.mark.parametrize("buf,word,equal", [
    (b"pmem", "pmem", True), (b"pmem\n", "pmem", True), (b"pmem\0", "pmem", True),
    (b"pmem\n\0", "pmem", True), (b"pmem\0junk", "pmem", True), (b"pmem\n\n", "pmem", False),
    (b"pmem ", "pmem", False), (b" pmem", "pmem", False), (b"pme", "pmem", False), (b"", "", True),
    (b"\n", "", True), (b"\0", "", True), (b"\n\n", "", False),
])
def test_sysfs_streq(buf: bytes, word: str, equal: bool) -> None:
    assert sysfs_streq(buf, word) is equal


def test_strim_uses_the_kernel_isspace() -> None:
    # lib/ctype.c: isspace() is true for \t \n \v \f \r, space and 0xa0 (NBSP in latin-1).
    assert strim(b" \t\v\f\r\n\xa0name\xa0 \n\0tail") == "name"
    assert strim(b"a b") == "a b"
    assert strim(b"\x1cname") == "\x1cname"  # file separator is a control char, not a space


def test_rstrim_keeps_leading_whitespace() -> None:
    # nd_namespace_store() ignores strim()'s return value: only trailing space goes.
    assert rstrim(b"  namespace0.0 \n\0") == "  namespace0.0"
    assert rstrim(b"namespace0.0\n") == "namespace0.0"
    assert rstrim(b" \n\t") == ""


# ---------------------------------------------------------------- uuid (nd_uuid_parse)

U = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")


@pytest.mark.parametrize("buf", [
    str(U).encode(),
    str(U).encode() + b"\n",
    str(U).encode() + b"\0",
    str(U).encode() + b"\n\0",
    U.hex.encode(),
    U.hex.upper().encode(),
    ":".join(U.hex[i:i + 2] for i in range(0, 32, 2)).encode(),
    "-".join(U.hex[i:i + 2] for i in range(0, 32, 2)).encode() + b"\n",
    # nd_uuid_parse() reads 16 pairs and ignores whatever follows them
    str(U).encode() + b"trailing garbage",
    U.hex.encode() + b"ff",
    # '\n' and '\0' count as separators between pairs too
    b"\n".join(U.hex[i:i + 2].encode() for i in range(0, 32, 2)),
    b"\0".join(U.hex[i:i + 2].encode() for i in range(0, 32, 2)),
])
def test_parse_uuid_accepts(buf: bytes) -> None:
    assert parse_uuid(buf) == U


@pytest.mark.parametrize("buf", [
    b"", b"\n", U.hex[:-1].encode(), U.hex[:30].encode() + b"\n",
    b"-" + U.hex.encode(),  # no separator before the first pair
    U.hex[:2].encode() + b"--" + U.hex[2:].encode(),  # at most one separator after a pair
    U.hex[:3].encode() + b"-" + U.hex[3:].encode(),  # separators only between pairs
    U.hex.replace("f", "g").encode(),
    U.hex[:2].encode() + b" " + U.hex[2:].encode(),
    str(U).encode().replace(b"-", b"_"),
])
def test_parse_uuid_rejects(buf: bytes) -> None:
    assert errno_of(parse_uuid, buf) == errno.EINVAL


def oracle_uuid(buf: bytes) -> uuid.UUID | None:
    m = re.match(rb"\A((?:[0-9a-fA-F]{2}[-:\n\0]?){15}[0-9a-fA-F]{2})", buf)
    if not m:
        return None
    return uuid.UUID(hex=re.sub(rb"[-:\n\0]", b"", m.group(1)).decode())


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=40),
    st.uuids().map(lambda u: str(u).encode()) | st.uuids().map(lambda u: u.hex.encode()),
    st.tuples(st.uuids(), st.binary(max_size=4), st.integers(0, 35)).map(
        lambda t: (str(t[0]).encode()[:t[2]] + t[1] + str(t[0]).encode()[t[2]:])),
))
def test_parse_uuid_matches_oracle(buf: bytes) -> None:
    expected = oracle_uuid(buf)
    if expected is None:
        assert errno_of(parse_uuid, buf) == errno.EINVAL, buf
    else:
        assert parse_uuid(buf) == expected, buf


# ---------------------------------------------------------------- uevent (kobject_synth_uevent)


@pytest.mark.parametrize("buf", [
    b"add", b"add\n", b"add\0", b"change", b"remove\n", b"online", b"offline", b"bind", b"unbind", b"move",
    b"add 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", b"change 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 A=1 B=xyz\n",
])
def test_synth_uevent_accepts(buf: bytes) -> None:
    synth_uevent(buf)


@pytest.mark.parametrize("buf", [
    b"", b"\n", b"\0", b"ad", b"adds", b"add\n\0", b"Add", b" add", b"add ", b"add x",
    b"add 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f", b"add 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 A",
    b"add 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 =1", b"add 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0  A=1",
    b"add 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 A=",
])
def test_synth_uevent_rejects(buf: bytes) -> None:
    assert errno_of(synth_uevent, buf) == errno.EINVAL
