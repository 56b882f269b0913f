"""The scheduler under every interleaving of add, step, abort and finish, on a pool so small
that it preempts all the time: a hypothesis state machine checks its invariants after each."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from serve.engine.kv.page_allocator import PageAllocator
from serve.engine.request import Request, RequestStatus
from serve.engine.scheduler import Scheduler
from serve.sampling_params import SamplingParams

NUM_PAGES, PAGE_SIZE = 8, 4


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.allocator = PageAllocator(NUM_PAGES, PAGE_SIZE)
        self.scheduler = Scheduler(self.allocator, max_num_seqs=3, max_num_batched_tokens=64)
        self.arrival: list[str] = []  # request ids in the order they were added
        self.ended: list[str] = []  # every request that finished or was aborted, once each
        self.unfinished: dict[str, Request] = {}
        self.tokens_seen: dict[str, int] = {}  # output tokens each request has produced

    @rule(prompt_len=st.integers(1, 12), max_tokens=st.integers(1, 12))
    def add(self, prompt_len: int, max_tokens: int) -> None:
        # the engine refuses, up front, what could never fit the pool alone
        if self.allocator.num_pages_for(prompt_len + max_tokens - 1) > NUM_PAGES:
            return
        request_id = str(len(self.arrival))
        request = Request(request_id, [1] * prompt_len, SamplingParams(), max_tokens, 0)
        self.scheduler.add(request)
        self.arrival.append(request_id)
        self.unfinished[request_id] = request
        self.tokens_seen[request_id] = 0

    @rule()
    def step(self) -> None:
        out = self.scheduler.schedule()
        assert len(self.scheduler.running) <= 3
        assert out.num_batched_tokens <= 64
        for victim in out.preempted:
            assert victim.status is RequestStatus.PREEMPTED and not victim.page_table.pages
        for item in out.scheduled:
            request = item.request
            assert request.status is RequestStatus.RUNNING
            # computing its new tokens: each must have a slot in its own pages
            assert len(request.page_table.pages) * PAGE_SIZE >= request.num_tokens
            assert item.num_new_tokens == request.num_tokens - request.num_computed_tokens
            request.num_computed_tokens += item.num_new_tokens
            request.output_token_ids.append(2)  # the sampled token
            self.tokens_seen[request.request_id] += 1
            if len(request.output_token_ids) >= request.max_tokens:
                self._end(request)

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
    def pages_are_conserved_and_never_shared(self) -> None:
        tables = [r.page_table.pages for r in (*self.scheduler.running, *self.scheduler.waiting)]
        held = [page for pages in tables for page in pages]
        assert len(held) == len(set(held)), "a page is held twice"
        assert not set(held) & set(self.allocator.free_pages), "a held page is also free"
        assert len(held) + self.allocator.num_free_pages == NUM_PAGES
        for request in self.scheduler.waiting:
            assert not request.page_table.pages  # only running requests hold pages

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
        assert self.allocator.num_free_pages == NUM_PAGES


def test_scheduler_state_machine():
    machine = SchedulerMachine.TestCase
    machine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
    machine().runTest()


def test_it_preempts_and_every_request_still_finishes():
    """Eight requests that each need up to 4 of the 8 pages: preemptions happen, none is lost."""
    allocator = PageAllocator(NUM_PAGES, PAGE_SIZE)
    scheduler = Scheduler(allocator, max_num_seqs=8, max_num_batched_tokens=64)
    requests = [Request(str(i), [1] * 6, SamplingParams(), 10, 0) for i in range(8)]
    for request in requests:
        scheduler.add(request)
    steps = 0
    while scheduler.has_unfinished:
        steps += 1
        assert steps < 500, "the scheduler stopped making progress"
        for item in scheduler.schedule().scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            request.output_token_ids.append(2)
            if len(request.output_token_ids) == request.max_tokens:
                request.status = RequestStatus.FINISHED
                scheduler.finish(request)
    assert scheduler.num_preemptions > 0
    assert all(len(r.output_token_ids) == 10 for r in requests)
    assert allocator.num_free_pages == NUM_PAGES
