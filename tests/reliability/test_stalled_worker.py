"""Nothing waits on a stalled helper, on a real mount: a worker SIGSTOPped in the middle of a
slow memmap has its runs handed to the other, so `echo sync > memmap_state` returns with every
record right while it is stopped, and SIGCONT later changes nothing; a new ns_per_page applies
to the runs already sleeping for the old one."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time

from reliability_kit import DAX, PFN, SMALL, alive, check_records, children, e820, wait_for, worker_in_run

WORKERS = 2
# 2 x 16384 pages at 100 us/page: ~1.6 s of floor per device on two workers, ~3.3 s on one.
NS_PER_PAGE = 100_000


def pages(m, dev: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    return int(m.read(f"{dev}/memmap/pages_done")), int(m.read(f"{dev}/memmap/pages_total"))


def sync(m, dev: str) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    assert m.write(f"{dev}/memmap_state", b"sync\n") == 5
    return time.monotonic() - t0


def test_sync_finishes_while_a_worker_is_stopped(make_mount, figures, shm_unchanged) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(e820(*SMALL, workers=WORKERS, ns_per_page=NS_PER_PAGE))
    pool = wait_for(lambda: (c := children(m.pid)) and len(c) == WORKERS and c, 10, "the worker pool")
    wait_for(lambda: pages(m, PFN)[0] + pages(m, DAX)[0] > 1024, 30, "memmap progress")
    assert m.read(f"{PFN}/memmap_state") == "active\n"
    victim = pool[0]
    os.kill(victim, signal.SIGSTOP)
    figures.add(faults=1)
    try:
        took = [sync(m, dev) for dev in (PFN, DAX)]
        # Generous: ~3.3 s of floor on one worker plus the stall bound (3 s) on a shared host.
        assert sum(took) < 60, f"echo sync took {took} s with one worker stopped"
        figures.note(sync_with_a_stopped_worker_s=round(sum(took), 3))
        for dev in (PFN, DAX):
            assert m.read(f"{dev}/memmap_state") == "idle\n"
            done, total = pages(m, dev)
            assert done == total, f"{dev}: {done}/{total} pages after sync"
        figures.add(records_verified=check_records(m, PFN) + check_records(m, DAX))
        assert alive(victim) and children(m.pid) == pool  # bypassed, not killed
        log = (m.state_dir / "vnvdimm.log").read_text()
        assert re.search(rf"memmap worker \d+ \(pid {victim}\) made no progress in [\d.]+ s: its \d+ runs go",
                         log), log[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    # Resumed: it reports the runs it had been given (revoked, ignored) and unmaps the jobs.
    wait_for(lambda: f"(pid {victim}) makes progress again" in (m.state_dir / "vnvdimm.log").read_text(),
             30, "the resumed worker to be heard from")
    for dev in (PFN, DAX):
        assert m.read(f"{dev}/memmap_state") == "idle\n"
        assert pages(m, dev)[0] == pages(m, dev)[1]
    figures.add(records_verified=check_records(m, PFN) + check_records(m, DAX))
    assert children(m.pid) == pool
    # Both workers serve a new memmap (unbind + bind the dax device), at full speed.
    m.write(f"{DAX}/memmap/ns_per_page", b"0\n")
    m.write("sys/bus/nd/drivers/dax_pmem/unbind", b"dax1.1\0")
    m.write("sys/bus/nd/drivers/dax_pmem/bind", b"dax1.1\0")
    assert sync(m, DAX) < 60
    figures.add(records_verified=check_records(m, DAX))
    m.umount()
    wait_for(lambda: not any(alive(p) for p in pool), 10, "every worker to exit")


def test_new_ns_per_page_applies_to_runs_in_flight(make_mount, figures, shm_unchanged) -> None:  # type: ignore[no-untyped-def]
    # One second per page: every run handed out (one 2 MiB block, 512 pages) would take 8.5 min.
    m = make_mount(e820(*SMALL, workers=WORKERS, ns_per_page=10**9))
    for dev in (PFN, DAX):
        assert m.read(f"{dev}/memmap_state") == "active\n"
    # Both workers asleep inside a run: a worker waits for its next message in recvmsg, and
    # sleeps for the floor in select (pselect6 on x86_64).
    pool = wait_for(lambda: (c := children(m.pid)) and len(c) == WORKERS and c, 10, "the worker pool")
    wait_for(lambda: all(worker_in_run(p) for p in pool), 30, "both workers inside a run")
    for dev in (PFN, DAX):
        assert pages(m, dev)[0] == 0
        m.write(f"{dev}/memmap/ns_per_page", b"0\n")
    took = [sync(m, dev) for dev in (PFN, DAX)]
    assert sum(took) < 30, f"echo sync took {took} s after ns_per_page 1e9 -> 0"
    figures.note(sync_after_ns_change_s=round(sum(took), 3))
    for dev in (PFN, DAX):
        assert m.read(f"{dev}/memmap/ns_per_page") == "0\n"
        assert m.read(f"{dev}/memmap_state") == "idle\n"
    figures.add(records_verified=check_records(m, PFN) + check_records(m, DAX))
