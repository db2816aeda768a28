"""As root, inside with-vnvdimm, block devices come and go with the namespaces as udev makes
them: a disk made while the command runs is a block device node (the mount's own, its rdev a
loop device) by the time ndctl returns, its partitions get /dev/pmemNp1 nodes, sysfs
directories and /proc/partitions lines, and media errors reach the block device as
pmem_do_read() has them: listed means a read fails, a write clears."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from mount_kit import have_ndctl

pytestmark = [
    pytest.mark.ndctl,
    pytest.mark.skipif(not have_ndctl(), reason="ndctl not installed"),
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control"),
                       reason="block devices need root and loop devices"),
]

# Waits inside the scripts: for what udev would make (partitions after BLKPG), generous bounds.
WAIT_FOR = 'wait_for() { i=0; until test "$@"; do i=$((i+1)); [ $i -lt 300 ] || return 1; sleep 0.1; done; }\n'


def sh(m, script: str, timeout: float = 300):  # type: ignore[no-untyped-def]
    return m.run("sh", "-c", "set -e\n" + WAIT_FOR + script, timeout=timeout)


def test_a_namespace_enabled_during_the_command_is_a_block_device_and_ext4_on_it_survives_a_remount(
        nfit_mnt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fs = tmp_path / "fs"
    fs.mkdir()
    res = sh(nfit_mnt, f"""
        ! test -e /dev/pmem1
        ndctl create-namespace -r region1 -m raw -s 64M | grep -o '"blockdev":"[a-z0-9]*"'
        stat -c '%F %t:%T' /dev/pmem1
        cat /sys/block/pmem1/dev
        mkfs.ext4 -q -F /dev/pmem1
        mount /dev/pmem1 {fs}
        echo 'made while the command ran' > {fs}/hello
        if ndctl disable-namespace namespace1.0 2>/dev/null; then echo 'disabled under ext4'; fi
        umount /dev/pmem1
        ndctl disable-namespace namespace1.0 2>/dev/null
        ! test -e /dev/pmem1
        ndctl enable-namespace namespace1.0 2>/dev/null
        test -b /dev/pmem1
    """)
    assert res.returncode == 0, res.stderr
    blockdev, node, sysfs_dev = res.stdout.splitlines()  # (and no "disabled under ext4")
    assert blockdev == '"blockdev":"pmem1"'
    kind, numbers = node.rsplit(" ", 1)
    assert kind == "block special file"
    major, minor = (int(x, 16) for x in numbers.split(":"))
    assert sysfs_dev == f"{major}:{minor}"  # the node and /sys/block/pmem1/dev agree
    nfit_mnt.remount()
    res = nfit_mnt.run("sh", "-c", f"fsck.ext4 -f -n /dev/pmem1 >/dev/null && mount -o ro /dev/pmem1 {fs} && "
                                   f"cat {fs}/hello && umount {fs}")
    assert (res.returncode, res.stdout) == (0, "made while the command ran\n"), res.stderr


def test_partitions_come_and_go_with_blkpg_rescans_and_the_namespace(nfit_mnt, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fs = tmp_path / "fs"
    fs.mkdir()
    res = sh(nfit_mnt, f"""
        ndctl create-namespace -r region1 -m raw -s 64M >/dev/null
        parted --script /dev/pmem1 mklabel gpt mkpart one 1MiB 9MiB mkpart two 9MiB 41MiB
        wait_for -b /dev/pmem1p2
        test -b /dev/pmem1p1
        echo "parts: $(grep -Eo 'pmem1.*' /proc/partitions | tr '\\n' ' ')"
        echo "p2: $(cat /sys/block/pmem1/pmem1p2/partition /sys/block/pmem1/pmem1p2/start \
                        /sys/block/pmem1/pmem1p2/size | tr '\\n' ' ')"
        mkfs.ext4 -q -F /dev/pmem1p2
        mount /dev/pmem1p2 {fs} && echo on-a-partition > {fs}/f && umount /dev/pmem1p2
        blockdev --rereadpt /dev/pmem1
        # /proc/partitions is the kernel's own list (the nodes follow): right after the
        # BLKRRPART it has none, until the partition scan found them again.
        i=0; until grep -q 'pmem1p2$' /proc/partitions; do i=$((i+1)); [ $i -lt 300 ]; sleep 0.1; done
        wait_for -b /dev/pmem1p2
        partprobe /dev/pmem1
        parted --script /dev/pmem1 rm 1
        wait_for ! -e /dev/pmem1p1
        test -b /dev/pmem1p2
        ndctl disable-namespace namespace1.0 2>/dev/null
        ! test -e /dev/pmem1p2
        ndctl enable-namespace namespace1.0 2>/dev/null
        test -b /dev/pmem1p2 && ! test -e /dev/pmem1p1
        mount -o ro /dev/pmem1p2 {fs} && cat {fs}/f && umount {fs}
        ndctl disable-namespace namespace1.0 2>/dev/null
        ndctl create-namespace -e namespace1.0 -m sector -f >/dev/null
        parted --script /dev/pmem1s mklabel gpt mkpart one 1MiB 9MiB
        wait_for -b /dev/pmem1s1
        echo "sector: $(grep -Eo 'pmem1s.+' /proc/partitions)"
    """)
    assert res.returncode == 0, res.stderr
    parts, p2, content, sector = res.stdout.splitlines()
    assert parts.split() == ["parts:", "pmem1", "pmem1p1", "pmem1p2"]
    assert p2.split() == ["p2:", "2", str(9 * 2048), str(32 * 2048)]
    assert content == "on-a-partition"
    assert sector == "sector: pmem1s1"


@pytest.mark.skipif(not shutil.which("sfdisk"), reason="sfdisk not installed (util-linux fdisk)")
def test_sfdisk_writes_a_table_and_the_kernel_knows_its_partitions(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    res = sh(nfit_mnt, """
        ndctl create-namespace -r region1 -m raw -s 64M >/dev/null
        printf 'label: dos\\nstart=2048, size=8192\\nstart=10240, size=16384\\n' | sfdisk --quiet /dev/pmem1
        # sfdisk's BLKRRPART drops what a look in between had added: wait until it settles
        wait_for -b /dev/pmem1p2
        i=0; until geometry=$(cat /sys/block/pmem1/pmem1p1/start /sys/block/pmem1/pmem1p2/size 2>/dev/null); do
            i=$((i+1)); [ $i -lt 300 ]; sleep 0.1; done
        echo $geometry
        sfdisk --quiet --delete /dev/pmem1 2
        wait_for ! -e /dev/pmem1p2
        test -b /dev/pmem1p1
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["2048", "16384"]


