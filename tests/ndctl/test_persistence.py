"""Unmount and mount again: `ndctl list -RNi` prints the same thing, and data written through
the device files before (plain os.pwrite + fsync on MNT/dev/...) reads back unchanged, for
fsdax, devdax, sector and raw namespaces on e820 and nfit."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from mount_kit import have_ndctl

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]


def pattern(name: str, n: int) -> bytes:
    out = b""
    while len(out) < n:
        out += hashlib.sha256(f"{name}:{len(out)}".encode()).digest()
    return out[:n]


def spots(size: int) -> list[tuple[int, int]]:
    """(offset, length): the start, an unaligned range in the middle, a page-crossing range, the end."""
    return [(0, 8192), (size // 2 + 17, 5000), (3 * 4096 - 100, 300), (size - 4096, 4096)]


def write_patterns(mnt, names: list[str]) -> dict[str, list[tuple[int, bytes]]]:  # type: ignore[no-untyped-def]
    written: dict[str, list[tuple[int, bytes]]] = {}
    for name in names:
        path = mnt.dev / name
        size = os.stat(path).st_size
        fd = os.open(path, os.O_RDWR)
        try:
            for off, n in spots(size):
                data = pattern(f"{name}@{off}", n)
                assert os.pwrite(fd, data, off) == n
                written.setdefault(name, []).append((off, data))
            os.fsync(fd)
        finally:
            os.close(fd)
    return written


def check_patterns(mnt, written: dict[str, list[tuple[int, bytes]]]) -> None:  # type: ignore[no-untyped-def]
    for name, chunks in written.items():
        fd = os.open(mnt.dev / name, os.O_RDONLY)
        try:
            for off, data in chunks:
                assert os.pread(fd, len(data), off) == data, (name, off)
        finally:
            os.close(fd)


def listing(mnt) -> tuple[str, list[dict[str, object]]]:  # type: ignore[no-untyped-def]
    """`ndctl list -RNi` verbatim, and `daxctl list -RD` without each region's "path": that
    names the nd dax device, whose id, as on a real kernel, is not kept across a reboot (the
    region's seeds take the lowest ids before the namespaces probe their info blocks)."""
    nd = mnt.run("ndctl", "list", "-RNi")
    dax = mnt.run("daxctl", "list", "-RD")
    assert nd.returncode == 0 and dax.returncode == 0, nd.stderr + dax.stderr
    regions = json.loads(dax.stdout) if dax.stdout.strip() else []
    for region in regions:
        assert region.pop("path").rsplit("/", 1)[1].startswith(f"dax{region['id']}.")
    return nd.stdout, regions


def test_e820_remount(mnt) -> None:  # type: ignore[no-untyped-def]
    written = write_patterns(mnt, ["pmem0", "dax1.0"])
    before = listing(mnt)
    mnt.remount()
    assert listing(mnt) == before
    check_patterns(mnt, written)

    res = mnt.run("ndctl", "create-namespace", "-e", "namespace0.0", "-m", "sector", "-f")
    assert res.returncode == 0, res.stderr
    written = write_patterns(mnt, ["pmem0s", "dax1.0"])
    before = listing(mnt)
    mnt.remount()
    assert listing(mnt) == before
    assert json.loads(before[0])  # sanity: there was something to compare
    check_patterns(mnt, written)


def test_nfit_remount(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    mnt = nfit_mnt
    for size, mode in (("64M", "raw"), ("128M", "devdax"), ("64M", "sector")):
        res = mnt.run("ndctl", "create-namespace", "-r", "region1", "-s", size, "-m", mode, "-n", f"my-{mode}")
        assert res.returncode == 0, res.stderr
    names = sorted(n for n in os.listdir(mnt.dev) if n.startswith(("pmem", "dax")))
    assert names == ["dax1.1", "pmem0", "pmem1", "pmem1.2s"]
    written = write_patterns(mnt, names)
    before = listing(mnt)
    assert '"name":"my-raw"' in before[0]
    mnt.remount()
    assert listing(mnt) == before
    check_patterns(mnt, written)


def test_non_default_settings_survive_a_remount(nfit_mnt) -> None:  # type: ignore[no-untyped-def]
    """Each setting that differs from its default (name, size, pfn/dax align, map=mem for
    fsdax, a 512-byte sector) is what ndctl shows after a remount: it came back from the
    labels and info blocks, not from defaults."""
    mnt = nfit_mnt
    created = {
        "dax-4k": ["-s", "64M", "-m", "devdax", "-a", "4K"],
        "fs-mem-4k": ["-s", "96M", "-m", "fsdax", "-M", "mem", "-a", "4K"],
        "sector-512": ["-s", "48M", "-m", "sector", "-l", "512"],
    }
    for name, args in created.items():
        res = mnt.run("ndctl", "create-namespace", "-r", "region1", "-n", name, *args)
        assert res.returncode == 0, res.stderr

    def settings() -> dict[str, dict[str, object]]:
        keys = ("mode", "map", "size", "align", "sector_size", "uuid")
        listed = mnt.ndctl("list", "-N", "-r", "region1")
        return {ns["name"]: {k: ns.get(k) for k in keys} for ns in listed}

    before = settings()
    assert before["dax-4k"]["align"] == before["fs-mem-4k"]["align"] == 4096, before
    assert before["fs-mem-4k"]["map"] == "mem" and before["sector-512"]["sector_size"] == 512, before
    mnt.remount()
    assert settings() == before
