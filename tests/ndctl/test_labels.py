"""ndctl's label commands through the label-area ioctls (GET_CONFIG_SIZE / GET_CONFIG_DATA /
SET_CONFIG_DATA) on template = "nfit_test": init-labels, read-labels, write-labels,
zero-labels and check-labels with the real ndctl, checked against the bytes of the DIMMs'
label areas and against what the kernel makes of them (namespaces found again after a
remount)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mount_kit import have_ndctl

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]

NFIT_TEST = 'template = "nfit_test"\n[memmap]\nworkers = 1\n'
LABEL_SIZE = 128 << 10  # nfit_test's LABEL_SIZE
REGION1_DIMMS = ("nmem0", "nmem1", "nmem2", "nmem3")  # spa1: 4-way over nfit_test.0's DIMMs


@pytest.fixture
def nt(make_mount):  # type: ignore[no-untyped-def]
    return make_mount(NFIT_TEST)


def area(nt, dimm: str) -> bytes:  # type: ignore[no-untyped-def]
    """The DIMM's label storage area as the platform keeps it."""
    return Path(nt.state_dir, "labels", f"{dimm}.lsa").read_bytes()


def sh(nt, script: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return nt.run("sh", "-c", script)


def ok(nt, script: str) -> str:  # type: ignore[no-untyped-def]
    res = sh(nt, script)
    assert res.returncode == 0, f"{script}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def read_labels(nt, dimm: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    (entry,) = json.loads(ok(nt, f"ndctl read-labels -j {dimm} 2>/dev/null"))
    return entry  # type: ignore[no-any-return]


def test_init_labels_writes_two_index_blocks_that_read_and_check_labels_accept(nt) -> None:  # type: ignore[no-untyped-def]
    assert area(nt, "nmem0")[:7] == b"label0\0"  # nfit_test's fill: no index yet
    res = sh(nt, "ndctl check-labels nmem0")
    assert res.returncode != 0 and "successfully verified 0 nmem" in res.stderr

    # the DIMMs of an enabled region are the kernel's: init-labels refuses, nothing changes
    res = sh(nt, "ndctl init-labels nmem0")
    assert res.returncode != 0 and "regions active" in res.stderr
    assert area(nt, "nmem0")[:7] == b"label0\0"

    out = ok(nt, "ndctl disable-region all && ndctl init-labels all")
    assert "initialized 6 nmems" in out
    raw = area(nt, "nmem0")
    assert len(raw) == LABEL_SIZE
    # v1.1 index blocks (sizeof_namespace_index() rounds to 256 bytes, two of them, each
    # tagged NAMESPACE_INDEX), then 1020 label slots of 128 bytes
    index_size = 256 * ((72 + (LABEL_SIZE // 128 + 7) // 8 + 255) // 256)
    assert raw[:16] == raw[index_size:index_size + 16] == b"NAMESPACE_INDEX\0"
    entry = read_labels(nt, "nmem0")
    assert entry["dev"] == "nmem0"
    index = entry["index"]
    assert [(i["signature"], i["major"], i["minor"], i["labelsize"], i["nslot"]) for i in index] == [  # type: ignore[union-attr]
        ("NAMESPACE_INDEX", 1, 1, 128, (LABEL_SIZE - 2 * index_size) // 128)] * 2
    assert sorted(i["seq"] for i in index) == [2, 3]  # type: ignore[union-attr]
    assert "successfully verified 6 nmem labels" in ok(nt, "ndctl check-labels all")


def test_a_namespace_created_after_init_labels_is_found_again_after_a_remount(nt) -> None:  # type: ignore[no-untyped-def]
    ok(nt, "ndctl disable-region all && ndctl init-labels all && ndctl enable-region all")
    made = json.loads(ok(nt, "ndctl create-namespace -b nfit_test.0 -r region1 -s 32M -m fsdax -n after-init"
                             " 2>/dev/null"))
    # one current label per DIMM of the interleave set, each naming the namespace (the
    # namespace's own uuid; ndctl shows an fsdax namespace by its pfn's)
    for position, dimm in enumerate(REGION1_DIMMS):
        labels = [lbl for lbl in read_labels(nt, dimm)["label"] if lbl["flags"] == 0]  # type: ignore[union-attr]
        assert [(lbl["name"], lbl["nlabel"], lbl["position"], lbl["rawsize"]) for lbl in labels] == [
            ("after-init", 4, position, 8 << 20)]

    nt.remount()
    (found,) = [ns for ns in nt.ndctl("list", "-N", "-r", "region1")]  # type: ignore[union-attr]
    assert {k: found[k] for k in ("uuid", "name", "mode", "size")} == {
        k: made[k] for k in ("uuid", "name", "mode", "size")}
    assert "successfully verified 4 nmem labels" in ok(nt, "ndctl check-labels nmem0 nmem1 nmem2 nmem3")


def test_read_zero_and_write_labels_round_trip_the_label_area(nt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ok(nt, "ndctl disable-region all && ndctl init-labels all && ndctl enable-region all")
    made = json.loads(ok(nt, "ndctl create-namespace -b nfit_test.0 -r region1 -s 32M -m raw 2>/dev/null"))
    saved = tmp_path / "nmem2.bin"
    ok(nt, f"ndctl disable-region region1 && ndctl read-labels -o {saved} nmem2")
    before = area(nt, "nmem2")
    assert saved.read_bytes() == before  # every byte of the area, as GET_CONFIG_DATA returns it

    out = ok(nt, "ndctl zero-labels nmem2")
    assert "zeroed 1 nmem" in out
    assert area(nt, "nmem2") == bytes(LABEL_SIZE)
    res = sh(nt, "ndctl check-labels nmem2")
    assert res.returncode != 0
    # the other DIMMs of the set still name it, but one missing label hides the namespace
    ok(nt, "ndctl enable-region region1")
    assert made["uuid"] not in [ns.get("uuid") for ns in nt.ndctl("list", "-N", "-r", "region1") or []]  # type: ignore[union-attr]

    ok(nt, f"ndctl disable-region region1 && ndctl write-labels -i {saved} nmem2")
    assert area(nt, "nmem2") == before
    assert "successfully verified 1 nmem label" in ok(nt, "ndctl check-labels nmem2")
    ok(nt, "ndctl enable-region region1")
    assert made["uuid"] in [ns.get("uuid") for ns in nt.ndctl("list", "-N", "-r", "region1")]  # type: ignore[union-attr]


def test_label_writes_to_a_dimm_of_an_active_region_change_nothing(nt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ok(nt, "ndctl disable-region all && ndctl init-labels all && ndctl enable-region all")
    before = area(nt, "nmem1")
    res = sh(nt, "ndctl zero-labels nmem1")
    assert res.returncode != 0 and "regions active" in res.stderr
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xa5" * LABEL_SIZE)
    sh(nt, f"ndctl write-labels -i {junk} nmem1")  # ndctl refuses (the DIMM is active)
    assert area(nt, "nmem1") == before


def test_fail_cmd_makes_read_labels_fail_as_nfit_test_does(nt) -> None:  # type: ignore[no-untyped-def]
    knob = "sys/devices/platform/nfit_test.0/nfit_test_dimm/test_dimm0"
    nt.write(f"{knob}/fail_cmd", b"0x20")  # 1 << ND_CMD_GET_CONFIG_DATA
    res = sh(nt, "ndctl read-labels -j nmem0")
    assert res.returncode != 0 and "read 0 nmem" in res.stderr
    assert sh(nt, "ndctl read-labels -j nmem1").returncode == 0  # only test_dimm0's DIMM
    nt.write(f"{knob}/fail_cmd", b"0")
    assert sh(nt, "ndctl read-labels -j nmem0").returncode == 0
