"""Turn the last position's logits into the next token, per request's SamplingParams."""

import torch

from serve.sampling_params import SamplingParams


class Sampler:
    """Greedy, temperature, top-k, top-p and min-p; seeded requests draw from their own generator.

    Each sampled row draws its own noise, so a seeded request gets the same tokens whichever other
    requests share its batch.
    """

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.shared_generator = torch.Generator(device=device).manual_seed(seed)

    def new_generator(self, params: SamplingParams) -> torch.Generator:
        """The generator a request samples with: its own when seeded, else the shared one."""
        if params.seed is None:
            return self.shared_generator
        return torch.Generator(device=self.device).manual_seed(params.seed)

    # --8<-- [start:sample]
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator],
    ) -> torch.Tensor:
        # logits: [num_rows, vocab_size] float32 -> token ids [num_rows]
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        probs = self._filtered_probs(logits, params)
        # Gumbel-style sampling: argmax(p / Exp(1) noise) draws from p without a CDF search.
        # Unseeded rows share one draw; a seeded row draws its own, from its own generator.
        noise = torch.empty_like(probs).exponential_(generator=self.shared_generator)
        for row, generator in enumerate(generators):
            if generator is not self.shared_generator:
                noise[row].exponential_(generator=generator)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy, sampled)
    # --8<-- [end:sample]

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax at each row's temperature, with top-k, top-p and min-p applied."""
        device = logits.device
        # a greedy row (temperature below SAMPLING_EPS) is taken from the argmax, not from here:
        # dividing by its tiny temperature would only fill the row with inf and NaN
        temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params],
                                   device=device)
        logits = logits / temperature[:, None]
        vocab = logits.shape[-1]
        # top_k may be any int (2**63, say): clamp it before it becomes an int64
        top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params],
                             device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        min_p = torch.tensor([p.min_p for p in params], device=device)

        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already cover top_p (always keep one)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # top_p == 1 keeps everything: float32 cumsum can reach 1.0 before the tail does
        drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
        drop[:, 0] = False  # the most likely token stays even when top_p rounds to 0.0 (1e-300)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        too_unlikely = sorted_probs < min_p[:, None] * sorted_probs[:, :1]
        sorted_probs = sorted_probs.masked_fill(too_unlikely, 0.0)
        return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
