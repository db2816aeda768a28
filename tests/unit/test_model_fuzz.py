"""Every writable attribute of every device type, fed random and near-valid bytes (with and
without NUL and newline), at the model level where a whole-system snapshot costs a
millisecond: a store the kernel would refuse fails with the kernel's errno and changes
nothing (every readable attribute of every device compared before/after each write); a
store the kernel would take succeeds and shows what it should. The expected verdicts come
from tests/kernel_oracle.py, written independently of vnvdimm."""

from __future__ import annotations

import errno
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import kernel_oracle as K
import pytest
from hypothesis import HealthCheck, given, settings
from model_kit import E820_FOUR, NFIT_TWO, Machine

EXAMPLES = 300
M = 1 << 20
NFIT_UUID = "5e5e5e5e-0000-4000-8000-000000000001"


def e820_setup(m: Machine) -> None:
    m.write("drivers/nd_pmem/unbind", "namespace2.0")  # an idle, unclaimed namespace to claim


def nfit_setup(m: Machine) -> None:
    m.write("namespace1.0/uuid", NFIT_UUID)  # the seed of the empty region, ready for a size


@dataclass(frozen=True)
class Case:
    path: str
    oracle: Callable[[bytes], K.Verdict]
    words: list[bytes]
    shows: Callable[[Machine, object], bool] | None = None  # the accepted value is what reads back
    nfit: bool = False
    min_refused: int = EXAMPLES // 3  # the inputs mostly probe the refusals


def shown(path: str, fmt: Callable[[object], str]) -> Callable[[Machine, object], bool]:
    return lambda m, v: m.read(path) == fmt(v)


ND_PMEM_BIND = {
    "namespace2.0": K.Ok("bound"), "namespace0.0": K.Err(errno.ENXIO), "namespace1.0": K.Err(errno.ENXIO),
    "namespace3.0": K.Err(errno.ENXIO), "pfn0.1": K.Err(errno.EBUSY), "btt3.1": K.Err(errno.EBUSY),
}
ND_PMEM_UNBIND = {"pfn0.1": K.Ok("unbound"), "btt3.1": K.Ok("unbound")}
NAMES = [n.encode() for n in ("namespace2.0", "namespace0.0", "pfn0.1", "btt3.1", "pfn2.0", "dax1.1", "region2",
                              "ndbus0", "dax1.0", "btt0.0")]
BTT_SIZES = (512, 520, 528, 4096, 4104, 4160, 4224)


def region_align(buf: bytes) -> K.Verdict:
    v = K.kstrtoull(buf)
    if isinstance(v, K.Err):
        return v
    a = v.value
    ok = a >= 4096 and a & (a - 1) == 0 and a <= 64 * M  # type: ignore[operator]
    return v if ok else K.Err(errno.EINVAL)


def ns_per_page(buf: bytes) -> K.Verdict:
    v = K.kstrtoull(buf)
    return v if isinstance(v, K.Err) or v.value <= 10**9 else K.Err(errno.EINVAL)  # type: ignore[operator]


def nfit_size(buf: bytes) -> K.Verdict:
    v = K.kstrtoull(buf)
    if isinstance(v, K.Err):
        return v
    if v.value % (16 * M):  # type: ignore[operator]
        return K.Err(errno.EINVAL)
    return v if v.value <= 256 * M else K.Err(errno.ENOSPC)  # type: ignore[operator]


def alt_name(buf: bytes) -> K.Verdict:
    name = K.c_string(buf).strip(K.KSPACE)
    return K.Ok(name) if len(name) <= 63 else K.Err(errno.EINVAL)


def scrub(buf: bytes) -> K.Verdict:
    v = K.kstrtol(buf)
    return v if isinstance(v, K.Err) or v.value == 1 else K.Err(errno.EINVAL)


def hw_error_scrub(buf: bytes) -> K.Verdict:
    v = K.kstrtol(buf)
    return v if isinstance(v, K.Err) or v.value in (0, 1) else K.Err(errno.EINVAL)


def busy(buf: bytes) -> K.Verdict:
    return K.Err(errno.EBUSY)


