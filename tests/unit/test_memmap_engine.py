"""The memmap engine: jobs, foreground sync, cancel, worker crashes (real worker processes)."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import pickle
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from vnvdimm.memmap import (
    PAGE_DTYPE,
    DevStorage,
    JobCancelled,
    JobSpec,
    MemmapEngine,
    MemmapJob,
    MemStorage,
    init_page_reference,
    protocol,
)
from vnvdimm.memmap import page as P
from vnvdimm.memmap.blockmap import BG, DONE, FG, PENDING, WORKER_BASE
from vnvdimm.memmap.storage import PageFloor

PGMAP = 0xFFFF888123400000
FIRST_PFN = 0x340000


def memfds() -> set[str]:
    out = set()
    for fd in glob.glob("/proc/self/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "vnvdimm-memmap" in target:
            out.add(f"{os.path.basename(fd)}:{target}")
    return out


def children() -> set[int]:
    pids: set[int] = set()
    for f in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with contextlib.suppress(FileNotFoundError), open(f) as fh:  # (a thread may just have ended)
            pids.update(int(p) for p in fh.read().split())
    return pids


@pytest.fixture
def make_engine() -> Iterator:
    engines: list[MemmapEngine] = []

    def make(workers: int, **kw: object) -> MemmapEngine:
        eng = MemmapEngine(workers, debug=True, **kw)
        engines.append(eng)
        eng.start()
        return eng

    try:
        yield make
    finally:
        for eng in engines:
            eng.close()


def spec(npages: int, **kw: object) -> JobSpec:
    args: dict = dict(name="t", first_pfn=FIRST_PFN, npages=npages, align_pages=512, pgmap=PGMAP)
    args.update(kw)
    return JobSpec(**args)


def check_records(job: MemmapJob, expected_records: Callable[..., np.ndarray], *, full: bool = True,
                  sample: int = 0) -> None:
    """Every initialized page equals the reference; reserve pages are untouched zeros."""
    g = job.geom
    recs = np.frombuffer(job.raw_records(0, g.npages), dtype=PAGE_DTYPE)
    r = g.reserve_pages
    assert recs[:r].tobytes() == bytes(64 * r)
    a = max(g.altmap_pages, r)
    exp_alt = expected_records(g.first_pfn + r, a - r, nid=g.nid, pgmap=g.pgmap, has_pgmap=False)
    exp_pg = expected_records(g.first_pfn + a, g.npages - a, nid=g.nid, pgmap=g.pgmap, has_pgmap=True)
    if full:
        assert recs[r:a].tobytes() == exp_alt.tobytes()
        assert recs[a:].tobytes() == exp_pg.tobytes()
    rng = random.Random(1)
    for i in [rng.randrange(r, g.npages) for _ in range(sample)]:
        ref = init_page_reference(g.first_pfn + i, nid=g.nid, pgmap=g.pgmap, has_pgmap=i >= a)
        assert recs[i].tobytes() == ref.tobytes(), i


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_async_job_goes_idle_with_correct_records(make_engine, workers: int, expected_records) -> None:
    eng = make_engine(workers)
    ev = threading.Event()
    job = eng.create_job(spec(3 * 32768 + 1000, nid=1))
    job.subscribe(lambda j: ev.set())
    assert job.pages_total == 3 * 32768 + 1000
    assert job.wait(30)
    assert not job.active and job.pages_done == job.pages_total
    assert ev.wait(5)
    check_records(job, expected_records, sample=50)
    assert (job.debug_init_counts() == 1).all()
    assert (job.block_states() == DONE).all()
    assert job.rate > 0 and job.elapsed > 0
    el = job.elapsed
    time.sleep(0.01)
    assert job.elapsed == el  # frozen when done
    assert job.sections_populated == job.sections_total == 4
    mt = job.pageblock_migratetype(0, 10**6)
    assert (mt == P.MIGRATE_MOVABLE).all()
    flags = np.frombuffer(job.kpageflags(0, 8), "<u8")
    assert (flags == 1 << P.KPF_RESERVED).all()
    assert np.frombuffer(job.kpagecount(0, 8), "<u8").tolist() == [0] * 8
    # a subscriber of an idle job is called at once
    called: list[MemmapJob] = []
    job.subscribe(called.append)
    assert called == [job]


@pytest.mark.timeout(120)
def test_big_job_checksum(make_engine, expected_records) -> None:
    """4 GiB of pmem = 1 Mi pages: full comparison with an independently built array + samples."""
    eng = make_engine(2)
    deadline = time.monotonic() + 30
    while eng.workers_ready() < 2:  # (a loaded host may not have run the second one yet)
        assert time.monotonic() < deadline, "the workers never said hello"
        time.sleep(0.01)
    job = eng.create_job(spec(1 << 20))
    assert job.wait(60)
    check_records(job, expected_records, full=True, sample=300)
    assert (job.debug_init_counts() == 1).all()
    # (how the blocks were shared between the two workers depends on the scheduler: on a
    # loaded machine one worker may take them all, so this test claims only the records)
    job.release()
    with pytest.raises(JobCancelled):
        job.raw_records(0, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_dev_storage_reserve_and_altmap(make_engine, tmp_path, workers: int, expected_records) -> None:
    npages = 4 * 32768
    altmap = npages * 64 // 4096 + 2  # the memmap's own pages
    media = tmp_path / "region0.media"
    ns_offset = 1 << 20
    with open(media, "wb") as f:
        f.truncate(ns_offset + 8192 + npages * 64 + (8 << 20))
        f.seek(ns_offset + 8192)
        f.write(b"\xee" * 128)  # the reserve's records: must stay as they were
    eng = make_engine(workers)
    job = eng.create_job(spec(npages, first_pfn=FIRST_PFN + 2, reserve_pages=2, altmap_pages=altmap,
                              align_pages=512, storage=DevStorage(str(media), ns_offset + 8192)))
    assert job.pages_total == npages - 2
    assert job.wait(30)
    recs = np.frombuffer(job.raw_records(0, npages), dtype=PAGE_DTYPE)
    assert recs[:2].tobytes() == b"\xee" * 128
    assert not job.initialized(0, 2).any() and job.initialized(2, npages).all()
    flags = np.frombuffer(job.kpageflags(0, 4), "<u8")
    assert flags.tolist() == [1 << P.KPF_NOPAGE] * 2 + [1 << P.KPF_RESERVED] * 2
    # altmap pages: no pgmap, lru self pointers; the rest: pgmap
    assert (recs["pgmap"][2:altmap] != PGMAP).all()
    assert (recs["pgmap"][altmap:] == PGMAP).all()
    g = job.geom
    exp = expected_records(g.first_pfn + 2, altmap - 2, nid=0, pgmap=PGMAP, has_pgmap=False)
    assert recs[2:altmap].tobytes() == exp.tobytes()
    exp = expected_records(g.first_pfn + altmap, npages - altmap, nid=0, pgmap=PGMAP, has_pgmap=True)
    assert recs[altmap:].tobytes() == exp.tobytes()
    job.release()
    # the records persist in the media file
    with open(media, "rb") as f:
        f.seek(ns_offset + 8192 + 64 * altmap)
        assert f.read(64) == exp[0].tobytes()


@pytest.mark.timeout(30)
def test_create_is_constant_time_and_views_never_initialize(make_engine) -> None:
    eng = make_engine(0)
    eng.pause_background()
    t0 = time.perf_counter()
    job = eng.create_job(spec(16 << 20))  # 64 GiB of pmem, 1 GiB of records
    took = time.perf_counter() - t0  # (initializing them would take 10+ s here)
    assert took < 5, f"create_job took {took:.2f} s"
    assert job.active
    flags = np.frombuffer(job.kpageflags(1000, 600), "<u8")
    assert (flags == 1 << P.KPF_NOPAGE).all()
    assert job.raw_records(1000, 2) == bytes(128)
    assert not job.initialized(0, 5000).any()
    assert job.pages_done == 0 and job.active
    assert not job.wait(0.05)
    job.cancel()
    assert not job.active


@pytest.mark.timeout(60)
def test_sync_range_initializes_exactly_the_covering_blocks(make_engine, expected_records) -> None:
    eng = make_engine(0)
    eng.pause_background()  # nothing but the foreground initializes
    npages = 8 * 32768
    job = eng.create_job(spec(npages, align_pages=512, reserve_pages=0))
    rng = random.Random(7)
    expected_blocks: set[int] = set()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(20):
                first = r.randrange(npages)
                n = r.choice([1, 1, 7, 512, 600, 2000])
                job.sync_range(first, n)
                assert job.initialized(first, min(n, npages - first)).all()
                with lock:
                    expected_blocks.update(range(first // 512, (min(first + n, npages) - 1) // 512 + 1))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(rng.random(),)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    st = job.block_states()
    assert set(np.flatnonzero(st == DONE).tolist()) == expected_blocks
    assert set(np.unique(st).tolist()) <= {DONE, PENDING}
    assert (job.debug_init_counts()[sorted(expected_blocks)] == 1).all()
    assert job.pages_done == len(expected_blocks) * 512
    # the initialized blocks hold correct records, the others are still empty
    recs = np.frombuffer(job.raw_records(0, npages), dtype=PAGE_DTYPE)
    exp = expected_records(FIRST_PFN, npages, nid=0, pgmap=PGMAP, has_pgmap=True)
    init = job.initialized(0, npages)
    assert recs[init].tobytes() == exp[init].tobytes()
    assert not recs[~init].tobytes().strip(b"\0")
    # already initialized: the fast path, no lock, no scan
    t0 = time.perf_counter()
    b = min(expected_blocks)
    for _ in range(1000):
        job.sync_range(b * 512, 1)
    took = time.perf_counter() - t0
    assert took < 5, f"1000 syncs of a done block took {took:.2f} s"
    # pages in the reserve / beyond the end are ignored
    job.sync_range(npages, 10)
    eng.resume_background()
    assert job.wait(30)
    assert (job.debug_init_counts() == 1).all()
    check_records(job, expected_records)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_exactly_once_under_concurrent_foreground_and_workers(make_engine, workers: int, expected_records) -> None:
    eng = make_engine(workers)
    npages = 16 * 32768
    job = eng.create_job(spec(npages, ns_per_page=5000))  # ~2.6 s of worker time in all
    errors: list[BaseException] = []

    def fg(seed: int) -> None:
        r = random.Random(seed)
        try:
            while job.active:
                first = r.randrange(npages)
                job.sync_range(first, 4096)
                assert job.initialized(first, 4096).all()
        except BaseException as e:
            errors.append(e)

    # Workers first (on a loaded machine six foreground threads could otherwise take every
    # block before a worker process is scheduled): both kinds then race for the rest.
    deadline = time.monotonic() + 30
    while job.workers_used == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert job.workers_used >= 1 and job.active, job
    threads = [threading.Thread(target=fg, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    assert job.wait(100)
    for t in threads:
        t.join()
    assert not errors, errors
    counts = job.debug_init_counts()
    assert (counts == 1).all(), np.unique(counts)
    st_owned = job.owners_used
    assert FG in st_owned and any(o >= WORKER_BASE for o in st_owned)
    check_records(job, expected_records, full=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_cancel_mid_job(make_engine, workers: int) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    fds_before = memfds()
    eng = make_engine(workers)
    job = eng.create_job(spec(8 << 20, ns_per_page=5000))  # >= 20 s of floor even with 2 workers
    deadline = time.monotonic() + 10
    while job.pages_done == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.active and job.pages_done > 0
    assert len(memfds()) > len(fds_before)  # (the memfd, and mmap's internal dup of it)
    t0 = time.perf_counter()
    job.cancel()
    took = time.perf_counter() - t0
    assert took < 10, f"cancel took {took:.2f} s (the job had 20 s to go)"
    assert not job.active and job.cancelled
    st = job.block_states()
    assert set(np.unique(st).tolist()) <= {DONE, PENDING}  # nothing left claimed
    assert memfds() == fds_before
    assert set(os.listdir("/dev/shm")) == shm_before
    with pytest.raises(JobCancelled):
        job.sync_range(0, 1)
    job.cancel()  # idempotent
    # the pool is free again: a new job runs at full speed
    t0 = time.perf_counter()
    job2 = eng.create_job(spec(1 << 18))
    assert job2.wait(10)
    assert time.perf_counter() - t0 < 5


@pytest.mark.timeout(60)
def test_cancel_wakes_sync_waiters(make_engine) -> None:
    eng = make_engine(1)
    # 20 ms a page: a worker run (one 512-page block) lasts 10 s, so the block the waiter
    # needs cannot be done before the cancel; the waiter must be woken by the cancel itself.
    job = eng.create_job(spec(4 * 32768, ns_per_page=20_000_000))
    deadline = time.monotonic() + 10
    held = np.array([], dtype=np.int64)
    while time.monotonic() < deadline:
        held = np.flatnonzero(job.block_states() == WORKER_BASE)
        if held.size:
            break
        time.sleep(0.001)
    assert held.size
    result: list[BaseException | None] = []

    def waiter() -> None:
        try:
            job.sync_range(int(held[-1]) * 512, 1)
            result.append(None)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    t.join(0.2)
    assert t.is_alive() and not result, f"the waiter returned before the cancel: {result}"
    job.cancel()
    t.join(5)
    assert not t.is_alive(), "the waiter was not woken by the cancel"
    assert len(result) == 1 and isinstance(result[0], JobCancelled), result
    assert result[0].errno == errno.ENXIO


@pytest.mark.timeout(120)
def test_worker_sigkill_is_recovered(make_engine, expected_records) -> None:
    eng = make_engine(2)
    pids = eng.worker_pids()
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while eng.workers_ready() < 2 and time.monotonic() < deadline:  # both take runs from the start
        time.sleep(0.01)
    job = eng.create_job(spec(1 << 20, ns_per_page=2000))  # ~1 s per worker: still running
    while job.pages_done == 0 and time.monotonic() < deadline:  # under way, with most to go
        time.sleep(0.001)
    assert job.active and 0 < job.pages_done < job.pages_total // 2, job
    # Kill a worker while it holds blocks: stopped (SIGSTOP) mid-run, so that what it holds
    # can come back only through the requeue of its runs (a worker killed between two runs
    # holds nothing, and the job would complete without the requeue).
    held, tries = 0, 0
    while not held:
        assert job.active, f"the job ended before a worker was caught holding blocks ({tries} tries)"
        victim = next(w for w in eng.pool.slots if w is not None and w.pid == pids[tries % 2])
        tries += 1
        os.kill(victim.pid, signal.SIGSTOP)
        time.sleep(0.05)  # the dispatcher takes in what it sent before it stopped
        held = int((job.block_states() == victim.owner).sum())
        if not held:
            os.kill(victim.pid, signal.SIGCONT)
            time.sleep(0.002)
    os.kill(victim.pid, signal.SIGKILL)
    assert job.wait(60), f"the {held} blocks the killed worker held were not initialized by anyone: {job}"
    assert not job.cancelled and job.pages_done == job.pages_total
    assert (job.debug_init_counts() == 1).all()
    check_records(job, expected_records, full=True)
    survivor = next(pid for pid in pids if pid != victim.pid)
    new = eng.worker_pids()
    assert len(new) == 2 and victim.pid not in new and survivor in new
    assert eng.replacements == 1
    assert victim.pid not in children()  # reaped
    # the replacement works
    # the replacement works: a job long enough for both slots to take runs is done by both
    # (the replacement took the dead worker's slot)
    job2 = eng.create_job(spec(1 << 18, ns_per_page=2000))
    assert job2.wait(30)
    assert job2.workers_used == 2, job2
    check_records(job2, expected_records, full=True)


@pytest.mark.timeout(60)
def test_waiting_for_a_whole_job_and_ns_floor(make_engine, expected_records) -> None:
    """What sync mode does (the model's waiter of a whole job, memmap_control.start_job):
    wait() returns once every page is initialized, not before the ns_per_page floor allows."""
    eng = make_engine(0)
    t0 = time.perf_counter()
    job = eng.create_job(spec(1 << 16, ns_per_page=1000))  # >= 65 ms
    assert job.wait(30)
    dt = time.perf_counter() - t0
    assert not job.active and job.pages_done == 1 << 16
    # the floor is per initializer: only the in-process background thread works here
    assert dt >= (1 << 16) * 1000e-9
    check_records(job, expected_records)
    eng2 = make_engine(2)
    job = eng2.create_job(spec(1 << 18))
    assert job.wait(30)
    assert not job.active
    check_records(job, expected_records)


@pytest.mark.timeout(60)
def test_ns_per_page_settable(make_engine) -> None:
    eng = make_engine(1)
    job = eng.create_job(spec(1 << 18, ns_per_page=1_000_000))  # would take 262 s
    time.sleep(0.05)
    job.ns_per_page = 0  # next runs go at full speed
    assert job.wait(30)


@pytest.mark.timeout(60)
def test_close_leaves_nothing(make_engine) -> None:
    before = children()
    shm_before = set(os.listdir("/dev/shm"))
    fds_before = memfds()
    eng = MemmapEngine(2)
    try:
        eng.start()
        pids = set(eng.worker_pids())
        assert pids <= children()
        jobs = [eng.create_job(spec(1 << 20, ns_per_page=100, name=f"j{i}")) for i in range(3)]
        done = eng.create_job(spec(1 << 12, name="small"))
        assert done.wait(10)
        cancelled = threading.Event()
        jobs[0].subscribe(lambda j: cancelled.set())
        time.sleep(0.1)
    finally:
        t0 = time.perf_counter()
        eng.close()
    assert time.perf_counter() - t0 < 5
    assert cancelled.wait(5)
    assert all(j.cancelled for j in jobs)
    assert children() == before
    assert memfds() == fds_before
    assert set(os.listdir("/dev/shm")) == shm_before
    eng.close()  # idempotent


def test_spec_validation(make_engine) -> None:
    eng = make_engine(0)
    with pytest.raises(ValueError):
        eng.create_job(spec(10, hold_permille=1001))
    with pytest.raises(ValueError):
        eng.create_job(spec(10, reserve_pages=11))
    with pytest.raises(ValueError):
        eng.create_job(spec(10, align_pages=0))
    with pytest.raises(ValueError):
        eng.create_job(spec(10, storage=DevStorage("/nonexistent", 4095)))
    job = eng.create_job(spec(2, reserve_pages=2, storage=MemStorage()))  # nothing to do
    assert not job.active and job.pages_total == 0
    assert JobCancelled().errno == errno.ENXIO
    assert isinstance(JobCancelled(), OSError)


@pytest.mark.timeout(60)
def test_align_variants(make_engine, expected_records) -> None:
    eng = make_engine(2)
    for align in (1, 16, 262144):
        job = eng.create_job(spec(300000 if align != 262144 else 2 * 262144 + 100, align_pages=align,
                                  reserve_pages=2, altmap_pages=5000, name=f"a{align}"))
        assert job.wait(30)
        check_records(job, expected_records)
        assert (job.debug_init_counts()[job.geom.reserve_pages // align:] == 1).all()
        job.release()


@pytest.mark.timeout(60)
def test_foreground_cost_is_one_block(make_engine) -> None:
    eng = make_engine(0)
    eng.pause_background()
    job = eng.create_job(spec(16 << 20, align_pages=512))  # 64 GiB
    job.sync_range(12345678, 1)
    assert job.pages_done == 512
    assert int(np.count_nonzero(job.block_states() != PENDING)) == 1
    assert FG in job.owners_used


def _wait_for_worker_block(job: MemmapJob, owner: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = np.flatnonzero(job.block_states() == owner)
        if held.size:
            return int(held[-1])
        time.sleep(0.001)
    raise AssertionError("no block claimed by the worker")


@pytest.mark.timeout(60)
def test_sync_range_takes_over_blocks_of_a_dead_worker(make_engine, expected_records) -> None:
    eng = make_engine(1)
    job = eng.create_job(spec(4 * 32768, ns_per_page=20000))  # a run: ~10 ms per 512 pages
    b = _wait_for_worker_block(job, WORKER_BASE)
    eng.pause_background()  # only the foreground may initialize the block again
    pid = eng.worker_pids()[0]
    done = threading.Event()

    def waiter() -> None:
        job.sync_range(b * 512, 1)
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    os.kill(pid, signal.SIGKILL)
    assert done.wait(10)
    t.join()
    assert job.initialized(b * 512, 512).all()
    recs = job.records(b * 512, 512)
    assert recs.tobytes() == expected_records(FIRST_PFN + b * 512, 512, nid=0, pgmap=PGMAP,
                                              has_pgmap=True).tobytes()
    assert (job.debug_init_counts() <= 1).all()
    job.ns_per_page = 0
    eng.resume_background()
    assert job.wait(30)
    assert (job.debug_init_counts() == 1).all()


@pytest.mark.timeout(60)
def test_no_replacement_possible_falls_back_to_a_thread(make_engine, expected_records) -> None:
    eng = make_engine(1)

    def cannot_start(slot: int, fork: bool) -> None:
        raise OSError(errno.EMFILE, "no more processes for you")

    eng.pool.start_worker = cannot_start  # type: ignore[method-assign]
    job = eng.create_job(spec(1 << 18, ns_per_page=2000))
    _wait_for_worker_block(job, WORKER_BASE)
    os.kill(eng.worker_pids()[0], signal.SIGKILL)
    job.ns_per_page = 0
    assert job.wait(30)
    assert not job.cancelled
    check_records(job, expected_records)


@pytest.mark.timeout(60)
def test_forked_workers_do_not_run_the_parents_signal_handlers(make_engine, tmp_path) -> None:
    marker = tmp_path / "handler-ran"

    def handler(signum: int, frame: object) -> None:
        marker.write_text(str(os.getpid()))

    old = signal.signal(signal.SIGTERM, handler)
    try:
        eng = make_engine(1)  # forks now, with the handler installed
        pid = eng.worker_pids()[0]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pid in eng.worker_pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pid not in eng.worker_pids()  # died of SIGTERM (default action)
        assert not marker.exists()
        deadline = time.monotonic() + 10
        while len(eng.worker_pids()) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        job = eng.create_job(spec(1 << 16))
        assert job.wait(30)
    finally:
        signal.signal(signal.SIGTERM, old)


def _wait_for_claim(job: MemmapJob, timeout: float = 20) -> None:
    """Until some initializer holds a block (a run is in flight)."""
    deadline = time.monotonic() + timeout
    while not ((job.block_states() > DONE).any()):
        assert time.monotonic() < deadline, "no run started"
        time.sleep(0.005)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_new_ns_per_page_reaches_runs_in_flight(make_engine, workers: int, expected_records) -> None:
    """A run sleeping for a huge floor picks up a new value at once (one block = one run of
    3300 s at the old value)."""
    eng = make_engine(workers)
    job = eng.create_job(spec(2 * 32768, align_pages=32768, ns_per_page=100_000_000))
    _wait_for_claim(job)
    assert job.pages_done == 0
    t0 = time.monotonic()
    job.ns_per_page = 0
    assert job.wait(60), f"still active {time.monotonic() - t0:.1f} s after ns_per_page = 0"
    assert (job.debug_init_counts() == 1).all()
    check_records(job, expected_records)


def test_page_floor_follows_the_current_rate() -> None:
    rate = [1e9]
    floor = PageFloor(lambda: rate[0])
    floor.add(1000)
    assert 990 < floor.owed() <= 1000  # seconds, at 1 s per page
    rate[0] = 1e6
    assert 0.9 < floor.owed() <= 1.0  # what is left, at the new rate
    rate[0] = 0
    assert floor.owed() == 0
    rate[0] = 1e9
    assert floor.owed() == 0  # the debt was cancelled, not just hidden


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def _cont(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(120)
def test_stalled_worker_runs_are_handed_to_the_other(make_engine, expected_records) -> None:
    eng = make_engine(2, stall_timeout=1.0)
    pids = eng.worker_pids()
    job = eng.create_job(spec(4 * 32768, ns_per_page=20000))  # ~2.6 s of floor on one worker
    _wait_for_worker_block(job, WORKER_BASE)
    _stop(pids[0])
    try:
        t0 = time.monotonic()
        assert job.wait(60), f"not idle {time.monotonic() - t0:.1f} s after stopping a worker"
        assert not job.cancelled and job.pages_done == job.pages_total
        assert eng.handoffs >= 1
        assert (job.debug_init_counts() == 1).all()
        check_records(job, expected_records)
        assert eng.worker_pids() == pids  # stopped, not killed: nothing asked for that
    finally:
        _cont(pids[0])
    # Resumed, its late reports change nothing; it serves the next job.
    job2 = eng.create_job(spec(1 << 18, name="after"))
    assert job2.wait(30)
    assert (job.debug_init_counts() == 1).all()
    check_records(job, expected_records)
    check_records(job2, expected_records)
    fds = memfds()
    job.release()
    assert len(memfds()) < len(fds)
    assert eng.worker_pids() == pids and eng.replacements == 0


@pytest.mark.timeout(120)
def test_release_kills_a_stopped_worker_that_still_maps_the_job(make_engine, expected_records) -> None:
    fds_before = memfds()
    eng = make_engine(2, stall_timeout=1.0)
    pids = eng.worker_pids()
    job = eng.create_job(spec(2 * 32768, ns_per_page=20000))
    _wait_for_worker_block(job, WORKER_BASE)
    _stop(pids[0])
    try:
        assert job.wait(60)
        check_records(job, expected_records)
        t0 = time.monotonic()
        job.release()  # waits until no process maps the storage: the stopped one is killed
        assert time.monotonic() - t0 < 10
        assert memfds() == fds_before
        deadline = time.monotonic() + 10
        while eng.replacements < 1 or len(eng.worker_pids()) < 2:
            assert time.monotonic() < deadline, "no replacement for the killed worker"
            time.sleep(0.01)
        assert pids[0] not in eng.worker_pids() and pids[0] not in children()
    finally:
        _cont(pids[0])
    job2 = eng.create_job(spec(1 << 16, name="after"))
    assert job2.wait(30)
    check_records(job2, expected_records)


@pytest.mark.timeout(120)
def test_single_stalled_worker_is_rescued_in_process(make_engine, expected_records) -> None:
    eng = make_engine(1, stall_timeout=1.0)
    pid = eng.worker_pids()[0]
    job = eng.create_job(spec(2 * 32768, ns_per_page=20000))
    _wait_for_worker_block(job, WORKER_BASE)
    _stop(pid)
    try:
        assert job.wait(60)
        assert BG in job.owners_used
        assert (job.debug_init_counts() == 1).all()
        check_records(job, expected_records)
    finally:
        _cont(pid)
    job2 = eng.create_job(spec(1 << 16, name="after"))
    assert job2.wait(30)


@pytest.mark.timeout(120)
def test_a_slow_run_is_not_taken_for_a_stall(make_engine) -> None:
    """One block of 32768 pages at 150 us/page: a single 5 s run, with heartbeats."""
    eng = make_engine(1, stall_timeout=2.0)
    job = eng.create_job(spec(32768, align_pages=32768, ns_per_page=150_000))
    assert job.wait(60)
    assert eng.handoffs == 0
    assert job.owners_used == {WORKER_BASE}


def test_protocol_messages_round_trip_and_nothing_else_decodes() -> None:
    g = spec(1000).geometry()
    for msg in (protocol.Attach(1, g), protocol.Run(1, 7, 0, 512, (0,)), protocol.Revoke(1, (7, 8)),
                protocol.Cancel(1), protocol.Detach(1), protocol.Exit(), protocol.Hello(42),
                protocol.Progress(1, 7), protocol.RunDone(1, 7, ()), protocol.RunAbandoned(1, 7),
                protocol.RunFailed(1, 7, "ENOSPC"), protocol.AttachFailed(1, "EMFILE"),
                protocol.Cancelled(1), protocol.Detached(1)):
        assert protocol.decode(protocol.encode(msg)) == msg
        assert len(protocol.encode(msg)) < protocol.MSG_MAX
    with pytest.raises(TypeError):
        protocol.decode(pickle.dumps(("run", 1, 7, 0, 512, 0.0, [])))  # the old positional tuples