def test_bad_sectors_fail_reads_through_the_block_device_until_written(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    res = sh(nfit_mnt, """
        ndctl create-namespace -r region1 -m raw -s 64M >/dev/null
        dd if=/dev/pmem1 of=/dev/null bs=4096 skip=125 count=1 status=none   # cached before
        ndctl inject-error --block=1000 --count=8 namespace1.0 >/dev/null
        echo "listed: $(cat /sys/block/pmem1/badblocks)"
        dd if=/dev/pmem1 of=/dev/null bs=512 skip=1003 count=1 iflag=direct status=none || echo direct-eio
        dd if=/dev/pmem1 of=/dev/null bs=4096 skip=125 count=1 status=none || echo cached-eio
        ndctl inject-error --uninject --block=1000 --count=8 namespace1.0 >/dev/null
        ndctl start-scrub >/dev/null && ndctl wait-scrub >/dev/null
        echo "after uninject: $(cat /sys/block/pmem1/badblocks)"
        dd if=/dev/pmem1 of=/dev/null bs=512 skip=1003 count=1 iflag=direct status=none || echo still-eio
        dd if=/dev/zero of=/dev/pmem1 bs=512 seek=1000 count=8 oflag=direct status=none
        echo "after write: $(cat /sys/block/pmem1/badblocks)"
        dd if=/dev/pmem1 of=/dev/null bs=512 skip=1003 count=1 iflag=direct status=none && echo read-ok
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["listed: 1000 8", "direct-eio", "cached-eio", "after uninject: 1000 8",
                                       "still-eio", "after write: ", "read-ok"], res.stderr


def test_a_disk_back_while_its_old_node_is_held_keeps_its_loop_device(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    """The kernel never changes an inode's device number, and an open file of /dev/pmem1 (fd 3
    here) keeps the inode across a disable and enable: the disk that comes back stands on the
    loop device that is still held, so the node, sysfs and the capacity agree."""
    res = sh(nfit_mnt, """
        ndctl create-namespace -r region1 -m raw -s 64M >/dev/null
        exec 3</dev/pmem1
        before=$(stat -c '%t:%T' /dev/pmem1)
        ndctl disable-namespace namespace1.0 2>/dev/null
        ndctl enable-namespace namespace1.0 2>/dev/null
        echo "$before $(stat -c '%t:%T' /dev/pmem1) $(cat /sys/block/pmem1/dev)"
        echo "$(blockdev --getsize64 /dev/pmem1) $(cat /sys/block/pmem1/size)"
        exec 3<&-
    """)
    assert res.returncode == 0, res.stderr
    numbers, sizes = res.stdout.splitlines()
    before, after, sysfs_dev = numbers.split()
    assert before == after
    assert sysfs_dev == ":".join(str(int(x, 16)) for x in after.split(":"))
    size, sectors = sizes.split()
    assert int(size) == int(sectors) * 512 == 64 << 20


def test_a_table_is_read_when_its_writer_closes_the_disk_not_while_it_writes(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    # udev reads a disk's table again when a writer closes its node (IN_CLOSE_WRITE), never
    # halfway through the writing: a look at a table half written would add partitions that a
    # tool such as parted is about to add itself (its BLKPG then fails with EBUSY).
    held = """
import os, struct, sys, time
entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 8192)
mbr = bytes(446) + entry + bytes(48) + b"\\x55\\xaa"
fd = os.open("/dev/pmem1", os.O_RDWR)
os.write(fd, mbr)
os.fsync(fd)
time.sleep(1.5)  # several looks of the daemon
print("while held:", os.path.exists("/sys/block/pmem1/pmem1p1"))
os.close(fd)
"""
    res = sh(nfit_mnt, f"""
        ndctl create-namespace -r region1 -m raw -s 64M >/dev/null
        python3 -c '{held}'
        wait_for -b /dev/pmem1p1
        echo "after close: $(cat /sys/block/pmem1/pmem1p1/start /sys/block/pmem1/pmem1p1/size | tr '\\n' ' ')"
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["while held: False", "after close: 2048 8192 "]


