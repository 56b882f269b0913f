"""How one request wants its tokens chosen and when it wants to stop."""

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request sampling and stopping rules (the same names and defaults as vLLM)."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability sums to top_p
    top_k: int = -1  # keep the k most likely tokens; -1 (or 0) keeps all
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely token)
    seed: int | None = None  # a seeded request samples the same tokens every time
    max_tokens: int | None = 16  # None: until the model's context is full
    stop: list[str] = field(default_factory=list)  # stop strings; not included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end the request
    ignore_eos: bool = False  # keep going past the end-of-sequence token (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the allowed range."""
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
