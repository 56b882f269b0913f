"""Iteration-level scheduling (Orca) under a per-step token budget, decodes first.

Every step decides afresh which requests run and how many tokens each computes (see schedule).
A prompt longer than what is left of the budget is cut: its first chunk runs now and the rest in
later steps (chunked prefill), so a long prompt never stalls the running requests for more than
one step's worth of tokens, and the budget need not hold the longest prompt.

With a prefix cache, an admitted request starts from the longest prefix of its tokens that
earlier requests computed, and computes only the rest; the pages it fills go into the cache after
each of its prefill chunks, when it finishes and when it is preempted.

When a request needs a page and none is free, cached pages that no request holds are evicted; if
that is not enough, the most recently admitted request is preempted: it gives all its pages back
and waits at the front of the queue, to recompute its prompt and its output so far when pages free
up (vLLM's preemption by recompute; the cache often still has most of them).
"""

from collections import deque
from dataclasses import dataclass, field

from serve.core.kv.page_allocator import PageAllocator
from serve.core.kv.radix_cache import RadixCache
from serve.core.request import Request, RequestStatus

WATERMARK = 0.01  # share of the pool kept free at admission, so running requests can grow


@dataclass(slots=True)  # one per request per step: slots make it quicker to build
class ScheduledRequest:
    """One request's part of a step: it computes its next num_new_tokens tokens."""

    request: Request
    num_new_tokens: int
    # its tokens reach the end of the sequence: the step samples its next token (a prefill
    # chunk that stops short of the end samples nothing)
    completes: bool = True
    is_prefill: bool = False  # computes prompt tokens (or recomputes after a preemption)
    admitted: bool = False  # joined the running batch this step (after a prefix-cache lookup)
    # drafts it checks (speculative decoding): its last num_drafts new tokens, each sampled too
    num_drafts: int = 0


