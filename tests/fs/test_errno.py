"""Stores on a real mount: the errno of the kernel code for bad input and busy devices, EACCES
for the wrong direction, kernfs' write rules (one store per write(2), at most a page, O_TRUNC
ignored), and nothing changes when a store is refused (the whole tree compared)."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest
from mount_kit import E820_BUS, SMALL_E820, diff, mounted, read, snapshot, sync_memmaps, write, write_errno

pytestmark = pytest.mark.mount

R0 = f"{E820_BUS}/region0"
R1 = f"{E820_BUS}/region1"


@pytest.fixture(scope="module")
def mnt(request):  # type: ignore[no-untyped-def]
    with mounted(request, SMALL_E820) as m:
        sync_memmaps(m.sys)
        yield m


@pytest.mark.parametrize("rel", [
    f"{R0}/size", f"{R0}/nstype", f"{R0}/namespace0.0/mode", f"{R0}/namespace0.0/size",
    f"{R0}/pfn0.1/size", f"{R0}/pfn0.1/resource", f"{R1}/dax1.1/dax1.0/align", f"{R1}/dax1.1/dax_region/size",
    f"{E820_BUS}/provider", "module/kmem/initstate",
])
def test_writing_a_read_only_attribute_is_eacces(mnt, rel: str) -> None:  # type: ignore[no-untyped-def]
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(PermissionError):
            os.open(mnt.sys / rel, flags)


@pytest.mark.parametrize("rel", ["bus/nd/drivers/nd_pmem/bind", "bus/nd/drivers/dax_pmem/unbind",
                                 "bus/dax/drivers/kmem/new_id", "bus/nd/uevent"])
def test_reading_a_write_only_attribute_is_eacces(mnt, rel: str) -> None:  # type: ignore[no-untyped-def]
    for flags in (os.O_RDONLY, os.O_RDWR):
        with pytest.raises(PermissionError):
            os.open(mnt.sys / rel, flags)


SPARE = str(uuid.uuid4()).encode()

BAD_STORES = [
    # region_devs.c
    (f"{R0}/align", b"3\n", errno.EINVAL),
    (f"{R0}/align", b"0x20000000\0", errno.EINVAL),  # larger than the region
    (f"{R0}/align", b"99999999999999999999\0", errno.ERANGE),
    (f"{R0}/read_only", b"maybe\0", errno.EINVAL),
    # namespace_devs.c: the IO namespaces are claimed
    (f"{R0}/namespace0.0/holder_class", b"dax\0", errno.EBUSY),
    (f"{R0}/namespace0.0/force_raw", b"x\n\0", errno.EINVAL),
    # pfn_devs.c / claim.c on the active pfn: busy
    (f"{R0}/pfn0.1/mode", b"ram\0", errno.EBUSY),
    (f"{R0}/pfn0.1/align", b"4096\n\0", errno.EBUSY),
    (f"{R0}/pfn0.1/uuid", SPARE + b"\0", errno.EBUSY),
    (f"{R0}/pfn0.1/namespace", b"\n\0", errno.EBUSY),
    (f"{R1}/dax1.1/mode", b"pmem\0", errno.EBUSY),
    # ... and on the idle seeds: the input is checked
    (f"{R0}/pfn0.0/mode", b"bogus\0", errno.EINVAL),
    (f"{R0}/pfn0.0/align", b"8192\0", errno.EINVAL),
    (f"{R0}/pfn0.0/uuid", b"not-a-uuid\0", errno.EINVAL),
    (f"{R0}/pfn0.0/namespace", b"foo\0", errno.EINVAL),
    (f"{R0}/pfn0.0/namespace", b"namespace1.0\0", errno.ENODEV),  # not a child of region0
    (f"{R0}/pfn0.0/namespace", b"namespace0.0\0", errno.EBUSY),  # claimed by pfn0.1
    (f"{R0}/dax0.0/namespace", b"namespace0.9\0", errno.ENODEV),
    (f"{R0}/btt0.0/sector_size", b"1000\n\0", errno.EINVAL),
    (f"{R0}/btt0.0/uuid", b"0123\0", errno.EINVAL),
    (f"{R0}/pfn0.1/memmap_state", b"async\0", errno.EINVAL),
    (f"{R0}/uevent", b"nope\0", errno.EINVAL),
    # the driver core (bind_store/unbind_store) and the probes
    ("bus/nd/drivers/nd_pmem/bind", b"namespace0.0\0", errno.ENXIO),  # claimed
    ("bus/nd/drivers/nd_pmem/bind", b"pfn0.1\0", errno.EBUSY),  # already bound
    ("bus/nd/drivers/nd_pmem/bind", b"pfn0.0\0", errno.ENODEV),  # a seed: no namespace
    ("bus/nd/drivers/nd_pmem/bind", b"region0\0", errno.ENODEV),  # does not match
    ("bus/nd/drivers/nd_region/bind", b"namespace0.0\0", errno.ENODEV),
    ("bus/nd/drivers/dax_pmem/bind", b"pfn0.0\0", errno.ENODEV),
    ("bus/nd/drivers/nd_pmem/unbind", b"dax1.1\0", errno.ENODEV),  # bound to another driver
    ("bus/nd/drivers/nd_pmem/unbind", b"nosuch\0", errno.ENODEV),
    ("bus/dax/drivers/device_dax/bind", b"dax1.0\0", errno.EBUSY),
    ("bus/dax/drivers/kmem/bind", b"dax1.0\0", errno.ENODEV),  # kmem matches by id only
    ("bus/dax/drivers/kmem/new_id", b"dax1\0", errno.EINVAL),
    ("bus/nd/uevent", b"add now\0", errno.EINVAL),
    # drivers/base/memory.c auto_online_blocks_store(): only the online types
    ("devices/system/memory/auto_online_blocks", b"movable\n", errno.EINVAL),
    ("devices/system/memory/auto_online_blocks", b"online \n", errno.EINVAL),
    ("devices/system/memory/auto_online_blocks", b"\n", errno.EINVAL),
]


def test_bad_stores_fail_with_the_kernel_errno_and_change_nothing(mnt) -> None:  # type: ignore[no-untyped-def]
    before = snapshot(mnt.sys)
    got = {(rel, data): write_errno(mnt.sys / rel, data) for rel, data, _ in BAD_STORES}
    assert got == {(rel, data): code for rel, data, code in BAD_STORES}
    assert diff(before, snapshot(mnt.sys)) == {}


def test_store_takes_at_most_a_page_and_ignores_o_trunc(mnt) -> None:  # type: ignore[no-untyped-def]
    path = mnt.sys / R0 / "read_only"
    try:
        assert write(path, b"1" + b"x" * 4999) == 4096  # one store of the first page
        assert read(path) == b"1\n"
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # what a shell redirection does
        try:
            assert os.write(fd, b"") == 0  # an empty write stores nothing
            assert os.write(fd, b"0\n") == 2
        finally:
            os.close(fd)
        assert read(path) == b"0\n"
        res = subprocess.run(["sh", "-c", f"echo 1 > {path}"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert read(path) == b"1\n"
        res = subprocess.run(["bash", "-c", f"echo 7 > {path}"], capture_output=True, text=True)
        assert res.returncode != 0 and "Invalid argument" in res.stderr
        res = subprocess.run(["bash", "-c", f"echo 1 > {mnt.sys / R0 / 'size'}"], capture_output=True, text=True)
        assert res.returncode != 0 and "Permission denied" in res.stderr
    finally:
        write(path, b"0\n")
    assert read(path) == b"0\n"


def test_each_write_on_one_open_file_is_its_own_store(mnt) -> None:  # type: ignore[no-untyped-def]
    path = mnt.sys / R0 / "read_only"
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.write(fd, b"1") == 1
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EINVAL
        assert os.write(fd, b"0") == 1
        assert os.pread(fd, 4096, 0) == b"0\n"  # each read at offset 0 shows afresh
        assert os.write(fd, b"1") == 1
        assert os.pread(fd, 4096, 0) == b"1\n"
    finally:
        os.pwrite(fd, b"0", 0)
        os.close(fd)


def test_auto_online_blocks_takes_the_online_types_and_shows_the_last(mnt) -> None:  # type: ignore[no-untyped-def]
    path = mnt.sys / "devices/system/memory/auto_online_blocks"
    assert read(path) == b"offline\n"
    try:
        for value in ("online_movable", "online_kernel", "online", "offline"):
            write(path, value.encode() + b"\n")
            assert read(path) == value.encode() + b"\n"
        write(path, b"online")  # sysfs_streq: the newline is optional
        assert read(path) == b"online\n"
    finally:
        write(path, b"offline\n")


def test_changing_names_in_the_tree_answers_as_sysfs_does(mnt) -> None:  # type: ignore[no-untyped-def]
    """Creating, linking, renaming or removing names: the errno sysfs gives its owner (root)
    on a host (kernfs: no create, EACCES; the rest EPERM), not ENOSYS; nothing changes."""
    before = snapshot(mnt.sys)
    ns = mnt.sys / "bus/nd/devices/namespace0.0"
    region = mnt.sys / E820_BUS / "region0"
    refused = {
        "create": (errno.EACCES, lambda: os.close(os.open(region / "new", os.O_CREAT | os.O_WRONLY, 0o644))),
        "mknod": (errno.EACCES, lambda: os.mknod(region / "new")),
        "mkdir": (errno.EPERM, lambda: os.mkdir(region / "new")),
        "symlink": (errno.EPERM, lambda: os.symlink("/tmp", region / "new")),
        "link": (errno.EPERM, lambda: os.link(region / "size", region / "new")),
        "unlink an attribute": (errno.EPERM, lambda: os.unlink(region / "size")),
        "unlink a link": (errno.EPERM, lambda: os.unlink(ns)),
        "rmdir": (errno.EPERM, lambda: os.rmdir(region)),
        "rename": (errno.EPERM, lambda: os.rename(region / "size", region / "new")),
        "rename a directory": (errno.EPERM, lambda: os.rename(region, region.parent / "region9")),
        "create in /dev": (errno.EACCES, lambda: os.close(os.open(mnt.dev / "new", os.O_CREAT | os.O_WRONLY))),
        "unlink in /dev": (errno.EPERM, lambda: os.unlink(mnt.dev / "pmem0")),
    }
    for what, (want, change) in refused.items():
        with pytest.raises(OSError) as e:
            change()
        assert e.value.errno == want, f"{what}: {errno.errorcode[e.value.errno]}, sysfs gives {errno.errorcode[want]}"
    assert diff(before, snapshot(mnt.sys)) == {}
    assert (mnt.dev / "pmem0").exists()
