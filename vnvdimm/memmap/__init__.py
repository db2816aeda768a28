"""vnvdimm.memmap - the memmap init engine (docs/design.md, "Memmap initialization").

Emulates the 2018 "asynchronous + multithreaded memmap init" series as its authors meant it
(docs/memmap-abi.md; not its two posted bugs): a device's ``struct page`` records are initialized in
the background by a pool of worker processes, and any access to a page that is not initialized
yet initializes the block covering it in the foreground. No FUSE, sysfs or model import here.

Usage::

    engine = MemmapEngine(workers=None)   # None: one per CPU; 0: a background thread, no processes
    engine.start()                        # once, before any other thread exists (workers fork)
    job = engine.create_job(JobSpec(name="pfn0.0", first_pfn=..., npages=..., reserve_pages=2,
                                    altmap_pages=..., align_pages=512, nid=0, pgmap=...,
                                    storage=MemStorage() | DevStorage(path, offset)))
    job.sync_range(page, n)               # before touching pages [page, page+n)
    job.wait(); job.release(); engine.close()

Rooms
-----
``engine`` (the facade: jobs, threads, shutdown) - ``job`` (one device's memmap, foreground sync,
cancel/release) - ``blockmap`` (block states and sections, pure) - ``lease`` (the storage and who
uses it) - ``dispatch`` (run queue, dispatcher thread, watchdogs) - ``pool`` (worker processes) -
``protocol`` (the messages) - ``worker`` (the worker process) - ``storage`` (geometry, mappings, the
chunk loop) - ``page`` (the record and its initializers).

Model
-----
* A job covers job pages ``[0, npages)`` = pfns ``[first_pfn, first_pfn + npages)``. Pages
  ``[0, reserve_pages)`` are never initialized (the altmap reserve); pages
  ``[reserve_pages, altmap_pages)`` hold the memmap itself under map=dev and get no pgmap; the
  others get ``pgmap``. Records: :data:`PAGE_DTYPE` (64 bytes, x86_64 ``struct page``; flags
  layout documented in :mod:`vnvdimm.memmap.page`). Pageblock migratetypes live in a separate
  usemap (``job.pageblock_migratetype``).
* Storage: map=mem (:class:`MemStorage`) is a memfd (anonymous shared memory: it cannot leak);
  map=dev (:class:`DevStorage`) is the media file at ``offset``. Both are created sparse, so
  ``create_job`` is O(1) in the device size.
* Phase 1 (vmemmap population), per 128 MiB section (2 MiB of records): the first initializer to
  reach a section makes its storage exist (fallocate + ``MADV_POPULATE_WRITE``).
* Phase 2, per ``align_pages`` block (PENDING / claimed-by / DONE). Claims are made only in the
  engine process, under the job's lock; a dispatcher thread hands each worker runs of up to a
  section, two in flight. ``sync_range`` claims the pending blocks it covers, initializes them
  itself and waits for those a worker holds (and takes over those given back). A dead worker's
  runs are re-queued and a replacement is spawned (fork+exec: threads exist by then); a worker
  that makes no progress (stopped, swapped out) has its runs handed to the others; while no
  worker makes progress, an in-process thread initializes.
* Workers map a job's storage from its creation until it is done (or cancelled), then unmap
  and acknowledge; the engine keeps its own mapping and the memfd until ``release()`` /
  ``cancel()``, which return once the memory is really freed (a worker that does not
  acknowledge by then is killed: released storage is never written).
* ``ns_per_page``: a floor on the time any initialization takes (emulates a slow platform). A
  new value applies at once, to the runs in flight too.
* ``create_job`` always returns at once; the pre-series kernel's synchronous memmap is the
  model's sync mode, which waits for the job (vnvdimm.model.memmap_control).

API beyond what the model needs: ``job.release()``, ``job.records()``, ``job.block_states()``,
``job.workers_used``, ``job.sections_populated``/``sections_total``, ``job.error``,
``job.debug_init_counts()`` (``MemmapEngine(debug=True)``), ``engine.pause_background()`` /
``resume_background()`` (tests), ``engine.worker_pids()``, ``engine.replacements``;
``job.owners_used``, ``engine.handoffs``, ``engine.workers_ready()``,
``MemmapEngine(stall_timeout=...)``.
"""

from .engine import MemmapEngine
from .job import JobCancelled, JobSpec, MemmapJob
from .page import PAGE_DTYPE, init_page_reference, init_range, init_range_naive
from .storage import DevStorage, MemStorage

__all__ = [
    "PAGE_DTYPE",
    "DevStorage",
    "JobCancelled",
    "JobSpec",
    "MemStorage",
    "MemmapEngine",
    "MemmapJob",
    "init_page_reference",
    "init_range",
    "init_range_naive",
]
