"""The block map alone (no processes, no storage): claims, completions and requeues of
align-blocks, checked against a plain-Python model of who holds what."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vnvdimm.memmap import page as P
from vnvdimm.memmap.blockmap import BG, DONE, FG, PENDING, WORKER_BASE, BlockMap, ClaimError
from vnvdimm.memmap.storage import Geometry

OWNERS = [FG, BG, WORKER_BASE, WORKER_BASE + 1]


def geometry(npages: int, align: int, reserve: int = 0, first_pfn: int = 0x340000) -> Geometry:
    return Geometry(first_pfn=first_pfn, npages=npages, reserve_pages=reserve, altmap_pages=reserve,
                    align_pages=align, nid=0, pgmap=0)


def test_reserve_blocks_start_done_and_pages_exclude_the_reserve() -> None:
    bm = BlockMap(geometry(npages=4 * 512 + 100, align=512, reserve=600))
    assert bm.states().tolist() == [DONE, PENDING, PENDING, PENDING, PENDING]
    assert bm.pages_total == 4 * 512 + 100 - 600
    assert bm.pages_of(1, 2) == (600, 1024)  # the reserve's tail is not counted
    assert bm.blocks_covering(0, 600) is None  # only reserve pages
    assert bm.blocks_covering(599, 2) == (1, 2)
    assert not bm.initialized(0, 600).any()


def test_claim_next_ends_runs_at_section_boundaries_and_respects_the_run_size() -> None:
    # first pfn 100 pages before a section boundary, align 1
    sec = P.PAGES_PER_SECTION
    g = geometry(npages=5 * sec, align=1, first_pfn=sec - 100)
    bm = BlockMap(g)
    assert bm.claim_next(FG, 1000) == (0, 100)  # a small run stops at the boundary
    assert bm.claim_next(FG, 1000) == (100, 1100)
    assert bm.claim_next(BG, 2 * sec) == (1100, 100 + 2 * sec)  # a big one ends on one
    assert bm.claim_next(BG, 10**9) == (100 + 2 * sec, 5 * sec)  # the end of the job
    # a block bigger than a section is still one run
    big = BlockMap(geometry(npages=4 * sec, align=2 * sec))
    assert big.claim_next(FG, 1) == (0, 1)
    # a run stops at the first block someone holds
    bm = BlockMap(geometry(npages=64 * 512, align=512))
    bm.claim_pending_in(10, 11, FG, 1)
    assert bm.claim_next(BG, 10**9) == (0, 10)
    assert bm.claim_next(BG, 10**9) == (11, 64)


def test_complete_is_idempotent_and_refuses_blocks_held_by_others() -> None:
    bm = BlockMap(geometry(npages=8 * 512, align=512), count_completions=True)
    assert bm.claim_next(WORKER_BASE, 4 * 512) == (0, 4)
    assert bm.requeue(0, 4, WORKER_BASE) == 4  # handed on (a stalled worker)
    assert bm.claim_next(WORKER_BASE + 1, 4 * 512) == (0, 4)
    before = bm.states()
    with pytest.raises(ClaimError):
        bm.complete(0, 4, WORKER_BASE)  # the old owner's late report: not its blocks any more
    assert (bm.states() == before).all() and bm.pages_done == 0
    assert bm.complete(0, 4, WORKER_BASE + 1) == 4 * 512
    assert bm.complete(0, 4, WORKER_BASE + 1) == 0  # again: nothing changes
    assert bm.complete(0, 4, WORKER_BASE) == 0  # DONE blocks: a late report is harmless
    assert (bm.completions()[:4] == 1).all()
    assert bm.owners_used == {WORKER_BASE + 1}
    assert bm.requeue(0, 4, WORKER_BASE + 1) == 0  # DONE stays DONE


def test_claim_pending_in_splits_runs_at_gaps_and_size() -> None:
    bm = BlockMap(geometry(npages=20 * 16, align=16))
    assert bm.claim_next(WORKER_BASE, 3 * 16) == (0, 3)
    bm.claim_pending_in(5, 6, BG, 100)
    assert bm.claim_pending_in(0, 12, FG, 4) == [(3, 5), (6, 10), (10, 12)]
    assert bm.claim_pending_in(0, 12, FG, 4) == []


class BlockMapMachine(RuleBasedStateMachine):
    """Random claims, completions and requeues by four owners against a dict model."""

    @initialize(npages=st.integers(1, 5000), align=st.sampled_from([1, 7, 64, 512]),
                reserve=st.integers(0, 600), first_pfn=st.integers(0, 3 * P.PAGES_PER_SECTION))
    def setup(self, npages: int, align: int, reserve: int, first_pfn: int) -> None:
        reserve = min(reserve, npages)
        self.g = geometry(npages, align, reserve, first_pfn)
        self.bm = BlockMap(self.g, count_completions=True)
        self.model = self.bm.states().tolist()
        self.held: dict[int, list[tuple[int, int]]] = {o: [] for o in OWNERS}

    @rule(owner=st.sampled_from(OWNERS), max_pages=st.integers(1, 40000))
    def claim_next(self, owner: int, max_pages: int) -> None:
        r = self.bm.claim_next(owner, max_pages)
        if r is None:
            assert PENDING not in self.model
            return
        b0, b1 = r
        assert b1 > b0 and all(s == PENDING for s in self.model[b0:b1])
        assert self.model.index(PENDING) == b0  # block order
        a = self.g.align_pages
        assert b1 - b0 <= max(1, max_pages // a)
        first_section = (self.g.first_pfn + b0 * a) >> P.PFN_SECTION_SHIFT
        end_pfn = self.g.first_pfn + b1 * a
        # one block, or within the first section, or ending on a section boundary (or the job's end)
        assert (b1 - b0 == 1 or (end_pfn - 1) >> P.PFN_SECTION_SHIFT == first_section
                or end_pfn % P.PAGES_PER_SECTION == 0 or b1 == len(self.model))
        self.model[b0:b1] = [owner] * (b1 - b0)
        self.held[owner].append(r)

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def claim_range(self, owner: int, data: st.DataObject) -> None:
        nb = len(self.model)
        b0 = data.draw(st.integers(0, nb - 1))
        b1 = data.draw(st.integers(b0 + 1, nb))
        runs = self.bm.claim_pending_in(b0, b1, owner, data.draw(st.integers(1, 8)))
        expect = [b for b in range(b0, b1) if self.model[b] == PENDING]
        assert sorted(b for r0, r1 in runs for b in range(r0, r1)) == expect
        for r0, r1 in runs:
            self.model[r0:r1] = [owner] * (r1 - r0)
            self.held[owner].append((r0, r1))

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), give_up=st.booleans())
    def finish(self, data: st.DataObject, give_up: bool) -> None:
        owner = data.draw(st.sampled_from([o for o, runs in self.held.items() if runs]))
        b0, b1 = self.held[owner].pop(data.draw(st.integers(0, len(self.held[owner]) - 1)))
        if give_up:
            self.bm.requeue(b0, b1, owner)
            self.model[b0:b1] = [PENDING if s == owner else s for s in self.model[b0:b1]]
        else:
            self.bm.complete(b0, b1, owner)
            self.model[b0:b1] = [DONE] * (b1 - b0)

    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def foreign_completion(self, data: st.DataObject, owner: int) -> None:
        """A completion of blocks one does not hold changes nothing (or is a no-op on DONE)."""
        nb = len(self.model)
        b0 = data.draw(st.integers(0, nb - 1))
        b1 = data.draw(st.integers(b0 + 1, min(nb, b0 + 5)))
        before = self.bm.states()
        if all(s in (owner, DONE) for s in self.model[b0:b1]):
            return  # a legitimate completion: covered by finish()
        with pytest.raises(ClaimError):
            self.bm.complete(b0, b1, owner)
        assert (self.bm.states() == before).all()

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "bm"):
            return
        assert self.bm.states().tolist() == self.model
        done = [b for b, s in enumerate(self.model) if s == DONE]
        pages = sum(max(0, hi - lo) for lo, hi in (self.bm.pages_of(b, b + 1) for b in done))
        assert self.bm.pages_done == pages
        assert self.bm.done == all(s == DONE for s in self.model)
        assert self.bm.blocks_left == sum(s != DONE for s in self.model)
        counts = self.bm.completions()
        assert counts is not None and counts.max(initial=0) <= 1  # exactly once, at most

    @invariant()
    def initialized_pages_are_those_of_done_blocks(self) -> None:
        if not hasattr(self, "bm"):
            return
        init = self.bm.initialized(0, self.g.npages)
        pages = np.arange(self.g.npages)
        expect = (np.array(self.model)[pages // self.g.align_pages] == DONE) & (pages >= self.g.reserve_pages)
        assert (init == expect).all()


TestBlockMapMachine = BlockMapMachine.TestCase
TestBlockMapMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                        derandomize=True)


@given(npages=st.integers(1, 3000), align=st.sampled_from([1, 16, 512]), reserve=st.integers(0, 1000),
       first=st.integers(0, 4000), count=st.integers(0, 4000))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_blocks_covering_holds_exactly_the_non_reserve_pages(npages: int, align: int, reserve: int,
                                                             first: int, count: int) -> None:
    reserve = min(reserve, npages)
    bm = BlockMap(geometry(npages, align, reserve))
    pages = [p for p in range(first, first + count) if reserve <= p < npages]
    cover = bm.blocks_covering(first, count)
    if not pages:
        assert cover is None
        return
    assert cover == (pages[0] // align, pages[-1] // align + 1)


def test_claim_next_claims_nothing_at_or_past_the_stop_block() -> None:
    """A hold (MemmapJob.hold_background_at): runs end before stop_block, nothing is claimed
    from it on, and a later call without the stop claims the rest."""
    bm = BlockMap(geometry(npages=P.PAGES_PER_SECTION * 2, align=512))
    assert bm.claim_next(WORKER_BASE, P.PAGES_PER_SECTION, stop_block=0) is None
    assert bm.claim_next(WORKER_BASE, P.PAGES_PER_SECTION, stop_block=5) == (0, 5)
    assert bm.claim_next(WORKER_BASE, P.PAGES_PER_SECTION, stop_block=5) is None
    assert bm.claim_next(WORKER_BASE, P.PAGES_PER_SECTION, stop_block=70) == (5, 64)  # a run, to the section end
    assert bm.claim_next(WORKER_BASE, P.PAGES_PER_SECTION, stop_block=70) == (64, 70)
    assert bm.claim_next(WORKER_BASE, P.PAGES_PER_SECTION) == (70, 128)
    assert bm.claim_next(WORKER_BASE, P.PAGES_PER_SECTION) is None
