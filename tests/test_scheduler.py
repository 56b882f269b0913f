"""The scheduler under every interleaving of add, step, abort and finish, on a pool so small
that it preempts all the time: a hypothesis state machine checks its invariants after each, with
the prefix cache off and on (prompts that share prefixes, so matches and evictions happen), and
with a token budget so small that prompts are prefilled in chunks."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from serve.core.kv.page_allocator import PageAllocator
from serve.core.kv.radix_cache import RadixCache
from serve.core.request import Request, RequestStatus
from serve.core.scheduler import Scheduler
from serve.sampling_params import SamplingParams
from serve.spec.verify import accepted_tokens

NUM_PAGES, PAGE_SIZE = 8, 4
PREFIXES = ([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 9], [5, 5], [])


def make_scheduler(prefix_caching: bool, page_size: int = PAGE_SIZE, max_num_seqs: int = 3,
                   budget: int = 64) -> tuple[PageAllocator, Scheduler]:
    allocator = PageAllocator(NUM_PAGES, page_size, max_num_seqs + 1, NUM_PAGES)
    cache = RadixCache(allocator) if prefix_caching else None
    allocator.evictor = cache
    return allocator, Scheduler(allocator, max_num_seqs, max_num_batched_tokens=budget,
                                cache=cache)


class SchedulerMachine(RuleBasedStateMachine):
    """With the cache off, pages are never shared and every page not held is free. `kv`
    records, for each slot, the tokens its K/V were computed from, so a request that reads a
    page holding other K/V (a wrong match, a page evicted while held) is caught."""

    PREFIX_CACHING = False
    PAGE_SIZE = PAGE_SIZE
    BUDGET = 64  # holds every prompt: no chunks

    def __init__(self) -> None:
        super().__init__()
        self.allocator, self.scheduler = make_scheduler(self.PREFIX_CACHING, self.PAGE_SIZE,
                                                        budget=self.BUDGET)
        self.arrival: list[str] = []  # request ids in the order they were added
        self.ended: list[str] = []  # every request that finished or was aborted, once each
        self.unfinished: dict[str, Request] = {}
        self.tokens_seen: dict[str, int] = {}  # output tokens each request has produced
        self.kv: dict[int, list[tuple[int, ...] | None]] = {}  # page -> each slot's tokens

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(1, 2), max_size=6),
          max_tokens=st.integers(1, 12))
    def add(self, prefix: list[int], tail: list[int], max_tokens: int) -> None:
        prompt = (prefix + tail)[:12] or [1]
        # the engine refuses, up front, what could never fit the pool alone
        if self.allocator.num_pages_for(len(prompt) + max_tokens - 1) > NUM_PAGES:
            return
        request_id = str(len(self.arrival))
        request = Request(request_id, prompt, SamplingParams(), max_tokens, 0)
        self.scheduler.add(request)
        self.arrival.append(request_id)
        self.unfinished[request_id] = request
        self.tokens_seen[request_id] = 0

    @rule()
    def step(self) -> None:
        idle = not self.scheduler.running and self.scheduler.waiting
        decoding = {r.request_id for r in self.scheduler.running
                    if r.num_tokens - r.num_computed_tokens == 1}
        out = self.scheduler.schedule()
        if idle:  # every request fits the pool alone: the head of the queue starts
            assert out.scheduled, "an idle scheduler admits nobody"
        assert len(self.scheduler.running) <= 3
        assert out.num_batched_tokens <= self.BUDGET
        for victim in out.preempted:
            assert victim.status is RequestStatus.PREEMPTED and not victim.page_table.pages
        # decodes first: every decoding request gets its token, unless it was preempted
        preempted = {r.request_id for r in out.preempted}
        scheduled = {item.request.request_id for item in out.scheduled}
        assert decoding - preempted <= scheduled
        for item in out.scheduled:
            request = item.request
            assert request.status is RequestStatus.RUNNING
            drafts, request.draft_token_ids = request.draft_token_ids, []
            assert len(drafts) == item.num_drafts
            end = request.num_computed_tokens + item.num_new_tokens
            # computing its new tokens: each must have a slot in its own pages
            assert len(request.page_table.pages) * self.PAGE_SIZE >= end
            assert 1 <= item.num_new_tokens - len(drafts) \
                <= request.num_tokens - request.num_computed_tokens
            self._check_reads(request)
            self._compute(request, end, drafts)
            completes = item.completes
            assert completes == (end - len(drafts) == request.num_tokens)
            request.num_computed_tokens = end
            if not completes:  # a prefill chunk that stops short: nothing is sampled
                assert request.num_computed_tokens < request.num_tokens
                continue
            self._sample(request, drafts)
        self.scheduler.cache_prefills(out)  # as the engine does after each step

    @staticmethod
    def next_token(num_tokens: int) -> int:
        """The token sampled after num_tokens tokens: alike for alike sequences, so outputs
        are shared too."""
        return 2 + num_tokens % 2

    def _sample(self, request: Request, drafts: list[int]) -> None:
        request.output_token_ids.append(self.next_token(request.num_tokens))
        self.tokens_seen[request.request_id] += 1
        if len(request.output_token_ids) >= request.max_tokens:
            self._end(request)

    def _compute(self, request: Request, end: int, drafts: list[int]) -> None:
        """Write the K/V of its tokens (drafts after them) from num_computed_tokens to end
        into its pages."""
        token_ids = request.token_ids_from(0) + drafts
        for position in range(request.num_computed_tokens, end):
            page = request.page_table.pages[position // self.PAGE_SIZE]
            assert not self.allocator.cached[page], "a cached page is written again"
            slots = self.kv.setdefault(page, [None] * self.PAGE_SIZE)
            slots[position % self.PAGE_SIZE] = tuple(token_ids[: position + 1])

    def _check_reads(self, request: Request) -> None:
        """The K/V it attends over (its computed tokens) are its own tokens' K/V."""
        token_ids = request.token_ids_from(0)
        for position in range(request.num_computed_tokens):
            page = request.page_table.pages[position // self.PAGE_SIZE]
            assert self.kv[page][position % self.PAGE_SIZE] == tuple(token_ids[: position + 1])

    @precondition(lambda self: self.unfinished)
    @rule(index=st.integers(0, 100))
    def abort(self, index: int) -> None:
        request = list(self.unfinished.values())[index % len(self.unfinished)]
        self._end(request)
        assert not request.page_table.pages  # an abort frees everything

    @precondition(lambda self: self.scheduler.running)
    @rule(index=st.integers(0, 100))
    def finish_early(self, index: int) -> None:
        """A stop string or EOS ends a running request before max_tokens."""
        running = self.scheduler.running
        self._end(running[index % len(running)])

    def _end(self, request: Request) -> None:
        assert request.request_id not in self.ended, "a request ended twice"
        request.status = RequestStatus.FINISHED
        self.scheduler.finish(request)
        self.ended.append(request.request_id)
        del self.unfinished[request.request_id]

    @invariant()
    def pages_are_conserved(self) -> None:
        """Each page is free, cached and held by nobody (evictable), or held; a page's count
        is the number of requests holding it."""
        tables = [r.page_table.pages for r in (*self.scheduler.running, *self.scheduler.waiting)]
        held = [page for pages in tables for page in pages]
        allocator = self.allocator
        assert all(held.count(p) == allocator.ref_counts[p] for p in range(NUM_PAGES))
        free = set(allocator.free_pages)
        assert not free & set(held), "a held page is also free"
        assert not any(allocator.cached[p] for p in free), "a cached page is also free"
        evictable = {p for p in range(NUM_PAGES)
                     if allocator.cached[p] and not allocator.ref_counts[p]}
        assert len(free) + len(evictable) + len(set(held)) == NUM_PAGES
        assert allocator.num_evictable_pages == len(evictable)
        assert allocator.num_used_pages == len(set(held))
        if not self.PREFIX_CACHING:
            assert len(held) == len(set(held)), "a page is held twice"
            assert len(held) + allocator.num_free_pages == NUM_PAGES
        for request in self.scheduler.waiting:
            assert not request.page_table.pages  # only running requests hold pages

    @invariant()
    def a_request_holds_whole_cached_nodes_and_their_ancestors(self) -> None:
        """What makes evictable pages really available: none hides under a held node."""
        if not self.PREFIX_CACHING:
            return
        refs = self.allocator.ref_counts
        stack = list(self.scheduler.cache.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            held = [refs[p] > 0 for p in node.pages]
            assert all(held) or not any(held), "a node is held in part"
            if any(held) and node.parent is not self.scheduler.cache.root:
                assert refs[node.parent.pages[0]] > 0, "a node is held without its parent"

    @invariant()
    def block_table_rows_mirror_page_tables(self) -> None:
        rows = []
        for request in self.scheduler.running:
            table = request.page_table
            if table.pages:
                rows.append(table.row)
                assert self.allocator.block_table[table.row, : len(table.pages)].tolist() \
                    == table.pages
        assert len(rows) == len(set(rows)), "two requests share a block table row"
        assert not set(rows) & set(self.allocator.free_rows)

    @invariant()
    def every_request_is_in_exactly_one_place(self) -> None:
        running = [r.request_id for r in self.scheduler.running]
        waiting = [r.request_id for r in self.scheduler.waiting]
        assert sorted(running + waiting + self.ended, key=int) == self.arrival

    @invariant()
    def the_queue_keeps_its_order(self) -> None:
        """Preempted requests wait at the front, oldest admitted first; behind them, requests
        that never ran wait in arrival order."""
        waiting = list(self.scheduler.waiting)
        fresh = [r.request_id for r in waiting if r.status is RequestStatus.WAITING]
        assert fresh == sorted(fresh, key=int)
        statuses = [r.status for r in waiting]
        assert statuses == sorted(statuses, key=lambda s: s is RequestStatus.WAITING)

    @invariant()
    def nothing_computed_is_lost(self) -> None:
        for request in self.unfinished.values():
            assert len(request.output_token_ids) == self.tokens_seen[request.request_id]
            assert request.num_computed_tokens <= request.num_tokens

    def teardown(self) -> None:
        for request in list(self.unfinished.values()):
            self._end(request)
        assert self.allocator.num_used_pages == 0
        if self.PREFIX_CACHING:
            self.scheduler.cache.evict(NUM_PAGES)
        assert self.allocator.num_free_pages == NUM_PAGES


class CachedSchedulerMachine(SchedulerMachine):
    """The same with the prefix cache on, and pages of 2 tokens, so prompts share pages."""

    PREFIX_CACHING = True
    PAGE_SIZE = 2


class ChunkedSchedulerMachine(CachedSchedulerMachine):
    """With the cache on, and 5 tokens a step: every prompt longer than what decodes leave of
    the budget is prefilled in chunks, cached chunk by chunk, and may be preempted half done."""

    BUDGET = 5


class SpeculativeSchedulerMachine(ChunkedSchedulerMachine):
    """Decoding requests get drafts, right or wrong, and check them as the engine does: each
    matching draft is accepted, the token at the first mismatch is kept, and the computed
    length moves back over the rejected drafts, whose K/V (written above) must never be read
    or cached. Preemptions and aborts happen between."""

    @rule(drafts=st.lists(st.lists(st.integers(2, 3), max_size=3), max_size=3))
    def propose(self, drafts: list[list[int]]) -> None:
        decoding = [r for r in self.scheduler.running
                    if r.num_tokens - r.num_computed_tokens == 1]
        for request, proposed in zip(decoding, drafts, strict=False):
            # never past max_tokens: the step yields one token more than its drafts
            request.draft_token_ids = proposed[: request.max_tokens
                                               - len(request.output_token_ids) - 1]

    def _sample(self, request: Request, drafts: list[int]) -> None:
        new = accepted_tokens(drafts, [self.next_token(request.num_tokens + i)
                                       for i in range(len(drafts) + 1)])
        request.num_computed_tokens -= len(drafts) - (len(new) - 1)
        for token in new:
            request.output_token_ids.append(token)
            self.tokens_seen[request.request_id] += 1
            if len(request.output_token_ids) >= request.max_tokens:
                request.num_computed_tokens = min(request.num_computed_tokens,
                                                  request.num_tokens)
                self._end(request)
                return
        assert request.num_tokens - request.num_computed_tokens == 1  # decoding again


@pytest.mark.parametrize("machine", [SchedulerMachine, CachedSchedulerMachine,
                                     ChunkedSchedulerMachine, SpeculativeSchedulerMachine],
                         ids=["no_cache", "prefix_cache", "chunked_prefill", "speculative"])
def test_scheduler_state_machine(machine):
    case = machine.TestCase
    case.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
    case().runTest()


def run_step(scheduler: Scheduler, out, token_id: int) -> None:
    """What the engine does with a schedule: compute, sample the requests whose tokens reach
    their end, finish those that reached max_tokens, cache the prefills."""
    for item in out.scheduled:
        request = item.request
        completes = item.completes
        request.num_computed_tokens += item.num_new_tokens
        if not completes:
            continue
        request.output_token_ids.append(token_id)
        if len(request.output_token_ids) == request.max_tokens:
            request.status = RequestStatus.FINISHED
            scheduler.finish(request)
    scheduler.cache_prefills(out)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no_cache", "prefix_cache"])
def test_it_preempts_and_every_request_still_finishes(prefix_caching):
    """Eight requests that each need up to 4 of the 8 pages: preemptions happen, none is lost."""
    allocator, scheduler = make_scheduler(prefix_caching, max_num_seqs=8)
    requests = [Request(str(i), [1] * 6, SamplingParams(), 10, 0) for i in range(8)]
    for request in requests:
        scheduler.add(request)
    steps = 0
    while scheduler.has_unfinished:
        steps += 1
        assert steps < 500, "the scheduler stopped making progress"
        run_step(scheduler, scheduler.schedule(), token_id=2)
    assert scheduler.num_preemptions > 0
    assert all(len(r.output_token_ids) == 10 for r in requests)
    assert allocator.num_used_pages == 0
    if prefix_caching:  # the first four, admitted together, computed the shared page; the
        # others found it (the last token, in the second page, is always computed)
        assert [r.num_cached_tokens for r in requests] == [0] * 4 + [4] * 4
    assert allocator.num_free_pages + allocator.num_evictable_pages == NUM_PAGES


def test_a_preempted_request_finds_what_it_computed_when_it_comes_back():
    """In 7 pages of 4 tokens: b (11 prompt tokens) is preempted when it needs a 4th page. It
    caches its 3 full pages on the way out (the 3rd filled by decoding, after its prefill was
    cached), so when a has finished, b recomputes only its last token."""
    allocator = PageAllocator(7, PAGE_SIZE)
    cache = RadixCache(allocator)
    allocator.evictor = cache
    scheduler = Scheduler(allocator, max_num_seqs=2, max_num_batched_tokens=64, cache=cache)
    a = Request("a", [1] * 12, SamplingParams(), 3, 0)
    b = Request("b", [2] * 11, SamplingParams(), 10, 0)
    scheduler.add(a)
    scheduler.add(b)
    readmitted = []
    while scheduler.has_unfinished:
        out = scheduler.schedule()
        readmitted += [item.num_new_tokens for item in out.scheduled
                       if item.is_prefill and item.request.num_preemptions]
        run_step(scheduler, out, token_id=3)
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert readmitted == [1]  # 13 tokens, 12 of them cached
