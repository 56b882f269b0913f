"""Draft-model drafts: a small model with the target's tokenizer guesses the next k tokens,
greedily, one forward pass per token, for every speculating request at once.

The draft keeps its own KV cache: its own pool, pages and page tables (no prefix cache), and
per request how many of the request's tokens its cache holds. A proposal first feeds the draft
what it has not seen (the whole prompt the first time, afterwards the one to k + 1 tokens the
last step kept), which gives the first draft; then each draft is fed back for the next. The K/V
of a draft the target rejected is stale: the next proposal starts over from the first position
whose fed token differs from the request's real one, and overwrites it.

On a GPU the draft replays CUDA graphs as the target does: a pass that feeds each request one
token replays a decode graph, and a catch-up of up to k + 1 tokens a request a verify-shaped
graph (only a prompt, the first time, runs eagerly), for as many requests as still speculate.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch

from serve.config import EngineConfig
from serve.core.kv.kv_pool import KVPool
from serve.core.kv.page_allocator import PageAllocator, PageTable
from serve.core.model_runner import MAX_VERIFY_GRAPH_ROWS, ModelRunner
from serve.core.request import Request
from serve.core.step_inputs import gather_step_inputs
from serve.models.loader import load_config, resolve_model_path
from serve.models.shapes import ModelShapes
from serve.spec.config import SpeculativeConfig

# At most this share of the GPU's free memory (before the target loads) for the draft's KV pool
DRAFT_MEMORY_SHARE = 0.1


@dataclass
class DraftState:
    """What the draft's cache holds for one request."""

    table: PageTable
    num_computed: int = 0  # the request's first num_computed tokens have K/V in the draft pool
    fed: list[int] | None = None  # the drafts fed back last time (positions from fed_start)
    fed_start: int = 0


