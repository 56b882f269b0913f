"""The offline API: `LLM(model=...).generate(prompts, params)`, stable across every stage."""

import itertools
from collections.abc import Sequence
from dataclasses import replace

from tqdm import tqdm

from serve.config import EngineConfig
from serve.engine.input_processor import prompt_list
from serve.engine.llm_engine import LLMEngine
from serve.engine.outputs import RequestOutput
from serve.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate for a list of prompts in one call; the results come back in the prompts' order.

    core_process=True runs the engine core (scheduler, KV cache, model) in a process of its
    own, as the server does: turning tokens into text then runs beside the core's steps instead
    of between them. By default the core runs in this process, where tests and benchmarks can
    look inside it (`llm.engine.runner`, `.scheduler`)."""

    def __init__(self, model: str, core_process: bool = False, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args), core_process)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the core process, if there is one (it also stops when this process exits)."""
        self.engine.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (vLLM's name); True when the cache is empty."""
        return self.engine.reset_prefix_cache()

    # --8<-- [start:generate]
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")

        order: dict[str, tuple[int, int]] = {}  # request id -> (prompt, sequence)
        try:
            for i, (prompt, params) in enumerate(zip(prompts, sampling_params, strict=True)):
                # n sequences: n requests, the prompt processed once, its pages computed once
                engine_input = self.engine.input_processor.process(prompt, params)
                first = str(next(self._ids))
                for sequence in range(params.n):
                    request_id, sequence_input = first, engine_input
                    if params.n > 1:
                        request_id = f"{first}-{sequence}"
                        sequence_input = engine_input.for_sequence(sequence)
                    self.engine.add_request(request_id, sequence_input,
                                            prefill_after=f"{first}-0" if sequence else None)
                    order[request_id] = (i, sequence)
        except Exception:  # a bad prompt: take back the ones already queued, then report it
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        results: list[list[RequestOutput]] = [[] for _ in prompts]
        with tqdm(total=len(order), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[order[output.request_id][0]].append(output)
                        bar.update(1)
        self.engine.take_stats()  # nobody reads the serving metrics offline: drop them
        return [_one_output(outputs, order) for outputs in results]
    # --8<-- [end:generate]


def _one_output(outputs: list[RequestOutput], order: dict[str, tuple[int, int]]) -> RequestOutput:
    """A prompt's n finished sequences as one RequestOutput (vLLM's shape): outputs[i] is
    sequence i; the prompt's log-probabilities come from the first."""
    if len(outputs) == 1:
        return outputs[0]
    outputs = sorted(outputs, key=lambda output: order[output.request_id][1])
    sequences = [replace(output.outputs[0], index=index) for index, output in enumerate(outputs)]
    first = outputs[0]
    return replace(first, request_id=first.request_id.rsplit("-", 1)[0], outputs=sequences,
                   num_cached_tokens=sum(output.num_cached_tokens for output in outputs))
