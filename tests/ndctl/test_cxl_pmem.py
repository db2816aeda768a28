"""template = "cxl_test", the bridge to libnvdimm (cxl_pmem): the CXL root's nvdimm bus with an
nmem per memdev, its label area the memdev's label storage, and every enabled pmem region an
nd region there, on which Debian's ndctl 76.1 creates namespaces whose memmaps the engine
initializes like any other's."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
from pathlib import Path

import pytest
from mount_kit import VNVDIMM, have_ndctl, wait_for
from test_cxl import CXL_TEST, cxl

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl")]

MiB = 1 << 20
LSA_SIZE = 128 << 10
KPF_NOPAGE = 1 << 20
# the memmap at 1 ms a page: a 64 MiB fsdax namespace takes seconds, a read's block 0.5 s
SLOW_CXL_TEST = CXL_TEST.replace("[memmap]\n", "[memmap]\nns_per_page = 1000000\n", 1)


@pytest.fixture
def ct(make_mount):  # type: ignore[no-untyped-def]
    return make_mount(CXL_TEST)


def nmem_of(m, memdev: str) -> str:  # type: ignore[no-untyped-def]
    """The nmem whose cxl/provider is the memdev's pmemN."""
    pmem = f"pmem{memdev.removeprefix('mem')}"
    dimms = m.ndctl("list", "-b", "cxl_test", "-D") or []
    (nmem,) = [d["dev"] for d in dimms if m.read(f"sys/bus/nd/devices/{d['dev']}/cxl/provider") == f"{pmem}\n"]
    return str(nmem)


def create_pmem_region(m, decoder: str, *memdevs: str, size: str) -> str:  # type: ignore[no-untyped-def]
    region = cxl(m, "create-region", "-m", "-t", "pmem", "-d", decoder, *memdevs, "-s", size)
    assert isinstance(region, dict)
    return str(region["region"])


def nd_regions(m) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    return m.ndctl("list", "-b", "cxl_test", "-R") or []  # type: ignore[no-any-return]


def test_the_cxl_root_has_an_nvdimm_bus_with_an_nmem_per_memdev(ct) -> None:  # type: ignore[no-untyped-def]
    buses = [b for b in ct.ndctl("list", "-B") if b["provider"] == "cxl_test"]
    assert len(buses) == 1
    bus = buses[0]["dev"]
    # ndbusN below nvdimm-bridge0, below the root port root0, bound to cxl_nvdimm_bridge
    bus_dir = os.path.realpath(ct.path(f"sys/bus/nd/devices/{bus}"))
    bridge_dir = os.path.realpath(ct.path("sys/bus/cxl/devices/nvdimm-bridge0"))
    assert os.path.dirname(bus_dir) == bridge_dir
    assert bridge_dir.endswith("/devices/platform/cxl_acpi.0/root0/nvdimm-bridge0")
    assert ct.read("sys/bus/cxl/devices/nvdimm-bridge0/devtype") == "cxl_nvdimm_bridge\n"
    assert os.path.basename(os.readlink(ct.path("sys/bus/cxl/devices/nvdimm-bridge0/driver"))) == "cxl_nvdimm_bridge"

    dimms = ct.ndctl("list", "-b", "cxl_test", "-D")
    assert sorted(int(d["id"]) for d in dimms) == list(range(10))  # cxl/id: the memdevs' serials
    for d in dimms:
        nmem = f"sys/bus/nd/devices/{d['dev']}"
        assert ct.read(f"{nmem}/commands") == "get_size get_data set_data \n"
        assert ct.read(f"{nmem}/flags") == "label \n"
        assert not ct.path(f"{nmem}/nfit").exists()
        # cxl/provider names the pmemN below the memdev whose serial is cxl/id
        pmem = ct.read(f"{nmem}/cxl/provider").strip()
        pmem_dir = Path(os.path.realpath(ct.path(f"sys/bus/cxl/devices/{pmem}")))
        memdev = pmem_dir.parent.name
        assert int(ct.read(f"sys/bus/cxl/devices/{memdev}/serial"), 16) == int(d["id"])
        assert (pmem_dir / "devtype").read_text() == "cxl_nvdimm\n"
        assert os.path.basename(os.readlink(pmem_dir / "driver")) == "cxl_nvdimm"
        assert os.path.dirname(os.path.realpath(ct.path(nmem))) == bus_dir

    # the bus goes with cxl_test, and comes back with it
    res = ct.run("sh", "-c", "modprobe -r cxl_test && ! ndctl list -B | grep -q cxl_test && modprobe cxl_test")
    assert res.returncode == 0, res.stderr
    assert len(ct.ndctl("list", "-b", "cxl_test", "-D")) == 10


