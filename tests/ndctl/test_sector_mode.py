"""Sector mode through the real ndctl on template = "nfit_test": the BTT's version and place
follow the label version as nd_btt chooses them, its debugfs shows the arena as the kernel
does, `ndctl check-namespace` (which reads the BTT's info blocks, map and flog from the raw
namespace) finds it consistent after thousands of writes, and a BTT 1.1 that an older vnvdimm
left on a v1.2-labelled namespace is refused rather than read as a BTT 2.0."""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import uuid
from pathlib import Path

import kernel_oracle as K
import pytest
from mount_kit import have_ndctl

from vnvdimm.model.infoblock import BttInfo, btt_arenas, btt_log_init

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]

NFIT_TEST = 'template = "nfit_test"\n[memmap]\nworkers = 1\n'
BUS = "nfit_test.0"


@pytest.fixture
def nt(make_mount):  # type: ignore[no-untyped-def]
    return make_mount(NFIT_TEST)


def ok(nt, *cmd: str) -> str:  # type: ignore[no-untyped-def]
    res = nt.run(*cmd)
    assert res.returncode == 0, f"{' '.join(cmd)}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def relabel(nt, version: str) -> None:  # type: ignore[no-untyped-def]
    """The suite's reset / resetV: fresh labels of that version on bus 0."""
    ok(nt, "ndctl", "disable-region", "-b", BUS, "all")
    ok(nt, "ndctl", "init-labels", "-f", "-V", version, "-b", BUS, "all")
    ok(nt, "ndctl", "enable-region", "-b", BUS, "all")


