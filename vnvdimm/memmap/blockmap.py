"""Which align-blocks of a job are pending, claimed (and by whom) or done; which sections exist.

Pure bookkeeping, no locks, no processes, no storage: the job calls it under its own lock. One
``uint8`` per block (``np.zeros`` is calloc, so half a million blocks cost nothing until touched):

    PENDING --claim(owner)--> owner --complete(owner)--> DONE
                                    --requeue(owner)--> PENDING

Only the owner holding a block may complete it, so every block is completed exactly once: a
completion of a block that is already DONE changes nothing (a late report of work handed to
someone else; the records it wrote are identical), a completion of a block that is PENDING or
held by another owner is a :class:`ClaimError` and changes nothing either.
"""

from __future__ import annotations

import numpy as np

from .page import PFN_SECTION_SHIFT
from .storage import Geometry

PENDING = 0
DONE = 1
FG = 2  # a foreground initializer (any thread of the engine process)
BG = 3  # the in-process background thread
WORKER_BASE = 4  # worker slot s claims as WORKER_BASE + s
MAX_WORKERS = 255 - WORKER_BASE

_SCAN_WINDOW = 4096  # blocks looked at per numpy call when searching for a pending block


class ClaimError(AssertionError):
    """A completion of blocks the completing owner does not hold (two initializers for a block)."""