def test_ndctl_labels_are_the_memdevs_label_storage(ct, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nmem = nmem_of(ct, "mem3")
    written = os.urandom(LSA_SIZE)
    (tmp_path / "lsa").write_bytes(written)
    res = ct.run("sh", "-c", f"ndctl write-labels -i {tmp_path}/lsa {nmem} && "
                             f"ndctl read-labels -o {tmp_path}/nd {nmem}")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "nd").read_bytes() == written
    # another memdev's label area is its own
    other = nmem_of(ct, "mem4")
    res = ct.run("ndctl", "read-labels", "-o", f"{tmp_path}/other", other)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "other").read_bytes() == bytes(LSA_SIZE)

    # the same bytes through the memdev's mailbox (GET_LSA), as `cxl read-labels` reads them
    res = ct.run("cxl", "read-labels", "-o", f"{tmp_path}/cxl", "mem3")
    if res.returncode != 0 and "query commands failed" in res.stderr:
        pytest.skip("the memdevs' mailbox ioctls are not forwarded here (issue 26 item 2)")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "cxl").read_bytes() == written
    # zero-labels through the nmem: the mailbox reads zeros
    res = ct.run("sh", "-c", f"ndctl zero-labels {nmem} && cxl read-labels -o {tmp_path}/cxl mem3")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "cxl").read_bytes() == bytes(LSA_SIZE)


def test_a_pmem_region_is_an_nd_region_with_namespaces(ct) -> None:  # type: ignore[no-untyped-def]
    assert nd_regions(ct) == []
    (root,) = [d for d in cxl(ct, "list", "-D", "-d", "root") if d["decoder"] == "decoder0.3"]
    region = create_pmem_region(ct, "decoder0.3", "mem0", "mem1", size="512M")
    (nd,) = nd_regions(ct)
    assert nd["dev"] == region  # the nd region takes the CXL region's id
    assert (nd["size"], nd["type"], nd["persistence_domain"]) == (512 * MiB, "pmem", "memory_controller")
    assert ct.read(f"sys/bus/nd/devices/{region}/resource") == f"{root['resource']:#x}\n"
    # its mappings: the endpoint decoders' DPA ranges on the memdevs' nmems, in position order
    pmem_region = f"sys/bus/cxl/devices/{region}/pmem_{region}"
    assert ct.read(f"{pmem_region}/devtype") == "cxl_pmem_region\n"
    mappings = [ct.read(f"sys/bus/nd/devices/{region}/mapping{i}").strip().split(",") for i in range(2)]
    decoders = cxl(ct, "list", "-D", "-r", region, "-d", "endpoint")
    dpa = {int(ct.read(f"sys/bus/cxl/devices/{d['decoder']}/dpa_resource"), 16) for d in decoders}
    assert [m[0] for m in mappings] == [nmem_of(ct, "mem0"), nmem_of(ct, "mem1")]
    assert {int(m[1]) for m in mappings} == dpa
    assert [(int(m[2]), int(m[3])) for m in mappings] == [(256 * MiB, 0), (256 * MiB, 1)]

    # namespaces of each mode, with labels on both memdevs
    made = {}
    for mode, size in (("fsdax", "128M"), ("devdax", "128M"), ("sector", "64M")):
        res = ct.run("ndctl", "create-namespace", "-r", region, "-m", mode, "-s", size)
        assert res.returncode == 0, res.stderr
        ns = json.loads(res.stdout)
        made[ns["dev"]] = (mode, ns["uuid"])
    listed = {ns["dev"]: (ns["mode"], ns["uuid"]) for ns in ct.ndctl("list", "-r", region, "-N")}
    assert listed == made

    # disabled and enabled again: the nd region comes back with its namespaces, from the labels
    res = ct.run("cxl", "disable-region", region)
    assert res.returncode == 0, res.stderr
    assert nd_regions(ct) == [] and not ct.path(pmem_region).exists()
    res = ct.run("cxl", "enable-region", region)
    assert res.returncode == 0, res.stderr
    assert {ns["uuid"] for ns in ct.ndctl("list", "-r", region, "-N")} == {u for _, u in made.values()}

    # destroyed: the nd region goes with it
    res = ct.run("cxl", "destroy-region", "-f", region)
    assert res.returncode == 0, res.stderr
    assert nd_regions(ct) == []
    assert not ct.path(f"sys/bus/nd/devices/{region}").exists()