def create_sector(nt, *extra: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    res = nt.run("ndctl", "create-namespace", "-b", BUS, "-t", "pmem", "-m", "sector", *extra)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def set_raw(nt, ns: str, raw: bool) -> None:  # type: ignore[no-untyped-def]
    ok(nt, "ndctl", "disable-namespace", ns)
    nt.write(f"sys/bus/nd/devices/{ns}/force_raw", b"1" if raw else b"0")
    ok(nt, "ndctl", "enable-namespace", ns)


def raw_head(nt, ns: str, blockdev: str) -> bytes:  # type: ignore[no-untyped-def]
    """The first 8 KiB of the namespace, through its raw block device."""
    set_raw(nt, ns, True)
    head = nt.path(f"dev/{blockdev.removesuffix('s')}").read_bytes()[:8192]
    set_raw(nt, ns, False)
    return head


def debugfs(nt, btt: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    arena = nt.path(f"sys/kernel/debug/btt/{btt}/arena0")
    return {f.name: f.read_text().strip() for f in arena.iterdir()}


@pytest.mark.parametrize(("labels", "version", "infooff"), [("1.1", (1, 1), 4096), ("1.2", (2, 0), 0)])
def test_btt_version_and_place_follow_the_labels(nt, labels: str, version: tuple[int, int],  # type: ignore[no-untyped-def]
                                                 infooff: int) -> None:
    relabel(nt, labels)
    ns = create_sector(nt)
    btt = nt.read(f"sys/bus/nd/devices/{ns['dev']}/holder").strip()
    assert nt.read(f"sys/bus/nd/devices/{ns['dev']}/holder_class") == "btt\n"
    shown = debugfs(nt, btt)
    assert (int(shown["version_major"]), int(shown["version_minor"])) == version
    assert (shown["log_index_0"], shown["log_index_1"]) == ("0", "1")
    assert shown["infooff"] == "0x0000000000000000" and shown["nfree"] == "256"
    head = raw_head(nt, str(ns["dev"]), str(ns["blockdev"]))
    sb = K.decode_btt_sb(head[infooff: infooff + 4096])
    assert sb is not None, f"no BTT info block at namespace offset {infooff}"
    assert (sb["version_major"], sb["version_minor"]) == version
    assert sb["uuid"] == uuid.UUID(str(ns["uuid"]))
    assert int(shown["external_nlba"], 16) == sb["external_nlba"]
    assert int(shown["mapoff"], 16) == sb["mapoff"] and int(shown["info2off"], 16) == sb["info2off"]
    other = 4096 - infooff  # nothing where the other version would have it
    assert K.decode_btt_sb(head[other: other + 4096]) is None
    # the disk: external_nlba sectors of 4096 bytes (ndctl's default sector size for sector mode)
    assert os.stat(nt.path(f"dev/{ns['blockdev']}")).st_size == sb["external_nlba"] * 4096 == ns["size"]


def test_check_namespace_is_clean_after_many_writes(nt) -> None:  # type: ignore[no-untyped-def]
    relabel(nt, "1.2")
    ns = create_sector(nt, "-l", "512")
    dev = nt.path(f"dev/{ns['blockdev']}")
    size = os.stat(dev).st_size
    rng = random.Random(5)
    shadow: dict[int, bytes] = {}
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        for _ in range(3000):
            block = rng.randrange(min(size // 4096, 512))  # rewrite blocks often: free blocks cycle
            data = rng.randbytes(4096)
            assert os.pwrite(fd, data, block * 4096) == 4096
            shadow[block] = data
    finally:
        os.close(fd)
    btt = nt.read(f"sys/bus/nd/devices/{ns['dev']}/holder").strip()
    ok(nt, "ndctl", "disable-namespace", str(ns["dev"]))
    out = ok(nt, "ndctl", "check-namespace", "--verbose", str(ns["dev"]))
    assert "log_index_0 = 0" in out and "log_index_1 = 1" in out, out
    ok(nt, "ndctl", "enable-namespace", str(ns["dev"]))
    assert nt.read(f"sys/bus/nd/devices/{ns['dev']}/holder").strip() == btt
    with open(dev, "rb") as f:
        for block, data in shadow.items():
            f.seek(block * 4096)
            assert f.read(4096) == data, block


def test_an_older_vnvdimm_btt_on_v12_labels_is_converted(nt) -> None:  # type: ignore[no-untyped-def]
    """vnvdimm before its BTT write path put a BTT 1.1 at 4 KiB on every namespace, writing
    blocks in place; where v1.2 labels call for a BTT 2.0 at offset 0, the namespace's next
    probe turns it into one (no data moved): it comes up in sector mode with the old sectors,
    and ndctl check-namespace finds the new BTT consistent."""
    relabel(nt, "1.2")
    ns = create_sector(nt)
    name, blockdev = str(ns["dev"]), str(ns["blockdev"])
    parent = uuid.UUID(nt.read(f"sys/bus/nd/devices/{name}/uuid").strip())
    set_raw(nt, name, True)
    raw = nt.path(f"dev/{blockdev.removesuffix('s')}")
    rawsize = os.stat(raw).st_size
    (arena,) = btt_arenas(rawsize - 4096, 4096)
    fd = os.open(raw, os.O_RDWR)
    try:  # the old layout, with sectors 0 and 9 written in place
        os.pwrite(fd, bytes(rawsize - arena.mapoff - 4096), 4096 + arena.mapoff)
        os.pwrite(fd, bytes(4096), 0)
        block = BttInfo(uuid.UUID(str(ns["uuid"])), parent, arena).pack()
        os.pwrite(fd, block, 4096)
        os.pwrite(fd, block, 4096 + arena.info2off)
        os.pwrite(fd, btt_log_init(arena), 4096 + arena.logoff)
        os.pwrite(fd, b"old data" * 512, 4096 + arena.dataoff)
        os.pwrite(fd, b"sector 9" * 512, 4096 + arena.dataoff + 9 * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    set_raw(nt, name, False)
    (listed,) = json.loads(ok(nt, "ndctl", "list", "-n", name))
    assert listed["mode"] == "sector" and listed["uuid"] == ns["uuid"], listed
    assert "converted the BTT 1.1" in (Path(nt.state_dir) / "vnvdimm.log").read_text(errors="replace")
    btt = nt.read(f"sys/bus/nd/devices/{name}/holder").strip()
    assert debugfs(nt, btt)["version_major"] == "2"
    with open(nt.path(f"dev/{blockdev}"), "rb") as f:
        assert f.read(4096) == b"old data" * 512
        f.seek(9 * 4096)
        assert f.read(4096) == b"sector 9" * 512
    ok(nt, "ndctl", "disable-namespace", name)
    ok(nt, "ndctl", "check-namespace", name)


def test_media_errors_through_the_btt_as_btt_errors_sh_checks_them(nt) -> None:  # type: ignore[no-untyped-def]
    """btt-errors.sh without its file system: a block written through the BTT disk is found
    through the map in the raw namespace (BTT 2.0 at offset 0 on v1.2 labels: mapoff at byte
    96), poisoned with `ndctl inject-error` + a scrub; a direct read of it through the BTT
    fails with EIO, a write of it succeeds (to a free block; the bad block is cleared), and
    it reads back. Then a poisoned map entry fails the read of its block."""
    relabel(nt, "1.2")
    ns = create_sector(nt)
    name, blockdev = str(ns["dev"]), str(ns["blockdev"])
    # nfit_test's region comes with errors of its own: cleared first by a raw write, as there
    set_raw(nt, name, True)
    ok(nt, "sh", "-c", f"if read -r sector len < /sys/block/{blockdev.removesuffix('s')}/badblocks; then "
       f"dd of=/dev/{blockdev.removesuffix('s')} if=/dev/zero oflag=direct bs=512 seek=$sector count=$len; fi")
    set_raw(nt, name, False)
    lba = 300  # its map entry is in the map's third sector: the second part poisons the first
    dev = nt.path(f"dev/{blockdev}")
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwrite(fd, b"f" * 4096, lba * 4096) == 4096
    finally:
        os.close(fd)
    set_raw(nt, name, True)
    raw = nt.path(f"dev/{blockdev.removesuffix('s')}").read_bytes()[:64 << 20]
    (mapoff,) = struct.unpack_from("<I", raw, 96)
    (entry,) = struct.unpack_from("<I", raw, mapoff + 4 * lba)
    dataoff = (entry & 0x3FFFFFFF) * 4096 + 4096
    assert raw[dataoff: dataoff + 4096] == b"f" * 4096
    ok(nt, "ndctl", "inject-error", f"--block={dataoff // 512}", "--count=8", name)
    ok(nt, "sh", "-c", f"ndctl start-scrub {BUS} && ndctl wait-scrub {BUS}")
    set_raw(nt, name, False)

    def read_block(block: int) -> bytes:
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.pread(fd, 4096, block * 4096)
        finally:
            os.close(fd)

    with pytest.raises(OSError) as info:
        read_block(lba)
    assert info.value.errno == errno.EIO
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwrite(fd, bytes(4096), lba * 4096) == 4096
    finally:
        os.close(fd)
    assert read_block(lba) == bytes(4096)
    assert read_block(lba + 1) == bytes(4096)

    # an error in the map (its first sector: lba 0's entry)
    set_raw(nt, name, True)
    ok(nt, "ndctl", "inject-error", f"--block={mapoff // 512}", "--count=1", name)
    ok(nt, "sh", "-c", f"ndctl start-scrub {BUS} && ndctl wait-scrub {BUS}")
    set_raw(nt, name, False)
    with pytest.raises(OSError) as info:
        read_block(0)
    assert info.value.errno == errno.EIO
    assert read_block(lba) == bytes(4096)  # its map entry is in another sector
    # (a poisoned map entry that a flog entry names fails the whole BTT at its next start, as
    # btt_freelist_init()'s map read does)


def test_a_btt_re_enabled_with_another_sector_size_keeps_the_arena_on_the_media(nt) -> None:  # type: ignore[no-untyped-def]
    """btt_init() -> discover_arenas(): the info block already on the namespace decides the
    geometry, whatever sector size the btt device was set to since; the disk then has the
    arena's block count of sectors of the new size (libndctl.c's check_btt_size() table)."""
    relabel(nt, "1.2")
    nt.write("sys/bus/nd/devices/region0/align", b"8192")  # a page per DIMM, as libndctl sets it
    ns = create_sector(nt, "-r", "region0", "-s", "18M", "-l", "512")
    dev, blockdev = str(ns["dev"]), str(ns["blockdev"])
    btt_dir = next(p for p in nt.path("sys/bus/nd/devices").iterdir()
                   if p.name.startswith("btt") and (p / "namespace").exists()
                   and (p / "namespace").read_text().strip() == dev)
    assert (btt_dir / "size").read_text() == f"{0x11B5400}\n"  # 18 MiB, 512-byte sectors (BTT 2.0)
    # what libndctl's ndctl_btt_disable() / set_sector_size() / enable() write
    nt.write(f"sys/bus/nd/devices/{btt_dir.name}/driver/unbind", btt_dir.name.encode())
    nt.write(f"sys/bus/nd/devices/{btt_dir.name}/sector_size", b"4096")
    nt.write("sys/bus/nd/drivers_probe", btt_dir.name.encode())
    assert (btt_dir / "sector_size").read_text() == "512 520 528 [4096] 4104 4160 4224 \n"
    assert (btt_dir / "size").read_text() == f"{0x8DAA000}\n"  # the same blocks, 4096 bytes each
    # the 4096-byte sector at lba 0 reads back as written
    script = (f"head -c 4096 /dev/urandom > s && dd if=s of=/dev/{blockdev} bs=4096 oflag=direct status=none && "
              f"dd if=/dev/{blockdev} bs=4096 count=1 iflag=direct status=none | cmp - s")
    ok(nt, "sh", "-c", script)
