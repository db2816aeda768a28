"""template = "nfit_test": the kernel's nfit_test module's two buses as ndctl lists them,
field by field (values from tools/testing/nvdimm/test/nfit.c and acpi/nfit), namespaces made
through sysfs written as labels, the nfit_test_dimm class, and modprobe / modprobe -r of the
module resetting the platform without touching the host."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mount_kit import have_ndctl

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]

M = 1 << 20
NFIT_TEST = 'template = "nfit_test"\n[memmap]\nworkers = 1\n'


@pytest.fixture
def nt(make_mount):  # type: ignore[no-untyped-def]
    return make_mount(NFIT_TEST)


def by(items: list[dict[str, object]], key: str) -> dict[object, dict[str, object]]:
    return {item[key]: item for item in items}


def test_ndctl_lists_both_buses_as_the_kernel_module_makes_them(nt) -> None:  # type: ignore[no-untyped-def]
    buses = by(nt.ndctl("list", "-BDRNiv"), "provider")
    assert set(buses) == {"nfit_test.0", "nfit_test.1"}
    b0, b1 = buses["nfit_test.0"], buses["nfit_test.1"]
    assert (b0["dev"], b1["dev"]) == ("ndbus0", "ndbus1")

    # DIMMs: handle NFIT_DIMM_HANDLE(), ids vendor-location-date-serial with serial ~handle
    # (big-endian as acpi/nfit prints it), memory-device flags of nfit_test.1's DIMMs
    assert by(b0["dimms"], "dev") == {  # type: ignore[arg-type]
        "nmem0": {"dev": "nmem0", "id": "cdab-0a-07e0-ffffffff", "handle": 0x0, "phys_id": 0, "security": "disabled"},
        "nmem1": {"dev": "nmem1", "id": "cdab-0a-07e0-feffffff", "handle": 0x1, "phys_id": 1, "security": "disabled"},
        "nmem2": {"dev": "nmem2", "id": "cdab-0a-07e0-fffeffff", "handle": 0x100, "phys_id": 2,
                  "security": "disabled"},
        "nmem3": {"dev": "nmem3", "id": "cdab-0a-07e0-fefeffff", "handle": 0x101, "phys_id": 3,
                  "security": "disabled"},
    }
    assert by(b1["dimms"], "dev") == {  # type: ignore[arg-type]
        "nmem4": {"dev": "nmem4", "id": "cdab-0a-07e0-fffffeff", "handle": 0x10000, "phys_id": 0,
                  "flag_failed_save": True, "flag_failed_arm": True, "flag_failed_restore": True,
                  "flag_failed_flush": True, "flag_smart_event": True, "security": "disabled"},
        "nmem5": {"dev": "nmem5", "id": "cdab-0a-07e0-fefffeff", "handle": 0x10001, "phys_id": 0,
                  "flag_failed_map": True, "security": "disabled"},
    }

    seed = {"mode": "raw", "size": 0, "uuid": "00000000-0000-0000-0000-000000000000", "sector_size": 512,
            "state": "disabled", "numa_node": 0, "target_node": 0}
    r0 = by(b0["regions"], "dev")  # type: ignore[arg-type]
    assert r0["region0"] == {
        "dev": "region0", "size": 32 * M, "align": 16 * M, "available_size": 32 * M, "max_available_extent": 32 * M,
        "type": "pmem", "numa_node": 0, "target_node": 0,
        "iset_id": 0x40E62F0CC00F58AC,  # cookie2 of spa0 (no label index yet: v1.2's)
        "mappings": [{"dimm": "nmem1", "offset": 0, "length": 16 * M, "position": 1},
                     {"dimm": "nmem0", "offset": 0, "length": 16 * M, "position": 0}],
        "persistence_domain": "memory_controller",
        "namespaces": [{"dev": "namespace0.0", **seed}]}
    assert r0["region1"] == {
        "dev": "region1", "size": 64 * M, "align": 16 * M, "available_size": 64 * M, "max_available_extent": 64 * M,
        "type": "pmem", "numa_node": 0, "target_node": 0, "iset_id": 0xA76C6907811FAE57,
        "mappings": [{"dimm": f"nmem{i}", "offset": 16 * M, "length": 16 * M, "position": i} for i in (3, 2, 1, 0)],
        "persistence_domain": "memory_controller",
        "namespaces": [{"dev": "namespace1.0", **seed}]}
    r1 = by(b1["regions"], "dev")  # type: ignore[arg-type]
    # nmem4 answers the label commands but has no BLK windows, and its label area holds no
    # index: its region is label-less, one IO namespace over all of it (ndctl shows no
    # interleave set and nothing available for a region that is not a pmem nstype)
    assert r1["region2"] == {
        "dev": "region2", "size": 32 * M, "align": 16 * M, "available_size": 0, "max_available_extent": 0,
        "type": "pmem", "numa_node": 0, "target_node": 0,
        "mappings": [{"dimm": "nmem4", "offset": 0, "length": 32 * M, "position": 0}],
        "persistence_domain": "unknown",
        "namespaces": [{"dev": "namespace2.0", "mode": "raw", "size": 32 * M, "sector_size": 512,
                        "blockdev": "pmem2", "numa_node": 0, "target_node": 0}]}
    assert r1["region3"] == {  # the virtual CD: no DIMM, no labels, one IO namespace
        "dev": "region3", "size": 4 * M, "align": 4096, "available_size": 0, "max_available_extent": 0,
        "type": "pmem", "numa_node": 0, "target_node": 0, "persistence_domain": "unknown",
        "namespaces": [{"dev": "namespace3.0", "mode": "raw", "size": 4 * M, "sector_size": 512,
                        "blockdev": "pmem3", "numa_node": 0, "target_node": 0}]}
    assert nt.read("sys/bus/nd/devices/region2/read_only") == "1\n"  # nmem4 is not armed
    assert nt.read("sys/bus/nd/devices/nmem5/nfit/flags") == "map_fail \n"
    assert nt.read("sys/bus/nd/devices/nmem0/nfit/flags") == "smart_notify \n"


def test_nfit_test_1s_region_turns_labelled_once_its_dimm_probes_with_labels(nt) -> None:  # type: ignore[no-untyped-def]
    region, dimm = "sys/bus/nd/devices/region2", "sys/bus/nd/devices/nmem4"
    # label-less: nstype 4 (IO); the attribute still shows the DIMM's free capacity
    # (nd_region_available_dpa(): no DPA is allocated on a DIMM without labels)
    assert (nt.read(f"{region}/nstype"), nt.read(f"{region}/available_size")) == ("4\n", f"{32 * M}\n")
    assert nt.read(f"{dimm}/flags") == "\n"

    def reprobe(action: str) -> None:
        res = nt.run("sh", "-c", f"ndctl disable-region -b nfit_test.1 all && ndctl {action} nmem4 && "
                                 "ndctl disable-dimm nmem4 && ndctl enable-dimm nmem4 && "
                                 "ndctl enable-region -b nfit_test.1 all")
        assert res.returncode == 0, res.stderr

    # labels written, the DIMM re-probed: it labels (NDD_LABELING), its region hosts pmem
    # namespaces: a zero-sized seed and the whole region available
    reprobe("init-labels")
    assert (nt.read(f"{region}/nstype"), nt.read(f"{dimm}/flags")) == ("5\n", "label \n")
    assert [r["available_size"] for r in nt.ndctl("list", "-R", "-r", "region2")] == [32 * M]  # type: ignore[union-attr,index]
    namespaces = nt.ndctl("list", "-Ni", "-r", "region2")
    assert [(ns["dev"], ns["size"]) for ns in namespaces] == [("namespace2.0", 0)]  # type: ignore[union-attr,index]
    # NDD_LABELING is never cleared: zeroed labels leave the region labelled (and empty)
    reprobe("zero-labels")
    assert (nt.read(f"{region}/nstype"), nt.read(f"{dimm}/flags")) == ("5\n", "label \n")


def test_the_nfit_test_dimm_class(nt) -> None:  # type: ignore[no-untyped-def]
    base = "sys/devices/platform/nfit_test.{}/nfit_test_dimm/test_dimm{}"
    handles = {0: "0", 1: "0x1", 2: "0x100", 3: "0x101", 4: "0x1000", 5: "0x10000", 6: "0x10001"}
    for n, handle in handles.items():
        assert nt.read(base.format(0 if n < 5 else 1, n) + "/handle") == handle + "\n"
    assert sorted(p.name for p in nt.path("sys/class/nfit_test_dimm").iterdir()) == [f"test_dimm{n}" for n in range(7)]
    knob = base.format(0, 0)
    nt.write(f"{knob}/fail_cmd", b"0x20")  # fail ND_CMD_GET_CONFIG_DATA (5)
    nt.write(f"{knob}/fail_cmd_code", b"-5")
    assert (nt.read(f"{knob}/fail_cmd"), nt.read(f"{knob}/fail_cmd_code")) == ("0x20\n", "-5\n")
    assert nt.path(f"{knob}/lock_dimm").stat().st_mode & 0o777 == 0o200


def test_nfit_values_libndctl_checks(nt) -> None:  # type: ignore[no-untyped-def]
    dimm = "sys/bus/nd/devices/nmem{}/nfit/{}"
    # nfit_test.0's DIMMs: acpi/nfit keeps the BLK control region (code 0x201), and the
    # shutdown count of smart_def read at registration; nfit_test.1's answer no SMART
    assert [nt.read(dimm.format(0, a)) for a in ("format", "formats", "dirty_shutdown")] == ["0x0201\n", "1\n", "42\n"]
    assert nt.read(dimm.format(4, "format")) == "0x0101\n"
    assert not nt.path(dimm.format(4, "dirty_shutdown")).exists()
    # the count is the one at registration: a dirty shutdown injected since shows in SMART only
    res = nt.run("ndctl", "inject-smart", "-U", "nmem0")
    assert res.returncode == 0, res.stderr
    assert nt.ndctl("list", "-DH", "-d", "nmem0")[0]["health"]["shutdown_count"] == 43  # type: ignore[index]
    assert nt.read(dimm.format(0, "dirty_shutdown")) == "42\n"

    # a pmem disk's dax device caches writes where the region has a cache (not cpu_cache)
    wc = "sys/block/pmem3/dax/write_cache"
    assert nt.read(wc) == "1\n"
    nt.write(wc, b"0")
    assert nt.read(wc) == "0\n"
    with pytest.raises(OSError):
        nt.write(wc, b"maybe")
    assert nt.read(wc) == "0\n"


def test_fail_cmd_has_the_kernels_consequences(nt) -> None:  # type: ignore[no-untyped-def]
    """dsm-fail's scenario: nfit_test's fail_cmd makes the DIMM driver's own label commands
    fail. EACCES on GET_CONFIG_SIZE locks the DIMM's capacity: it enables, its regions enable,
    their namespaces are listed but never enabled. EACCES on GET_CONFIG_DATA fails the DIMM's
    probe, and with it every region it is part of."""
    knob = "sys/devices/platform/nfit_test.0/nfit_test_dimm/test_dimm0"
    setup = ("ndctl init-labels -f all -b nfit_test.0 >/dev/null 2>&1 && ndctl enable-dimm all -b nfit_test.0 && "
             "ndctl enable-region all -b nfit_test.0 && "
             "ndctl create-namespace -b nfit_test.0 -r region1 -s 16M -m raw >/dev/null && "
             "ndctl disable-region all -b nfit_test.0 && ndctl disable-dimm nmem0")
    res = nt.run("sh", "-c", f"ndctl disable-region all -b nfit_test.0 && {setup}")
    assert res.returncode == 0, res.stderr
    nt.write(f"{knob}/fail_cmd", b"0x10")  # 1 << ND_CMD_GET_CONFIG_SIZE
    nt.write(f"{knob}/fail_cmd_code", b"-13")
    res = nt.run("sh", "-c", "ndctl enable-dimm nmem0 && ndctl enable-region region1 && "
                             "cat /sys/bus/nd/devices/nmem0/flags")
    assert (res.returncode, res.stdout) == (0, "label lock \n"), res.stderr
    namespaces = nt.ndctl("list", "-N", "-i", "-r", "region1")
    assert [(ns["size"], ns.get("state")) for ns in namespaces] == [(16 << 20, "disabled")]  # type: ignore[union-attr,index]
    res = nt.run("ndctl", "enable-namespace", "namespace1.0")
    assert res.returncode != 0
    # the user's own label reads fail the same way (the ioctl answers the override's errno)
    res = nt.run("ndctl", "read-labels", "-j", "nmem0")
    assert res.returncode != 0

    res = nt.run("sh", "-c", "ndctl disable-region all -b nfit_test.0 && ndctl disable-dimm nmem0")
    assert res.returncode == 0, res.stderr
    nt.write(f"{knob}/fail_cmd", b"0x20")  # 1 << ND_CMD_GET_CONFIG_DATA
    assert nt.run("ndctl", "enable-dimm", "nmem0").returncode != 0
    assert nt.read("sys/bus/nd/devices/nmem0/flags") == "label lock \n"
    res = nt.run("ndctl", "enable-region", "all", "-b", "nfit_test.0")
    assert "enabled 0 regions" in res.stderr
    assert not nt.path("sys/bus/nd/devices/region0/driver").exists()
    assert not nt.path("sys/bus/nd/devices/region1/driver").exists()

    nt.write(f"{knob}/fail_cmd", b"0")
    res = nt.run("sh", "-c", "ndctl enable-dimm nmem0 && ndctl enable-region all -b nfit_test.0 && "
                             "cat /sys/bus/nd/devices/nmem0/flags && ndctl enable-namespace namespace1.0")
    assert res.returncode == 0 and res.stdout.startswith("label \n"), res.stderr


def label_area(nt, dimm: int) -> bytes:  # type: ignore[no-untyped-def]
    return Path(nt.state_dir, "labels", f"nmem{dimm}.lsa").read_bytes()


def test_namespaces_are_labels_and_modprobe_reloads_the_module(nt) -> None:  # type: ignore[no-untyped-def]
    assert label_area(nt, 1)[:7] == b"label1\0"  # nfit_test's initial fill: no index
    res = nt.run("ndctl", "create-namespace", "-b", "nfit_test.0", "-r", "region1", "-s", "32M", "-m", "fsdax")
    assert res.returncode == 0, res.stderr
    uuid = json.loads(res.stdout)["uuid"]
    assert label_area(nt, 1)[:16] == b"NAMESPACE_INDEX\0"
    res = nt.run("sh", "-c", "ndctl disable-region region1 && ndctl enable-region region1")
    assert res.returncode == 0, res.stderr
    assert [ns["uuid"] for ns in nt.ndctl("list", "-N", "-r", "region1")] == [uuid]  # type: ignore[union-attr]

    # modprobe -r: the buses are gone, the host untouched; modprobe: back, as allocated anew
    res = nt.run("sh", "-c", "modprobe -r nfit_test && ls /sys/bus/nd/devices && test ! -e /sys/module/nfit_test")
    assert (res.returncode, res.stdout) == (0, ""), res.stderr
    res = nt.run("sh", "-c", "modprobe nfit_test && modprobe nfit_test && cat /sys/module/nfit_test/initstate")
    assert (res.returncode, res.stdout) == (0, "live\n"), res.stderr
    # active: the IO namespaces of nfit_test.1's label-less regions
    assert sorted(ns["dev"] for ns in nt.ndctl("list", "-N")) == ["namespace2.0", "namespace3.0"]  # type: ignore[union-attr]
    assert [label_area(nt, d)[:7] for d in range(4)] == [f"label{d}\0".encode() for d in range(4)]
    assert len(nt.ndctl("list", "-D")) == 6  # type: ignore[arg-type]


def test_other_modules(nt) -> None:  # type: ignore[no-untyped-def]
    res = nt.run("sh", "-c", "modprobe nd_pmem && modinfo -F name nd_pmem && modinfo nfit_test >/dev/null")
    assert (res.returncode, res.stdout) == (0, "nd_pmem\n"), res.stderr
    res = nt.run("modprobe", "-r", "nd_pmem")
    assert res.returncode == 1 and "in use" in res.stderr
    res = nt.run("modprobe", "no_such_module")
    assert res.returncode == 1 and "not found" in res.stderr
    res = nt.run("modinfo", "no_such_module")
    assert res.returncode == 1 and "not found" in res.stderr
    res = nt.run("sh", "-c", "journalctl -k -r --since -2s; echo rc=$?")
    assert res.stdout == "rc=0\n"


# What ndctl_test_init() (ndctl's test/core.c) asks before it trusts a platform, asked through
# libkmod itself: each module's path from modules.dep.bin, its initstate, its taint.
KMOD_PROBE = r"""
import ctypes, os, sys
kmod = ctypes.CDLL("libkmod.so.2")
kmod.kmod_new.restype = ctypes.c_void_p
kmod.kmod_module_get_path.restype = ctypes.c_char_p
kmod.kmod_module_get_path.argtypes = [ctypes.c_void_p]
kmod.kmod_module_get_initstate.argtypes = [ctypes.c_void_p]
ctx = kmod.kmod_new(None, None)
for name in sys.argv[1:]:
    mod = ctypes.c_void_p()
    assert kmod.kmod_module_new_from_name(ctypes.c_void_p(ctx), name.encode(), ctypes.byref(mod)) == 0
    path = kmod.kmod_module_get_path(mod)
    state = kmod.kmod_module_get_initstate(mod)  # KMOD_MODULE_LIVE = 1
    taint = open(f"/sys/module/{name}/taint").read().strip() if state == 1 else "-"
    print(name, path.decode() if path else None, state, repr(taint))