class DraftModelProposer:
    def __init__(self, config: SpeculativeConfig, engine: EngineConfig, max_model_len: int,
                 target_vocab_size: int) -> None:
        path = resolve_model_path(config.model)
        hf_config = load_config(path)
        if hf_config.vocab_size != target_vocab_size:
            raise ValueError(f"the draft model {config.model} has a vocabulary of "
                             f"{hf_config.vocab_size} tokens and the target {target_vocab_size}: "
                             "a draft must share the target's tokenizer")
        pages_per_seq = -(-max_model_len // engine.page_size)
        # graphs for the batches that speculate (its own runner's speculative shapes: k + 1)
        speculating = min(engine.max_num_seqs,
                          config.disable_by_batch_size or MAX_VERIFY_GRAPH_ROWS)
        draft = replace(engine, model=config.model, max_num_seqs=speculating,
                        tensor_parallel_size=1, num_pages=self._pool_pages(
                            engine, hf_config, pages_per_seq))
        self.runner = ModelRunner(draft, hf_config, path, max_model_len)
        self.page_size = engine.page_size
        self.max_step_tokens = engine.max_num_batched_tokens
        self.allocator = PageAllocator(self.runner.kv_pool.num_pages, self.page_size,
                                       engine.max_num_seqs + 1, pages_per_seq)

    @staticmethod
    def _pool_pages(engine: EngineConfig, hf_config, pages_per_seq: int) -> int:
        """Pages for every running request's whole context, or what DRAFT_MEMORY_SHARE of
        the free memory holds if that is less (then requests whose context does not fit go
        without drafts); at least one full-length sequence."""
        shapes = ModelShapes.of(hf_config)
        per_page = KVPool.bytes_per_page(shapes.num_layers, engine.page_size, shapes.num_kv_heads,
                                         shapes.head_dim, engine.torch_dtype())
        wanted = engine.max_num_seqs * pages_per_seq
        if engine.torch_device().type != "cuda":
            return wanted
        free, _ = torch.cuda.mem_get_info()
        return max(pages_per_seq, min(wanted, int(DRAFT_MEMORY_SHARE * free) // per_page))

    # --8<-- [start:propose]
    def propose(self, requests: list[Request], max_drafts: list[int]) -> list[list[int]]:
        """Up to max_drafts[i] greedy draft tokens for requests[i], all requests together: one
        pass to catch up on their new tokens, then one pass per further draft."""
        states, feeds, wanted = [], [], []
        for request, limit in zip(requests, max_drafts, strict=True):
            state = self._state(request)
            # pages for what it catches up on and for the drafts fed back (all but the last)
            if not state.table.grow_to(request.num_tokens + limit - 1):
                self.release(request)  # the draft pool is full: this request goes without
                continue
            states.append(state)
            feeds.append(request.token_ids_between(state.num_computed, request.num_tokens))
            wanted.append(limit)
        drafts = [[token] for token in self._feed(states, feeds)]
        for step in range(1, max(wanted, default=0)):
            active = [i for i, limit in enumerate(wanted) if limit > step]
            next_tokens = self._feed([states[i] for i in active],
                                     [[drafts[i][-1]] for i in active])
            for i, token in zip(active, next_tokens, strict=True):
                drafts[i].append(token)
        for state, row in zip(states, drafts, strict=True):
            state.fed, state.fed_start = row[:-1], state.num_computed - len(row) + 1
        by_request = dict(zip((id(s) for s in states), drafts, strict=True))
        return [by_request.get(id(request.draft_state), []) for request in requests]
    # --8<-- [end:propose]

    def _state(self, request: Request) -> DraftState:
        """The request's draft state, moved back to the first position whose K/V came from a
        draft that turned out wrong."""
        state = request.draft_state
        if state is None:
            state = request.draft_state = DraftState(self.allocator.new_table())
        elif state.fed:
            real = request.token_ids_between(state.fed_start, state.fed_start + len(state.fed))
            matched = 0
            while matched < len(real) and real[matched] == state.fed[matched]:
                matched += 1
            state.num_computed = min(state.num_computed, state.fed_start + matched)
            state.fed = None
        return state

    def _feed(self, states: list[DraftState], feeds: list[list[int]]) -> list[int]:
        """Run the draft over each state's tokens (which start at its num_computed), in steps of
        at most max_step_tokens tokens; the greedy next token after each state's last one."""
        next_tokens = [0] * len(states)
        remaining = dict(enumerate(feeds))  # (each feed has a token at least: see _state)
        while remaining:
            batch, budget = [], self.max_step_tokens
            for i, tokens in remaining.items():
                if budget == 0:
                    break
                batch.append((i, tokens[:budget]))
                budget -= len(batch[-1][1])
            last = self._forward([(states[i], chunk) for i, chunk in batch])
            for (i, chunk), token in zip(batch, last, strict=True):
                states[i].num_computed += len(chunk)
                remaining[i] = remaining[i][len(chunk) :]
                if not remaining[i]:
                    del remaining[i]
                    next_tokens[i] = token
        return next_tokens

    def _forward(self, batch: list[tuple[DraftState, list[int]]]) -> list[int]:
        """One forward pass of the draft; the argmax after each sequence's last token."""
        query_lens = np.array([len(tokens) for _, tokens in batch], dtype=np.int64)
        computed = np.array([state.num_computed for state, _ in batch], dtype=np.int64)
        rows = np.array([state.table.row for state, _ in batch], dtype=np.int64)
        token_ids = np.fromiter((t for _, tokens in batch for t in tokens), dtype=np.int64)
        inputs = gather_step_inputs(token_ids, query_lens, computed, self.allocator.block_table,
                                    rows, self.page_size)
        return self.runner.forward(inputs).argmax(dim=-1).tolist()

    def release(self, request: Request) -> None:
        """Give back the request's draft pages (it finished, or the pool ran out)."""
        state = request.draft_state
        if isinstance(state, DraftState):
            state.table.release()
        request.draft_state = None
