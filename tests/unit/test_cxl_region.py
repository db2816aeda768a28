"""CXL regions and DPA through sysfs (no FUSE), with the CXL core's checks: hdm.c's DPA rules
on endpoint decoders, region.c's geometry, attach, position, commit and delete rules."""

from __future__ import annotations

import errno
import uuid

import pytest
from test_cxl_topology import read, real, write

from vnvdimm.model.cxl import CxlDecoder, CxlMemdev
from vnvdimm.model.system import System
from vnvdimm.sysfs.tree import Tree
from vnvdimm.topology import cxl_test

SZ_256M = 256 << 20
DEV = "/sys/bus/cxl/devices"


@pytest.fixture
def tree() -> Tree:
    system = System()
    cxl_test.build(system)
    return Tree(system)


def memdev(tree: Tree, name: str) -> CxlMemdev:
    return next(d for d in tree.system.all_devices() if isinstance(d, CxlMemdev) and d.name == name)


def ep_decoder(tree: Tree, mem: str, index: int = 0) -> str:
    endpoint = memdev(tree, mem).endpoint
    assert endpoint is not None
    return endpoint.decoders[index].name


def errno_of(tree: Tree, path: str, data: bytes) -> int | None:
    try:
        write(tree, path, data)
    except OSError as e:
        return e.errno
    return None


def reserve(tree: Tree, mem: str, size: int = SZ_256M, mode: bytes = b"pmem", index: int = 0) -> str:
    d = ep_decoder(tree, mem, index)
    write(tree, f"{DEV}/{d}/mode", mode)
    write(tree, f"{DEV}/{d}/dpa_size", str(size).encode())
    return d


def test_dpa_reservation_follows_hdm_c(tree: Tree) -> None:
    d0, d1 = ep_decoder(tree, "mem0", 0), ep_decoder(tree, "mem0", 1)
    assert errno_of(tree, f"{DEV}/{d0}/mode", b"flash") == errno.EINVAL
    assert errno_of(tree, f"{DEV}/{d0}/dpa_size", str(SZ_256M).encode()) == errno.EINVAL  # no mode yet
    write(tree, f"{DEV}/{d1}/mode", b"pmem")
    assert errno_of(tree, f"{DEV}/{d1}/dpa_size", str(SZ_256M).encode()) == errno.EBUSY  # decoder order
    write(tree, f"{DEV}/{d0}/mode", b"pmem")
    assert errno_of(tree, f"{DEV}/{d0}/dpa_size", b"4096") == errno.EINVAL  # 256 MiB aligned
    assert errno_of(tree, f"{DEV}/{d0}/dpa_size", str(2 << 30).encode()) == errno.ENOSPC  # 1 GiB of pmem
    write(tree, f"{DEV}/{d0}/dpa_size", str(SZ_256M).encode())
    # pmem starts after the 1 GiB ram partition
    assert (read(tree, f"{DEV}/{d0}/dpa_resource"), read(tree, f"{DEV}/{d0}/dpa_size")) == ("0x40000000\n",
                                                                                            "0x0000000010000000\n")
    assert errno_of(tree, f"{DEV}/{d0}/mode", b"ram") == errno.EBUSY  # has DPA
    write(tree, f"{DEV}/{d1}/dpa_size", str(SZ_256M).encode())
    assert read(tree, f"{DEV}/{d1}/dpa_resource") == "0x50000000\n"
    assert errno_of(tree, f"{DEV}/{d0}/dpa_size", b"0") == errno.EBUSY  # freed in reverse order only
    write(tree, f"{DEV}/{d1}/dpa_size", b"0")
    write(tree, f"{DEV}/{d0}/dpa_size", b"0")
    assert read(tree, f"{DEV}/{d0}/dpa_size") == "0x0000000000000000\n"  # "%pa"


def make_region(tree: Tree, root: str = "decoder0.2") -> str:
    name = read(tree, f"{DEV}/{root}/create_pmem_region").strip()
    write(tree, f"{DEV}/{root}/create_pmem_region", name.encode())
    return name