"""


def test_ndctl_test_init_finds_the_mocked_modules_out_of_tree(nt) -> None:  # type: ignore[no-untyped-def]
    host_lib_modules = Path("/lib/modules").exists()
    names = ("nfit", "device_dax", "dax_pmem", "libnvdimm", "nd_btt", "nd_e820", "nd_pmem", "nfit_test", "dax")
    res = nt.run("python3", "-c", KMOD_PROBE, *names)
    assert res.returncode == 0, res.stderr
    release = os.uname().release
    seen = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines()}
    for name in names[:7]:
        assert seen[name] == [f"/lib/modules/{release}/extra/{name}.ko", "1", "'O'"], name
    assert seen["nfit_test"] == [f"/lib/modules/{release}/extra/test/nfit_test.ko", "1", "'O'"]
    assert seen["dax"] == [f"/lib/modules/{release}/kernel/drivers/dax/dax.ko", "1", "''"]  # the distribution's
    assert Path("/lib/modules").exists() == host_lib_modules  # the view was the namespace's only

    # the kernel's module graph: holders/ and refcnt of a module its users hold
    res = nt.run("sh", "-c", "ls /sys/module/nfit/holders; cat /sys/module/nfit/refcnt; "
                             "test -d /sys/bus/acpi/drivers/nfit && echo acpi")
    assert (res.returncode, res.stdout) == (0, "nfit_test\n1\nacpi\n"), res.stderr
    res = nt.run("sh", "-c", "modprobe -r nfit_test && ls /sys/module/nfit/holders; cat /sys/module/nfit/refcnt")
    assert (res.returncode, res.stdout) == (0, "0\n"), res.stderr


KMOD_RELOAD = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
kmod = ctypes.CDLL("libkmod.so.2")
kmod.kmod_new.restype = ctypes.c_void_p
ctx = ctypes.c_void_p(kmod.kmod_new(None, None))
mod = ctypes.c_void_p()
assert kmod.kmod_module_new_from_name(ctx, b"nfit_test", ctypes.byref(mod)) == 0
print("remove", kmod.kmod_module_remove_module(mod, 0), os.path.exists("/sys/bus/nd/devices/ndbus0"))
print("insert", kmod.kmod_module_probe_insert_module(mod, 0, None, None, None, None),
      os.path.exists("/sys/bus/nd/devices/ndbus0"))
for name in (b"libnvdimm", b"nd_e820", b"no_such_module"):  # held by others; not the platform's; absent
    print(name.decode(), libc.delete_module(name, 0), errno.errorcode[ctypes.get_errno()])
print("init_module", libc.init_module(b"\x7fELF", 4, b""), errno.errorcode[ctypes.get_errno()])
"""


