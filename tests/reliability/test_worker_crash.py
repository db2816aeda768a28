"""A memmap worker process SIGKILLed in the middle of a job, on a real mount: the blocks it
had claimed are given back and initialized by someone else, every record ends up exactly as
the reference says, memmap_state reaches idle, the pool is back to full size, and no
shared-memory segment is left behind."""

from __future__ import annotations

import os
import re
import signal
import time

from mount_kit import memmap_state
from reliability_kit import DAX, PFN, SMALL, alive, check_records, children, e820, wait_for, worker_in_run

WORKERS = 2
# 16384 pages per device at 0.3 ms/page on 2 workers: each memmap takes ~5 s, so a kill
# always lands while both jobs have pending and claimed blocks.
NS_PER_PAGE = 300_000


def pages(m, dev: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    return int(m.read(f"{dev}/memmap/pages_done")), int(m.read(f"{dev}/memmap/pages_total"))


def test_sigkill_workers_mid_job(make_mount, figures, shm_unchanged) -> None:  # type: ignore[no-untyped-def]
    m = make_mount(e820(*SMALL, workers=WORKERS, ns_per_page=NS_PER_PAGE))
    original = wait_for(lambda: (c := children(m.pid)) and len(c) == WORKERS and c, 60, "the worker pool")
    assert memmap_state(m.root, PFN) == "active"
    assert memmap_state(m.root, DAX) == "active"
    killed: list[int] = []
    for i in range(3):
        # Progress first (the job is really under way), then kill one worker while the job
        # still has most of its pages to do.
        done0 = pages(m, PFN)[0] + pages(m, DAX)[0]
        wait_for(lambda d=done0: pages(m, PFN)[0] + pages(m, DAX)[0] > d + 1024, 30, "memmap progress")
        done, total = pages(m, PFN)
        assert done < total, "the job finished before the fault could be injected"
        pool = children(m.pid)
        assert len(pool) == WORKERS, f"pool has {len(pool)} workers before kill {i}"
        victim = pool[i % WORKERS]
        # (a replacement spawned for the last kill may still be starting: it holds no runs yet)
        wait_for(lambda v=victim: worker_in_run(v), 60, f"worker {victim} to be inside a run")
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        figures.add(faults=1)
        wait_for(lambda v=victim: not alive(v), 60, f"worker {victim} to die")
        # The engine reaps it (no zombie stays behind) and starts a replacement.
        wait_for(lambda v=victim: not os.path.exists(f"/proc/{v}"), 60, f"worker {victim} to be reaped")
        wait_for(lambda v=victim: len(c := children(m.pid)) == WORKERS and v not in c, 60,
                 "the pool to be back to full size")
        assert pages(m, PFN)[0] < pages(m, PFN)[1] or i == 2

    # The job still completes (at full speed now), with every record right.
    m.write(f"{PFN}/memmap/ns_per_page", b"0\n")
    m.write(f"{DAX}/memmap/ns_per_page", b"0\n")
    t0 = time.monotonic()
    for dev in (PFN, DAX):
        assert m.write(f"{dev}/memmap_state", b"sync\n") == 5
        assert memmap_state(m.root, dev) == "idle"
        done, total = pages(m, dev)
        assert done == total, f"{dev}: {done}/{total} pages after sync"
    assert time.monotonic() - t0 < 30
    verified = check_records(m, PFN) + check_records(m, DAX)
    figures.add(records_verified=verified)

    pool = children(m.pid)
    assert len(pool) == WORKERS, f"pool has {pool}"
    assert not set(pool) & set(killed)
    assert int(m.read(f"{PFN}/memmap/workers")) == WORKERS

    # The log names each death and the runs it gave back (a kill mid-job always finds the
    # worker holding claimed runs: it keeps two in flight).
    log = (m.state_dir / "vnvdimm.log").read_text()
    deaths = re.findall(r"memmap worker \d+ \(pid (\d+)\) died; (\d+) runs re-queued", log)
    assert sorted(int(pid) for pid, _ in deaths) == sorted(killed), log[-2000:]
    assert all(int(n) >= 1 for _, n in deaths), deaths

    # A later access works and the replacement workers serve a new job: unbind + bind the
    # dax device (a new memmap) and check its records too.
    m.write("sys/bus/nd/drivers/dax_pmem/unbind", b"dax1.1\0")
    m.write("sys/bus/nd/drivers/dax_pmem/bind", b"dax1.1\0")
    assert m.write(f"{DAX}/memmap_state", b"sync\0") == 5
    figures.add(records_verified=check_records(m, DAX))
    m.umount()
    wait_for(lambda: not any(alive(p) for p in [*pool, *original]), 60, "every worker to exit")
