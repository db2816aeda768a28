"""A map=mem memmap larger than the host can give is refused at enable (ENOMEM), as the
kernel's devm_memremap_pages() fails the probe, instead of filling shared memory until the
host swaps or the OOM killer comes."""

from __future__ import annotations

import errno
import time

from mount_kit import daemon_tree, have_ndctl, memfds, memmap_state, write_errno
from topologies import e820

from vnvdimm.model.host_memory import read_host_memory

GiB = 1 << 30


def region_too_large_for_the_host() -> int:
    """4T, as found (a 64 GiB memmap on a 23 GiB host), or larger on a larger host: a region
    whose memmap (1/64 of it) is twice the host's memory, in whole 16 GiB steps."""
    return max(4 << 40, -(-read_host_memory().total * 64 * 2 // (16 * GiB)) * 16 * GiB)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_map_mem_memmap_the_host_cannot_hold_is_refused_with_enomem(make_mount) -> None:
    huge = region_too_large_for_the_host()
    m = make_mount(e820(f"{huge // GiB}G devdax mem", "64M devdax mem"), mount=False)
    res = m.mount()
    assert res.returncode == 0, res.stderr
    # the config check said so before the daemon started
    assert "warning:" in res.stderr and 'map = "mem" namespaces need' in res.stderr, res.stderr
    assert f"this host has {read_host_memory().total / GiB:.1f} GiB" in res.stderr, res.stderr

    # At boot the dax device found on the media failed its probe: unbound, no memmap.
    dax = m.sys / "bus/nd/devices/dax0.1"
    assert not (dax / "driver").exists()
    log = (m.state_dir / "vnvdimm.log").read_text()
    line = next((ln for ln in log.splitlines() if "dax0.1: memmap of" in ln), "")
    assert f"needs {huge // 64 / GiB:.1f} GiB of host memory" in line and "available (MemAvailable)" in line \
        and "ENOMEM" in line, log[-2000:]

    # Enabling it is refused as the kernel refuses it: ENOMEM to the writer of `bind`.
    assert write_errno(m.sys / "bus/nd/drivers/dax_pmem/bind", b"dax0.1\0") == errno.ENOMEM
    assert not (dax / "driver").exists()
    # ... and ndctl's enable fails (ndctl reports its own ENXIO "failed to enable").
    if have_ndctl():
        res = m.run("ndctl", "enable-namespace", "namespace0.0")
        assert res.returncode != 0 and "failed to enable" in res.stderr, res.stderr
        listed = m.ndctl("list", "-N", "-i", "-n", "namespace0.0")
        assert isinstance(listed, list) and listed[0]["mode"] == "devdax" and listed[0]["state"] == "disabled", \
            listed

    # No shared memory was set up for it, and none grows toward it.
    time.sleep(0.5)
    tree = daemon_tree(m.pid)
    held = memfds(tree)
    assert "vnvdimm-memmap:dax0.1" not in held, held
    assert sum(rss_kib(p) for p in tree) < 512 * 1024, {p: rss_kib(p) for p in tree}

    # The memmap that fits beside it is given its memory as before.
    assert (m.sys / "bus/nd/devices/dax1.1/driver").exists()
    m.write("sys/bus/nd/devices/dax1.1/memmap_state", b"sync\n")
    assert memmap_state(m.root, "dax1.1") == "idle"