def unique_uuid(taken: set[str]) -> Callable[[bytes], K.Verdict]:
    def oracle(buf: bytes) -> K.Verdict:
        v = K.uuid_parse(buf)
        return K.Err(errno.EINVAL) if isinstance(v, K.Ok) and v.value in taken else v
    return oracle


UUIDS = [str(uuid.UUID(int=i * 0x1111_1111_1111_1111_1111_1111_1111_1111)).encode() for i in (1, 7)]
NUMS = [b"0", b"4096", b"2097152", b"0x200000", b"1073741824", b"0x1000000", b"512", b"4096\n", b"18446744073709551615"]

CASES = {
    "region.align": Case("region2/align", region_align, NUMS, shown("region2/align", lambda v: f"{v:#x}\n")),
    "region.read_only": Case("region2/read_only", K.kstrtobool, [b"1", b"0", b"y", b"on", b"off", b"t"],
                             shown("region2/read_only", lambda v: f"{int(v)}\n")),  # type: ignore[call-overload]
    "namespace.force_raw": Case("namespace2.0/force_raw", K.kstrtobool, [b"1", b"n", b"On", b"false"],
                                shown("namespace2.0/force_raw", lambda v: f"{int(v)}\n")),  # type: ignore[call-overload]
    "namespace.holder_class": Case("namespace2.0/holder_class", lambda b: K.choice(b, ("", "btt", "pfn", "dax")),
                                   [b"btt", b"pfn", b"dax", b""], shown("namespace2.0/holder_class", "{}\n".format)),
    "namespace.uevent": Case("namespace2.0/uevent", K.uevent, [b"add", b"change", b"remove " + UUIDS[0]]),
    "pfn.mode": Case("pfn2.0/mode", K.pfn_mode, [b"pmem", b"ram", b"none"], shown("pfn2.0/mode", "{}\n".format)),
    "pfn.align": Case("pfn2.0/align", lambda b: K.size_select(b, (4096, 2 * M, 1 << 30)), NUMS,
                      shown("pfn2.0/align", "{}\n".format)),
    "pfn.uuid": Case("pfn2.0/uuid", K.uuid_parse, UUIDS, shown("pfn2.0/uuid", "{}\n".format)),
    "pfn.namespace": Case("pfn2.0/namespace", lambda b: K.namespace_store(b, {"namespace2.0": K.Ok("namespace2.0")}),
                          [b"namespace2.0", b"namespace2.1", b"namespace0.0", b""],
                          shown("pfn2.0/namespace", "{}\n".format)),
    "pfn.memmap_state": Case("pfn2.0/memmap_state", lambda b: K.choice(b, ("sync",)), [b"sync", b"idle"]),
    "pfn.ns_per_page": Case("pfn2.0/memmap/ns_per_page", ns_per_page, [*NUMS, b"1000000001"],
                            shown("pfn2.0/memmap/ns_per_page", "{}\n".format)),
    "dax.mode": Case("dax2.0/mode", K.pfn_mode, [b"pmem", b"ram", b"none"], shown("dax2.0/mode", "{}\n".format)),
    "dax.namespace": Case("dax0.0/namespace", lambda b: K.namespace_store(b, {"namespace0.0": K.Err(errno.EBUSY)}),
                          [b"namespace0.0", b"namespace2.0", b""], shown("dax0.0/namespace", "{}\n".format)),
    "btt.sector_size": Case("btt2.0/sector_size", lambda b: K.size_select(b, BTT_SIZES),
                            [str(s).encode() for s in BTT_SIZES] + [b"1024"],
                            lambda m, v: f"[{v}] " in m.read("btt2.0/sector_size")),
    "btt.uuid": Case("btt2.0/uuid", K.uuid_parse, UUIDS, shown("btt2.0/uuid", "{}\n".format)),
    "active_pfn.mode": Case("pfn0.1/mode", busy, [b"pmem", b"ram"]),
    "active_pfn.uuid": Case("pfn0.1/uuid", busy, UUIDS),
    "active_btt.namespace": Case("btt3.1/namespace", busy, [b"", b"namespace3.0"]),
    "active_dax.align": Case("dax1.1/align", busy, NUMS),
    "nd_pmem.bind": Case("drivers/nd_pmem/bind", lambda b: K.device_name(b, ND_PMEM_BIND, K.Err(errno.ENODEV)),
                         NAMES, lambda m, v: m.dev("namespace2.0").driver is not None),
    "nd_pmem.unbind": Case("drivers/nd_pmem/unbind",
                           lambda b: K.device_name(b, ND_PMEM_UNBIND, K.Err(errno.ENODEV)), NAMES),
    "kmem.new_id": Case("dax/drivers/kmem/new_id", K.dax_id, [b"dax1.0", b"dax0.0", b"dax12.34"]),
    "device_dax.remove_id": Case("dax/drivers/device_dax/remove_id", K.dax_id, [b"dax1.0", b"dax-1.0"]),
    "nfit.size": Case("namespace1.0/size", nfit_size, [b"0x1000000", b"0x10000000", b"16777216", b"0"],
                      shown("namespace1.0/size", "{}\n".format), nfit=True),
    "nfit.alt_name": Case("namespace1.0/alt_name", alt_name, [b"name", b"x" * 63, b" spaced ", b"y" * 64, b"z" * 99],
                          lambda m, v: m.read("namespace1.0/alt_name").encode("utf-8", "surrogateescape")
                          == v + b"\n", nfit=True, min_refused=EXAMPLES // 20),  # type: ignore[operator]
    "nfit.sector_size": Case("namespace1.0/sector_size", lambda b: K.size_select(b, (512, 4096)),
                             [b"512", b"4096", b"520"],
                             lambda m, v: f"[{v}] " in m.read("namespace1.0/sector_size"), nfit=True),
    "nfit.uuid": Case("namespace0.1/uuid", unique_uuid({NFIT_UUID}), [*UUIDS, NFIT_UUID.encode()],
                      shown("namespace0.1/uuid", "{}\n".format), nfit=True),
    "nfit.scrub": Case("ndbus0/nfit/scrub", scrub, [b"1", b"0", b"-1", b"2"], nfit=True),
    "nfit.hw_error_scrub": Case("ndbus0/nfit/hw_error_scrub", hw_error_scrub, [b"1", b"0", b"-1", b"2"],
                               shown("ndbus0/nfit/hw_error_scrub", "{}\n".format), nfit=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_store_matches_the_kernel_and_a_refused_store_changes_nothing(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    m = Machine(tmp_path / "state", NFIT_TWO if case.nfit else E820_FOUR)
    setup = nfit_setup if case.nfit else e820_setup
    m.boot()
    if case.nfit:
        # A namespace once created leaves a label index on its DIMMs (init_labels()), which
        # the next boot shows (nmemN/flags "label"): start from that state, the one that
        # putting things back after an accepted size store ends in.
        nfit_setup(m)
        m.write("namespace1.0/size", "0x1000000")
        m.write("namespace1.0/size", "0")
        m.boot()
    setup(m)
    baseline = m.snapshot()
    counts = {"refused": 0, "taken": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(K.inputs(case.words))
    def check(buf: bytes) -> None:
        verdict = case.oracle(buf)
        got = m.errno_of(case.path, buf)
        if isinstance(verdict, K.Err):
            counts["refused"] += 1
            assert got == verdict.errno, (case.path, buf)
            assert m.snapshot() == baseline, (case.path, buf)
            return
        counts["taken"] += 1
        assert got is None, (case.path, buf, errno.errorcode.get(got or 0))
        if case.shows is not None:
            assert case.shows(m, verdict.value), (case.path, buf, verdict.value)
        if m.snapshot() == baseline:
            return
        # put things back the way they were and check that the store did nothing else
        if case.nfit and name == "nfit.size" and m.read("namespace1.0/size") != "0\n":
            m.write("namespace1.0/size", "0")  # frees the allocation and its labels
        m.boot()
        setup(m)
        assert m.snapshot() == baseline, (case.path, buf)

    try:
        check()
    finally:
        m.shutdown()
    assert counts["refused"] >= case.min_refused, counts
