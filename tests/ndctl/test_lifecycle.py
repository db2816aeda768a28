"""disable/enable/destroy-namespace and disable/enable-region with the real ndctl/daxctl: exit
codes, the counts ndctl prints, and what the system looks like afterwards (list JSON, the
device files, the info blocks re-detected when a namespace or a region is enabled again)."""

from __future__ import annotations

import errno
import json
import os

import pytest
from mount_kit import E820_BUS, have_ndctl, read

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]

FSDAX = {"dev": "namespace0.0", "mode": "fsdax", "map": "dev", "size": 262144000, "sector_size": 512,
         "align": 2097152, "blockdev": "pmem0"}
DEVDAX = {"dev": "namespace1.0", "mode": "devdax", "map": "mem", "size": 266338304, "chardev": "dax1.0",
          "align": 2097152}
LEGACY_DISABLED = {"dev": "namespace0.0", "mode": "fsdax", "map": "mem", "size": 268435456, "sector_size": 512,
                   "state": "disabled"}


def ndctl(mnt, *args: str, rc: int = 0) -> tuple[object, str]:  # type: ignore[no-untyped-def]
    res = mnt.run("ndctl", *args)
    assert res.returncode == rc, f"ndctl {' '.join(args)}: rc {res.returncode}: {res.stderr}"
    return (json.loads(res.stdout) if res.stdout.strip() else None), res.stderr


def uuids(mnt) -> dict[str, str]:  # type: ignore[no-untyped-def]
    listed, _ = ndctl(mnt, "list", "-N")
    return {ns["dev"]: ns["uuid"] for ns in listed}  # type: ignore[union-attr]


def devfiles(mnt) -> set[str]:  # type: ignore[no-untyped-def]
    return {n for n in os.listdir(mnt.dev) if n.startswith(("pmem", "dax"))}


def test_disable_and_enable_namespaces(mnt) -> None:  # type: ignore[no-untyped-def]
    ids = uuids(mnt)
    _, err = ndctl(mnt, "disable-namespace", "namespace0.0")
    assert err == "disabled 1 namespace\n"
    listed, _ = ndctl(mnt, "list", "-Ni", "-n", "namespace0.0")
    assert listed == [LEGACY_DISABLED]  # the pfn was deleted; its info block stays on the media
    assert read(mnt.sys / E820_BUS / "region0/namespace0.0/holder") == b"\n"
    assert devfiles(mnt) == {"dax1.0"}
    _, err = ndctl(mnt, "enable-namespace", "namespace0.0")
    assert err == "enabled 1 namespace\n"
    listed, _ = ndctl(mnt, "list", "-N", "-n", "namespace0.0")
    assert listed == [{**FSDAX, "uuid": ids["namespace0.0"]}]  # probed from the info block
    assert os.stat(mnt.dev / "pmem0").st_size == 262144000

    _, err = ndctl(mnt, "disable-namespace", "namespace1.0")
    assert err == "disabled 1 namespace\n"
    assert devfiles(mnt) == {"pmem0"}
    daxes = mnt.run("daxctl", "list")
    assert daxes.returncode == 0 and daxes.stdout.strip() == ""
    _, err = ndctl(mnt, "enable-namespace", "namespace1.0")
    assert err == "enabled 1 namespace\n"
    listed, _ = ndctl(mnt, "list", "-N", "-n", "namespace1.0")
    assert listed == [{**DEVDAX, "uuid": ids["namespace1.0"]}]

    _, err = ndctl(mnt, "disable-namespace", "all")
    assert err == "disabled 2 namespaces\n"
    assert devfiles(mnt) == set()
    listed, _ = ndctl(mnt, "list", "-N")
    assert listed is None  # without -i, disabled namespaces are hidden
    _, err = ndctl(mnt, "enable-namespace", "all")
    assert err == "enabled 2 namespaces\n"
    assert uuids(mnt) == ids
    assert devfiles(mnt) == {"pmem0", "dax1.0"}


def test_enable_of_a_missing_namespace(mnt) -> None:  # type: ignore[no-untyped-def]
    _, err = ndctl(mnt, "enable-namespace", "namespace9.9", rc=256 - errno.ENXIO)
    assert err.splitlines()[-1] == "enabled 0 namespaces"


def test_destroy_namespace(mnt) -> None:  # type: ignore[no-untyped-def]
    ids = uuids(mnt)
    _, err = ndctl(mnt, "destroy-namespace", "namespace0.0", rc=256 - errno.EBUSY)
    assert "namespace0.0 is active, specify --force for re-configuration" in err
    assert err.splitlines()[-1] == "destroyed 0 namespaces"
    assert uuids(mnt) == ids
    _, err = ndctl(mnt, "destroy-namespace", "namespace0.0", "-f")
    assert err == "destroyed 1 namespace\n"
    listed, _ = ndctl(mnt, "list", "-Ni", "-n", "namespace0.0")
    assert listed == [LEGACY_DISABLED]
    # the info block was wiped: enabling brings the namespace back raw (legacy fsdax, map=mem)
    _, err = ndctl(mnt, "enable-namespace", "namespace0.0")
    assert err == "enabled 1 namespace\n"
    listed, _ = ndctl(mnt, "list", "-N", "-n", "namespace0.0")
    assert listed == [{k: v for k, v in LEGACY_DISABLED.items() if k != "state"} | {"blockdev": "pmem0"}]
    assert os.stat(mnt.dev / "pmem0").st_size == 268435456
    with open(mnt.dev / "pmem0", "rb") as f:
        assert f.read(8192) == bytes(8192)


def test_disable_and_enable_regions(mnt) -> None:  # type: ignore[no-untyped-def]
    ids = uuids(mnt)
    _, err = ndctl(mnt, "disable-region", "region1")
    assert err == "disabled 1 region\n"
    regions, _ = ndctl(mnt, "list", "-Ri", "-r", "region1")
    assert regions == [{"dev": "region1", "size": 268435456, "align": 16777216, "available_size": 0,
                        "max_available_extent": 0, "type": "pmem", "state": "disabled",
                        "persistence_domain": "unknown"}]
    assert not (mnt.sys / E820_BUS / "region1/namespace1.0").exists()
    assert devfiles(mnt) == {"pmem0"}
    listed, _ = ndctl(mnt, "list", "-N")
    assert listed == [{**FSDAX, "uuid": ids["namespace0.0"]}]
    _, err = ndctl(mnt, "enable-region", "region1")
    assert err == "enabled 1 region\n"
    assert uuids(mnt) == ids  # the namespaces re-probed and found their info blocks
    assert devfiles(mnt) == {"pmem0", "dax1.0"}
    _, err = ndctl(mnt, "disable-region", "all")
    assert err == "disabled 2 regions\n"
    assert devfiles(mnt) == set()
    _, err = ndctl(mnt, "enable-region", "all")
    assert err == "enabled 2 regions\n"
    assert uuids(mnt) == ids
    listed, _ = ndctl(mnt, "list", "-N")
    assert sorted(listed, key=lambda n: n["dev"]) == [  # type: ignore[arg-type]
        {**FSDAX, "uuid": ids["namespace0.0"]}, {**DEVDAX, "uuid": ids["namespace1.0"]}]
