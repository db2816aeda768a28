"""template = "cxl_test": Debian's `cxl read-labels`, `write-labels` and `zero-labels` (ndctl
76.1) reach the memdevs' label storage areas through /dev/cxl/memN's mailbox ioctls
(CXL_MEM_QUERY_COMMANDS, CXL_MEM_SEND_COMMAND with GET_LSA / SET_LSA, chunked by the memdev's
payload_max), as they do on the kernel's cxl_test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mount_kit import have_ndctl

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl")]

CXL_TEST = 'template = "cxl_test"\n[memmap]\nworkers = 1\n'
LSA_SIZE = 128 << 10  # mem.c's LSA_SIZE, what label_storage_size reads


@pytest.fixture
def ct(make_mount):  # type: ignore[no-untyped-def]
    return make_mount(CXL_TEST)


def cxl(m, *args: str) -> str:  # type: ignore[no-untyped-def]
    res = m.run("cxl", *args)
    assert res.returncode == 0, f"cxl {' '.join(args)}: rc {res.returncode}: {res.stderr}"
    return res.stderr


def writable(m, memdev: str) -> None:  # type: ignore[no-untyped-def]
    """`cxl write-labels` refuses a memdev whose nvdimm bridge device is bound (libcxl reads
    memN/pmemX/driver), and cxl_nvdimm has no unbind file (suppress_bind_attrs): on the
    kernel's cxl_test one disables the memdev, which takes its pmemX with it while
    /dev/cxl/memN and its mailbox stay."""
    if any((pmem / "driver").exists() for pmem in (m.sys / "bus/cxl/devices" / memdev).glob("pmem*")):
        cxl(m, "disable-memdev", "--force", memdev)
    assert not list((m.sys / "bus/cxl/devices" / memdev).glob("pmem*/driver"))


def test_read_labels_of_every_memdev(ct, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    memdevs = sorted(p.name for p in (ct.sys / "bus/cxl/devices").glob("mem*"))
    assert len(memdevs) >= 8
    for memdev in memdevs:
        out = tmp_path / f"{memdev}.lsa"
        cxl(ct, "read-labels", "-o", str(out), memdev)
        assert out.stat().st_size == int(ct.read(f"sys/bus/cxl/devices/{memdev}/label_storage_size")) == LSA_SIZE
        assert out.read_bytes() == bytes(LSA_SIZE)  # mem.c's label area starts zeroed


def test_write_read_and_zero_labels_round_trip(ct, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A whole label area of random bytes (32 SET_LSA chunks of payload_max - 8), read back
    whole and in part at an offset; another memdev untouched; zeroing erases it."""
    writable(ct, "mem1")
    data = os.urandom(LSA_SIZE)
    (tmp_path / "in").write_bytes(data)
    log = cxl(ct, "write-labels", "-i", str(tmp_path / "in"), "mem1", "-v")
    assert "wrote 1 mem" in log
    cxl(ct, "read-labels", "-o", str(tmp_path / "whole"), "mem1")
    assert (tmp_path / "whole").read_bytes() == data
    cxl(ct, "read-labels", "-O", "5000", "-s", "9000", "-o", str(tmp_path / "part"), "mem1")
    assert (tmp_path / "part").read_bytes() == data[5000:14000]
    cxl(ct, "read-labels", "-o", str(tmp_path / "other"), "mem2")
    assert (tmp_path / "other").read_bytes() == bytes(LSA_SIZE)
    # a partial write lands where it was asked and nowhere else
    (tmp_path / "patch").write_bytes(b"\x5a" * 300)
    cxl(ct, "write-labels", "-i", str(tmp_path / "patch"), "-O", "4090", "-s", "300", "mem1")
    cxl(ct, "read-labels", "-o", str(tmp_path / "patched"), "mem1")
    assert (tmp_path / "patched").read_bytes() == data[:4090] + b"\x5a" * 300 + data[4390:]
    cxl(ct, "zero-labels", "mem1")
    cxl(ct, "read-labels", "-o", str(tmp_path / "zeroed"), "mem1")
    assert (tmp_path / "zeroed").read_bytes() == bytes(LSA_SIZE)


def test_labels_past_the_label_area_fail_and_change_nothing(ct, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """mem.c's mock refuses a GET_LSA/SET_LSA beyond LSA_SIZE (EINVAL), which the ioctl
    returns; the area keeps what it had."""
    writable(ct, "mem3")
    (tmp_path / "in").write_bytes(b"\x11" * 64)
    cxl(ct, "write-labels", "-i", str(tmp_path / "in"), "-O", str(LSA_SIZE - 64), "mem3")
    res = ct.run("cxl", "write-labels", "-i", str(tmp_path / "in"), "-O", str(LSA_SIZE - 32), "-s", "64", "mem3")
    assert res.returncode != 0
    assert "Invalid argument" in res.stderr
    res = ct.run("cxl", "read-labels", "-O", str(LSA_SIZE - 32), "-s", "64", "-o", str(tmp_path / "x"), "mem3")
    assert res.returncode != 0
    cxl(ct, "read-labels", "-O", str(LSA_SIZE - 64), "-s", "64", "-o", str(tmp_path / "tail"), "mem3")
    assert (tmp_path / "tail").read_bytes() == b"\x11" * 64


def test_labels_survive_a_cxl_disable_and_enable_of_the_memdev(ct, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The label area is the device's: unbinding cxl_mem from the memdev (cxl disable-memdev)
    leaves it, and the mailbox still answers in between, as the kernel's does."""
    writable(ct, "mem4")
    (tmp_path / "in").write_bytes(b"label" * 100)
    cxl(ct, "write-labels", "-i", str(tmp_path / "in"), "-s", "500", "mem4")
    cxl(ct, "disable-memdev", "--force", "mem4")
    cxl(ct, "read-labels", "-s", "500", "-o", str(tmp_path / "while"), "mem4")
    cxl(ct, "enable-memdev", "mem4")
    cxl(ct, "read-labels", "-s", "500", "-o", str(tmp_path / "after"), "mem4")
    assert (tmp_path / "while").read_bytes() == (tmp_path / "after").read_bytes() == b"label" * 100


def test_health_and_partition_info_are_mem_c_s(ct) -> None:  # type: ignore[no-untyped-def]
    """`cxl list -H -I` asks each memdev's mailbox (GET_HEALTH_INFO, GET_PARTITION_INFO) and
    shows what mem.c's mock answers."""
    res = ct.run("cxl", "list", "-m", "mem0", "-H", "-I")
    assert res.returncode == 0, res.stderr
    (mem0,) = json.loads(res.stdout)
    health = mem0["health"]
    assert (health["maintenance_needed"], health["media_data_lost"], health["ext_temperature"]) == (
        True, True, "critical")
    assert (health["life_used_percent"], health["temperature"], health["dirty_shutdowns"]) == (15, 25, 10)
    assert (health["volatile_errors"], health["pmem_errors"]) == (20, 30)
    info = mem0["partition_info"]
    assert (info["total_size"], info["partition_alignment_size"]) == (2 << 30, 256 << 20)
    assert (info["active_volatile_size"], info["active_persistent_size"]) == (1 << 30, 1 << 30)