class BlockMap:
    """The block states and the phase-1 section map of one job."""

    def __init__(self, geom: Geometry, *, count_completions: bool = False) -> None:
        self.geom = geom
        nb = geom.nblocks
        self._state = np.zeros(nb, dtype=np.uint8)
        # Blocks lying wholly in the reserve have nothing to initialize.
        reserved = nb if geom.reserve_pages >= geom.npages else geom.reserve_pages // geom.align_pages
        self._state[:reserved] = DONE
        self._blocks_left = nb - reserved
        self._cursor = reserved  # no PENDING block before it
        self._populated = np.zeros(geom.nsections, dtype=np.uint8)
        self._pages_done = 0
        self._completions = np.zeros(nb, dtype=np.uint16) if count_completions else None
        self._owners_used: set[int] = set()

    # -- views -----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._blocks_left == 0

    @property
    def blocks_left(self) -> int:
        return self._blocks_left

    @property
    def pages_done(self) -> int:
        return self._pages_done

    @property
    def pages_total(self) -> int:
        return self.geom.npages - self.geom.reserve_pages

    @property
    def owners_used(self) -> frozenset[int]:
        """Owners that completed at least one block."""
        return frozenset(self._owners_used)

    @property
    def sections_populated(self) -> int:
        return int(np.count_nonzero(self._populated))

    def states(self) -> np.ndarray:
        return self._state.copy()

    def completions(self) -> np.ndarray | None:
        """Completions per block when counted (``count_completions``), else None."""
        return None if self._completions is None else self._completions.copy()

    def pages_of(self, b0: int, b1: int) -> tuple[int, int]:
        """Job page range [lo, hi) of blocks [b0, b1), without the reserve (empty: lo >= hi)."""
        g = self.geom
        return max(b0 * g.align_pages, g.reserve_pages), min(b1 * g.align_pages, g.npages)

    def blocks_covering(self, first_page: int, npages: int) -> tuple[int, int] | None:
        """Blocks [b0, b1) holding pages [first_page, first_page + npages) outside the reserve."""
        g = self.geom
        lo = max(first_page, g.reserve_pages)
        hi = min(first_page + npages, g.npages)
        if lo >= hi:
            return None
        return lo // g.align_pages, (hi - 1) // g.align_pages + 1

    def all_done(self, b0: int, b1: int) -> bool:
        return bool((self._state[b0:b1] == DONE).all())

    def initialized(self, first_page: int, count: int) -> np.ndarray:
        """Per page of [first_page, first_page + count): initialized (never for the reserve)."""
        pages = np.arange(first_page, first_page + count, dtype=np.int64)
        out = self._state[pages // self.geom.align_pages] == DONE
        out &= pages >= self.geom.reserve_pages
        return out

    def unpopulated_sections(self, lo: int, hi: int) -> list[int]:
        """Job-relative sections of pages [lo, hi) whose storage nobody has populated yet."""
        if lo >= hi:
            return []
        g = self.geom
        return [js for js in range(g.section_of(lo), g.section_of(hi - 1) + 1) if not self._populated[js]]

    def is_populated(self, js: int) -> bool:
        return bool(self._populated[js])

    # -- transitions -------------------------------------------------------------------------------
    def claim_next(self, owner: int, max_pages: int, stop_block: int | None = None) -> tuple[int, int] | None:
        """Claim the next run of PENDING blocks in block order: at least one block, at most
        ``max_pages`` (rounded down to blocks), ending at a section boundary when it reaches
        past its first section, and stopping at the first block that is not PENDING and at
        ``stop_block`` (a hold: nothing at or past it is claimed)."""
        st = self._state
        nb = len(st) if stop_block is None else min(len(st), stop_block)
        c = self._cursor
        b0 = c if c < nb and st[c] == PENDING else -1  # the usual case: no scan
        while b0 < 0 and c < nb:
            window = st[c : min(nb, c + _SCAN_WINDOW)]
            hit = np.flatnonzero(window == PENDING)
            if hit.size:
                b0 = c + int(hit[0])
                break
            c += len(window)
        if b0 < 0:
            self._cursor = max(self._cursor, nb)
            return None
        g = self.geom
        a = g.align_pages
        start_pfn = g.first_pfn + b0 * a
        end_pfn = start_pfn + max(max_pages, a)
        section_end = end_pfn >> PFN_SECTION_SHIFT << PFN_SECTION_SHIFT
        if section_end > start_pfn:
            end_pfn = section_end  # whole sections: phase 1 and the templates go by section
        limit = min(nb, max(b0 + 1, (end_pfn - g.first_pfn) // a))
        seg = st[b0:limit]
        if (seg == PENDING).all():
            b1 = limit  # the usual case
        else:
            stop = np.flatnonzero(seg != PENDING)
            b1 = b0 + (int(stop[0]) if stop.size else len(seg))
        st[b0:b1] = owner
        self._cursor = b1
        return b0, b1

    def claim_pending_in(self, b0: int, b1: int, owner: int, max_blocks: int) -> list[tuple[int, int]]:
        """Claim every PENDING block of [b0, b1) for ``owner``, as runs of at most ``max_blocks``."""
        seg = self._state[b0:b1]
        mine = np.flatnonzero(seg == PENDING)
        if not mine.size:
            return []
        seg[mine] = owner
        mine += b0
        runs: list[tuple[int, int]] = []
        for r in np.split(mine, np.flatnonzero(np.diff(mine) != 1) + 1):
            first, end = int(r[0]), int(r[-1]) + 1
            runs += [(x, min(x + max_blocks, end)) for x in range(first, end, max_blocks)]
        return runs

    def complete(self, b0: int, b1: int, owner: int) -> int:
        """Blocks of [b0, b1) held by ``owner`` become DONE; returns the pages newly done.

        Blocks already DONE are left alone (idempotent). Any other block (PENDING, or held by
        another owner) raises :class:`ClaimError` before anything changes.
        """
        seg = self._state[b0:b1]
        mine = seg == owner
        if mine.all():  # the usual case: the whole run
            seg[:] = DONE
            if self._completions is not None:
                self._completions[b0:b1] += 1
            lo, hi = self.pages_of(b0, b1)
            pages, nblocks = max(0, hi - lo), b1 - b0
        else:
            if not (mine | (seg == DONE)).all():
                raise ClaimError(f"blocks [{b0}, {b1}) completed by {owner} but held by {np.unique(seg).tolist()}")
            idx = np.flatnonzero(mine) + b0
            if not idx.size:
                return 0
            seg[mine] = DONE
            if self._completions is not None:
                self._completions[idx] += 1
            g = self.geom
            lo_pages = np.maximum(idx * g.align_pages, g.reserve_pages)
            hi_pages = np.minimum((idx + 1) * g.align_pages, g.npages)
            pages, nblocks = int(np.maximum(hi_pages - lo_pages, 0).sum()), len(idx)
        if not nblocks:
            return 0
        self._pages_done += pages
        self._blocks_left -= nblocks
        self._owners_used.add(owner)
        return pages

    def requeue(self, b0: int, b1: int, owner: int) -> int:
        """Blocks of [b0, b1) still held by ``owner`` become PENDING again; returns how many."""
        seg = self._state[b0:b1]
        mine = seg == owner
        n = int(np.count_nonzero(mine))
        if n:
            seg[mine] = PENDING
            self._cursor = min(self._cursor, b0)
        return n

    def mark_populated(self, sections: list[int] | tuple[int, ...]) -> None:
        for js in sections:
            self._populated[js] = 1
