"""`speculative_config`: the same keys as vLLM's, for the methods nanoserve has."""

import json
from dataclasses import dataclass, fields
from typing import Any

# Past this many running requests speculation switches itself off: a verify step runs eagerly
# while a decode step replays its CUDA graph, so drafts pay only for a request that runs alone
# (milestones/10 measures it).
DEFAULT_DISABLE_BY_BATCH_SIZE = 1


# --8<-- [start:config]
@dataclass(frozen=True)
class SpeculativeConfig:
    """How requests speculate. Built from a dict with vLLM's keys (`from_dict`), e.g.
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}."""

    # "ngram": drafts are the tokens that followed an earlier copy of the last n;
    # "draft_model": a small model with the target's tokenizer writes them (greedily)
    method: str
    num_speculative_tokens: int  # k: drafts per request per step
    model: str | None = None  # the draft model (a local directory), for "draft_model"
    prompt_lookup_max: int = 5  # the longest n-gram looked up (tried first)
    prompt_lookup_min: int = 5  # the shortest n-gram looked up
    # no drafts while more requests than this run (vLLM's key); None: never switch off
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE
# --8<-- [end:config]

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative_config method {self.method!r} is not supported: "
                             "nanoserve speculates with 'ngram' (prompt lookup) or "
                             "'draft_model' (with 'model': a draft model's directory)")
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative_config method 'draft_model' needs 'model': the draft "
                             "model's directory")
        if self.num_speculative_tokens < 1:
            raise ValueError("speculative_config num_speculative_tokens must be >= 1, got "
                             f"{self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max,"
                             f" got {self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError("speculative_config disable_by_batch_size must be >= 1, got "
                             f"{self.disable_by_batch_size}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "SpeculativeConfig":
        """vLLM's keys: `method` (or `model` "[ngram]"/"ngram", vLLM's older spelling), one of
        prompt_lookup_min/max standing for both when the other is missing (as vLLM does)."""
        config = dict(config)
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(config) - known):
            raise ValueError(f"speculative_config has unknown keys {unknown}; nanoserve "
                             f"knows {sorted(known)}")
        model = config.get("model")
        if model in ("ngram", "[ngram]"):  # vLLM's older spelling of the n-gram method
            config["method"], config["model"] = "ngram", None
        if "method" not in config:
            if model is None:
                raise ValueError("speculative_config needs 'method' (e.g. \"ngram\")")
            config["method"] = "draft_model"
        if "num_speculative_tokens" not in config:
            raise ValueError("speculative_config needs 'num_speculative_tokens'")
        for key in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                    "disable_by_batch_size"):
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"speculative_config {key} must be an integer, got {value!r}")
        low, high = config.get("prompt_lookup_min"), config.get("prompt_lookup_max")
        if (low is None) != (high is None):  # the one given stands for both
            config["prompt_lookup_min"] = config["prompt_lookup_max"] = high if low is None else low
        return cls(**config)

    @classmethod
    def from_json(cls, text: str) -> "SpeculativeConfig":
        """The command line's --speculative-config '{...}'."""
        try:
            config = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--speculative-config is not JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError("--speculative-config must be a JSON object")
        return cls.from_dict(config)
