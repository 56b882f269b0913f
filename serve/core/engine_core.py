"""The engine core: continuous batching over a paged KV cache, with prefix caching and chunked
prefill, in token ids only. `step()` schedules, runs one forward pass, samples, ends requests at
a token (EOS, a stop token, max_tokens) and reports each request's new tokens as a CoreOutput.
Text (detokenizing, stop strings) is the server side's: a request that meets a stop string there
is ended here with `abort_request(..., reason="stop")`.
"""

import logging
import time
from dataclasses import dataclass

from serve.config import EngineConfig
from serve.core.batch import PersistentBatch
from serve.core.kv.page_allocator import PageAllocator
from serve.core.kv.radix_cache import RadixCache
from serve.core.logprobs import LogprobsLists
from serve.core.model_runner import LaunchedStep, ModelRunner, StepLogits
from serve.core.parallel_runner import ParallelRunner
from serve.core.prepared_step import NO_DRAFTS, PreparedStep, prepare_step
from serve.core.request import Request, RequestStatus
from serve.core.scheduler import Scheduler, SchedulerOutput
from serve.core.stats import StatsCollector
from serve.messages import CoreOutput, CoreRequest, EngineStats, LogprobsColumns
from serve.models.loader import load_config, resolve_model_path
from serve.spec.draft_model import DraftModelProposer
from serve.spec.ngram import NgramProposer
from serve.spec.verify import accepted_tokens
from serve.structured.manager import GrammarManager

logger = logging.getLogger(__name__)

FINISHED = RequestStatus.FINISHED


@dataclass
class InFlight:
    """A launched step: which request each sampled row belongs to, and where its token goes."""

    launched: LaunchedStep
    rows: list[tuple[Request, int]]  # (request, index in its output_token_ids)
    drafts: list[list[int]] | None = None  # per row, the drafts it checks; None: no row does
    prompt_rows: list[tuple[Request, int]] | None = None  # (PreparedStep.prompt_rows)


@dataclass
class Forward:
    """A step whose forward pass is launched and whose sampling is not yet."""

    logits: StepLogits
    schedule: SchedulerOutput
    step: PreparedStep


