"""`ndctl list -BDRNi -v` and `daxctl list -RD` on the default-like topology (two e820 regions:
namespace0.0 fsdax map=dev, namespace1.0 devdax map=mem align 2M; 256 MiB instead of 8 GiB),
asserted field by field; and the same JSON from a second mount of the same state dir."""

from __future__ import annotations

import json

import pytest
from mount_kit import E820_BUS, SMALL_E820, have_ndctl, mounted, read

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]

REGION = 268435456
FSDAX_SIZE = 262144000  # roundup(8 KiB + 64 * npfns, 2 MiB) taken for the memmap on the media
DEVDAX_SIZE = 266338304  # roundup(8 KiB, 2 MiB): the memmap is in RAM


@pytest.fixture(scope="module")
def mnt(request):  # type: ignore[no-untyped-def]
    with mounted(request, SMALL_E820) as m:
        yield m


def pfn_uuid(mnt, region: int) -> str:  # type: ignore[no-untyped-def]
    holder = read(mnt.sys / E820_BUS / f"region{region}/namespace{region}.0/holder").decode().strip()
    return read(mnt.sys / E820_BUS / f"region{region}/{holder}/uuid").decode().strip()


def expected_bus(mnt) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    region = {"size": REGION, "align": 16777216, "available_size": 0, "max_available_extent": 0, "type": "pmem",
              "numa_node": 0, "target_node": 0, "persistence_domain": "unknown"}
    ns0 = {"dev": "namespace0.0", "mode": "fsdax", "map": "dev", "size": FSDAX_SIZE, "uuid": pfn_uuid(mnt, 0),
           "sector_size": 512, "align": 2097152, "blockdev": "pmem0", "numa_node": 0, "target_node": 0}
    ns1 = {"dev": "namespace1.0", "mode": "devdax", "map": "mem", "size": DEVDAX_SIZE, "uuid": pfn_uuid(mnt, 1),
           "daxregion": {"id": 1, "size": DEVDAX_SIZE, "align": 2097152,
                         "devices": [{"chardev": "dax1.0", "size": DEVDAX_SIZE, "target_node": 0, "align": 2097152,
                                      "mode": "devdax"}]},
           "align": 2097152, "numa_node": 0, "target_node": 0}
    return [{"provider": "e820", "dev": "ndbus0", "regions": [
        {"dev": "region0", **region, "namespaces": [ns0]},
        {"dev": "region1", **region, "namespaces": [ns1]}]}]


def by_dev(buses: list[dict[str, object]]) -> list[dict[str, object]]:
    for bus in buses:
        bus["regions"] = sorted(bus["regions"], key=lambda r: r["dev"])  # type: ignore[arg-type,index,return-value]
    return buses


def test_ndctl_list_bdrni_v(mnt) -> None:  # type: ignore[no-untyped-def]
    res = mnt.run("ndctl", "list", "-BDRNi", "-v")
    assert res.returncode == 0, res.stderr
    got = by_dev(json.loads(res.stdout))
    assert got == expected_bus(mnt)


def test_ndctl_list_without_options_shows_the_namespaces(mnt) -> None:  # type: ignore[no-untyped-def]
    listed = sorted(mnt.ndctl("list"), key=lambda n: n["dev"])  # type: ignore[arg-type]
    assert listed == [
        {"dev": "namespace0.0", "mode": "fsdax", "map": "dev", "size": FSDAX_SIZE, "uuid": pfn_uuid(mnt, 0),
         "sector_size": 512, "align": 2097152, "blockdev": "pmem0"},
        {"dev": "namespace1.0", "mode": "devdax", "map": "mem", "size": DEVDAX_SIZE, "uuid": pfn_uuid(mnt, 1),
         "chardev": "dax1.0", "align": 2097152}]


def test_daxctl_list_rd(mnt) -> None:  # type: ignore[no-untyped-def]
    res = mnt.run("daxctl", "list", "-RD")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    holder = read(mnt.sys / E820_BUS / "region1/namespace1.0/holder").decode().strip()
    assert json.loads(res.stdout) == [{
        "path": f"/platform/e820_pmem/ndbus0/region1/{holder}", "id": 1, "size": DEVDAX_SIZE, "align": 2097152,
        "devices": [{"chardev": "dax1.0", "size": DEVDAX_SIZE, "target_node": 0, "align": 2097152,
                     "mode": "devdax"}]}]


def test_ndctl_list_regions_and_buses(mnt) -> None:  # type: ignore[no-untyped-def]
    assert mnt.ndctl("list", "-B") == [{"provider": "e820", "dev": "ndbus0"}]
    regions = sorted(mnt.ndctl("list", "-R"), key=lambda r: r["dev"])  # type: ignore[arg-type]
    assert [r["dev"] for r in regions] == ["region0", "region1"]
    assert all(r["size"] == REGION and r["type"] == "pmem" for r in regions)
    assert mnt.ndctl("list", "-D") is None  # e820 has no DIMMs


def test_a_second_mount_lists_the_same(make_mount) -> None:  # type: ignore[no-untyped-def]
    first = make_mount()
    before = first.run("ndctl", "list", "-RNi")
    daxes = first.run("daxctl", "list", "-RD")
    assert before.returncode == 0 and daxes.returncode == 0
    first.umount()
    second = make_mount(None, state_dir=first.state_dir)
    assert second.run("ndctl", "list", "-RNi").stdout == before.stdout
    assert second.run("daxctl", "list", "-RD").stdout == daxes.stdout
