"""Prompt lookup (n-gram) drafts: text often repeats itself, so what followed an earlier copy of
the last few tokens is a good guess of what comes next (code, quotes, lists, edits of a given
text). No model runs: a lookup in a table per request.

The table maps every n-gram of the request's tokens (n from prompt_lookup_min to
prompt_lookup_max) to where its first occurrence ends. It is filled as tokens arrive, a few
entries per token, so a proposal costs the same at any context length: vLLM scans the whole
context each step instead (a KMP search, compiled with numba).
"""

from serve.core.request import Request
from serve.spec.config import SpeculativeConfig


class NgramIndex:
    """One request's n-grams: each one's first occurrence, by the position just after it."""

    def __init__(self) -> None:
        self.num_indexed = 0  # tokens of the request entered so far
        self.first_end: dict[tuple[int, ...], int] = {}


# --8<-- [start:propose]
class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, requests: list[Request], max_drafts: list[int]) -> list[list[int]]:
        return [self.propose_one(request, limit)
                for request, limit in zip(requests, max_drafts, strict=True)]

    def propose_one(self, request: Request, max_drafts: int) -> list[int]:
        """Up to max_drafts tokens: what followed the first earlier occurrence of the request's
        last n tokens, for the largest n that has one; [] if none does."""
        index = request.draft_state
        if index is None:
            index = request.draft_state = NgramIndex()
        self._extend(index, request)
        num_tokens = request.num_tokens
        tail = request.token_ids_between(max(0, num_tokens - self.max_n), num_tokens)
        for n in range(min(self.max_n, len(tail)), self.min_n - 1, -1):
            end = index.first_end.get(tuple(tail[len(tail) - n :]))
            if end is not None and end < num_tokens:  # (not the tail itself)
                return request.token_ids_between(end, min(end + max_drafts, num_tokens))
        return []
    # --8<-- [end:propose]

    def _extend(self, index: NgramIndex, request: Request) -> None:
        """Enter the n-grams that end at each token the index has not seen (the whole prompt
        at first, then the few tokens each step accepted)."""
        start, end = index.num_indexed, request.num_tokens
        window = request.token_ids_between(max(0, start - self.max_n + 1), end)
        offset = end - len(window)  # position of window[0]
        first_end = index.first_end
        for stop in range(start + 1, end + 1):  # n-grams ending just before position `stop`
            for n in range(self.min_n, min(self.max_n, stop) + 1):
                first_end.setdefault(tuple(window[stop - n - offset : stop - offset]), stop)
        index.num_indexed = end

    @staticmethod
    def release(request: Request) -> None:
        """Drop the request's index (it finished)."""
        request.draft_state = None
