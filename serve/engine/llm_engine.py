"""The engine: continuous batching over a paged KV cache, with prefix caching.

`step()` is the engine's whole interface: each call asks the scheduler which requests run, runs
one forward pass over all of them, and reports what each one produced. Requests join and leave
the running batch between any two steps; a request starts from the pages of the longest prefix
of its prompt that earlier requests computed (a radix tree over pages, when the config enables
it), and computes only the rest.
"""

import logging
import random
import time

from serve.config import EngineConfig
from serve.core.kv.page_allocator import PageAllocator
from serve.core.kv.radix_cache import RadixCache
from serve.core.model_runner import ModelRunner
from serve.core.request import Request, RequestOutput
from serve.core.sampler import SamplingTensors
from serve.core.scheduler import ScheduledRequest, Scheduler
from serve.core.stats import EngineStats, StatsCollector
from serve.core.step_inputs import StepInputs, build_step_inputs
from serve.engine.input_processor import EngineInput, InputProcessor, Prompt
from serve.engine.output_processor import OutputProcessor
from serve.engine.tokenizer import eos_token_ids, load_tokenizer
from serve.models.loader import load_config, resolve_model_path
from serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_name = config.model
        path = resolve_model_path(config.model)
        self.hf_config = load_config(path)
        limit = self.hf_config.max_position_embeddings  # the RoPE table has no more rows
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({limit})")
        self.tokenizer = load_tokenizer(config.tokenizer or path)
        self.runner = ModelRunner(config, self.hf_config, path, self.max_model_len)
        self.max_model_len = self._context_the_pool_holds(config.max_model_len is not None)
        self.input_processor = InputProcessor(self.tokenizer, self.hf_config.vocab_size,
                                              self.max_model_len)
        self.output_processor = OutputProcessor(
            self.tokenizer, eos_token_ids(self.hf_config, path, self.tokenizer))
        self.allocator = PageAllocator(self.runner.kv_pool.num_pages, config.page_size)
        self.cache = RadixCache(self.allocator) if config.enable_prefix_caching else None
        self.allocator.evictor = self.cache  # the allocator evicts through it when it runs dry
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.cache)
        self.stats = StatsCollector()
        self._seeds = random.Random(config.seed)  # seeds for requests that bring none

    # --8<-- [start:add_request]
    def add_request(
        self, request_id: str, prompt: Prompt | EngineInput, params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request: a prompt to process here, or an EngineInput processed already."""
        if not isinstance(prompt, EngineInput):
            prompt = self.input_processor.process(prompt, params or SamplingParams())
        # (Whatever fits max_model_len fits the pool alone: _context_the_pool_holds saw to it.)
        params = prompt.params
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(64)
        request = Request(request_id, prompt.prompt_token_ids, params, prompt.max_tokens, seed,
                          prompt=prompt.prompt)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        self.output_processor.add_request(request)
        self.scheduler.add(request)
    # --8<-- [end:add_request]

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

    def abort_request(self, request_id: str, error: str | None = None) -> RequestOutput | None:
        """End a waiting or running request and free its pages; None if it is not here."""
        request = self.scheduler.find(request_id)
        if request is None:
            return None
        output = self.output_processor.abort(request, error)
        self.scheduler.finish(request)
        self.stats.on_finish(request, time.monotonic())
        return output

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # --8<-- [start:step]
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass over every scheduled request, sample the requests
        whose tokens reach their end (not a prefill chunk that stops short), report."""
        schedule = self.scheduler.schedule()
        self.stats.on_schedule(schedule, prefix_caching=self.cache is not None)
        if schedule.is_empty:
            return []
        sampled = [item.completes for item in schedule.scheduled]
        token_ids = self.runner.execute(self._step_inputs(schedule.scheduled, sampled))
        for item in schedule.scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
        now = time.monotonic()
        outputs = []
        sampled_requests = [item.request for item, s in zip(schedule.scheduled, sampled,
                                                            strict=True) if s]
        for request, token_id in zip(sampled_requests, token_ids, strict=True):
            outputs.append(self._process_token(request, token_id, now))
            if request.finished:
                self.scheduler.finish(request)  # its pages are free for the next step
                self.stats.on_finish(request, now)
        self.scheduler.cache_prefills(schedule)  # the next step's requests find these prompts
        return outputs
    # --8<-- [end:step]

    def _step_inputs(self, scheduled: list[ScheduledRequest], sampled: list[bool]) -> StepInputs:
        requests = [item.request for item in scheduled]
        samplers = [r for r, s in zip(requests, sampled, strict=True) if s]
        sampling = SamplingTensors.build(
            [r.params for r in samplers], [r.sampling_seed for r in samplers],
            [r.num_tokens for r in samplers],  # the position each request samples next
            self.hf_config.vocab_size)
        return build_step_inputs(
            [item.request.token_ids_from(item.request.num_computed_tokens)[:item.num_new_tokens]
             for item in scheduled],
            [r.num_computed_tokens for r in requests],
            [r.page_table.pages for r in requests],
            self.allocator.page_size, sampling, sampled)

    def _process_token(self, request: Request, token_id: int, now: float) -> RequestOutput:
        """Detokenize and check the stop rules. A failure here is this request's alone: it
        ends with an error, and the other requests go on."""
        try:
            output = self.output_processor.process_token(request, token_id)
        except Exception as error:
            logger.exception("request %s failed while processing its output",
                             request.request_id)
            return self.output_processor.abort(request, f"{type(error).__name__}: {error}")
        self.stats.on_token(request, now)
        return output

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (benchmarks, between runs). Pages that running requests hold
        stay; True when the cache is empty afterwards."""
        if self.cache is None:
            return True
        self.cache.evict(self.cache.num_cached_pages)
        return self.cache.num_cached_pages == 0

    def take_stats(self) -> EngineStats:
        """The queue and pool now, and everything counted since the last call."""
        stats = self.stats.snapshot(len(self.scheduler.running), len(self.scheduler.waiting),
                                    self.allocator.num_used_pages, self.allocator.num_pages,
                                    self.cache.num_cached_pages if self.cache else 0)
        self.stats = StatsCollector()
        return stats
