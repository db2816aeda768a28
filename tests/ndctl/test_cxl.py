"""template = "cxl_test": Debian's `cxl` (ndctl 76.1) lists the topology of the kernel's
cxl_test module field by field as tools/testing/cxl/test/cxl.c and mem.c make it (and as
ndctl's own cxl-topology.sh asserts it), its disable/enable commands change it as the CXL core
does, and `modprobe -r cxl_test; modprobe cxl_test` resets it. nfit_test's buses are there too."""

from __future__ import annotations

import json

import pytest
from mount_kit import have_ndctl

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl")]

GiB = 1 << 30
CXL_TEST = 'template = "cxl_test"\n[memmap]\nworkers = 1\n'


@pytest.fixture
def ct(make_mount):  # type: ignore[no-untyped-def]
    return make_mount(CXL_TEST)


def cxl(m, *args: str) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    res = m.run("cxl", *args)
    assert res.returncode == 0, f"cxl {' '.join(args)}: rc {res.returncode}: {res.stderr}"
    return json.loads(res.stdout) if res.stdout.strip() else []


def test_cxl_list_shows_cxl_tests_topology(ct) -> None:  # type: ignore[no-untyped-def]
    buses = cxl(ct, "list", "-B")
    assert buses == [{"bus": "root0", "provider": "cxl_test"}]

    memdevs = sorted(cxl(ct, "list", "-M", "-b", "cxl_test"), key=lambda m: int(str(m["memdev"])[3:]))
    assert memdevs == [{"memdev": f"mem{i}", "pmem_size": GiB, "ram_size": GiB, "serial": i, "numa_node": i % 2,
                        "host": f"cxl_mem.{i}"} for i in range(10)]

    # three host bridges below root0: two with two root ports, one with one
    ports = cxl(ct, "list", "-b", "cxl_test", "-BPT")[0]["ports:root0"]
    hosts = sorted((p["host"], p["nr_dports"]) for p in ports)  # type: ignore[union-attr,index]
    assert hosts == [("cxl_host_bridge.0", 2), ("cxl_host_bridge.1", 2), ("cxl_host_bridge.2", 1)]

    # the root decoders: the CFMWS windows of cxl.c (modulo arithmetic)
    decoders = sorted(cxl(ct, "list", "-b", "cxl_test", "-D", "-d", "root"), key=lambda d: str(d["decoder"]))
    shape = [(d["decoder"], d["size"], d["interleave_ways"], d["nr_targets"], d.get("volatile_capable", False),
              d.get("pmem_capable", False)) for d in decoders]
    assert shape == [
        ("decoder0.0", GiB, 1, 1, True, False),
        ("decoder0.1", 2 * GiB, 2, 2, True, False),
        ("decoder0.2", GiB, 1, 1, False, True),
        ("decoder0.3", 2 * GiB, 2, 2, False, True),
        ("decoder0.4", GiB, 1, 1, False, True),
    ]
    assert decoders[1]["interleave_granularity"] == 4096
    assert all(d["max_available_extent"] == d["size"] for d in decoders)  # no region yet

    # every memdev has an endpoint below a switch below a host bridge (depth 3)
    endpoints = cxl(ct, "list", "-E")
    assert sorted(e["host"] for e in endpoints) == sorted(f"mem{i}" for i in range(10))  # type: ignore[type-var]
    assert {e["depth"] for e in endpoints} == {3}


