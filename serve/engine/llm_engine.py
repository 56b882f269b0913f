"""Stage 1's engine: static batching. A batch of requests runs from prefill to its last token,
then the next batch starts.

`step()` is the engine's whole interface: each call runs one forward pass and reports what it
produced. Every stage keeps this interface and changes what one step does.
"""

import logging
import time

from serve.config import EngineConfig
from serve.engine.errors import PromptTooLongError
from serve.engine.model_runner import ModelRunner
from serve.engine.output_processor import OutputProcessor
from serve.engine.request import Request, RequestOutput
from serve.engine.sampler import Sampler
from serve.engine.scheduler import Scheduler
from serve.engine.static_batch import BatchStats, StaticBatch
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
        self.max_model_len = config.max_model_len or self.hf_config.max_position_embeddings
        self.tokenizer = load_tokenizer(config.tokenizer or path)
        self.runner = ModelRunner(config, self.hf_config, path)
        self.sampler = Sampler(self.runner.device, config.seed)
        eos_ids = eos_token_ids(self.hf_config, path, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer, eos_ids, self.max_model_len)
        self.scheduler = Scheduler(config.max_batch_size, config.batch_wait_ms)
        self.batch: StaticBatch | None = None  # the batch being generated
        self.stats = BatchStats()

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> None:
        prompt_text, prompt_ids = self._tokenize(prompt)
        num_completion = params.max_tokens or 1
        if len(prompt_ids) + num_completion > self.max_model_len:
            raise PromptTooLongError(len(prompt_ids), num_completion, self.max_model_len)
        request = Request(request_id, prompt_ids, params, prompt=prompt_text)
        self.output_processor.add_request(request)
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> None:
        """A waiting request leaves the queue; a running one stops being sampled, but its row
        stays in the batch until the batch ends (static batching cannot shrink a batch)."""
        request = self.scheduler.remove(request_id)
        if request is None and self.batch is not None:
            request = next((r for r in self.batch.requests
                            if r.request_id == request_id and not r.finished), None)
        if request is not None:
            self.output_processor.abort(request)
            if self.batch is not None and self.batch.finished:
                self.batch = None

    def has_unfinished_requests(self) -> bool:
        return self.batch is not None or bool(self.scheduler.waiting)

    # --8<-- [start:step]
    def step(self) -> list[RequestOutput]:
        """Start a new batch if none is running, else decode one token for every row."""
        if self.batch is None:
            wait = self.scheduler.seconds_until_ready()
            if wait > 0:  # let the batch fill up, but come back soon to take new requests
                time.sleep(min(wait, MAX_IDLE_WAIT_S))
                return []
            if not self.scheduler.waiting:
                return []
            self.batch = self._start_batch(self.scheduler.next_batch())
        batch = self.batch
        was_prefill = not batch.is_prefilled
        idle_rows = sum(r.finished for r in batch.requests)  # rows computed for nothing
        logits = self.runner.forward(batch)  # [batch, vocab]
        params = [r.params for r in batch.requests]
        token_ids = self.sampler(logits, params, batch.generators).tolist()  # host sync
        outputs = []
        for request, token_id in zip(batch.requests, token_ids, strict=True):
            if not request.finished:  # a finished row was computed for nothing
                outputs.append(self.output_processor.process_token(request, token_id))
        self.stats.record_step(batch, was_prefill, idle_rows)
        if batch.finished:
            self.batch = None
        return outputs
    # --8<-- [end:step]

    # --8<-- [start:start_batch]
    def _start_batch(self, requests: list[Request]) -> StaticBatch:
        """Reserve one KV block for the batch, sized by its longest prompt and largest output."""
        max_len = StaticBatch.max_slots(requests, self.max_model_len)
        kv_cache = self.runner.allocate_kv_cache(len(requests), max_len)
        generators = [self.sampler.new_generator(r.params) for r in requests]
        batch = StaticBatch(requests, kv_cache, generators, self.max_model_len,
                            self.runner.device)
        logger.debug("batch of %d: %d prompt slots, %d cache slots, %.1f MiB of KV",
                     batch.size, batch.prompt_len, max_len, kv_cache.num_bytes / 2**20)
        return batch
    # --8<-- [end:start_batch]

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
