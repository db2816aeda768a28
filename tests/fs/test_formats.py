"""What reads of MNT/sys return on a real mount (the small e820 topology: region0 fsdax map=dev,
region1 devdax map=mem, 256 MiB each): the kernel's formats (one trailing newline, decimal
or %#llx numbers, lists with a trailing space and [x] selection), st_size 4096 and the modes
of the kernel's attribute declarations, from os.stat."""

from __future__ import annotations

import os
import re
import stat
import uuid

import pytest
from mount_kit import E820_BUS, SKIP_CONTENT, SMALL_E820, mounted, read, read_errno, sync_memmaps

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def mnt(request):  # type: ignore[no-untyped-def]
    """One mount of the small e820 topology for the whole module: these tests only read."""
    with mounted(request, SMALL_E820) as m:
        sync_memmaps(m.sys)  # memmap_state reads idle once the init is done
        yield m

MULTILINE = {"uevent", "badblocks"}  # "KEY=value\n" lines, "sector count\n" lines


def attribute_files(root):  # type: ignore[no-untyped-def]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                yield path, name, st


def test_every_attribute_has_one_trailing_newline(mnt) -> None:  # type: ignore[no-untyped-def]
    checked = 0
    for path, name, st in attribute_files(mnt.sys):
        if name in SKIP_CONTENT or not st.st_mode & 0o444:
            continue
        try:
            data = read(path)
        except OSError:
            continue  # shows that fail (ENXIO for a disabled pfn's resource...) are checked elsewhere
        checked += 1
        if data == b"":
            assert name in MULTILINE, path  # an empty list of lines
            continue
        assert data.endswith(b"\n") and not data.endswith(b"\n\n"), (path, data)
        if name not in MULTILINE:
            assert data.count(b"\n") == 1, (path, data)
    assert checked > 200


def test_attribute_st_size_is_4096_and_bin_attributes_their_size(mnt) -> None:  # type: ignore[no-untyped-def]
    for path, name, st in attribute_files(mnt.sys):
        if name in SKIP_CONTENT:
            assert st.st_size % 8 == 0, path
        else:
            assert st.st_size == 4096, path


BUS = E820_BUS
R0 = f"{BUS}/region0"
R1 = f"{BUS}/region1"


@pytest.mark.parametrize("rel,expected", [
    (f"{BUS}/provider", b"e820\n"),
    (f"{BUS}/commands", b"\n"),  # e820 has no bus commands: an empty list
    (f"{BUS}/wait_probe", b"1\n"),
    (f"{BUS}/ndctl0/dev", b"240:0\n"),
    ("class/nd/ndctl0/dev", b"240:0\n"),
    (f"{R0}/size", b"268435456\n"),
    (f"{R0}/align", b"0x1000000\n"),
    (f"{R0}/nstype", b"4\n"),
    (f"{R0}/mappings", b"0\n"),
    (f"{R0}/read_only", b"0\n"),
    (f"{R0}/modalias", b"nd:t2\n"),
    (f"{R0}/devtype", b"nd_pmem\n"),
    (f"{R0}/numa_node", b"0\n"),
    (f"{R0}/target_node", b"0\n"),
    (f"{R0}/pfn_seed", b"pfn0.0\n"),
    (f"{R0}/dax_seed", b"dax0.0\n"),
    (f"{R0}/btt_seed", b"btt0.0\n"),
    (f"{R0}/namespace_seed", b"namespace0.0\n"),
    (f"{R0}/init_namespaces", b"1/1\n"),
    (f"{R0}/max_available_extent", b"0\n"),
    (f"{R0}/badblocks", b""),
    (f"{R0}/namespace0.0/mode", b"memory\n"),
    (f"{R0}/namespace0.0/holder", b"pfn0.1\n"),
    (f"{R0}/namespace0.0/holder_class", b"\n"),  # the claim class is not on the media of an IO namespace
    (f"{R0}/namespace0.0/force_raw", b"0\n"),
    (f"{R0}/namespace0.0/nstype", b"4\n"),
    (f"{R0}/namespace0.0/size", b"268435456\n"),
    (f"{R0}/namespace0.0/modalias", b"nd:t4\n"),
    (f"{R0}/namespace0.0/devtype", b"nd_namespace_io\n"),
    (f"{R0}/pfn0.1/mode", b"pmem\n"),
    (f"{R0}/pfn0.1/align", b"2097152\n"),
    (f"{R0}/pfn0.1/namespace", b"namespace0.0\n"),
    (f"{R0}/pfn0.1/size", b"262144000\n"),
    (f"{R0}/pfn0.1/supported_alignments", b"4096 2097152 1073741824 \n"),
    (f"{R0}/pfn0.1/devtype", b"nd_pfn\n"),
    (f"{R0}/pfn0.1/memmap_state", b"idle\n"),
    (f"{R0}/pfn0.1/block/pmem0/size", b"512000\n"),  # in 512-byte sectors
    (f"{R0}/pfn0.0/mode", b"none\n"),
    (f"{R0}/pfn0.0/uuid", b"\n"),
    (f"{R0}/pfn0.0/namespace", b"\n"),
    (f"{R0}/pfn0.0/memmap_state", b"idle\n"),  # never enabled
    (f"{R0}/btt0.0/sector_size", b"512 520 528 4096 4104 4160 4224 \n"),
    (f"{R0}/btt0.0/uuid", b"\n"),
    (f"{R1}/namespace1.0/mode", b"dax\n"),
    (f"{R1}/namespace1.0/holder", b"dax1.1\n"),
    (f"{R1}/dax1.1/mode", b"ram\n"),
    (f"{R1}/dax1.1/modalias", b"nd:t7\n"),
    (f"{R1}/dax1.1/size", b"266338304\n"),
    (f"{R1}/dax1.1/dax_region/size", b"266338304\n"),
    (f"{R1}/dax1.1/dax_region/align", b"2097152\n"),
    (f"{R1}/dax1.1/dax_region/id", b"1\n"),
    (f"{R1}/dax1.1/dax1.0/size", b"266338304\n"),
    (f"{R1}/dax1.1/dax1.0/align", b"2097152\n"),
    (f"{R1}/dax1.1/dax1.0/target_node", b"0\n"),
    (f"{R1}/dax1.1/dax1.0/modalias", b"dax:t0*\n"),
    (f"{R1}/dax1.1/dax1.0/dev", b"242:0\n"),
    ("bus/nd/drivers_autoprobe", b"1\n"),
    ("module/kmem/initstate", b"live\n"),
    ("module/nd_pmem/initstate", b"live\n"),
])
def test_values(mnt, rel: str, expected: bytes) -> None:  # type: ignore[no-untyped-def]
    assert read(mnt.sys / rel) == expected


