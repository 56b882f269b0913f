"""How one request wants its tokens chosen and when it wants to stop."""

import math
from dataclasses import dataclass, field

from serve.structured.params import StructuredOutputsParams

# --8<-- [start:limits]
# Below this temperature a request is greedy, as in vLLM (_SAMPLING_EPS). Dividing the logits by
# anything smaller overflows float32: 1e-300 even rounds to 0.0, and the probabilities turn NaN.
SAMPLING_EPS = 1e-5
# Stop strings are searched for after every token of their request, on the engine's one thread, so
# they cost the whole batch; and a stream holds back the last (longest stop string - 1) characters
# in case they grow into one. OpenAI allows 4 stop strings; 32 leaves room for eval harnesses.
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024  # a few hundred covers every newline-like token of a large vocabulary
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a torch.Generator seed is a 64-bit integer
# --8<-- [end:limits]


@dataclass
class SamplingParams:
    """Per-request sampling and stopping rules (the same names and defaults as vLLM)."""

    temperature: float = 1.0  # below SAMPLING_EPS (0, say): greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability sums to top_p
    top_k: int = -1  # keep the k most likely tokens; -1 (or 0) keeps all; any k >= vocab keeps all
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely token)
    seed: int | None = None  # a seeded request samples the same tokens every time
    max_tokens: int | None = 16  # None: until the model's context is full
    stop: list[str] = field(default_factory=list)  # stop strings; not included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end the request
    ignore_eos: bool = False  # keep going past the end-of-sequence token (benchmarks)
    # the output must match a JSON schema, regex, choice or grammar (vLLM's name); a dict works
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        # One ValueError naming every broken rule, the first field first (NaN fails every range).
        stop, stop_ids = self.stop, self.stop_token_ids
        rules = [
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1 (disabled) or >= 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must fit in 64 bits, [{SEED_MIN}, {SEED_MAX}], got {self.seed}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            (len(stop) <= MAX_STOP_STRINGS,
             f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}"),
            (all(stop), "stop strings must not be empty"),
            (all(len(s) <= MAX_STOP_STRING_CHARS for s in stop),
             f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters long"),
            (len(stop_ids) <= MAX_STOP_TOKEN_IDS,
             f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(stop_ids)}"),
            (all(token_id >= 0 for token_id in stop_ids), "stop_token_ids must be >= 0"),
        ]
        if problems := [message for holds, message in rules if not holds]:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS
