"""Stage 1's scheduler: a FIFO of waiting requests, taken a whole batch at a time."""

import time
from collections import deque

from serve.engine.request import Request


# --8<-- [start:scheduler]
class Scheduler:
    """Decides which waiting requests form the next batch, and when.

    A new batch starts only when the previous one has finished. It takes up to max_batch_size
    waiting requests; with batch_wait_ms > 0 it first waits that long after the oldest request
    arrived, so that requests arriving close together share a batch.
    """

    def __init__(self, max_batch_size: int, batch_wait_ms: float) -> None:
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1e3
        self.waiting: deque[Request] = deque()

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

    def next_batch(self) -> list[Request]:
        """Pop the requests of the next batch, oldest first."""
        count = min(self.max_batch_size, len(self.waiting))
        return [self.waiting.popleft() for _ in range(count)]
# --8<-- [end:scheduler]