def test_an_fsdax_namespace_there_gets_its_memmap_from_the_engine(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(SLOW_CXL_TEST)
    region = create_pmem_region(m, "decoder0.2", "mem0", size="256M")
    res = m.run("ndctl", "create-namespace", "-r", region, "-m", "fsdax", "-M", "dev", "-s", "64M")
    assert res.returncode == 0, res.stderr
    ns = json.loads(res.stdout)
    holder = m.read(f"sys/bus/nd/devices/{ns['dev']}/holder").strip()
    pfn = f"sys/bus/nd/devices/{holder}"
    # create-namespace returned while the memmap is still being initialized
    assert m.read(f"{pfn}/memmap_state") == "active\n"
    # a cold read of the last block waits for that block only
    start_pfn = int(m.read(f"{pfn}/memmap/start_pfn"), 16)
    first_data_page = int(m.read(f"{pfn}/resource"), 16) // 4096 - start_pfn
    size = int(m.read(f"sys/block/{ns['blockdev']}/size")) * 512
    offset = (size - 4096) // (2 * MiB) * (2 * MiB)
    res = m.run("dd", f"if=/dev/{ns['blockdev']}", "of=/dev/null", "bs=4096", "count=1", f"skip={offset // 4096}",
                "iflag=direct")
    assert res.returncode == 0, res.stderr
    with open(m.path(f"{pfn}/memmap/kpageflags"), "rb") as f:
        f.seek((first_data_page + offset // 4096) * 8)
        flags = int.from_bytes(f.read(8), "little")
    assert not flags & KPF_NOPAGE, "the page read was not initialized"
    assert m.read(f"{pfn}/memmap_state") == "active\n"  # the rest still is being initialized
    wait_for(lambda: m.read(f"{pfn}/memmap_state") == "idle\n", 300, "the memmap to finish")
    assert int(m.read(f"{pfn}/memmap/pages_done")) == int(m.read(f"{pfn}/memmap/pages_total"))


def test_a_devdax_namespace_there_gets_its_memmap_from_the_engine(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(SLOW_CXL_TEST)
    region = create_pmem_region(m, "decoder0.4", "mem8", size="256M")
    res = m.run("ndctl", "create-namespace", "-r", region, "-m", "devdax", "-s", "64M")
    assert res.returncode == 0, res.stderr
    ns = json.loads(res.stdout)
    chardev = ns["daxregion"]["devices"][0]["chardev"]
    holder = m.read(f"sys/bus/nd/devices/{ns['dev']}/holder").strip()
    dax = f"sys/bus/nd/devices/{holder}"
    assert m.read(f"{dax}/memmap_state") == "active\n"  # enable returned before the memmap was done
    # a cold read of the device's last page waits for its block only
    dev = m.path(f"dev/{chardev}")
    size = os.stat(dev).st_size
    data_page = int(m.read(f"{dax}/resource"), 16) // 4096 - int(m.read(f"{dax}/memmap/start_pfn"), 16)
    with open(dev, "rb") as f:
        f.seek(size - 4096)
        assert f.read(4096) == bytes(4096)
    with open(m.path(f"{dax}/memmap/kpageflags"), "rb") as f:
        f.seek((data_page + size // 4096 - 1) * 8)
        flags = int.from_bytes(f.read(8), "little")
    assert not flags & KPF_NOPAGE, "the page read was not initialized"
    assert m.read(f"{dax}/memmap_state") == "active\n"
    wait_for(lambda: m.read(f"{dax}/memmap_state") == "idle\n", 300, "the memmap to finish")
    assert int(m.read(f"{dax}/memmap/pages_done")) == int(m.read(f"{dax}/memmap/pages_total"))


def test_nfit_test_reloaded_beside_cxl_test_keeps_its_own_ids(ct) -> None:  # type: ignore[no-untyped-def]
    """nfit_test's buses, DIMMs and regions come back with their fixed ids: the CXL bus,
    nmems and regions, registered while nfit_test was out, must not have taken them."""
    res = ct.run("sh", "-c", "modprobe -r nfit_test && modprobe -r cxl_test && modprobe cxl_test && "
                             "cxl create-region -m -t pmem -d decoder0.2 mem0 -s 256M && modprobe nfit_test")
    assert res.returncode == 0, res.stderr
    (cxl_region,) = nd_regions(ct)
    nfit_regions = [r["dev"] for b in ("nfit_test.0", "nfit_test.1") for r in ct.ndctl("list", "-b", b, "-Ri") or []]
    assert nfit_regions and cxl_region["dev"] not in nfit_regions
    buses = ct.ndctl("list", "-B")
    assert sorted(b["provider"] for b in buses) == ["cxl_test", "nfit_test.0", "nfit_test.1"]
    assert len({b["dev"] for b in buses}) == 3
    dimms = [d["dev"] for b in ("nfit_test.0", "nfit_test.1", "cxl_test") for d in ct.ndctl("list", "-b", b, "-D")]
    assert len(dimms) == len(set(dimms)) == 16


def test_vnvdimm_injects_errors_into_a_namespace_there(ct) -> None:  # type: ignore[no-untyped-def]
    """`vnvdimm inject-error` on a CXL region's namespace: no NFIT platform behind its bus, so
    the bad blocks go straight to the region's poison list (as on e820) and reads of them fail."""
    region = create_pmem_region(ct, "decoder0.3", "mem0", "mem1", size="512M")
    res = ct.run("ndctl", "create-namespace", "-r", region, "-m", "raw", "-s", "64M")
    assert res.returncode == 0, res.stderr
    ns = json.loads(res.stdout)
    res = subprocess.run([*VNVDIMM, "inject-error", str(ct.root), ns["dev"], "-B", "16", "-n", "8"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert ct.read(f"sys/block/{ns['blockdev']}/badblocks") == "16 8\n"
    fd = os.open(ct.dev / ns["blockdev"], os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        with pytest.raises(OSError) as bad:
            os.preadv(fd, [buf], 16 * 512)
        assert bad.value.errno == errno.EIO
    finally:
        os.close(fd)