def test_create_region_takes_the_advertised_name_only(tree: Tree) -> None:
    root = f"{DEV}/decoder0.2"
    name = read(tree, f"{root}/create_pmem_region").strip()
    assert errno_of(tree, f"{root}/create_pmem_region", b"region999") == errno.EBUSY
    assert errno_of(tree, f"{root}/create_pmem_region", b"bogus") == errno.EINVAL
    write(tree, f"{root}/create_pmem_region", name.encode())
    assert read(tree, f"{root}/create_pmem_region").strip() != name
    assert real(tree, f"{DEV}/{name}").endswith(f"/root0/decoder0.2/{name}")
    assert read(tree, f"{DEV}/{name}/mode") == "pmem\n"
    assert read(tree, f"{DEV}/{name}/size") == "0\n"  # "%#llx" of 0
    assert read(tree, f"{DEV}/{name}/resource") == "0xffffffffffffffff\n"  # no HPA yet
    assert tree.lookup(real(tree, f"{DEV}/decoder0.0") + "/create_pmem_region") is None  # a ram window
    assert errno_of(tree, f"{root}/delete_region", b"region999") == errno.ENODEV
    write(tree, f"{root}/delete_region", name.encode())
    assert tree.lookup(f"{DEV}/{name}") is None


def test_region_geometry_rules(tree: Tree) -> None:
    r = make_region(tree, "decoder0.3")  # x2 across host bridges 0 and 1, 4 KiB
    base = f"{DEV}/{r}"
    assert errno_of(tree, f"{base}/interleave_ways", b"5") == errno.EINVAL
    assert errno_of(tree, f"{base}/interleave_ways", b"1") == errno.EINVAL  # not a multiple of the root's 2
    write(tree, f"{base}/interleave_ways", b"2")
    assert errno_of(tree, f"{base}/interleave_granularity", b"1000") == errno.EINVAL
    assert errno_of(tree, f"{base}/interleave_granularity", b"256") == errno.EINVAL  # root interleaves at 4096
    write(tree, f"{base}/interleave_granularity", b"4096")
    assert errno_of(tree, f"{base}/size", str(2 * SZ_256M).encode()) == errno.ENXIO  # uuid first
    assert errno_of(tree, f"{base}/uuid", b"not-a-uuid") == errno.EINVAL
    write(tree, f"{base}/uuid", str(uuid.uuid4()).encode() + b"\n")
    assert errno_of(tree, f"{base}/size", str(SZ_256M).encode()) == errno.EINVAL  # 256 MiB x ways
    assert errno_of(tree, f"{base}/size", str(8 * SZ_256M + 2 * SZ_256M).encode()) == errno.ENOSPC
    write(tree, f"{base}/size", str(2 * SZ_256M).encode())
    assert errno_of(tree, f"{base}/interleave_ways", b"4") == errno.EBUSY  # sized
    assert int(read(tree, f"{base}/resource"), 16) == int(read(tree, f"{DEV}/decoder0.3/start"), 16)


def test_attach_positions_commit_and_teardown(tree: Tree) -> None:
    r = make_region(tree, "decoder0.3")
    base = f"{DEV}/{r}"
    write(tree, f"{base}/uuid", str(uuid.uuid4()).encode())
    write(tree, f"{base}/interleave_ways", b"2")
    write(tree, f"{base}/interleave_granularity", b"4096")
    write(tree, f"{base}/size", str(2 * SZ_256M).encode())
    e0, e1 = reserve(tree, "mem0"), reserve(tree, "mem1")  # host bridge 0, host bridge 1
    assert errno_of(tree, f"{base}/target0", e1.encode()) == errno.ENXIO  # position 0 is host bridge 0's
    assert errno_of(tree, f"{base}/target0", b"decoder0.0") == errno.EINVAL  # no endpoint decoder
    assert errno_of(tree, f"{base}/target0", b"decoder77.0") == errno.ENODEV
    write(tree, f"{base}/target0", e0.encode())
    assert errno_of(tree, f"{base}/commit", b"1") == errno.ENXIO  # not all targets yet
    write(tree, f"{base}/target1", e1.encode())
    assert read(tree, f"{DEV}/{e0}/region") == f"{r}\n"
    assert read(tree, f"{DEV}/{e0}/interleave_ways") == "2\n"
    assert read(tree, f"{DEV}/{e0}/start") == read(tree, f"{base}/resource")
    # the host bridges' and switches' decoders: x1 each, granularity 4096 x 2
    switch_decoders = [d for d in tree.system.all_devices() if isinstance(d, CxlDecoder) and d.kind == "switch"
                       and d.region is not None]
    assert len(switch_decoders) == 4
    assert {(d.interleave_ways, d.interleave_granularity) for d in switch_decoders} == {(1, 8192)}
    assert errno_of(tree, f"{DEV}/{e0}/dpa_size", b"0") == errno.EBUSY  # in a region
    write(tree, f"{base}/commit", b"1")
    assert read(tree, f"{base}/commit") == "1\n"
    port = memdev(tree, "mem0").endpoint
    assert port is not None and read(tree, real(tree, f"{DEV}/{port.name}") + "/decoders_committed") == "1\n"
    write(tree, "/sys/bus/cxl/drivers/cxl_region/bind", r.encode())
    assert real(tree, f"{base}/driver") == "/sys/bus/cxl/drivers/cxl_region"
    write(tree, f"{base}/commit", b"0")
    assert tree.lookup(real(tree, base) + "/driver") is None  # decommit unbinds the region
    write(tree, f"{base}/target0", b"\n")
    assert read(tree, f"{DEV}/{e0}/region") == "\n"
    write(tree, f"{DEV}/decoder0.3/delete_region", r.encode())
    assert read(tree, f"{DEV}/{e1}/region") == "\n"
    assert not any(isinstance(d, CxlDecoder) and d.region is not None for d in tree.system.all_devices())


