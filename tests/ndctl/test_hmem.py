"""Soft-reserved memory ([[hmem]]): dax_hmem's dynamic dax region carved by the real daxctl
(create-device, destroy-device, reconfigure-device -s), with the memmap of each device: its
pages initialized by the engine once it is enabled, over all of its ranges, and reads through
a device waiting only for the pages they touch."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from mount_kit import have_ndctl, wait_for

pytestmark = [pytest.mark.ndctl, pytest.mark.skipif(not have_ndctl(), reason="needs ndctl and daxctl")]

M, G = 1 << 20, 1 << 30
PAGE = 4096
KPF_NOPAGE = 1 << 20
HMEM = '''template = "e820"
[memmap]
workers = 1
{extra}
[[region]]
size = "32M"
namespace = {{ mode = "raw" }}
[[hmem]]
size = "1G"
'''
REGION = "sys/devices/platform/hmem.0/dax_region"


@pytest.fixture
def hm(make_mount):  # type: ignore[no-untyped-def]
    return make_mount(HMEM.format(extra=""))


def daxctl(m, *args: str) -> object:  # type: ignore[no-untyped-def]
    res = m.run("daxctl", *args)
    assert res.returncode == 0, f"daxctl {' '.join(args)}: {res.stderr}"
    return json.loads(res.stdout) if res.stdout.strip() else None


def dev_dir(m, dev: str) -> Path:  # type: ignore[no-untyped-def]
    return m.path(f"sys/bus/dax/devices/{dev}")


def hmem_memmap_state(m, dev: str) -> str:  # type: ignore[no-untyped-def]
    """memmap_state of an hmem instance, checked against what it promises: `idle` means every
    page of every range is initialized (pages_done == pages_total, no KPF_NOPAGE);
    `active` means progress read before it still had pages to go."""
    d = dev_dir(m, dev)
    done = int((d / "memmap/pages_done").read_text())
    total = int((d / "memmap/pages_total").read_text())
    flags = np.frombuffer((d / "memmap/kpageflags").read_bytes(), dtype="<u8")
    state = (d / "memmap_state").read_text().strip()
    if state == "idle":
        after = np.frombuffer((d / "memmap/kpageflags").read_bytes(), dtype="<u8")
        assert int((d / "memmap/pages_done").read_text()) == total == after.size, f"{dev}: idle but not done"
        assert not (after & KPF_NOPAGE).any(), f"{dev}: idle with uninitialized pages"
    else:
        assert state == "active" and done < total and (flags & KPF_NOPAGE).any(), (dev, state, done, total)
    return state


def sync(m, dev: str) -> None:  # type: ignore[no-untyped-def]
    m.write(f"sys/bus/dax/devices/{dev}/memmap_state", b"sync")
    assert hmem_memmap_state(m, dev) == "idle"


def mappings(m, dev: str) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    d = dev_dir(m, dev)
    out = []
    for sub in sorted(d.glob("mapping[0-9]*"), key=lambda p: int(p.name[7:])):
        out.append((int((sub / "start").read_text(), 16), int((sub / "end").read_text(), 16),
                    int((sub / "page_offset").read_text(), 16)))
    return sorted(out, key=lambda t: t[2])


def store_errno(m, rel: str, value: bytes) -> int:  # type: ignore[no-untyped-def]
    fd = os.open(m.path(rel), os.O_WRONLY)
    try:
        os.write(fd, value)
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)
    return 0


def test_the_region_starts_as_dax_hmem_makes_it(hm) -> None:  # type: ignore[no-untyped-def]
    regions = daxctl(hm, "list", "-RDM")
    assert len(regions) == 1  # type: ignore[arg-type]
    r = regions[0]  # type: ignore[index]
    assert (r["path"], r["id"], r["size"], r["align"]) == ("/platform/hmem.0", 0, G, 2 * M)
    (dev,) = r["devices"]
    assert (dev["chardev"], dev["size"], dev["mode"], len(dev["mappings"])) == ("dax0.0", G, "devdax", 1)
    assert hm.path("sys/module/device_hmem").is_dir() and hm.read(f"{REGION}/available_size") == "0\n"
    sync(hm, "dax0.0")
    assert int(hm.read("sys/bus/dax/devices/dax0.0/memmap/pages_total")) == G // PAGE


def test_create_destroy_and_reconfigure_with_a_memmap_per_device(hm) -> None:  # type: ignore[no-untyped-def]
    daxctl(hm, "disable-device", "dax0.0")
    daxctl(hm, "reconfigure-device", "-s", "0", "dax0.0")
    assert hm.read(f"{REGION}/available_size") == f"{G}\n"
    assert hmem_memmap_state(hm, "dax0.0") == "idle" and hm.read("sys/bus/dax/devices/dax0.0/size") == "0\n"

    a = daxctl(hm, "create-device", "-r", "0", "-s", "256M")[0]["chardev"]  # type: ignore[index]
    b = daxctl(hm, "create-device", "-r", "0", "-s", "256M")[0]["chardev"]  # type: ignore[index]
    assert (a, b) == ("dax0.1", "dax0.2")
    for dev, base in ((a, 0), (b, 256 * M)):
        (start, end, pgoff), = mappings(hm, dev)
        assert (end - start + 1, pgoff) == (256 * M, 0) and start - mappings(hm, a)[0][0] == base
        sync(hm, dev)
        assert int(hm.read(f"sys/bus/dax/devices/{dev}/memmap/pages_total")) == 256 * M // PAGE

    # a hole where dax0.1 was: a 512M device takes it and the space after dax0.2
    daxctl(hm, "disable-device", a)
    daxctl(hm, "destroy-device", a)
    assert not dev_dir(hm, a).exists()
    c = daxctl(hm, "create-device", "-r", "0", "-s", "512M")[0]["chardev"]  # type: ignore[index]
    maps = mappings(hm, c)
    assert [(e - s + 1, p) for s, e, p in maps] == [(256 * M, 0), (256 * M, 256 * M // PAGE)]
    assert hm.read(f"sys/bus/dax/devices/{c}/memmap/ranges") == "2\n"
    sync(hm, c)
    assert int(hm.read(f"sys/bus/dax/devices/{c}/memmap/pages_total")) == 512 * M // PAGE

    # the data of a two-range device: written across the boundary, read back, at its ranges
    pattern = os.urandom(2 * PAGE)
    with open(hm.path(f"dev/{c}"), "r+b") as f:
        f.seek(256 * M - PAGE)
        f.write(pattern)
        f.seek(256 * M - PAGE)
        assert f.read(2 * PAGE) == pattern

    # reconfigure -s: shrink to one range, grow back
    daxctl(hm, "disable-device", c)
    daxctl(hm, "reconfigure-device", "-s", "256M", c)
    assert len(mappings(hm, c)) == 1 and hm.read(f"sys/bus/dax/devices/{c}/size") == f"{256 * M}\n"
    daxctl(hm, "enable-device", c)
    sync(hm, c)
    with open(hm.path(f"dev/{c}"), "rb") as f:
        f.seek(256 * M - PAGE)
        assert f.read(PAGE) == pattern[:PAGE]
    assert hm.read(f"{REGION}/available_size") == f"{512 * M}\n"


def test_refusals_change_nothing(hm) -> None:  # type: ignore[no-untyped-def]
    dax0 = "sys/bus/dax/devices/dax0.0"
    assert store_errno(hm, f"{dax0}/size", b"0") == errno.EBUSY  # enabled
    assert store_errno(hm, f"{REGION}/create", b"1") == errno.ENOSPC  # all of it is dax0.0's
    daxctl(hm, "disable-device", "dax0.0")
    assert store_errno(hm, f"{dax0}/size", b"12345") == errno.EINVAL  # not a multiple of 2M
    assert store_errno(hm, f"{dax0}/size", str(2 * G).encode()) == errno.ENOSPC
    assert store_errno(hm, f"{dax0}/align", b"8192") == errno.EINVAL
    assert store_errno(hm, f"{REGION}/create", b"2") == errno.EINVAL
    assert store_errno(hm, f"{REGION}/delete", b"dax0.0") == errno.EBUSY  # has capacity, and is daxN.0
    assert store_errno(hm, f"{REGION}/delete", b"dax0.9") == errno.ENXIO
    assert hm.read(f"{dax0}/size") == f"{G}\n" and hm.read(f"{REGION}/available_size") == "0\n"
    daxctl(hm, "reconfigure-device", "-s", "512M", "dax0.0")
    assert store_errno(hm, f"{REGION}/create", b"1") == 0
    seed = hm.read(f"{REGION}/seed").strip()
    start = mappings(hm, "dax0.0")[0][0]
    taken = f"{start:#x}-{start + 2 * M - 1:#x}".encode()
    assert store_errno(hm, f"sys/bus/dax/devices/{seed}/mapping", taken) == errno.ENOMEM  # dax0.0's
    res = hm.run("daxctl", "enable-device", seed)  # zero-sized: does not probe
    assert dev_dir(hm, seed).joinpath("driver").exists() is False, res.stderr


def test_reads_wait_for_their_pages_only(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(HMEM.format(extra="ns_per_page = 20000"))  # 262144 pages: about 5 s
    d = dev_dir(m, "dax0.0")
    wait_for(lambda: int((d / "memmap/pages_total").read_text()) > 0, 10, "dax0.0's memmap")
    with open(m.path("dev/dax0.0"), "rb") as f:
        f.seek(G - PAGE)
        f.read(PAGE)  # the last page: initialized for this read, long before the rest
    flags = np.frombuffer((d / "memmap/kpageflags").read_bytes(), dtype="<u8")
    assert not flags[-1] & KPF_NOPAGE, "the read returned before its page was initialized"
    if hmem_memmap_state(m, "dax0.0") == "active":
        assert (flags & KPF_NOPAGE).any()
    sync(m, "dax0.0")
