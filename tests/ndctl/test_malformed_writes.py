"""Malformed input to every writable attribute of every device type, through the real mount:
random bytes (with and without NUL and newline) and near-valid edits, 300 examples per
attribute, each write a single store that must fail with the kernel's errno (the verdicts
come from tests/kernel_oracle.py, independent of vnvdimm). Nothing may change: the device's
directory is compared before/after each attribute's examples, and the whole MNT/sys tree
before/after the module.

(The model-level twin, tests/unit/test_model_fuzz.py, also checks the inputs the kernel
accepts and compares the whole system around every single write.)"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import kernel_oracle as K
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mount_kit import E820_BUS, NFIT_BUS, diff, mounted, snapshot, sync_memmaps, write
from topologies import four_modes, nfit

pytestmark = pytest.mark.ndctl

EXAMPLES = 300
M = 1 << 20
E820 = four_modes(workers=1)
NFIT = nfit("128M 128M", "0,1", workers=1)
NFIT_UUID = b"5e5e5e5e-0000-4000-8000-000000000001"


@pytest.fixture(scope="module")
def e820(request):  # type: ignore[no-untyped-def]
    with mounted(request, E820) as m:
        write(m.sys / "bus/nd/drivers/nd_pmem/unbind", b"namespace2.0\0")  # idle and unclaimed
        sync_memmaps(m.sys)
        before = snapshot(m.sys)
        yield m
        assert diff(before, snapshot(m.sys)) == {}


@pytest.fixture(scope="module")
def nfit(request):  # type: ignore[no-untyped-def]
    with mounted(request, NFIT) as m:
        write(m.sys / NFIT_BUS / "region0/namespace0.0/uuid", NFIT_UUID + b"\0")
        before = snapshot(m.sys)
        yield m
        assert diff(before, snapshot(m.sys)) == {}


R = f"{E820_BUS}/region"


def region_align(buf: bytes) -> K.Verdict:
    v = K.kstrtoull(buf)
    if isinstance(v, K.Err):
        return v
    a = v.value
    return v if a >= 4096 and a & (a - 1) == 0 and a <= 64 * M else K.Err(errno.EINVAL)  # type: ignore[operator]


def nfit_size(buf: bytes) -> K.Verdict:
    v = K.kstrtoull(buf)
    if isinstance(v, K.Err) or v.value % (16 * M):  # type: ignore[operator]
        return v if isinstance(v, K.Err) else K.Err(errno.EINVAL)
    return v if v.value <= 256 * M else K.Err(errno.ENOSPC)  # type: ignore[operator]


def kstrtol_is(values: tuple[int, ...]) -> Callable[[bytes], K.Verdict]:
    def oracle(buf: bytes) -> K.Verdict:
        v = K.kstrtol(buf)
        return v if isinstance(v, K.Err) or v.value in values else K.Err(errno.EINVAL)
    return oracle


def busy(buf: bytes) -> K.Verdict:
    return K.Err(errno.EBUSY)


ND_DEVICES = ["ndbus0", *(f"region{i}" for i in range(4)), *(f"namespace{i}.0" for i in range(4)),
              *(f"{kind}{i}.0" for kind in ("btt", "pfn", "dax") for i in range(4)), "pfn0.1", "dax1.1", "btt3.1"]
BIND = {"namespace2.0": K.Ok(), "namespace0.0": K.Err(errno.ENXIO), "namespace1.0": K.Err(errno.ENXIO),
        "namespace3.0": K.Err(errno.ENXIO), "pfn0.1": K.Err(errno.EBUSY), "btt3.1": K.Err(errno.EBUSY)}
UNBIND = {"pfn0.1": K.Ok(), "btt3.1": K.Ok()}
NAMES = [n.encode() for n in ("namespace2.0", "namespace0.0", "pfn0.1", "btt3.1", "pfn2.0", "region2", "dax1.0")]
NUMS = [b"4096", b"2097152", b"0x200000", b"1073741824", b"0x1000000", b"512", b"18446744073709551615"]
UUIDS = [b"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", b"0f1e2d3c4b5a69788796a5b4c3d2e1f0"]
BTT = (512, 520, 528, 4096, 4104, 4160, 4224)

# attribute (relative to MNT/sys) -> (oracle, near-valid words, the directory to compare)
E820_CASES: dict[str, tuple[Callable[[bytes], K.Verdict], list[bytes], str]] = {
    f"{R}2/align": (region_align, NUMS, f"{R}2"),
    f"{R}2/read_only": (K.kstrtobool, [b"1", b"0", b"on", b"off", b"yes"], f"{R}2"),
    f"{R}2/uevent": (K.uevent, [b"add", b"change"], f"{R}2"),
    f"{R}2/namespace2.0/force_raw": (K.kstrtobool, [b"1", b"0", b"oN"], f"{R}2/namespace2.0"),
    f"{R}2/namespace2.0/holder_class": (lambda b: K.choice(b, ("", "btt", "pfn", "dax")), [b"btt", b"pfn", b"dax"],
                                        f"{R}2/namespace2.0"),
    f"{R}0/namespace0.0/holder_class": (busy, [b"pfn", b""], f"{R}0/namespace0.0"),
    f"{R}2/pfn2.0/mode": (K.pfn_mode, [b"pmem", b"ram", b"none"], f"{R}2/pfn2.0"),
    f"{R}2/pfn2.0/align": (lambda b: K.size_select(b, (4096, 2 * M, 1 << 30)), NUMS, f"{R}2/pfn2.0"),
    f"{R}2/pfn2.0/uuid": (K.uuid_parse, UUIDS, f"{R}2/pfn2.0"),
    f"{R}2/pfn2.0/namespace": (lambda b: K.namespace_store(b, {"namespace2.0": K.Ok()}),
                               [b"namespace2.0", b"namespace2.1", b"namespace0.0"], f"{R}2/pfn2.0"),
    f"{R}2/pfn2.0/memmap_state": (lambda b: K.choice(b, ("sync",)), [b"sync"], f"{R}2/pfn2.0"),
    f"{R}2/dax2.0/mode": (K.pfn_mode, [b"pmem", b"ram"], f"{R}2/dax2.0"),
    f"{R}2/dax2.0/namespace": (lambda b: K.namespace_store(b, {"namespace2.0": K.Ok()}), [b"namespace2.0"],
                               f"{R}2/dax2.0"),
    f"{R}2/btt2.0/sector_size": (lambda b: K.size_select(b, BTT), [str(s).encode() for s in BTT], f"{R}2/btt2.0"),
    f"{R}2/btt2.0/uuid": (K.uuid_parse, UUIDS, f"{R}2/btt2.0"),
    f"{R}0/pfn0.1/mode": (busy, [b"ram", b"pmem"], f"{R}0/pfn0.1"),
    f"{R}0/pfn0.1/align": (busy, NUMS, f"{R}0/pfn0.1"),
    f"{R}0/pfn0.1/uuid": (busy, UUIDS, f"{R}0/pfn0.1"),
    f"{R}0/pfn0.1/namespace": (busy, [b"", b"namespace0.0"], f"{R}0/pfn0.1"),
    f"{R}0/pfn0.1/memmap_state": (lambda b: K.choice(b, ("sync",)), [b"sync"], f"{R}0/pfn0.1"),
    f"{R}1/dax1.1/mode": (busy, [b"pmem"], f"{R}1/dax1.1"),
    f"{R}3/btt3.1/sector_size": (busy, [b"512"], f"{R}3/btt3.1"),
    f"{R}3/btt3.1/namespace": (busy, [b""], f"{R}3/btt3.1"),
    f"{R}0/pfn0.1/block/pmem0/uevent": (K.uevent, [b"change"], f"{R}0/pfn0.1/block/pmem0"),
    f"{R}1/dax1.1/dax1.0/uevent": (K.uevent, [b"add"], f"{R}1/dax1.1/dax1.0"),
    f"{E820_BUS}/ndctl0/uevent": (K.uevent, [b"add"], f"{E820_BUS}/ndctl0"),
    "bus/nd/drivers/nd_pmem/bind": (lambda b: K.device_name(b, BIND, K.Err(errno.ENODEV)), NAMES, "bus/nd"),
    "bus/nd/drivers/nd_pmem/unbind": (lambda b: K.device_name(b, UNBIND, K.Err(errno.ENODEV)), NAMES, "bus/nd"),
    "bus/nd/drivers/dax_pmem/bind": (lambda b: K.device_name(b, {"dax1.1": K.Err(errno.EBUSY)},
                                                             K.Err(errno.ENODEV)), NAMES, "bus/nd"),
    "bus/nd/drivers/nd_region/unbind": (lambda b: K.device_name(b, {f"region{i}": K.Ok() for i in range(4)},
                                                                K.Err(errno.ENODEV)), NAMES, "bus/nd"),
    "bus/nd/drivers/nd_pmem/uevent": (K.uevent, [b"add"], "bus/nd"),
    "bus/dax/drivers/kmem/new_id": (K.dax_id, [b"dax1.0", b"dax0.12"], "bus/dax"),
    "bus/dax/drivers/device_dax/remove_id": (K.dax_id, [b"dax1.0"], "bus/dax"),
    "bus/dax/drivers/device_dax/bind": (lambda b: K.device_name(b, {"dax1.0": K.Err(errno.EBUSY)},
                                                                K.Err(errno.ENODEV)), [b"dax1.0"], "bus/dax"),
    "bus/nd/uevent": (K.uevent, [b"add"], "bus/nd"),
    "bus/nd/drivers_probe": (lambda b: K.device_name(b, {n: K.Ok() for n in ND_DEVICES}, K.Err(errno.ENODEV)),
                             NAMES, "bus/nd"),
}
N = f"{NFIT_BUS}/region0"
NFIT_CASES: dict[str, tuple[Callable[[bytes], K.Verdict], list[bytes], str]] = {
    f"{N}/namespace0.0/size": (nfit_size, [b"0x1000000", b"0x20000000", b"0"], f"{N}/namespace0.0"),
    f"{N}/namespace0.0/sector_size": (lambda b: K.size_select(b, (512, 4096)), [b"4096", b"520"],
                                      f"{N}/namespace0.0"),
    f"{N}/namespace0.0/alt_name": (lambda b: K.Err(errno.EINVAL) if len(K.c_string(b).strip(K.KSPACE)) > 63
                                   else K.Ok(), [b"n" * 64, b" " + b"x" * 70], f"{N}/namespace0.0"),
    # the seed has a uuid and the region no labels yet: a valid new uuid is a rename (EBUSY),
    # its own uuid is not unique (EINVAL)
    f"{N}/namespace0.0/uuid": (lambda b: K.Err(errno.EINVAL) if isinstance(K.uuid_parse(b), K.Err)
                               or K.uuid_parse(b) == K.uuid_parse(NFIT_UUID) else K.Err(errno.EBUSY),
                               [*UUIDS, NFIT_UUID], f"{N}/namespace0.0"),
    f"{NFIT_BUS}/nfit/scrub": (kstrtol_is((1,)), [b"1", b"2", b"-1"], f"{NFIT_BUS}/nfit"),
    f"{NFIT_BUS}/nfit/hw_error_scrub": (kstrtol_is((0, 1)), [b"0", b"2"], f"{NFIT_BUS}/nfit"),
    f"{NFIT_BUS}/nmem0/uevent": (K.uevent, [b"add"], f"{NFIT_BUS}/nmem0"),
}


def fuzz(sys_root: Path, rel: str, oracle: Callable[[bytes], K.Verdict], words: list[bytes], scope: str) -> None:
    before = snapshot(sys_root / scope)
    fd = os.open(sys_root / rel, os.O_WRONLY)  # every write(2) is its own store
    seen = {"n": 0}
    malformed = K.inputs(words).filter(lambda b: isinstance(oracle(b), K.Err))
    if "alt_name" in rel:  # almost every short string is a valid name: make them long
        malformed = st.binary(min_size=64, max_size=120).map(lambda b: b"x" * 64 + b).filter(
            lambda b: isinstance(oracle(b), K.Err))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(malformed)
    def check(buf: bytes) -> None:
        expected = oracle(buf)
        assert isinstance(expected, K.Err)
        try:
            os.write(fd, buf)
        except OSError as e:
            assert e.errno == expected.errno, (rel, buf)
        else:
            raise AssertionError(f"{rel}: {buf!r} was accepted; the kernel answers {errno.errorcode[expected.errno]}")
        seen["n"] += 1

    try:
        check()
    finally:
        os.close(fd)
    assert seen["n"] >= EXAMPLES * 9 // 10
    assert diff(before, snapshot(sys_root / scope)) == {}


@pytest.mark.parametrize("rel", sorted(E820_CASES))
def test_e820_attribute(e820, rel: str) -> None:  # type: ignore[no-untyped-def]
    fuzz(e820.sys, rel, *E820_CASES[rel])


@pytest.mark.parametrize("rel", sorted(NFIT_CASES))
def test_nfit_attribute(nfit, rel: str) -> None:  # type: ignore[no-untyped-def]
    fuzz(nfit.sys, rel, *NFIT_CASES[rel])