def test_libkmod_reloads_nfit_test_in_process(nt) -> None:  # type: ignore[no-untyped-def]
    """ndctl_test_init()'s reset: libkmod's delete_module() and finit_module() of nfit_test,
    made by the test itself, remove and load the emulated module; nothing reaches the host."""
    res = nt.run("sh", "-c", "uuidgen > /sys/bus/nd/devices/namespace0.0/uuid && python3 -c \"$0\" && "
                             "cat /sys/bus/nd/devices/namespace0.0/uuid", KMOD_RELOAD)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "remove 0 False", "insert 0 True", "libnvdimm -1 EAGAIN", "nd_e820 -1 EBUSY", "no_such_module -1 ENOENT",
        "init_module -1 ENOEXEC",
        ""]  # the uuid written before is gone: the module's platform, allocated anew


@pytest.mark.skipif(not Path("/sys/kernel/mm/hugepages").is_dir(), reason="the host has no hugepages in sysfs")
def test_host_sysfs_shows_through_where_vnvdimm_has_nothing_to_say(nt) -> None:  # type: ignore[no-untyped-def]
    host = sorted(p.name for p in Path("/sys/kernel/mm/hugepages").iterdir())
    res = nt.run("sh", "-c", "ls /sys/kernel/mm/hugepages && ls /sys/bus/nd/devices/ndbus1 >/dev/null")
    assert (res.returncode, res.stdout.split()) == (0, host), res.stderr


