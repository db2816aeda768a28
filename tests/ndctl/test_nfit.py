"""Labelled regions on the nfit topology with the real ndctl: create namespaces of given sizes
until available_size is 0 (then one more create fails), destroy some, create again; the list
JSON of DIMMs and regions."""

from __future__ import annotations

import json

import pytest
from mount_kit import NFIT_BUS, have_ndctl, read

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]

M = 1 << 20


def btt_size(size: int, lbasize: int = 4096, initial_offset: int = 0) -> int:
    """btt.c create_arenas()/alloc_arena() for one arena. The platform's labels are v1.2, so
    nd_btt makes a BTT 2.0 with its info block at offset 0 (v1.1: 4 KiB)."""
    available = size - initial_offset - 2 * 4096 - 256 * 64
    internal_nlba = (available - 4096) // (-(-lbasize // 64) * 64 + 4)
    return (internal_nlba - 256) * lbasize


def pfn_size(size: int, map_dev: bool) -> int:
    memmap = 64 * ((size - 8192) // 4096) if map_dev else 0
    return size - -(-(8192 + memmap) // (2 * M)) * (2 * M)


def region1(mnt) -> dict[str, object]:  # type: ignore[no-untyped-def]
    (region,) = mnt.ndctl("list", "-R", "-r", "region1")
    return region  # type: ignore[no-any-return]


def create(mnt, size: int, mode: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    res = mnt.run("ndctl", "create-namespace", "-r", "region1", "-s", str(size), "-m", mode)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def destroy(mnt, ns: str) -> None:  # type: ignore[no-untyped-def]
    res = mnt.run("ndctl", "destroy-namespace", ns, "-f")
    assert res.returncode == 0, res.stderr
    assert res.stderr == "destroyed 1 namespace\n"


def test_list_of_the_nfit_platform(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    (bus,) = nfit_mnt.ndctl("list", "-BDRi")
    cookie0 = int(read(nfit_mnt.sys / NFIT_BUS / "region0/set_cookie"), 16)
    assert bus["provider"] == "ACPI.NFIT" and bus["dev"] == "ndbus0"
    dimms = sorted(bus["dimms"], key=lambda d: d["dev"])
    assert [(d["dev"], d["handle"], d["phys_id"]) for d in dimms] == [
        ("nmem0", 0, 16), ("nmem1", 1, 17), ("nmem2", 16, 18), ("nmem3", 17, 19)]
    assert all(d["id"] == f"8089-a2-1740-{0x1000 + i:08x}" for i, d in enumerate(dimms))
    regions = {r["dev"]: r for r in bus["regions"]}
    r0 = regions["region0"]
    assert r0 == {
        "dev": "region0", "size": 1024 * M, "align": 16 * M, "available_size": 768 * M,
        "max_available_extent": 768 * M, "type": "pmem", "iset_id": cookie0,
        "mappings": r0["mappings"], "persistence_domain": "memory_controller"}
    assert sorted(r0["mappings"], key=lambda m: m["position"]) == [
        {"dimm": "nmem0", "offset": 0, "length": 512 * M, "position": 0},
        {"dimm": "nmem1", "offset": 0, "length": 512 * M, "position": 1}]
    (ns,) = nfit_mnt.ndctl("list", "-N", "-r", "region0")
    holder = read(nfit_mnt.sys / NFIT_BUS / "region0/namespace0.0/holder").decode().strip()
    pfn_uuid = read(nfit_mnt.sys / NFIT_BUS / "region0" / holder / "uuid").decode().strip()
    assert ns == {"dev": "namespace0.0", "mode": "fsdax", "map": "dev", "size": pfn_size(256 * M, True),
                  "uuid": pfn_uuid, "sector_size": 512, "align": 2097152, "blockdev": "pmem0"}


def test_fill_destroy_and_create_again(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    mnt = nfit_mnt
    assert region1(mnt)["available_size"] == 1024 * M
    made = [create(mnt, 128 * M, "fsdax"), create(mnt, 256 * M, "devdax"), create(mnt, 384 * M, "sector")]
    assert [(n["dev"], n["mode"], n["size"]) for n in made] == [
        ("namespace1.0", "fsdax", pfn_size(128 * M, True)),
        ("namespace1.1", "devdax", pfn_size(256 * M, True)),
        ("namespace1.2", "sector", btt_size(384 * M))]
    assert made[0]["blockdev"] == "pmem1" and made[2]["blockdev"] == "pmem1.2s"
    assert made[1]["daxregion"]["devices"][0]["chardev"] == "dax1.1"  # type: ignore[index]
    assert region1(mnt)["available_size"] == 256 * M
    last = create(mnt, 256 * M, "raw")
    assert last == {"dev": "namespace1.3", "mode": "raw", "size": 256 * M, "uuid": last["uuid"],
                    "sector_size": 512, "blockdev": "pmem1.3"}
    assert region1(mnt)["available_size"] == 0 and region1(mnt)["max_available_extent"] == 0
    res = mnt.run("ndctl", "create-namespace", "-r", "region1", "-s", str(16 * M), "-m", "raw")
    assert res.returncode != 0
    assert "failed to create namespace: No space left on device" in res.stderr
    listed = mnt.ndctl("list", "-Ni", "-r", "region1")
    seed = [n for n in listed if n["size"] == 0]  # type: ignore[union-attr]
    assert seed == [{"dev": "namespace1.4", "mode": "raw", "size": 0, "uuid": "00000000-0000-0000-0000-000000000000",
                     "sector_size": 512, "state": "disabled"}]

    destroy(mnt, "namespace1.1")
    destroy(mnt, "namespace1.2")
    region = region1(mnt)
    assert region["available_size"] == 640 * M
    assert region["max_available_extent"] == 640 * M  # the two freed ranges touch: one extent
    names = {n["dev"] for n in mnt.ndctl("list", "-N", "-r", "region1")}  # type: ignore[union-attr]
    assert names == {"namespace1.0", "namespace1.3"}
    again = create(mnt, 512 * M, "fsdax")
    assert again["size"] == pfn_size(512 * M, True)
    assert region1(mnt)["available_size"] == 128 * M
    tail = create(mnt, 128 * M, "devdax")
    assert tail["size"] == pfn_size(128 * M, True)
    assert region1(mnt)["available_size"] == 0
    devs = {n["dev"]: n["mode"] for n in mnt.ndctl("list", "-N", "-r", "region1")}  # type: ignore[union-attr]
    assert sorted(devs.values()) == ["devdax", "fsdax", "fsdax", "raw"]
    assert len(devs) == 4
