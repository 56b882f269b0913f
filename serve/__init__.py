"""nanoserve: an LLM inference engine built stage by stage, as a course."""

from serve.engine.outputs import CompletionOutput, RequestOutput
from serve.llm import LLM
from serve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
