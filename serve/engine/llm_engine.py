"""Stage 0's engine: one request at a time, from prefill to its last token, then the next.

`step()` is the engine's whole interface: each call runs one forward pass and reports what it
produced. Every later stage keeps this interface and changes what one step does.
"""

import logging
from collections import deque

import torch

from serve.config import EngineConfig
from serve.engine.errors import PromptTooLongError
from serve.engine.kv_cache import ContiguousKVCache
from serve.engine.model_runner import ModelRunner
from serve.engine.output_processor import OutputProcessor
from serve.engine.request import Request, RequestOutput, RequestStatus
from serve.engine.sampler import Sampler
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
        self.max_model_len = config.max_model_len or self.hf_config.max_position_embeddings
        self.tokenizer = load_tokenizer(config.tokenizer or path)
        self.runner = ModelRunner(config, self.hf_config, path)
        self.sampler = Sampler(self.runner.device, config.seed)
        eos_ids = eos_token_ids(self.hf_config, path, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer, eos_ids, self.max_model_len)
        self.waiting: deque[Request] = deque()
        self.running: Request | None = None  # the one request being generated
        self.kv_cache: ContiguousKVCache | None = None  # the running request's cache
        self.generator: torch.Generator | None = None  # the running request's sampling RNG

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> None:
        prompt_text, prompt_ids = self._tokenize(prompt)
        num_completion = params.max_tokens or 1
        if len(prompt_ids) + num_completion > self.max_model_len:
            raise PromptTooLongError(len(prompt_ids), num_completion, self.max_model_len)
        request = Request(request_id, prompt_ids, params, prompt=prompt_text)
        self.output_processor.add_request(request)
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> None:
        if self.running is not None and self.running.request_id == request_id:
            self.output_processor.abort(self.running)
            self._release_running()
            return
        for request in [r for r in self.waiting if r.request_id == request_id]:
            self.waiting.remove(request)
            self.output_processor.abort(request)  # frees its detokenizer

    def has_unfinished_requests(self) -> bool:
        return self.running is not None or bool(self.waiting)

    # --8<-- [start:step]
    def step(self) -> list[RequestOutput]:
        """Prefill the next waiting request, or decode one token of the running one."""
        if self.running is None:
            if not self.waiting:
                return []
            request = self._start(self.waiting.popleft())
            logits = self.runner.forward(request.prompt_token_ids, 0, self.kv_cache)
        else:
            request = self.running
            logits = self.runner.forward(
                request.output_token_ids[-1:], request.num_tokens - 1, self.kv_cache
            )
        token_id = self.sampler(logits, [request.params], [self.generator]).item()  # host sync
        output = self.output_processor.process_token(request, token_id)
        if request.finished:
            self._release_running()
        return [output]
    # --8<-- [end:step]

    # --8<-- [start:start]
    def _start(self, request: Request) -> Request:
        """Make `request` the running one and reserve its whole KV cache up front."""
        max_tokens = request.params.max_tokens or self.max_model_len
        max_len = min(request.num_prompt_tokens + max_tokens, self.max_model_len)
        self.kv_cache = self.runner.allocate_kv_cache(max_len)
        self.generator = self.sampler.new_generator(request.params)
        request.status = RequestStatus.RUNNING
        self.running = request
        return request
    # --8<-- [end:start]

    def _release_running(self) -> None:
        self.running, self.kv_cache, self.generator = None, None, None

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
