"""Iteration-level scheduling (Orca): every step decides afresh which requests run.

Requests join the running batch as soon as pages and the step's token budget allow, and leave
it the step they finish. When decoding needs a page and none is free, the most recently admitted
request is preempted: it gives all its pages back and waits at the front of the queue, to
recompute its prompt and its output so far when pages free up (vLLM's preemption by recompute).
"""

from collections import deque
from dataclasses import dataclass, field

from serve.engine.kv.page_allocator import PageAllocator
from serve.engine.request import Request, RequestStatus

WATERMARK = 0.01  # share of the pool kept free at admission, so running requests can grow


@dataclass
class ScheduledRequest:
    """One request's part of a step: it computes its next num_new_tokens tokens."""

    request: Request
    num_new_tokens: int


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
    """Owns the waiting queue and the running batch; hands out pages to both."""

    def __init__(
        self, allocator: PageAllocator, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_pages = int(WATERMARK * allocator.num_pages)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0  # since the engine started

    # --8<-- [start:schedule]
    def schedule(self) -> SchedulerOutput:
        """This step's requests: every running request decodes one token, then waiting requests
        are admitted, oldest first, while the token budget, max_num_seqs and free pages allow."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        queue = deque(self.running)  # running requests not yet given a slot this step
        while queue and budget > 0:
            request = queue.popleft()
            # The token sampled last step is computed now; its K/V may need a fresh page.
            while not request.page_table.grow_to(request.num_tokens):
                victim = queue.pop() if queue else request  # the most recently admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                num_new = request.num_tokens - request.num_computed_tokens
                out.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
        if out.preempted:
            return out  # pages are short: admitting now would only preempt again
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_new = request.num_tokens  # the prompt, plus any output a preemption discarded
            if num_new > budget or not self._can_admit(request):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.page_table.grow_to(request.num_tokens)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return out
    # --8<-- [end:schedule]

    def _can_admit(self, request: Request) -> bool:
        """Its prompt's pages are free, and a watermark stays free for the running requests to
        grow into (an idle engine admits without it, so a request that fits the pool runs)."""
        needed = request.page_table.num_missing_pages(request.num_tokens)
        reserve = self.watermark_pages if self.running else 0
        return needed + reserve <= self.allocator.num_free_pages

    def _preempt(self, request: Request) -> None:
        request.page_table.release()
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
        """A finished request leaves the batch and gives its pages back at once."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.page_table.release()

    def find(self, request_id: str) -> Request | None:
        """The unfinished request with this id, waiting or running."""
        for request in (*self.running, *self.waiting):
            if request.request_id == request_id:
                return request
        return None

    def waiting_never_started(self) -> list[Request]:
        """Queued requests that have not produced a token (a preempted one has)."""
        return [r for r in self.waiting if not r.started]

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)