@dataclass
class SchedulerOutput:
    """The requests of one step (running ones first, then newly admitted), and who was
    preempted to make room."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting queue and the running batch; hands out pages to both. `cache` is None
    when prefix caching is off."""

    def __init__(self, allocator: PageAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 cache: RadixCache | None = None) -> None:
        self.allocator = allocator
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_pages = int(WATERMARK * allocator.num_pages)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0  # since the engine started

    # --8<-- [start:schedule]
    def schedule(self) -> SchedulerOutput:
        """This step's requests and their tokens: first every decoding request's one token, then
        prefills in progress, then waiting requests, oldest first, while the token budget,
        max_num_seqs and pages allow. A prompt that does not fit the budget's rest is cut."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        queue, prefilling = deque(), []  # running requests not yet given their tokens
        for request in self.running:  # (one pass: this runs for every request every step)
            num_output = len(request.output_token_ids)
            if len(request.prompt_token_ids) + num_output - request.num_computed_tokens == 1:
                if num_output < request.max_tokens:  # else: its last token is still being
                    queue.append(request)  # sampled (overlap scheduling)
            else:
                prefilling.append(request)
        decodes_left = len(queue)  # (of them, not yet given their token)
        queue.extend(prefilling)  # decodes first
        while queue and budget > 0:
            request = queue.popleft()
            remaining = request.num_tokens - request.num_computed_tokens
            # a decoding request with drafts (speculative decoding) checks them in this step:
            # its last token and its drafts, each of whose K/V gets a slot now; drafts take
            # only what the budget keeps after every other decode's one token
            drafts = request.draft_token_ids
            if drafts:
                num_new = remaining + min(len(drafts), max(0, budget - decodes_left))
            else:
                num_new = min(remaining, budget)
            decodes_left -= decodes_left > 0
            # Its new tokens' K/V may need fresh pages; grow_to evicts cached pages nobody
            # holds before it gives up, and then someone is preempted: prefills in progress
            # first (they have produced nothing yet), else the most recently admitted.
            while not request.page_table.grow_to(request.num_computed_tokens + num_new):
                victim = queue.pop() if queue else request
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                num_drafts = 0
                if drafts:  # (the usual row has none: no work for them on this path)
                    num_drafts = max(0, num_new - remaining)
                    del drafts[num_drafts:]  # those past the budget are dropped
                out.scheduled.append(ScheduledRequest(request, num_new, num_new >= remaining,
                                                      remaining > 1, False, num_drafts))
                budget -= num_new
        if out.preempted:
            return out  # pages are short: admitting now would only preempt again
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting[0]
            num_new = self._admit(request, budget)
            if num_new is None:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            completes = request.num_computed_tokens + num_new == request.num_tokens
            out.scheduled.append(ScheduledRequest(request, num_new, completes, is_prefill=True,
                                                  admitted=True))
            budget -= num_new
        return out
    # --8<-- [end:schedule]

    # --8<-- [start:admit]
    def _admit(self, request: Request, budget: int) -> int | None:
        """Give a waiting request its cached prefix and the pages of its first chunk. Returns
        how many tokens it computes now (at most budget: the rest of its prompt, plus any
        output a preemption discarded, comes in later steps); None, holding nothing, if its
        first chunk's pages do not fit."""
        table = request.page_table
        num_cached = 0
        if self.cache is not None and not request.wants_prompt_logprobs:
            # The last token is always computed: its logits give the next token.
            num_cached, pages = self.cache.match(
                request.token_ids_between(0, request.num_tokens - 1), request.cache_salt)
            table.adopt(pages)  # first: pages it matched are no longer evictable
        num_new = min(request.num_tokens - num_cached, budget)
        if not self._fits(num_cached + num_new, request):
            table.release()  # what it matched is evictable again
            return None
        table.grow_to(num_cached + num_new)
        request.num_computed_tokens = num_cached
        if request.status is RequestStatus.WAITING:  # its first admission
            request.num_cached_tokens = num_cached
        return num_new

    def _fits(self, num_tokens: int, request: Request) -> bool:
        """The pages for its first num_tokens tokens are free or evictable, and a watermark stays
        available for the running requests to grow into (an idle engine admits without it, so
        a request that fits the pool runs)."""
        needed = request.page_table.num_missing_pages(num_tokens)
        reserve = self.watermark_pages if self.running else 0
        return needed + reserve <= self.allocator.num_available_pages
    # --8<-- [end:admit]

    def cache_prefills(self, out: SchedulerOutput) -> None:
        """Called after a step has run: the pages this step's prefill chunks filled go into the
        cache, so the requests behind them find the prefix at once. Decodes are not cached every
        step, to keep the host's work per step O(batch): a request's later pages go in when it
        finishes or is preempted."""
        for item in out.scheduled:
            if item.is_prefill and item.request.status is RequestStatus.RUNNING:
                self._cache(item.request)

    def _cache(self, request: Request) -> None:
        """Insert the request's full computed pages into the cache and hold the cache's pages
        in their place; its copies of pages the cache had already are free again at once."""
        num_full = request.num_computed_tokens // self.allocator.page_size
        if self.cache is None or num_full == 0:
            return
        table = request.page_table
        token_ids = request.token_ids_between(0, num_full * self.allocator.page_size)
        table.swap_prefix(self.cache.insert(token_ids, table.pages[:num_full],
                                            request.cache_salt))

    def _preempt(self, request: Request) -> None:
        self._cache(request)  # its recompute will likely find these pages still cached
        request.page_table.release()  # and its slot: its last token is the host's to send
        request.token_in_slot = False
        request.draft_token_ids.clear()
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)

    def add(self, request: Request) -> None:
        request.page_table = self.allocator.new_table()
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """A finished (or aborted) request leaves the batch; what it computed stays in the
        cache, and the rest of its pages are free at once."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._cache(request)
        request.page_table.release()

    def find(self, request_id: str) -> Request | None:
        """The unfinished request with this id, waiting or running."""
        return next((r for r in (*self.running, *self.waiting) if r.request_id == request_id), None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)
