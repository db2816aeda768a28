"""A test that hangs on purpose (run by test_watchdog.py, never collected by the suite: the
file name does not match test_*.py): `echo sync` on a memmap held at its pause mark waits
forever, in the kernel's FUSE wait, where no signal to the test process can end it."""

from __future__ import annotations

import os

import pytest
from topologies import e820

PFN = "sys/bus/nd/devices/pfn0.1"


@pytest.mark.watchdog(float(os.environ.get("HUNG_SYNC_BOUND", "8")))
def test_hung_sync(make_mount) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(e820("256M fsdax dev", "256M devdax mem", ns_per_page=1_000_000))
    m.write(f"{PFN}/memmap/pause_at", b"1\n")  # held at 0.1 %: never released
    print(f"daemon {m.pid}", flush=True)
    m.write(f"{PFN}/memmap_state", b"sync\n")
