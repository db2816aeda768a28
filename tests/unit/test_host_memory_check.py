"""The host-memory check of a map=mem enable, and the config check's warning, against given
hosts (tests/reliability/test_host_memory.py mounts with the real one)."""

from __future__ import annotations

import errno
import tomllib

import pytest
from model_kit import Machine
from topologies import e820

from vnvdimm.model.host_memory import HostMemory, read_host_memory
from vnvdimm.topology.config import host_memory_warnings, parse_config

MiB = 1 << 20


def test_enable_needs_its_memmap_within_available_less_the_margin(tmp_path) -> None:
    m = Machine(tmp_path / "state", e820("64M devdax mem"))
    system = m.boot()
    dax = m.dev("dax0.1")
    npages = (64 * MiB) // 4096  # a 1 MiB memmap
    # 16 MiB total: a margin of 1 MiB; 2 MiB available leaves 1 MiB: just enough
    system.host_memory = lambda: HostMemory(total=16 * MiB, available=2 * MiB)
    dax.memmap.check_host_memory(npages)  # type: ignore[attr-defined]
    system.host_memory = lambda: HostMemory(total=16 * MiB, available=2 * MiB - 4096)
    with pytest.raises(OSError) as e:
        dax.memmap.check_host_memory(npages)  # type: ignore[attr-defined]
    assert e.value.errno == errno.ENOMEM
    assert "needs 1.0 MiB of host memory" in str(e.value) and "margin of 1.0 MiB" in str(e.value)
    m.shutdown()


def test_meminfo_is_read_in_bytes(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683772 kB\nMemFree:        23641920 kB\nMemAvailable:   23619184 kB\n")
    host = read_host_memory(str(meminfo))
    assert (host.total, host.available) == (24683772 * 1024, 23619184 * 1024)
    assert host.margin == host.total // 16 and host.usable == host.available - host.margin


def test_the_config_check_warns_when_the_map_mem_memmaps_exceed_the_host() -> None:
    host = HostMemory(total=1 << 30, available=1 << 30)
    # 2 x 32G map=mem = 1 GiB of memmaps: fits exactly; the map=dev one costs no RAM
    fits = parse_config(tomllib.loads(e820("32G devdax mem", "32G fsdax mem", "64G fsdax dev")), "t.toml")
    assert host_memory_warnings(fits, host) == []
    over = parse_config(tomllib.loads(e820("32G devdax mem", "48G fsdax mem")), "t.toml")
    (warning,) = host_memory_warnings(over, host)
    assert warning.startswith('t.toml: the map = "mem" namespaces need 1.2 GiB of host memory') and \
        "this host has 1.0 GiB" in warning
