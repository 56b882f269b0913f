"""The engine core's side of structured output: grammars compiled off the step loop, one
matcher per request that follows its tokens, and each step's bitmask of allowed tokens.

Compiling a grammar against a vocabulary takes from a millisecond to seconds (a schema with a
large enum or deep nesting). It runs on a thread pool; the request waits beside the scheduler,
not in its queue, until its grammar is ready, so it never holds up anyone else. xgrammar's
compiler keeps compiled grammars in a cache of bounded size, so a schema that every request
sends is compiled once.
"""

import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoTokenizer

from serve.core.request import Request
from serve.structured.grammar import TokenBitmask, build_grammar, xgrammar

logger = logging.getLogger(__name__)

COMPILE_THREADS = 2
COMPILE_TIMEOUT_S = 30.0  # a grammar not compiled by then fails its request
# A step's masks are filled on FILL_THREADS threads from PARALLEL_FILL_ROWS rows on; below that
# starting the threads costs more than they save (~1 us a row on one thread, ~80 us to start).
FILL_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
PARALLEL_FILL_ROWS = 128
CACHE_BYTES = 256 << 20  # compiled grammars kept for requests that send the same constraint


@dataclass
class GrammarState:
    """One request's grammar: being compiled (future), then followed token by token (matcher)."""

    future: concurrent.futures.Future
    started: float = field(default_factory=time.monotonic)
    matcher: object | None = None  # an xgrammar GrammarMatcher, once compiled


class GrammarManager:
    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: set[int]) -> None:
        """The compiler for the vocabulary of the tokenizer in tokenizer_path (the core loads it
        only here, for its first structured request)."""
        xgr = xgrammar()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS,
                                            cache_limit_bytes=CACHE_BYTES)
        self.pool = concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS,
                                                          thread_name_prefix="grammar")
        self.num_words = -(-vocab_size // 32)
        self._bits = np.empty((0, self.num_words), dtype=np.int32)
        self.one_thread = xgr.BatchGrammarMatcher(max_threads=1)
        self.threads = xgr.BatchGrammarMatcher(max_threads=FILL_THREADS)

    def start(self, request: Request) -> None:
        params = request.params.structured_outputs
        request.grammar = GrammarState(self.pool.submit(
            lambda: self.compiler.compile_grammar(build_grammar(params))))

    @staticmethod
    def wait(requests: list[Request], timeout_s: float = 0.01) -> None:
        """Block until one of the requests' grammars is compiled, or timeout_s (an engine with
        nothing else to do would otherwise spin, taking a core from the compiler)."""
        concurrent.futures.wait([r.grammar.future for r in requests], timeout=timeout_s,
                                return_when=concurrent.futures.FIRST_COMPLETED)

    def ready(self, request: Request) -> str | None:
        """Whether the request's grammar is compiled (its matcher is made here): None while it
        is not; "" when it is; the reason when it failed."""
        state = request.grammar
        if not state.future.done():
            if time.monotonic() - state.started > COMPILE_TIMEOUT_S:
                return f"its grammar did not compile in {COMPILE_TIMEOUT_S:g} s"
            return None
        try:
            compiled = state.future.result()
        except Exception as error:  # (the server side parsed it: this should not happen)
            return f"its grammar failed to compile: {error}"
        state.matcher = xgrammar().GrammarMatcher(compiled)
        return ""

    # --8<-- [start:fill]
    def fill(self, rows: list[tuple[int, Request, list[int]]]) -> TokenBitmask:
        """The bitmask of each constrained sampled row: (row, request, tokens before it) means
        the row samples the token after the request's matcher state and then `tokens` (the
        drafts before that position in a verify row, [] otherwise). Rows without drafts are
        filled together by xgrammar in C++ (on several threads when there are many); a verify row's
        positions, one matcher in several states, one by one (drafts accepted, then rolled
        back)."""
        if len(self._bits) < len(rows):
            self._bits = np.empty((2 * len(rows), self.num_words), dtype=np.int32)
        bits = self._bits[: len(rows)]
        view = torch.from_numpy(bits)  # (xgrammar fills a torch int32 tensor in place)
        matchers, indices = [], []
        for i, (_, request, drafts) in enumerate(rows):
            matcher = request.grammar.matcher
            if matcher.is_terminated() and not drafts:
                view[i] = -1  # it has ended: the row's token is dropped, any will do
            elif not drafts:
                matchers.append(matcher)
                indices.append(i)
            else:
                for token in drafts:
                    matcher.accept_token(token)
                if matcher.is_terminated():
                    view[i] = -1
                else:
                    matcher.fill_next_token_bitmask(view, i)
                matcher.rollback(len(drafts))
        if matchers:
            batch = self.threads if len(matchers) >= PARALLEL_FILL_ROWS else self.one_thread
            batch.batch_fill_next_token_bitmask(matchers, view, indices)
        return TokenBitmask(np.array([row for row, _, _ in rows], dtype=np.int64), bits.copy())
    # --8<-- [end:fill]

    @staticmethod
    def accept(request: Request, token_id: int) -> bool:
        """Advance the request's matcher by a sampled token; False if the grammar refuses it
        (the mask allowed it, so that would be a bug)."""
        return request.grammar.matcher.accept_token(token_id)

    @staticmethod
    def valid_prefix(request: Request, drafts: list[int]) -> list[int]:
        """The longest prefix of drafts the grammar accepts from the request's state."""
        matcher, num_valid = request.grammar.matcher, 0
        for token in drafts:
            if matcher.is_terminated() or not matcher.accept_token(token):
                break
            num_valid += 1
        if num_valid:
            matcher.rollback(num_valid)
        return drafts[:num_valid]

    @staticmethod
    def terminated(request: Request) -> bool:
        """The grammar has ended: it accepted a stop token after a complete match."""
        return request.grammar.matcher.is_terminated()