@pytest.mark.skipif(not shutil.which("delpart"), reason="delpart not installed (util-linux)")
def test_a_partition_deleted_with_blkpg_stays_deleted_while_its_table_still_has_it(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    # BLKPG_DEL_PARTITION tells the kernel, which does not read the table again on its own.
    # The disable and enable read the table at the attach, before ndctl returns: no rescan of
    # parted's close is still to come (as `udevadm settle` would make sure on a real system).
    res = sh(nfit_mnt, """
        ndctl create-namespace -r region1 -m raw -s 64M >/dev/null
        parted --script /dev/pmem1 mklabel gpt mkpart one 1MiB 9MiB mkpart two 9MiB 41MiB
        ndctl disable-namespace namespace1.0 2>/dev/null
        ndctl enable-namespace namespace1.0 2>/dev/null
        wait_for -b /dev/pmem1p2
        delpart /dev/pmem1 1
        wait_for ! -e /dev/pmem1p1
        sleep 1.5
        echo "$(test -e /dev/pmem1p1 && echo p1) $(test -b /dev/pmem1p2 && echo p2)"
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["p2"]


def test_a_disk_reopened_after_a_read_only_toggle_is_its_new_block_device(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    """libndctl's validate_bdev: /dev/pmemN held open while its region turns read-write (the
    loop device behind it is replaced), then reopened O_DIRECT and read. The name must lead
    to the new device, not to the released one (size 0: the read returned nothing). The
    daemon's watch on the node used to keep the old inode, device number and all."""
    res = nfit_mnt.run(sys.executable, "-c", """
import fcntl, mmap, os, struct
ro = "/sys/bus/nd/devices/region0/read_only"
with open(ro, "w") as f:
    f.write("1")
fd = os.open("/dev/pmem0", os.O_RDONLY)
with open(ro, "w") as f:
    f.write("0")
fcntl.ioctl(fd, 0x125d, struct.pack("i", 0))  # BLKROSET 0
os.close(fd)
fd = os.open("/dev/pmem0", os.O_RDWR | os.O_DIRECT)
size = struct.unpack("Q", fcntl.ioctl(fd, 0x80081272, bytes(8)))[0]  # BLKGETSIZE64
buf = mmap.mmap(-1, 4096)
print(size, os.readv(fd, [buf]))
""")
    assert res.returncode == 0, res.stderr
    size, got = map(int, res.stdout.split())
    assert size > 0 and got == 4096
