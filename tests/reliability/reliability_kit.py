"""Helpers of the reliability suite (issue 6): process trees, bounded waits, small topologies
and memmap record checks. (A module of its own: test modules cannot import a conftest by
name, tests/unit has one too.)

Durations: ``VNVDIMM_STRESS_SECONDS`` (default 8) scales the stress tests; the full length is
``VNVDIMM_STRESS_SECONDS=30``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vnvdimm.memmap import PAGE_DTYPE, init_page_reference

WITH_VNVDIMM = Path(__file__).resolve().parents[2] / "mountscripts" / "with-vnvdimm"
STRESS_SECONDS = float(os.environ.get("VNVDIMM_STRESS_SECONDS", "8"))


def e820(*regions: str, workers: int = 2, ns_per_page: int = 0, mode: str = "async") -> str:
    """An e820 config; each region is 'SIZE MODE [MAP]', e.g. '64M fsdax dev'."""
    out = ['template = "e820"', "[memmap]", f"workers = {workers}", f"ns_per_page = {ns_per_page}",
           f'mode = "{mode}"']
    for spec in regions:
        size, nsmode, *rest = spec.split()
        ns = f'mode = "{nsmode}"'
        if rest:
            ns += f', map = "{rest[0]}"'
        if nsmode in ("fsdax", "devdax"):
            ns += ', align = "2M"'
        out += ["[[region]]", f'size = "{size}"', f"namespace = {{ {ns} }}"]
    return "\n".join(out) + "\n"


# The small platform most tests use: pmem0 (fsdax, map=dev, pfn0.1) and dax1.0 (devdax,
# map=mem, dax1.1), 64 MiB each = 16384 pages per memmap.
SMALL = ("64M fsdax dev", "64M devdax mem")
PFN = "sys/bus/nd/devices/pfn0.1"
DAX = "sys/bus/nd/devices/dax1.1"


# ---------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    """True while pid runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def children(pid: int) -> list[int]:
    """Live child processes of pid (every thread's children)."""
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return sorted(c for c in set(out) if alive(c))


def process_group(pgid: int) -> list[int]:
    """Live processes whose process group is pgid (the daemon and its workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                out.append(int(entry))
    return sorted(out)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """pred()'s first truthy value, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- memmap records


def check_records(m: Any, dev: str) -> int:
    """Every record of `dev` (a pfn/dax device dir, memmap idle) against init_page_reference.
    Returns the number of records verified."""
    from vnvdimm.model.personality import PGMAP_BASE

    start_pfn = int(m.read(f"{dev}/memmap/start_pfn"), 16)
    records = np.frombuffer(m.path(f"{dev}/memmap/records").read_bytes(), dtype=PAGE_DTYPE)
    npages = len(records)
    assert npages > 0
    on_media = m.read(f"{dev}/mode").strip() == "pmem"
    data_page = int(m.read(f"{dev}/resource"), 16) // 4096 - start_pfn
    nid = int(m.read(f"{dev}/numa_node"))
    reserve = 2 if on_media else 0
    pgmap = PGMAP_BASE + (start_pfn << 6) % (1 << 32)
    expected = np.zeros(npages, dtype=PAGE_DTYPE)
    for page in range(reserve, npages):
        expected[page] = init_page_reference(start_pfn + page, nid=nid, pgmap=pgmap,
                                             has_pgmap=page >= data_page or not on_media)
    got, want = records[reserve:].view("V64"), expected[reserve:].view("V64")
    differ = np.nonzero(got != want)[0]
    assert differ.size == 0, f"{dev}: {differ.size} of {npages} records differ, first page {differ[0] + reserve}"
    flags = np.frombuffer(m.path(f"{dev}/memmap/kpageflags").read_bytes(), dtype="<u8")
    assert not (flags[reserve:] & (1 << 20)).any(), f"{dev}: pages left uninitialized (KPF_NOPAGE)"
    return npages - reserve