class EngineCore:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int]) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.hf_config = load_config(self.model_path)
        self.eos_token_ids = eos_token_ids
        limit = self.hf_config.max_position_embeddings  # the RoPE table has no more rows
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({limit})")
        runner_class = ParallelRunner if config.tensor_parallel_size > 1 else ModelRunner
        # (a draft model first: the target's KV pool is sized from the memory left after it)
        self.speculative = config.speculative_config
        self.proposer = self._make_proposer()
        self.runner = runner_class(config, self.hf_config, self.model_path, self.max_model_len)
        self.max_model_len = self._context_the_pool_holds(config.max_model_len is not None)
        self.allocator = PageAllocator(self.runner.kv_pool.num_pages, config.page_size,
                                       config.max_num_seqs + 1,  # + one being admitted
                                       -(-self.max_model_len // config.page_size))
        self.cache = RadixCache(self.allocator) if config.enable_prefix_caching else None
        self.allocator.evictor = self.cache  # the allocator evicts through it when it runs dry
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.cache)
        # a running request's slot is its block table row: the allocator's rows, one batch row each
        self.batch = PersistentBatch(config.num_slots, self.hf_config.vocab_size)
        self.stats = StatsCollector()
        # Drafts are proposed from the tokens a step sampled, so the host must have them
        # before it schedules the next step: speculation runs without overlap.
        self.overlap = config.overlap_scheduling and self.proposer is None
        if config.overlap_scheduling and self.proposer is not None:
            logger.info("overlap scheduling: off (speculative decoding proposes drafts from "
                        "each step's tokens before the next step)")
        self._in_flight: InFlight | None = None
        self.grammars: GrammarManager | None = None  # made for the first structured request
        self._compiling: list[Request] = []  # structured requests whose grammar is not ready

    def _make_proposer(self) -> "NgramProposer | DraftModelProposer | None":
        spec = self.speculative
        if spec is None:
            return None
        if spec.method == "ngram":
            return NgramProposer(spec)
        return DraftModelProposer(spec, self.config, self.max_model_len, self.hf_config.vocab_size)

    def _context_the_pool_holds(self, asked: bool) -> int:
        """max_model_len, if the KV pool holds one sequence that long (else no request of that
        length could ever finish). A pool too small refuses an asked-for length; a default one
        (the config's) is lowered to what the pool holds, as vLLM does."""
        pool = self.runner.kv_pool
        capacity = pool.num_pages * pool.page_size
        if self.max_model_len <= capacity:
            return self.max_model_len
        if asked:
            raise ValueError(
                f"max_model_len {self.max_model_len} needs "
                f"{-(-self.max_model_len // pool.page_size)} KV pages of {pool.page_size} tokens "
                f"and the pool has {pool.num_pages}: raise --num-pages (or "
                "--gpu-memory-utilization), or lower --max-model-len")
        logger.warning("max_model_len lowered from %d to %d: the KV pool holds %d tokens (raise "
                       "--num-pages or --gpu-memory-utilization for more)",
                       self.max_model_len, capacity, capacity)
        return capacity

    def add_request(self, message: CoreRequest) -> None:
        """Queue a request (whatever fits max_model_len fits the pool: see above)."""
        request = Request(message.request_id, message.prompt_token_ids, message.params,
                          message.max_tokens, message.seed, message.cache_salt,
                          arrival_time=message.arrival_time,
                          prompt_logprobs=None if message.params.prompt_logprobs is None else [])
        if request.params.structured_outputs is None:
            self.scheduler.add(request)
            return
        if self.grammars is None:
            self.grammars = GrammarManager(self.config.tokenizer or self.model_path,
                                           self.hf_config.vocab_size, self.eos_token_ids)
        self.grammars.start(request)  # it joins the queue once its grammar is compiled
        self._compiling.append(request)

    def _admit_compiled(self) -> list[CoreOutput]:
        """Queue the structured requests whose grammar is ready; end those whose grammar
        failed (reported as errors). With nothing else to run, wait a little for one."""
        if not self.scheduler.has_unfinished and self._in_flight is None:
            self.grammars.wait(self._compiling)
        failed, waiting = [], []
        for request in self._compiling:
            problem = self.grammars.ready(request)
            if problem is None:
                waiting.append(request)
            elif problem:
                self._finish(request, "abort")
                self.stats.on_finish(request, time.monotonic())
                failed.append(CoreOutput(request.request_id, [], "abort", error=problem,
                                         error_param="structured_outputs"))
            else:
                self.scheduler.add(request)
        self._compiling = waiting
        return failed

    def abort_request(self, request_id: str, reason: str = "abort") -> bool:
        """End a waiting or running request and free its pages; False if it is not here."""
        request = next((r for r in self._compiling if r.request_id == request_id), None)
        if request is not None:
            self._compiling.remove(request)
        elif (request := self.scheduler.find(request_id)) is not None:
            self._release(request)
        else:
            return False
        self._finish(request, reason)
        self.stats.on_finish(request, time.monotonic())
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or self._in_flight is not None or bool(self._compiling)

    # --8<-- [start:step]
    def step(self) -> list[CoreOutput]:
        """Launch the next step, then report the tokens of the step before it.

        With overlap scheduling, the host schedules and launches step N+1 while the device still
        runs step N: the tokens step N samples feed step N+1 on the device, and the host reads
        them only afterwards, so the device never waits for the host between steps. The price:
        a request that ends at step N (EOS, a stop token) has already been given a row in step
        N+1, whose token is dropped. Without overlap, each step is launched and read in turn.

        A step with rows that a grammar constrains samples only once the tokens before them are
        known: its forward pass is launched, then the step in flight is read (the device
        computes the forward pass meanwhile), then the masks are filled and the step sampled."""
        outputs = self._admit_compiled() if self._compiling else []
        forward = self._forward_next()
        if forward is not None and forward.step.grammar_rows and self._in_flight is not None:
            outputs += self._collect(self._in_flight)
            self._in_flight = None
        launched = self._sample(forward) if forward is not None else None
        if self.overlap:
            previous, self._in_flight = self._in_flight, launched
        else:
            previous = launched
        return outputs + (self._collect(previous) if previous is not None else [])
    # --8<-- [end:step]

    # --8<-- [start:launch]
    def _forward_next(self) -> Forward | None:
        """Schedule a step and launch its forward pass (the first of the runner's two calls)."""
        schedule = self.scheduler.schedule()
        self.stats.on_schedule(schedule, prefix_caching=self.cache is not None)
        if schedule.is_empty:
            return None
        step = prepare_step(schedule.scheduled, self.batch, self.allocator)
        return Forward(self.runner.execute_model(step.inputs), schedule, step)

    def _sample(self, forward: Forward) -> InFlight:
        """Sample a launched step (the runner's second call), with its grammar rows masked.
        Its sampled tokens are PENDING on the host until collected; on the device they are in
        their slots already."""
        step = forward.step
        mask = self.grammars.fill(step.grammar_rows) if step.grammar_rows else None
        launched = self.runner.sample(forward.logits, mask)
        self.scheduler.cache_prefills(forward.schedule)  # the next step finds these prompts
        return InFlight(launched, step.rows, step.drafts, step.prompt_rows)
    # --8<-- [end:launch]

    # --8<-- [start:collect]
    def _collect(self, in_flight: InFlight) -> list[CoreOutput]:
        """Wait for a launched step's tokens, put them in place of their PENDING marks, apply
        the rules that end a request, and report.

        A verify row (speculative decoding, never overlapped) keeps the tokens its drafts
        earned (serve/spec/verify.py), checked one by one for a stop; the K/V of the drafts it
        rejected is never read again (its computed length moves back; the pages stay, and the
        next step overwrites those slots). Then each running request gets its drafts."""
        token_ids = self.runner.collect(in_flight.launched)
        launched = in_flight.launched
        logprobs = launched.logprobs.lists() if launched.logprobs is not None else None
        if launched.prompt_logprobs is not None:
            self._keep_prompt_logprobs(in_flight.prompt_rows, launched.prompt_logprobs.lists())
        now = time.monotonic()
        outputs, start, to_propose = [], 0, []
        drafts_of = in_flight.drafts or [NO_DRAFTS] * len(in_flight.rows)
        speculate = self.proposer is not None and (
            self.speculative.disable_by_batch_size is None
            or len(self.scheduler.running) <= self.speculative.disable_by_batch_size)
        on_token, check_stop = self.stats.on_token, self._check_stop
        for (request, index), drafts in zip(in_flight.rows, drafts_of, strict=True):
            row, start = start, start + 1 + len(drafts)
            if request.status is FINISHED:
                continue  # ended meanwhile (an abort, or one step late: see step)
            if not drafts and request.max_tokens:  # the usual row: one token
                new = [token_id := token_ids[row]]
                request.output_token_ids[index] = token_id  # in place of its PENDING mark
                on_token(request, now)
                check_stop(request, token_id, index + 1)
            else:
                new = self._accept(request, index, drafts, token_ids[row:start], now)
            if request.status is FINISHED:
                # (a row of the step in flight, or drafts past the stop: not its tokens)
                del request.output_token_ids[index + len(new) :]
                request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens)
                self._release(request)  # its pages are free for the next step
                self.stats.on_finish(request, now)
            elif speculate and not request.params.penalized:  # (see _propose)
                to_propose.append(request)
            output = CoreOutput(request.request_id, new, request.finish_reason,
                                request.num_cached_tokens)
            if logprobs is not None or request.prompt_logprobs is not None:
                self._add_logprobs(output, request, logprobs, row)
            outputs.append(output)
        if to_propose:
            self._propose(to_propose)
        return outputs
    # --8<-- [end:collect]

    def _accept(self, request: Request, index: int, drafts: list[int], samples: list[int],
                now: float) -> list[int]:
        """The tokens a verify row keeps, or none for a request that wants its prompt alone
        (max_tokens 0), put in place of its PENDING mark and checked one by one for a stop."""
        if not request.max_tokens:  # (its prompt's log-probabilities, or an echo)
            self._finish(request, "length")
            del request.output_token_ids[index:]
            return []
        new = accepted_tokens(drafts, samples)
        self.stats.on_verify(len(drafts), len(new) - 1)
        request.num_computed_tokens -= len(drafts) - (len(new) - 1)
        request.output_token_ids[index:] = new
        for kept, token_id in enumerate(new, 1):
            self.stats.on_token(request, now)
            self._check_stop(request, token_id, index + kept)
            if request.status is FINISHED:
                return new[:kept]  # the tokens after a stop are dropped, never reported
        return new

    # --8<-- [start:output]
    @staticmethod
    def _add_logprobs(output: CoreOutput, request: Request, logprobs: LogprobsLists | None,
                      row: int) -> None:
        """A request's output with its new tokens' log-probabilities (theirs start at row `row`
        of the step's) and, the first time, its prompt's."""
        if logprobs is not None and request.params.logprobs is not None:
            output.new_logprobs = logprobs.columns(row, row + len(output.new_token_ids),
                                                   request.params.logprobs)
        if request.prompt_logprobs is not None and request.num_prompt_logprobs >= \
                request.num_prompt_tokens - 1:
            chunks, request.prompt_logprobs = request.prompt_logprobs, None
            output.prompt_logprobs = LogprobsColumns(
                *([x for chunk in chunks for x in getattr(chunk, field)]
                  for field in ("token_ids", "logprobs", "top_ids", "top_logprobs")))
    # --8<-- [end:output]

    @staticmethod
    def _keep_prompt_logprobs(prompt_rows: list[tuple[Request, int]],
                              lists: LogprobsLists) -> None:
        """Each request's part of the step's prompt log-probabilities, kept until its first
        token reports them all."""
        start = 0
        for request, count in prompt_rows:
            if request.prompt_logprobs is not None:
                request.prompt_logprobs.append(
                    lists.columns(start, start + count, request.params.prompt_logprobs))
            start += count

    # --8<-- [start:propose]
    def _propose(self, requests: list[Request]) -> None:
        """Drafts for the requests' next step: at most k each, never past max_tokens (the
        step yields one token more than it has drafts) or the context length. A penalized
        request gets none: a penalty depends on the tokens before it, which differ for each
        draft position (its rows would need counts per position, not per slot)."""
        k, limits, proposing = self.speculative.num_speculative_tokens, [], []
        for request in requests:
            limit = min(k, request.max_tokens - len(request.output_token_ids) - 1,
                        self.max_model_len - request.num_tokens)
            if limit > 0:
                proposing.append(request)
                limits.append(limit)
        if proposing:
            for request, drafts in zip(proposing, self.proposer.propose(proposing, limits),
                                       strict=True):
                if request.grammar is not None:  # a draft the grammar refuses cannot be right
                    drafts = self.grammars.valid_prefix(request, drafts)
                request.draft_token_ids = drafts
    # --8<-- [end:propose]

    def _check_stop(self, request: Request, token_id: int, num_output_tokens: int) -> None:
        """The rules that end a request at its num_output_tokens-th token; a stop string is
        the server side's. A request with a grammar moves its matcher on, and ends when the
        grammar has (it accepted EOS after a complete match)."""
        params = request.params
        if request.grammar is not None:
            if not self.grammars.accept(request, token_id):
                logger.error("request %s sampled token %d, which its grammar refuses",
                             request.request_id, token_id)
                self._finish(request, "abort")
                return
            if self.grammars.terminated(request):
                self._finish(request, "stop")
                return
        if (not params.ignore_eos and token_id in self.eos_token_ids) \
                or token_id in params.stop_token_ids:
            self._finish(request, "stop")
        elif num_output_tokens >= request.max_tokens:
            self._finish(request, "length")

    @staticmethod
    def _finish(request: Request, reason: str) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _release(self, request: Request) -> None:
        """A finished request gives back its pages and its proposer's state."""
        self.scheduler.finish(request)
        if self.proposer is not None:
            self.proposer.release(request)

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (benchmarks, between runs). Pages that running requests hold
        stay; True when the cache is empty afterwards."""
        if self.cache is None:
            return True
        self.cache.evict(self.cache.num_cached_pages)
        return self.cache.num_cached_pages == 0

    def check_health(self) -> None:
        """Raise RuntimeError if a tensor-parallel worker has died or stopped beating (checked
        while idle: a rank that dies mid-step fails that step)."""
        if isinstance(self.runner, ParallelRunner):
            self.runner.check_health()

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if there are any."""
        if isinstance(self.runner, ParallelRunner):
            self.runner.shutdown()

    def take_stats(self) -> EngineStats:
        """The queue and pool now, and everything counted since the last call."""
        stats = self.stats.snapshot(len(self.scheduler.running), len(self.scheduler.waiting),
                                    self.allocator.num_used_pages, self.allocator.num_pages,
                                    self.cache.num_cached_pages if self.cache else 0)
        self.stats = StatsCollector()
        return stats
