"""Stage 2's scheduler: a FIFO of waiting requests, admitted a whole batch at a time by pages."""

import time
from collections import deque

from serve.engine.page_allocator import PageAllocator, PageTable
from serve.engine.request import Request


# --8<-- [start:scheduler]
class Scheduler:
    """Decides which waiting requests form the next batch, and when.

    A new batch starts when the previous one has finished. It admits waiting requests oldest
    first for as long as the pool can promise each one pages for its prompt plus its max_tokens,
    and the prompts fit in one prefill (max_num_batched_tokens). max_batch_size is only an upper
    bound; memory decides. With batch_wait_ms > 0 it first waits that long after the oldest
    request arrived, so that requests arriving close together share a batch.
    """

    def __init__(
        self,
        allocator: PageAllocator,
        max_model_len: int,
        max_batch_size: int,
        max_num_batched_tokens: int,
        batch_wait_ms: float,
    ) -> None:
        self.allocator = allocator
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.batch_wait_s = batch_wait_ms / 1e3
        self.waiting: deque[Request] = deque()

    def max_tokens_of(self, request: Request) -> int:
        """The most tokens the request can ever hold in the KV cache."""
        max_new = request.params.max_tokens or self.max_model_len
        return min(request.num_prompt_tokens + max_new, self.max_model_len)

    def next_batch(self) -> tuple[list[Request], list[PageTable]]:
        """Pop the requests of the next batch, oldest first, each with its page table."""
        requests, tables, prompt_tokens = [], [], 0
        while self.waiting and len(requests) < self.max_batch_size:
            request = self.waiting[0]
            prompt_tokens += request.num_prompt_tokens
            if requests and prompt_tokens > self.max_num_batched_tokens:
                break
            table = self.allocator.reserve(self.max_tokens_of(request))
            if table is None:
                break  # out of pages: this batch admits fewer requests
            requests.append(self.waiting.popleft())
            tables.append(table)
        return requests, tables
    # --8<-- [end:scheduler]

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request_id: str) -> Request | None:
        """Take a waiting request out of the queue (an abort); None if it is not waiting."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return request
        return None

    def seconds_until_ready(self) -> float:
        """How long to wait before the next batch should start (0: now)."""
        if len(self.waiting) >= self.max_batch_size or not self.waiting:
            return 0.0
        waited = time.monotonic() - self.waiting[0].arrival_time
        return max(0.0, self.batch_wait_s - waited)
