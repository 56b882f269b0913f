"""Stage 2's engine: static batches over a paged KV cache. A batch runs from prefill to its last
token, then the next batch starts; how many requests a batch holds is decided by free pages.

`step()` is the engine's whole interface: each call runs one forward pass and reports what it
produced. Every stage keeps this interface and changes what one step does.
"""

import logging
import time

from serve.config import EngineConfig
from serve.engine.errors import PromptTooLongError
from serve.engine.model_runner import ModelRunner
from serve.engine.output_processor import OutputProcessor
from serve.engine.page_allocator import PageAllocator
from serve.engine.request import Request, RequestOutput
from serve.engine.sampler import Sampler
from serve.engine.scheduler import Scheduler
from serve.engine.static_batch import StaticBatch
from serve.engine.tokenizer import eos_token_ids, load_tokenizer
from serve.models.loader import load_config, resolve_model_path
from serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_IDLE_WAIT_S = 0.001  # while a batch fills up, return to the caller this often to take requests


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
        self.sampler = Sampler(self.runner.device, config.seed)
        eos_ids = eos_token_ids(self.hf_config, path, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer, eos_ids, self.max_model_len)
        self.allocator = PageAllocator(self.runner.kv_pool.num_pages, config.page_size)
        self.scheduler = Scheduler(
            self.allocator, self.max_model_len, config.max_batch_size,
            config.prefill_token_budget(self.max_model_len), config.batch_wait_ms,
        )
        self.batch: StaticBatch | None = None  # the batch being generated

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> None:
        prompt_text, prompt_ids = self._tokenize(prompt)
        num_completion = params.max_tokens or 1
        if len(prompt_ids) + num_completion > self.max_model_len:
            raise PromptTooLongError(len(prompt_ids), num_completion, self.max_model_len)
        if len(prompt_ids) > self.scheduler.max_num_batched_tokens:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, more than one prefill may "
                             f"hold ({self.scheduler.max_num_batched_tokens}): raise "
                             "--max-num-batched-tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none: "
                             "use stop_token_ids")
        request = Request(request_id, prompt_ids, params, prompt=prompt_text)
        needed = self.allocator.pages_for(self.scheduler.max_tokens_of(request))
        if needed > self.allocator.num_pages:
            raise ValueError(f"the request needs {needed} KV pages and the pool has only "
                             f"{self.allocator.num_pages}: lower max_tokens or grow the pool")
        self.output_processor.add_request(request)
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> None:
        """A waiting request leaves the queue; a running one stops and gives its pages back."""
        request = self.scheduler.remove(request_id)
        if request is None and self.batch is not None:
            request = next((r for r in self.batch.requests
                            if r.request_id == request_id and not r.finished), None)
        if request is not None:
            self.output_processor.abort(request)
            self._release_finished()

    def has_unfinished_requests(self) -> bool:
        return self.batch is not None or bool(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        batch = self.batch  # read once: /metrics reads this from another thread
        return 0 if batch is None else sum(not r.finished for r in batch.requests)

    # --8<-- [start:step]
    def step(self) -> list[RequestOutput]:
        """Start a new batch if none is running, else decode one token for every running row."""
        if self.batch is None:
            wait = self.scheduler.seconds_until_ready()
            if wait > 0:  # let the batch fill up, but come back soon to take new requests
                time.sleep(min(wait, MAX_IDLE_WAIT_S))
                return []
            if not self.scheduler.waiting:
                return []
            self.batch = self._start_batch()
        rows = self.batch.next_rows()
        logits = self.runner.forward(rows)  # [rows, vocab]
        params = [row.request.params for row in rows]
        generators = [row.generator for row in rows]
        token_ids = self.sampler(logits, params, generators).tolist()  # host sync
        outputs = [self.output_processor.process_token(row.request, token_id)
                   for row, token_id in zip(rows, token_ids, strict=True)]
        self._release_finished()
        return outputs
    # --8<-- [end:step]

    def _start_batch(self) -> StaticBatch:
        requests, tables = self.scheduler.next_batch()
        generators = [self.sampler.new_generator(r.params) for r in requests]
        logger.debug("batch of %d requests; %d of %d pages free", len(requests),
                     self.allocator.num_available_pages, self.allocator.num_pages)
        return StaticBatch(requests, tables, generators)

    def _release_finished(self) -> None:
        """Finished requests give their pages back now, not at the end of the batch."""
        if self.batch is None:
            return
        self.batch.release_finished()
        if self.batch.finished:
            self.batch = None

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"model {self.model_name!r} has no tokenizer: send token ids as the prompt"
                )
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            text = prompt
        else:
            ids, text = list(prompt), None
        if not ids:
            raise ValueError("the prompt is empty")
        vocab_size = self.hf_config.vocab_size
        if any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        return text, ids