def test_the_disk_follows_its_regions_read_only_state(nt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """read_only_store() -> nvdimm_check_and_set_ro(): nmem4 is not armed, so region2 and its
    disk start read-only; writing 0 makes /dev/pmem2 writable at once, 1 read-only again,
    all within one session (one program holding the platform, as libndctl's test does)."""
    sector = tmp_path / "sector"
    script = f"""
        PATH=$PATH:/usr/sbin:/sbin  # blockdev, for an ordinary user too (BLKROGET is emulated)
        ro=/sys/bus/nd/devices/region2/read_only
        put() {{ dd if={sector} of=/dev/pmem2 bs=4096 oflag=direct conv=notrunc status=none 2>/dev/null; }}
        head -c 4096 /dev/urandom > {sector}
        echo "start $(blockdev --getro /dev/pmem2) $(put && echo wrote || echo refused)"
        echo 0 > $ro
        echo "rw $(blockdev --getro /dev/pmem2) $(put && echo wrote || echo refused)"
        dd if=/dev/pmem2 bs=4096 count=1 iflag=direct status=none | cmp - {sector} && echo "read back"
        echo 1 > $ro
        echo "ro $(blockdev --getro /dev/pmem2) $(put && echo wrote || echo refused)"
    """
    res = nt.run("sh", "-c", script)
    assert res.stdout.splitlines() == ["start 1 refused", "rw 0 wrote", "read back", "ro 1 refused"], res.stderr