def test_number_formats(mnt) -> None:  # type: ignore[no-untyped-def]
    start = read(mnt.sys / R0 / "resource")
    assert re.fullmatch(rb"0x[0-9a-f]+\n", start)  # %#llx
    start0 = int(start, 16)
    assert read(mnt.sys / R0 / "namespace0.0/resource") == start
    # fsdax map=dev: the data starts after the info block and the memmap, 2 MiB aligned
    assert int(read(mnt.sys / R0 / "pfn0.1/resource"), 16) == start0 + (6 << 20)
    assert int(read(mnt.sys / R1 / "dax1.1/resource"), 16) == int(read(mnt.sys / R1 / "resource"), 16) + (2 << 20)
    for rel in (f"{R0}/pfn0.1/uuid", f"{R1}/dax1.1/uuid"):
        text = read(mnt.sys / rel).decode()
        assert text == f"{uuid.UUID(text.strip())}\n"  # lowercase 8-4-4-4-12


@pytest.mark.parametrize("rel,code", [
    (f"{R0}/pfn0.0/resource", 6),  # ENXIO: no address to convey while disabled
    (f"{R0}/pfn0.0/size", 6),
    (f"{R0}/btt0.0/size", 6),
    (f"{R0}/dax0.0/resource", 6),
])
def test_show_errno(mnt, rel: str, code: int) -> None:  # type: ignore[no-untyped-def]
    assert read_errno(mnt.sys / rel) == code


MODES = {
    f"{R0}/size": 0o444, f"{R0}/align": 0o644, f"{R0}/read_only": 0o644, f"{R0}/resource": 0o400,
    f"{R0}/uevent": 0o644, f"{R0}/namespace_seed": 0o444,
    f"{R0}/namespace0.0/size": 0o444, f"{R0}/namespace0.0/holder_class": 0o644,
    f"{R0}/namespace0.0/force_raw": 0o644, f"{R0}/namespace0.0/resource": 0o400,
    f"{R0}/pfn0.1/mode": 0o644, f"{R0}/pfn0.1/align": 0o644, f"{R0}/pfn0.1/uuid": 0o644,
    f"{R0}/pfn0.1/namespace": 0o644, f"{R0}/pfn0.1/resource": 0o400, f"{R0}/pfn0.1/size": 0o444,
    f"{R0}/pfn0.1/memmap_state": 0o644, f"{R0}/btt0.0/sector_size": 0o644, f"{R0}/btt0.0/size": 0o444,
    f"{R1}/dax1.1/dax_region/align": 0o400, f"{R1}/dax1.1/dax_region/size": 0o444,
    f"{R1}/dax1.1/dax1.0/align": 0o444, f"{R1}/dax1.1/dax1.0/size": 0o444,
    f"{R1}/dax1.1/dax1.0/resource": 0o400,
    "bus/nd/drivers/nd_pmem/bind": 0o200, "bus/nd/drivers/nd_pmem/unbind": 0o200,
    "bus/nd/drivers/nd_pmem/uevent": 0o200, "bus/nd/uevent": 0o200, "bus/nd/drivers_autoprobe": 0o644,
    "bus/dax/drivers/device_dax/new_id": 0o200, "bus/dax/drivers/kmem/remove_id": 0o200,
    "module/kmem/initstate": 0o444,
}


def test_modes(mnt) -> None:  # type: ignore[no-untyped-def]
    got = {rel: stat.S_IMODE(os.stat(mnt.sys / rel).st_mode) for rel in MODES}
    assert got == MODES
    for rel in (R0, f"{R0}/pfn0.1", f"{R1}/dax1.1/dax_region", "bus/nd/drivers/nd_pmem"):
        st = os.stat(mnt.sys / rel)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    st = os.lstat(mnt.sys / "class/nd/ndctl0")
    assert stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o777
    for _, name, st in attribute_files(mnt.sys):
        assert stat.S_IMODE(st.st_mode) in (0o444, 0o644, 0o200, 0o400, 0o600), name
