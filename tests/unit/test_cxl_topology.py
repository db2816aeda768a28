"""The cxl_test topology as /sys shows it (no FUSE): the devices tools/testing/cxl/test/cxl.c
registers, their attributes as drivers/cxl/core prints them, and what binding and unbinding
the cxl drivers does to the tree (endpoints, switch ports, decoders)."""

from __future__ import annotations

import errno
import posixpath

import pytest

from vnvdimm.model.cxl import CxlMemdev, CxlPort
from vnvdimm.model.system import System
from vnvdimm.sysfs.kernfs import KAttr, KDir, KLink
from vnvdimm.sysfs.tree import Tree
from vnvdimm.topology import cxl_test

GiB = 1 << 30


@pytest.fixture
def tree() -> Tree:
    system = System()
    cxl_test.build(system)
    return Tree(system)


def real(tree: Tree, path: str) -> str:
    """The path with every link on the way followed (what the kernel's path walk does)."""
    out = "/"
    for part in path.strip("/").split("/"):
        out = posixpath.join(out, part)
        node = tree.lookup(out)
        if isinstance(node, KLink):
            out = posixpath.normpath(posixpath.join(posixpath.dirname(out), node.target))
    return out


def read(tree: Tree, path: str) -> str:
    node = tree.lookup(real(tree, path))
    assert isinstance(node, KAttr), path
    return node.attr.show()  # type: ignore[misc]


def write(tree: Tree, path: str, data: bytes) -> None:
    node = tree.lookup(real(tree, path))
    assert isinstance(node, KAttr), path
    tree.store(node, data)


def devices(tree: Tree, prefix: str) -> list[str]:
    node = tree.lookup("/sys/bus/cxl/devices")
    assert isinstance(node, KDir)
    return sorted(n for n in node.children if n.startswith(prefix))


def resolve(tree: Tree, path: str) -> str:
    assert isinstance(tree.lookup(real(tree, posixpath.dirname(path)) + "/" + posixpath.basename(path)), KLink), path
    return real(tree, path)


def test_the_module_registers_cxl_tests_devices(tree: Tree) -> None:
    assert devices(tree, "root") == ["root0"]
    assert devices(tree, "mem") == [f"mem{i}" for i in range(10)]
    assert len(devices(tree, "endpoint")) == 10
    # 3 host-bridge ports + 5 switch ports
    assert len(devices(tree, "port")) == 8
    assert resolve(tree, "/sys/bus/cxl/devices/root0") == "/sys/devices/platform/cxl_acpi.0/root0"
    assert resolve(tree, "/sys/bus/cxl/devices/root0/uport") == "/sys/devices/platform/cxl_acpi.0"
    assert [resolve(tree, f"/sys/bus/cxl/devices/root0/dport{i}") for i in range(3)] == [
        f"/sys/devices/platform/cxl_host_bridge.{i}" for i in range(3)]
    # mem0 below the first switch dport of host bridge 0, as cxl_mem_init() parents it
    assert resolve(tree, "/sys/bus/cxl/devices/mem0") == (
        "/sys/devices/platform/cxl_host_bridge.0/cxl_root_port.0/cxl_switch_uport.0/cxl_switch_dport.0/cxl_mem.0/mem0")
    assert resolve(tree, "/sys/bus/cxl/devices/mem8").startswith(
        "/sys/devices/platform/cxl_host_bridge.2/cxl_root_port.4/cxl_switch_uport.4/cxl_switch_dport.8/")


def test_memdev_attributes_are_mem_c_s(tree: Tree) -> None:
    base = "/sys/bus/cxl/devices/mem3"
    assert read(tree, f"{base}/serial") == "0x3\n"
    assert read(tree, f"{base}/firmware_version") == "mock fw v1 \n"
    assert read(tree, f"{base}/ram/size") == f"{GiB:#x}\n"
    assert read(tree, f"{base}/pmem/size") == f"{GiB:#x}\n"
    assert read(tree, f"{base}/label_storage_size") == "131072\n"
    assert read(tree, f"{base}/payload_max") == "4096\n"
    assert read(tree, f"{base}/numa_node") == "1\n"
    assert read(tree, f"{base}/devtype") == "cxl_memdev\n"
    assert read(tree, f"{base}/modalias") == "cxl:t5\n"
    assert resolve(tree, f"{base}/driver") == "/sys/bus/cxl/drivers/cxl_mem"
    assert tree.lookup("/dev/cxl/mem3") is not None


