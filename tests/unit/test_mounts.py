"""vnvdimm.mounts without a mount: the mount table's escapes and stacking, and paths seen from
another mount namespace (with-vnvdimm binds MNT/dev over /dev) mapped back into the file system."""

from __future__ import annotations

import os

from vnvdimm.mounts import Holder, MountEntry, _NamespaceView, _unescape, mount_entry, mount_table, process_alive

FUSE = (0, 41)


def entry(mountpoint: str, root: str = "/", dev: tuple[int, int] = (0, 6), fstype: str = "devtmpfs") -> MountEntry:
    return MountEntry(mountpoint, root, dev, fstype)


def test_escapes_and_the_mount_on_top() -> None:
    assert _unescape(r"/tmp/a\040b\011c\134d") == "/tmp/a b\tc\\d"
    table = [entry("/"), entry("/dev"), entry("/dev", "/dev", FUSE, "fuse.vnvdimm")]
    assert mount_entry("/dev", table) == table[2]  # the later one is on top
    assert mount_entry("/dev/pmem0", table) is None  # only exact mount points
    assert any(e.mountpoint == "/" for e in mount_table("self"))
    assert mount_table(2**22 + 7) == []  # no such process: empty, no error


def test_paths_of_another_namespace_map_into_the_file_system() -> None:
    table = [entry("/", dev=(8, 1), fstype="ext4"), entry("/dev"), entry("/dev/shm", fstype="tmpfs"),
             entry("/dev", "/dev", FUSE, "fuse.vnvdimm"), entry("/dev/shm", fstype="tmpfs"),
             entry("/sys", "/sys", FUSE, "fuse.vnvdimm"), entry("/tmp/pmem", "/", FUSE, "fuse.vnvdimm")]
    view = _NamespaceView(table, FUSE)
    assert view.inside("/dev/pmem0") == "/dev/pmem0"
    assert view.inside("/tmp/pmem/dev/dax1.0") == "/dev/dax1.0"
    assert view.inside("/sys/bus/nd/devices/region0/size") == "/sys/bus/nd/devices/region0/size"
    assert view.inside("/dev/shm/x") is None  # the host's /dev/shm bound over it
    assert view.inside("/home/user/file") is None
    assert view.fstype("/dev/shm/x") == "tmpfs"


def test_only_data_device_files_make_a_mount_busy() -> None:
    assert Holder("/dev/pmem0", "open").device and Holder("/dev/pmem12s", "mapped").device
    assert Holder("/dev/dax1.0", "open").device
    for path in ("/dev/null", "/dev/ndctl0", "/dev/pts/3", "/sys/bus/nd/devices/pfn0.1/memmap_state", "/"):
        assert not Holder(path, "open").device, path
    assert str(Holder("/dev/pmem0", "open", 42, "mkfs.ext4 /dev/pmem0")) == \
        "/dev/pmem0: open by pid 42 (mkfs.ext4 /dev/pmem0)"


def test_liveness() -> None:
    assert process_alive(os.getpid())
    assert not process_alive(2**22 + 7)
