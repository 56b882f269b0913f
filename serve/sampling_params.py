"""How one request wants its tokens chosen and when it wants to stop."""

import math
from dataclasses import dataclass, field, replace

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
MAX_LOGPROBS = 20  # top log-probabilities per token (OpenAI's top_logprobs limit, vLLM's default)
MAX_N = 128  # sequences per prompt (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # entries of one logit_bias map (OpenAI's limit)
LOGIT_BIAS_RANGE = 100.0  # a bias is in [-100, 100] (OpenAI's range)
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
    n: int = 1  # sequences to generate for the prompt (LLM.generate and the server fan it out)
    # penalties on the logits, as vLLM (and OpenAI) apply them (serve/core/penalties.py says
    # how); 0, 0 and 1 are off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    # None: no log-probabilities; k: each output token's, and the k most likely tokens' (0: its
    # own only). They are the model's raw distribution, before penalties, bias, temperature,
    # filters and grammars (vLLM's default, "raw_logprobs")
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias is not None:  # (JSON object keys are strings)
            self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        self._check()

    def _check(self) -> None:
        # One ValueError naming every broken rule, the first field first (NaN fails every range).
        stop, stop_ids, bias = self.stop, self.stop_token_ids, self.logit_bias or {}
        rules = [
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1 (disabled) or >= 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must fit in 64 bits, [{SEED_MIN}, {SEED_MAX}], got {self.seed}"),
            (self.max_tokens is None or self.max_tokens >= 0,
             f"max_tokens must be >= 0, got {self.max_tokens}"),
            (len(stop) <= MAX_STOP_STRINGS,
             f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}"),
            (all(stop), "stop strings must not be empty"),
            (all(len(s) <= MAX_STOP_STRING_CHARS for s in stop),
             f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters long"),
            (len(stop_ids) <= MAX_STOP_TOKEN_IDS,
             f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(stop_ids)}"),
            (all(token_id >= 0 for token_id in stop_ids), "stop_token_ids must be >= 0"),
            (1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 < self.repetition_penalty <= 2,
             f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}"),
            (len(bias) <= MAX_LOGIT_BIAS,
             f"logit_bias must hold at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}"),
            (all(token >= 0 for token in bias), "logit_bias token ids must be >= 0"),
            (all(-LOGIT_BIAS_RANGE <= b <= LOGIT_BIAS_RANGE for b in bias.values()),
             f"logit_bias values must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
        ]
        if problems := [message for holds, message in rules if not holds]:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def for_sequence(self, index: int) -> "SamplingParams":
        """The rules of sequence `index` of the n a request asked for: one sequence each, a
        seed of its own (seed + index, so that a seeded request repeats and its sequences
        differ), the prompt's log-probabilities only once."""
        seed = self.seed
        if seed is not None:
            seed = (seed + index - SEED_MIN) % 2**64 + SEED_MIN  # (wraps within 64 bits)
        return replace(self, n=1, seed=seed,
                       prompt_logprobs=self.prompt_logprobs if index == 0 else None)

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens seen so far (presence, frequency or
        repetition penalty)."""
        return bool(self.presence_penalty or self.frequency_penalty) \
            or self.repetition_penalty != 1.0
