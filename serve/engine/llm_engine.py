"""The engine as the server side sees it: text in, text out, over an engine core.

`LLMEngine` tokenizes and checks each request (InputProcessor), hands the core token ids
(serve/messages.py), and turns the core's new tokens back into text, applying stop strings
(OutputProcessor). `step()` reports what each request produced since the last call.
"""

import logging
import random
import time

from serve.config import EngineConfig
from serve.core.engine_core import EngineCore
from serve.engine.core_client import CoreClient
from serve.engine.input_processor import EngineInput, InputProcessor, Prompt
from serve.engine.output_processor import OutputProcessor
from serve.engine.outputs import RequestOutput
from serve.engine.tokenizer import eos_token_ids, load_tokenizer
from serve.messages import CoreRequest, EngineStats
from serve.models.loader import load_config, resolve_model_path
from serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    """core_process=True runs the core in a process of its own (the server does); else it runs
    in this one, and `step()` runs its steps."""

    def __init__(self, config: EngineConfig, core_process: bool = False) -> None:
        self.config = config
        self.model_name = config.model
        path = resolve_model_path(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer or path)
        eos_ids = eos_token_ids(load_config(path), path, self.tokenizer)
        if core_process:
            self.core = CoreClient(config, eos_ids)
            vocab_size = self.core.vocab_size
        else:
            self.core = EngineCore(config, eos_ids)
            vocab_size = self.core.hf_config.vocab_size
        self.max_model_len = self.core.max_model_len  # (lowered to what the KV pool holds)
        self.input_processor = InputProcessor(self.tokenizer, vocab_size, self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._seeds = random.Random(config.seed)  # seeds for requests that bring none
        # requests held back until the request they name has computed its prompt (prefill_after)
        self._held: dict[str, list[CoreRequest]] = {}

    # The core's parts, for tests and benchmarks that look inside an in-process core.
    runner = property(lambda self: self.core.runner)
    scheduler = property(lambda self: self.core.scheduler)
    allocator = property(lambda self: self.core.allocator)
    cache = property(lambda self: self.core.cache)
    hf_config = property(lambda self: self.core.hf_config)

    # --8<-- [start:add_request]
    def add_request(self, request_id: str, prompt: Prompt | EngineInput,
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    cache_salt: str | None = None, prefill_after: str | None = None) -> None:
        """Queue a request: a prompt to process here, or an EngineInput processed already. With
        a cache_salt, it shares cached prompt prefixes only with requests of the same salt.

        prefill_after names a request with the same prompt, added before (n > 1: the first
        sequence of the prompt): this one waits until that one has computed the prompt, then
        finds its pages in the prefix cache instead of computing a copy of them."""
        if not isinstance(prompt, EngineInput):
            prompt = self.input_processor.process(prompt, params or SamplingParams())
        params = prompt.params
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(64)
        self.output_processor.add_request(request_id, prompt.prompt, prompt.prompt_token_ids,
                                          params)
        message = CoreRequest(request_id, prompt.prompt_token_ids, params, prompt.max_tokens,
                              seed, arrival_time or time.monotonic(), cache_salt)
        first = self.output_processor.requests.get(prefill_after)
        if first is not None and not first.token_ids and self.config.enable_prefix_caching:
            self._held.setdefault(prefill_after, []).append(message)
            return
        try:
            self.core.add_request(message)
        except BaseException:  # the core did not take it: nothing of it may stay here
            del self.output_processor.requests[request_id]
            raise
    # --8<-- [end:add_request]

    def _release(self, request_id: str) -> None:
        """Queue the requests held back for this one (it computed its prompt, or ended)."""
        for message in self._held.pop(request_id, ()):
            if message.request_id in self.output_processor.requests:  # not aborted meanwhile
                self.core.add_request(message)

    def abort_request(self, request_id: str, error: str | None = None) -> RequestOutput | None:
        """End a waiting or running request and free its pages; None if it is not here."""
        if request_id not in self.output_processor.requests:
            return None
        self.core.abort_request(request_id)
        output = self.output_processor.abort(request_id, error)
        self._release(request_id)
        return output

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or bool(self._held)

    def check_health(self) -> None:
        """Raise if the core (its process, or a tensor-parallel worker) has died or stopped;
        called while idle, when no step would notice."""
        self.core.check_health()

    def request_ids(self, started: bool | None = None) -> list[str]:
        """The requests in flight; with started=False, those that have produced no token yet."""
        states = self.output_processor.requests.values()
        return [s.request_id for s in states if started is None or bool(s.token_ids) == started]

    def shutdown(self) -> None:
        """Stop the core: its process, or in this process its tensor-parallel workers."""
        self.core.shutdown()

    # --8<-- [start:step]
    def step(self) -> list[RequestOutput]:
        """One core step; each request's new tokens become text here, where a stop string can
        end it (and the core is told). A failure while processing a request's output is that
        request's alone: it ends with an error, and the others go on."""
        outputs = []
        requests, process = self.output_processor.requests, self.output_processor.process
        for core_output in self.core.step():
            request_id = core_output.request_id
            if self._held:
                self._release(request_id)  # its first output: its prompt is computed
            if request_id not in requests:
                continue  # ended here meanwhile (a stop string, an abort)
            if core_output.error is not None:  # the core could not serve it
                outputs.append(self.output_processor.abort(request_id, core_output.error,
                                                           core_output.error_param))
                continue
            try:
                output = process(core_output)
            except Exception as error:
                logger.exception("request %s failed while processing its output", request_id)
                if core_output.finish_reason is None:
                    self.core.abort_request(request_id)
                output = self.output_processor.abort(request_id, f"{type(error).__name__}: {error}")
            else:
                if output.finished and core_output.finish_reason is None:  # a stop string
                    self.core.abort_request(request_id, reason="stop")
            outputs.append(output)
        return outputs
    # --8<-- [end:step]

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    def take_stats(self) -> EngineStats:
        return self.core.take_stats()
