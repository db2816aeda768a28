"""The /sys and /dev trees built from the model, without a mount: relative symlinks that
resolve inside the tree, the kernel's layout (class, bus, dev/char, module), the attribute
modes of the kernel's DEVICE_ATTR_* declarations, and rebuilds when the model changes."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pytest
from model_kit import E820_FOUR, NFIT_TWO, machine

from vnvdimm.sysfs.kernfs import KAttr, KBin, KDir, KLink
from vnvdimm.sysfs.tree import KChar, KDevFile, Tree

BUS = "/sys/devices/platform/e820_pmem/ndbus0"
NFIT_BUS = "/sys/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0012:00/ndbus0"


@pytest.fixture(params=["e820", "nfit"])
def tree(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    with machine(tmp_path, NFIT_TWO if request.param == "nfit" else E820_FOUR) as m:
        yield Tree(m.sys), m


def resolve(nodes: dict, path: str, depth: int = 0) -> str:  # type: ignore[type-arg]
    """Follow links (relative ones from their directory) the way path resolution does."""
    parts = path.strip("/").split("/")
    cur = ""
    for i, part in enumerate(parts):
        cur = posixpath.normpath(f"{cur}/{part}")
        node = nodes.get(cur)
        if isinstance(node, KLink) and (i < len(parts) - 1 or depth == 0):
            assert depth < 40, path
            target = node.target
            cur = resolve(nodes, target if target.startswith("/") else posixpath.join(posixpath.dirname(cur), target),
                          depth + 1)
    return cur


def test_every_sys_link_is_relative_and_resolves_inside_the_tree(tree) -> None:  # type: ignore[no-untyped-def]
    t, _ = tree
    nodes = t.snapshot().nodes
    links = {p: n.target for p, n in nodes.items() if isinstance(n, KLink) and p.startswith("/sys/")}
    assert len(links) > 50
    for path, target in links.items():
        assert not target.startswith("/"), (path, target)
        real = resolve(nodes, path)
        assert real.startswith("/sys/"), (path, real)
        assert isinstance(nodes.get(real), KDir), (path, target, real)


def test_layout(tree) -> None:  # type: ignore[no-untyped-def]
    t, m = tree
    nodes = t.snapshot().nodes
    bus = NFIT_BUS if m.platform.template == "nfit" else BUS
    assert nodes["/sys/class/nd/ndctl0"].target == posixpath.relpath(f"{bus}/ndctl0", "/sys/class/nd")
    assert resolve(nodes, "/sys/dev/char/240:0") == f"{bus}/ndctl0"
    assert resolve(nodes, "/sys/dev/char/240:0/device") == bus
    assert resolve(nodes, f"{bus}/ndctl0/device") == bus
    assert resolve(nodes, f"{bus}/region0/driver") == "/sys/bus/nd/drivers/nd_region"
    assert resolve(nodes, f"{bus}/region0/subsystem") == "/sys/bus/nd"
    nd_devices = sorted(k.rsplit("/", 1)[1] for k in nodes if k.startswith("/sys/bus/nd/devices/"))
    assert nd_devices == sorted(d.name for d in m.sys.bus_devices("nd"))
    for name in nd_devices:
        real = resolve(nodes, f"/sys/bus/nd/devices/{name}")
        assert real.startswith(bus) and real.endswith(f"/{name}")
    for drv in ("nd_bus", "nvdimm", "nd_region", "nd_pmem", "dax_pmem"):
        assert {"bind", "unbind", "uevent", "module"} <= set(nodes[f"/sys/bus/nd/drivers/{drv}"].children)
    for drv in ("device_dax", "kmem"):
        assert {"bind", "unbind", "new_id", "remove_id"} <= set(nodes[f"/sys/bus/dax/drivers/{drv}"].children)
    # a driver dir links the devices bound to it
    pmem_bound = sorted(c for c, n in nodes["/sys/bus/nd/drivers/nd_pmem"].children.items()
                        if isinstance(n, KLink) and c != "module")
    assert pmem_bound == sorted(d.name for d in m.sys.bus_devices("nd") if d.driver and d.driver.name == "nd_pmem")
    for mod in ("libnvdimm", "nd_pmem", "nd_btt", "nd_e820", "dax", "dax_pmem", "device_dax", "kmem"):
        assert isinstance(nodes[f"/sys/module/{mod}/initstate"], KAttr)


def test_block_and_dax_devices(tmp_path: Path) -> None:
    with machine(tmp_path) as m:
        nodes = Tree(m.sys).snapshot().nodes
        for disk, parent in (("pmem0", "region0/pfn0.1"), ("pmem2", "region2/namespace2.0"),
                             ("pmem3s", "region3/btt3.1")):
            path = f"{BUS}/{parent}/block/{disk}"
            assert isinstance(nodes[path], KDir)
            major, minor = m.dev(disk).devt  # type: ignore[attr-defined]
            assert major == 259
            assert resolve(nodes, f"/sys/dev/block/{major}:{minor}") == path
            assert resolve(nodes, f"/sys/block/{disk}") == path
            assert resolve(nodes, f"/sys/class/block/{disk}") == path
            assert isinstance(nodes[f"/dev/{disk}"], KDevFile)
        instance = f"{BUS}/region1/dax1.1/dax1.0"
        assert resolve(nodes, "/sys/bus/dax/devices/dax1.0") == instance
        assert resolve(nodes, "/sys/dev/char/242:0") == instance
        assert resolve(nodes, f"{instance}/subsystem") == "/sys/bus/dax"
        assert resolve(nodes, f"{instance}/driver") == "/sys/bus/dax/drivers/device_dax"
        assert isinstance(nodes["/dev/dax1.0"], KDevFile)


def test_dev(tmp_path: Path) -> None:
    with machine(tmp_path) as m:
        nodes = Tree(m.sys).snapshot().nodes
        devs = nodes["/dev"].children
        assert set(devs) == {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "fd", "stdin", "stdout",
                             "stderr", "pts", "shm", "ndctl0", "pmem0", "pmem2", "pmem3s", "dax1.0"}
        expected = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
                    "tty": (5, 0), "ptmx": (5, 2)}
        for name, rdev in expected.items():
            assert isinstance(devs[name], KChar) and devs[name].rdev == rdev
        assert {n: devs[n].target for n in ("fd", "stdin", "stdout", "stderr")} == {
            "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
            "stderr": "/proc/self/fd/2"}
        assert isinstance(devs["pts"], KDir) and isinstance(devs["shm"], KDir)
        sizes = {n: devs[n].data.size for n in ("pmem0", "pmem2", "pmem3s", "dax1.0")}
        assert sizes == {"pmem0": 62 << 20, "pmem2": 64 << 20, "pmem3s": int(m.read("btt3.1/size")),
                         "dax1.0": 62 << 20}


# The kernel's modes (DEVICE_ATTR_RO/RW/WO/ADMIN_RO and the is_visible() callbacks).
MODES = {
    "region0/size": 0o444, "region0/align": 0o644, "region0/nstype": 0o444, "region0/mappings": 0o444,
    "region0/read_only": 0o644, "region0/resource": 0o400, "region0/badblocks": 0o444,
    "region0/pfn_seed": 0o444, "region0/dax_seed": 0o444, "region0/btt_seed": 0o444,
    "region0/namespace_seed": 0o444, "region0/init_namespaces": 0o444, "region0/max_available_extent": 0o444,
    "region0/numa_node": 0o444, "region0/target_node": 0o444, "region0/modalias": 0o444,
    "region0/devtype": 0o444, "region0/uevent": 0o644,
    "namespace0.0/size": 0o444, "namespace0.0/holder": 0o444, "namespace0.0/holder_class": 0o644,
    "namespace0.0/force_raw": 0o644, "namespace0.0/mode": 0o444, "namespace0.0/resource": 0o400,
    "namespace0.0/nstype": 0o444,
    "pfn0.1/mode": 0o644, "pfn0.1/uuid": 0o644, "pfn0.1/namespace": 0o644, "pfn0.1/align": 0o644,
    "pfn0.1/resource": 0o400, "pfn0.1/size": 0o444, "pfn0.1/supported_alignments": 0o444,
    "pfn0.1/memmap_state": 0o644,
    "dax1.1/dax_region/size": 0o444, "dax1.1/dax_region/align": 0o400, "dax1.1/dax_region/id": 0o444,
    "btt3.1/sector_size": 0o644, "btt3.1/uuid": 0o644, "btt3.1/namespace": 0o644, "btt3.1/size": 0o444,
    "btt3.1/log_zero_flags": 0o444,
    "daxdev/dax1.0/size": 0o444, "daxdev/dax1.0/align": 0o444, "daxdev/dax1.0/resource": 0o400,
    "daxdev/dax1.0/target_node": 0o444, "daxdev/dax1.0/modalias": 0o444, "daxdev/dax1.0/dev": 0o444,
    "daxdev/dax1.0/uevent": 0o644, "daxdev/dax1.0/mapping0/start": 0o400,
    "ndctl0/dev": 0o444, "ndbus0/provider": 0o444, "ndbus0/commands": 0o444, "ndbus0/wait_probe": 0o444,
    "drivers/nd_pmem/bind": 0o200, "drivers/nd_pmem/unbind": 0o200, "drivers/nd_pmem/uevent": 0o200,
    "dax/drivers/kmem/new_id": 0o200, "dax/drivers/kmem/remove_id": 0o200,
}
NFIT_MODES = {
    "region0/available_size": 0o444, "region0/set_cookie": 0o444, "region0/mapping0": 0o444,
    "region0/deep_flush": 0o444, "region0/persistence_domain": 0o444,
    "namespace0.0/size": 0o644, "namespace0.0/uuid": 0o644, "namespace0.0/alt_name": 0o644,
    "namespace0.0/sector_size": 0o644, "namespace0.0/dpa_extents": 0o444,
    "nmem0/dev": 0o444, "nmem0/commands": 0o444, "nmem0/nfit/handle": 0o444,
    "ndbus0/nfit/scrub": 0o644, "ndbus0/nfit/revision": 0o444,
}


def test_attribute_modes(tmp_path: Path) -> None:
    with machine(tmp_path) as m:
        got = {p: m.attr(p).mode for p in MODES}
        assert got == MODES
        for path, a in m.readable():
            assert a.mode in (0o444, 0o644, 0o400, 0o600), path
    with machine(tmp_path, NFIT_TWO, "nfit") as m:
        assert {p: m.attr(p).mode for p in NFIT_MODES} == NFIT_MODES


def test_rebuilt_when_the_model_changes_and_values_are_never_cached(tmp_path: Path) -> None:
    with machine(tmp_path) as m:
        t = Tree(m.sys)
        first = t.snapshot()
        assert t.snapshot() is first  # nothing changed: same tree
        node = t.lookup(f"{BUS}/region2/read_only")
        assert isinstance(node, KAttr) and node.show() == b"0\n"
        m.write("region2/read_only", "1")
        assert node.show() == b"1\n"  # values come from the model on every read
        assert t.snapshot() is first
        m.write("drivers/nd_pmem/unbind", "namespace2.0")
        second = t.snapshot()
        assert second is not first
        assert f"{BUS}/region2/namespace2.0/driver" not in second.nodes
        assert "/dev/pmem2" not in second.nodes
        assert isinstance(second.nodes[f"{BUS}/region2/pfn2.0/memmap/kpageflags"], KBin)


def test_a_device_dax_node_outlives_its_driver(tmp_path: Path) -> None:
    # devm_create_dev_dax() adds the device (and devtmpfs its node) when the nd dax device
    # probes; device_dax only adds the cdev: unbound, the node stays and opens fail (ENXIO)
    with machine(tmp_path) as m:
        t = Tree(m.sys)
        m.write("dax/drivers/device_dax/unbind", "dax1.0")
        node = t.lookup("/dev/dax1.0")
        assert isinstance(node, KDevFile) and node.data is None and node.rdev == (242, 0)
        m.write("dax/drivers/device_dax/bind", "dax1.0")
        node = t.lookup("/dev/dax1.0")
        assert isinstance(node, KDevFile) and node.data is not None
        m.write("drivers/dax_pmem/unbind", "dax1.1")  # the instance goes away with its nd dax device
        assert t.lookup("/dev/dax1.0") is None


def test_drivers_probe(tmp_path: Path) -> None:
    # bus.c drivers_probe_store(): ENODEV for an unknown device, else a rescan (probe
    # failures are not the writer's error)
    with machine(tmp_path) as m:
        t = Tree(m.sys)
        probe = t.lookup("/sys/bus/nd/drivers_probe")
        assert isinstance(probe, KAttr) and probe.mode == 0o200
        m.write("drivers/nd_pmem/unbind", "namespace2.0")
        assert probe.store(b"namespace2.0\n") == 13
        assert m.dev("namespace2.0").driver is not None
        assert probe.store(b"pfn2.0") == 6  # nothing binds a bare seed: still not an error
        assert m.dev("pfn2.0").driver is None
        with pytest.raises(OSError) as e:
            probe.store(b"nosuch")
        assert e.value.errno == 19
        dax_probe = t.lookup("/sys/bus/dax/drivers_probe")
        m.write("dax/drivers/device_dax/unbind", "dax1.0")
        assert isinstance(dax_probe, KAttr) and dax_probe.store(b"dax1.0") == 6
        assert m.devdax("dax1.0").driver is not None
