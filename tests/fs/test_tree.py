"""The shape of MNT/sys and MNT/dev on a real mount: relative symlinks that readlink() and
realpath() like sysfs, the listings of the kernel's directories, and /dev."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from mount_kit import E820_BUS, SMALL_E820, mounted, read

from vnvdimm.mounts import mount_entry

pytestmark = pytest.mark.mount

R0 = f"{E820_BUS}/region0"
R1 = f"{E820_BUS}/region1"


@pytest.fixture(scope="module")
def mnt(request):  # type: ignore[no-untyped-def]
    with mounted(request, SMALL_E820) as m:
        yield m


LINKS = {
    "class/nd/ndctl0": ("../../devices/platform/e820_pmem/ndbus0/ndctl0", f"{E820_BUS}/ndctl0"),
    "dev/char/240:0": ("../../devices/platform/e820_pmem/ndbus0/ndctl0", f"{E820_BUS}/ndctl0"),
    f"{E820_BUS}/ndctl0/device": ("..", E820_BUS),
    f"{R0}/driver": ("../../../../../bus/nd/drivers/nd_region", "bus/nd/drivers/nd_region"),
    f"{R0}/subsystem": ("../../../../../bus/nd", "bus/nd"),
    f"{R0}/pfn0.1/driver": ("../../../../../../bus/nd/drivers/nd_pmem", "bus/nd/drivers/nd_pmem"),
    f"{R1}/dax1.1/driver": ("../../../../../../bus/nd/drivers/dax_pmem", "bus/nd/drivers/dax_pmem"),
    f"{R1}/dax1.1/dax1.0/driver": ("../../../../../../../bus/dax/drivers/device_dax",
                                   "bus/dax/drivers/device_dax"),
    f"{R1}/dax1.1/dax1.0/subsystem": ("../../../../../../../bus/dax", "bus/dax"),
    "bus/nd/devices/region0": ("../../../devices/platform/e820_pmem/ndbus0/region0", R0),
    "bus/nd/devices/pfn0.1": ("../../../devices/platform/e820_pmem/ndbus0/region0/pfn0.1", f"{R0}/pfn0.1"),
    "bus/dax/devices/dax1.0": ("../../../devices/platform/e820_pmem/ndbus0/region1/dax1.1/dax1.0",
                               f"{R1}/dax1.1/dax1.0"),
    "dev/char/242:0": ("../../devices/platform/e820_pmem/ndbus0/region1/dax1.1/dax1.0", f"{R1}/dax1.1/dax1.0"),
    "bus/nd/drivers/nd_pmem/pfn0.1": ("../../../../devices/platform/e820_pmem/ndbus0/region0/pfn0.1",
                                      f"{R0}/pfn0.1"),
    "bus/nd/drivers/nd_pmem/module": ("../../../../module/nd_pmem", "module/nd_pmem"),
    "block/pmem0": ("../devices/platform/e820_pmem/ndbus0/region0/pfn0.1/block/pmem0",
                    f"{R0}/pfn0.1/block/pmem0"),
}


@pytest.mark.parametrize("rel", sorted(LINKS))
def test_links_are_relative_and_resolve(mnt, rel: str) -> None:  # type: ignore[no-untyped-def]
    target, real = LINKS[rel]
    assert os.readlink(mnt.sys / rel) == target
    assert os.path.realpath(mnt.sys / rel) == str(mnt.sys / real)


def test_every_link_under_sys_resolves_inside_sys(mnt) -> None:  # type: ignore[no-untyped-def]
    count = 0
    for dirpath, dirnames, filenames in os.walk(mnt.sys):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            count += 1
            assert not os.readlink(path).startswith("/"), path
            real = os.path.realpath(path)
            assert real.startswith(str(mnt.sys) + "/"), (path, real)
            assert os.path.isdir(real), (path, real)
    assert count >= 50


def test_bus_location_the_way_ndctl_finds_it(mnt) -> None:  # type: ignore[no-untyped-def]
    dev = (mnt.sys / "class/nd/ndctl0/dev").read_text().strip()
    bus = os.path.realpath(mnt.sys / "dev/char" / dev / "device")
    assert bus == str(mnt.sys / E820_BUS)
    assert os.path.basename(bus) == "ndbus0"


LISTINGS = {
    "bus/nd/drivers": {"nd_bus", "nvdimm", "nd_region", "nd_pmem", "dax_pmem"},
    "bus/dax/drivers": {"device_dax", "kmem"},
    "bus/nd/devices": {"ndbus0", "region0", "region1", "namespace0.0", "namespace1.0", "btt0.0", "pfn0.0", "dax0.0",
                       "pfn0.1", "btt1.0", "pfn1.0", "dax1.0", "dax1.1"},
    "bus/dax/devices": {"dax1.0"},
    "class/nd": {"ndctl0"},
    "bus/nd/drivers/nd_pmem": {"bind", "unbind", "uevent", "module", "pfn0.1"},
    "bus/nd/drivers/dax_pmem": {"bind", "unbind", "uevent", "module", "dax1.1"},
    "bus/dax/drivers/device_dax": {"bind", "unbind", "uevent", "module", "new_id", "remove_id", "dax1.0"},
    E820_BUS: {"provider", "commands", "wait_probe", "ndctl0", "region0", "region1", "devtype", "uevent",
               "subsystem", "driver"},
    R0: {"size", "align", "nstype", "mappings", "btt_seed", "pfn_seed", "dax_seed", "namespace_seed", "read_only",
         "max_available_extent", "init_namespaces", "badblocks", "resource", "numa_node", "target_node",
         "modalias", "devtype", "uevent", "subsystem", "driver", "namespace0.0", "btt0.0", "pfn0.0", "dax0.0",
         "pfn0.1"},
    f"{R0}/namespace0.0": {"nstype", "size", "mode", "holder", "holder_class", "force_raw", "resource",
                           "numa_node", "target_node", "modalias", "devtype", "uevent", "subsystem"},
    f"{R0}/pfn0.1/block": {"pmem0"},
    f"{R1}/dax1.1/dax_region": {"id", "size", "align"},
}


EXTENSIONS = {"vnvdimm", "memmap", "memmap_state"}  # vnvdimm's documented extension groups


@pytest.mark.parametrize("rel", sorted(LISTINGS))
def test_listing(mnt, rel: str) -> None:  # type: ignore[no-untyped-def]
    assert set(os.listdir(mnt.sys / rel)) - EXTENSIONS == LISTINGS[rel]


def test_personality_directories(mnt) -> None:  # type: ignore[no-untyped-def]
    pfn = set(os.listdir(mnt.sys / R0 / "pfn0.1"))
    assert {"mode", "uuid", "namespace", "align", "resource", "size", "supported_alignments", "numa_node",
            "target_node", "modalias", "devtype", "uevent", "subsystem", "driver", "block", "memmap_state"} <= pfn
    seed = set(os.listdir(mnt.sys / R0 / "pfn0.0"))
    assert "driver" not in seed and "block" not in seed
    btt = set(os.listdir(mnt.sys / R0 / "btt0.0"))
    assert {"sector_size", "namespace", "uuid", "size", "log_zero_flags", "modalias", "devtype"} <= btt
    dax = set(os.listdir(mnt.sys / R1 / "dax1.1"))
    assert {"dax_region", "dax1.0", "mode", "uuid", "namespace", "align", "driver"} <= dax
    instance = set(os.listdir(mnt.sys / R1 / "dax1.1/dax1.0"))
    assert {"size", "align", "target_node", "resource", "modalias", "dev", "uevent", "driver",
            "subsystem", "mapping0"} <= instance


def test_dev(mnt) -> None:  # type: ignore[no-untyped-def]
    names = set(os.listdir(mnt.dev))
    assert names == {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "fd", "stdin", "stdout", "stderr",
                     "pts", "shm", "ndctl0", "pmem0", "dax1.0"}
    for name, rdev in {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
                       "tty": (5, 0), "ptmx": (5, 2)}.items():
        st = os.lstat(mnt.dev / name)
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == rdev, name
        assert stat.S_IMODE(st.st_mode) == 0o666
    assert os.readlink(mnt.dev / "fd") == "/proc/self/fd"
    assert os.readlink(mnt.dev / "stderr") == "/proc/self/fd/2"
    assert os.path.isdir(mnt.dev / "pts") and os.path.isdir(mnt.dev / "shm")
    assert os.stat(mnt.dev / "pmem0").st_size == 262144000
    assert os.stat(mnt.dev / "dax1.0").st_size == 266338304
    assert stat.S_ISREG(os.stat(mnt.dev / "pmem0").st_mode)
    entry = mount_entry(mnt.root)
    assert entry is not None
    if "nodev" in entry.options:
        # An ordinary user's FUSE mount is nodev (fusermount3 forces it): the nodes are seen,
        # but opening one is refused, as on any nodev mount; with-vnvdimm binds the host's.
        with pytest.raises(PermissionError):
            open(mnt.dev / "zero", "rb")  # noqa: SIM115
    else:
        with open(mnt.dev / "zero", "rb") as f:  # the host's driver answers (mounted with -o dev)
            assert f.read(16) == bytes(16)
        with open(mnt.dev / "null", "wb") as f:
            f.write(b"x")
    # ioctl-only: it opens (for the preload library's ioctls), but has no read() or write()
    fd = os.open(mnt.dev / "ndctl0", os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.read(fd, 16)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    # what the preload library learns about each node (and only device nodes have it)
    socket_path = str(mnt.state_dir)  # not in there: the socket lives in the runtime dir
    node = os.getxattr(mnt.dev / "ndctl0", "user.vnvdimm").decode().split()
    assert node[:4] == ["c", read(mnt.sys / "class/nd/ndctl0/dev").decode().strip(), "ndctl0", "0"]
    assert node[4].endswith(".sock") and not node[4].startswith(socket_path)
    assert os.getxattr(mnt.dev / "pmem0", "user.vnvdimm").decode().split()[:3] == [
        "b", read(mnt.sys / "block/pmem0/dev").decode().strip(), "pmem0"]
    assert os.getxattr(mnt.dev / "dax1.0", "user.vnvdimm").decode().split()[3] == "2097152"
    with pytest.raises(OSError) as e:
        os.getxattr(mnt.sys / "bus/nd/drivers_autoprobe", "user.vnvdimm")
    assert e.value.errno == errno.ENODATA