def test_disable_memdev_and_port_as_the_cxl_core_does(ct) -> None:  # type: ignore[no-untyped-def]
    sw = next(p for p in cxl(ct, "list", "-P", "-p", "root0")[0]["ports:root0"]  # type: ignore[index,union-attr]
              if p["host"] == "cxl_host_bridge.0")
    (s,) = [p for p in cxl(ct, "list", "-P", "-p", str(sw["port"]))[0][f"ports:{sw['port']}"]  # type: ignore[index]
            if p["host"] == "cxl_switch_uport.0"]
    assert sorted(m["memdev"] for m in cxl(ct, "list", "-M", "-p", s["port"])) == ["mem0", "mem4"]
    cxl(ct, "disable-memdev", "mem0", "--force")
    assert len(cxl(ct, "list", "-p", s["port"])) == 1
    cxl(ct, "disable-memdev", "mem4", "--force")
    assert cxl(ct, "list", "-p", s["port"]) == []  # the switch went with its last endpoint
    cxl(ct, "enable-memdev", "mem0", "mem4")
    assert len(cxl(ct, "list", "-p", s["port"])) == 1

    # a host bridge disabled: its four memdevs are disabled, enable-port -m brings them back
    cxl(ct, "disable-port", str(sw["port"]), "-f")
    disabled = cxl(ct, "list", "-M", "-i", "-p", str(sw["port"]))
    assert sorted(m["memdev"] for m in disabled if m.get("state") == "disabled") == ["mem0", "mem2", "mem4", "mem6"]
    cxl(ct, "enable-port", str(sw["port"]), "-m")
    assert len(cxl(ct, "list", "-M", "-p", str(sw["port"]))) == 4


def test_modprobe_resets_cxl_test(ct) -> None:  # type: ignore[no-untyped-def]
    cxl(ct, "disable-memdev", "mem1", "--force")
    res = ct.run("sh", "-c", "modprobe -r cxl_test && test ! -e /sys/bus/cxl/devices/mem1 && modprobe cxl_test")
    assert res.returncode == 0, res.stderr
    assert len(cxl(ct, "list", "-M")) == 10  # every memdev enabled again
    # nfit_test's buses are on the same platform
    assert {b["provider"] for b in json.loads(ct.run("ndctl", "list", "-B").stdout)} >= {"nfit_test.0", "nfit_test.1"}


def test_create_and_destroy_region_as_cxl_lists_it(ct) -> None:  # type: ignore[no-untyped-def]
    (root,) = [d for d in cxl(ct, "list", "-D", "-d", "root") if d["decoder"] == "decoder0.3"]
    region = cxl(ct, "create-region", "-d", "decoder0.3", "-m", "mem0", "mem1", "-s", "512M")
    assert isinstance(region, dict)
    name = region["region"]
    assert {k: v for k, v in region.items() if k not in ("region", "mappings")} == {
        "resource": root["resource"], "size": 512 << 20, "interleave_ways": 2, "interleave_granularity": 4096,
        "decode_state": "commit"}
    # the root alternates host bridges: mem0 (host bridge 0) at 0, mem1 (host bridge 1) at 1
    assert sorted((m["position"], m["memdev"]) for m in region["mappings"]) == [(0, "mem0"), (1, "mem1")]
    (listed,) = cxl(ct, "list", "-R")
    assert listed["region"] == name and listed["size"] == 512 << 20
    # every host bridge and switch on the way gave the region a decoder: x1, 4096 x 2
    switch = cxl(ct, "list", "-D", "-r", str(name), "-d", "switch")
    assert len(switch) == 4
    assert {(d["interleave_ways"], d["size"]) for d in switch} == {(1, 512 << 20)}
    assert {ct.read(f"sys/bus/cxl/devices/{d['decoder']}/interleave_granularity").strip() for d in switch} == {"8192"}
    endpoints = cxl(ct, "list", "-D", "-r", str(name), "-d", "endpoint")
    assert sorted((d["mode"], d["dpa_size"]) for d in endpoints) == [("pmem", 256 << 20)] * 2
    res = ct.run("cxl", "destroy-region", "-f", str(name))
    assert res.returncode == 0, res.stderr
    assert cxl(ct, "list", "-R") == []
    # the window is whole again
    (root,) = [d for d in cxl(ct, "list", "-D", "-d", "root") if d["decoder"] == "decoder0.3"]
    assert root["max_available_extent"] == root["size"]