def test_a_region_refuses_uncommitted_binding_and_disabled_memdevs_leave_it(tree: Tree) -> None:
    r = make_region(tree, "decoder0.2")  # x1 on host bridge 0
    base = f"{DEV}/{r}"
    write(tree, f"{base}/uuid", str(uuid.uuid4()).encode())
    write(tree, f"{base}/interleave_ways", b"1")
    write(tree, f"{base}/interleave_granularity", b"4096")
    write(tree, f"{base}/size", str(SZ_256M).encode())
    assert errno_of(tree, "/sys/bus/cxl/drivers/cxl_region/bind", r.encode()) == errno.ENXIO
    e0 = reserve(tree, "mem0")
    write(tree, f"{base}/target0", e0.encode())
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/unbind", b"mem0")
    assert read(tree, f"{base}/target0") == "\n"


def x8_region(tree: Tree, order: list[str]) -> tuple[str, list[str]]:
    r = make_region(tree, "decoder0.3")
    base = f"{DEV}/{r}"
    write(tree, f"{base}/uuid", str(uuid.uuid4()).encode())
    write(tree, f"{base}/interleave_ways", b"8")
    write(tree, f"{base}/interleave_granularity", b"4096")
    write(tree, f"{base}/size", str(8 * SZ_256M).encode())
    return r, [reserve(tree, mem) for mem in order]


def test_x8_positions_must_be_routable(tree: Tree) -> None:
    # memN hangs below root port N % 4 of host bridge N % 2: the root alternates host bridges,
    # each host bridge its two root ports, each switch its two memdevs
    r, eps = x8_region(tree, [f"mem{i}" for i in (0, 1, 4, 3, 2, 5, 6, 7)])
    for pos, ep in enumerate(eps[:7]):
        write(tree, f"{DEV}/{r}/target{pos}", ep.encode())
    # mem4 at position 2 shares root port 0 with mem0 at position 0, closer than the distance
    # (4) at which host bridge 0 may reuse a root port: check_last_peer() refuses it
    assert errno_of(tree, f"{DEV}/{r}/target7", eps[7].encode()) == errno.ENXIO
    assert read(tree, f"{DEV}/{r}/target7") == "\n"
    write(tree, f"{DEV}/decoder0.3/delete_region", r.encode())


def test_x8_in_routable_order_programs_every_level(tree: Tree) -> None:
    r, eps = x8_region(tree, [f"mem{i}" for i in range(8)])
    for pos, ep in enumerate(eps):
        write(tree, f"{DEV}/{r}/target{pos}", ep.encode())
    switch = [d for d in tree.system.all_devices() if isinstance(d, CxlDecoder) and d.kind == "switch"
              and d.region is not None]
    # 2 host bridges (ig 8192) and 4 switches (ig 16384), each x2, as cxl-region-sysfs.sh checks
    assert sorted((d.port.kind, d.interleave_ways, d.interleave_granularity) for d in switch) == sorted(
        [("host_bridge", 2, 8192)] * 2 + [("switch", 2, 16384)] * 4)
    write(tree, f"{DEV}/{r}/commit", b"1")
    assert read(tree, f"{DEV}/{r}/commit") == "1\n"