def test_root_decoders_are_the_cfmws_windows(tree: Tree) -> None:
    got = []
    for i in range(5):
        d = f"/sys/bus/cxl/devices/decoder0.{i}"
        got.append((int(read(tree, f"{d}/size"), 16), read(tree, f"{d}/cap_ram").strip(),
                    read(tree, f"{d}/cap_pmem").strip(), read(tree, f"{d}/target_list").strip(),
                    read(tree, f"{d}/interleave_ways").strip(), read(tree, f"{d}/interleave_granularity").strip()))
    assert got == [
        (GiB, "1", "0", "0", "1", "4096"),
        (2 * GiB, "1", "0", "0,1", "2", "4096"),
        (GiB, "0", "1", "0", "1", "4096"),
        (2 * GiB, "0", "1", "0,1", "2", "4096"),
        (GiB, "0", "1", "2", "1", "4096"),
    ]
    starts = [int(read(tree, f"/sys/bus/cxl/devices/decoder0.{i}/start"), 16) for i in range(5)]
    assert all(s % (256 << 20) == 0 for s in starts) and starts == sorted(starts)
    assert read(tree, "/sys/bus/cxl/devices/decoder0.0/devtype") == "cxl_decoder_root\n"


def test_endpoint_decoders_start_empty(tree: Tree) -> None:
    ep = devices(tree, "endpoint")[0]
    port_id = ep.removeprefix("endpoint")
    d = f"/sys/bus/cxl/devices/{ep}/decoder{port_id}.0"
    assert read(tree, f"{d}/mode") == "none\n"
    assert read(tree, f"{d}/dpa_size") == "0x0000000000000000\n"  # "%pa"
    assert read(tree, f"{d}/size") == "0\n"  # "%#llx" of 0
    assert read(tree, "/sys/bus/cxl/devices/mem0/serial") == "0\n"
    assert read(tree, f"{d}/devtype") == "cxl_decoder_endpoint\n"
    assert len([n for n in devices(tree, "decoder") if n.startswith(f"decoder{port_id}.")]) == 8


def switch_of(tree: Tree, memdev: str) -> CxlPort:
    mem = next(d for d in tree.system.all_devices() if isinstance(d, CxlMemdev) and d.name == memdev)
    assert mem.endpoint is not None and mem.endpoint.parent_port is not None
    return mem.endpoint.parent_port


def test_disabling_both_memdevs_of_a_switch_takes_the_switch_away(tree: Tree) -> None:
    switch = switch_of(tree, "mem0").name
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/unbind", b"mem0")
    assert switch in devices(tree, "port")
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/unbind", b"mem4")
    assert switch not in devices(tree, "port")
    assert len(devices(tree, "endpoint")) == 8
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/bind", b"mem0")
    assert resolve(tree, "/sys/bus/cxl/devices/mem0/driver") == "/sys/bus/cxl/drivers/cxl_mem"
    assert switch_of(tree, "mem0").uport.name == "cxl_switch_uport.0"


def test_disabling_a_host_bridge_port_detaches_its_memdevs(tree: Tree) -> None:
    write(tree, "/sys/bus/cxl/drivers/cxl_port/unbind", b"port1")
    names = [f"mem{i}" for i in range(10)]
    unbound = [m for m in names if tree.lookup(real(tree, f"/sys/bus/cxl/devices/{m}") + "/driver") is None]
    assert unbound == ["mem0", "mem2", "mem4", "mem6"]
    # a memdev below a disabled port cannot be enabled (cxl_mem_probe(): -ENXIO)
    with pytest.raises(OSError) as e:
        write(tree, "/sys/bus/cxl/drivers/cxl_mem/bind", b"mem0")
    assert e.value.errno == errno.ENXIO
    write(tree, "/sys/bus/cxl/drivers/cxl_port/bind", b"port1")
    write(tree, "/sys/bus/cxl/drivers/cxl_mem/bind", b"mem0")
    assert resolve(tree, "/sys/bus/cxl/devices/mem0/driver") == "/sys/bus/cxl/drivers/cxl_mem"


def test_unbinding_cxl_acpi_removes_the_root(tree: Tree) -> None:
    write(tree, "/sys/bus/platform/drivers/cxl_acpi/unbind", b"cxl_acpi.0")
    assert devices(tree, "root") == [] and devices(tree, "port") == [] and devices(tree, "decoder") == []
    assert devices(tree, "mem") == [f"mem{i}" for i in range(10)]  # memdevs stay, unbound
    write(tree, "/sys/bus/platform/drivers/cxl_acpi/bind", b"cxl_acpi.0")
    assert devices(tree, "root") == ["root0"] and len(devices(tree, "port")) == 3


def test_module_remove_and_load(tree: Tree) -> None:
    system = tree.system
    cxl_test.remove(system, system.cxl_topologies[0])
    assert tree.lookup("/sys/bus/cxl/devices/mem0") is None
    assert tree.lookup("/sys/devices/platform/cxl_acpi.0") is None
    assert tree.lookup("/dev/cxl/mem0") is None
    cxl_test.build(system)
    assert devices(tree, "mem") == [f"mem{i}" for i in range(10)]
    assert devices(tree, "root") == ["root0"]


def test_the_cxl_bus_has_its_flush_attribute(tree: Tree) -> None:
    write(tree, "/sys/bus/cxl/flush", b"1\n")
    with pytest.raises(OSError) as e:
        write(tree, "/sys/bus/cxl/flush", b"2")
    assert e.value.errno == errno.EINVAL
