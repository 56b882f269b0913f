"""Penalties and logit bias: the rules that change a row's logits before it is sampled.

A penalty depends on the tokens a request has seen, so each slot keeps, on the device, how many
times each token was generated (`counts`) and which tokens its prompt holds (`in_prompt`). A
slot's row is written when a penalized request is admitted (from its tokens on the host, once),
then grows by one count per sampled token, on the device, where the token already is: the host
never sends a request's history again, and with overlap scheduling it does not even know the
last token yet. Both tables are made for the first penalized request: an engine whose requests
use none pays nothing, and a step whose rows use none skips all of this.

The rules, vLLM's (and OpenAI's): a logit bias is added first; then a token seen in the prompt
or the output has a positive logit divided by the repetition penalty and a negative one
multiplied by it (CTRL's rule); then each generated token's logit loses frequency_penalty per
time it was generated and presence_penalty once.
"""

import torch

from serve.core.sampler import SamplingTensors


class Penalties:
    """Per-slot token counts on the device, and the step's penalties and bias applied with them."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device) -> None:
        self.shape = (num_slots, vocab_size)
        self.device = device
        self.counts: torch.Tensor | None = None  # [slots, vocab] int32: times generated
        self.in_prompt: torch.Tensor | None = None  # [slots, vocab] bool

    def admit(self, rules: SamplingTensors) -> None:
        """Write the rows of the slots just admitted with a penalty: their prompt and the tokens
        they generated before (a preempted request recomputes with its history)."""
        if rules.reset_slots is None:
            return
        if self.counts is None:
            self.counts = torch.zeros(self.shape, dtype=torch.int32, device=self.device)
            self.in_prompt = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        self.counts[rules.reset_slots] = 0
        self.in_prompt[rules.reset_slots] = False
        self.in_prompt[rules.prompt_token_slots, rules.prompt_token_ids] = True
        ones = torch.ones_like(rules.output_token_ids, dtype=torch.int32)
        self.counts.index_put_((rules.output_token_slots, rules.output_token_ids), ones,
                               accumulate=True)

    def apply(self, logits: torch.Tensor, rules: SamplingTensors) -> torch.Tensor:
        """The step's logits with bias and penalties applied (a float32 copy), or the same
        tensor when no row has either."""
        if rules.penalty_rows is None and rules.bias_rows is None:
            return logits
        # a float32 copy: the raw logits stay as they are (a CUDA graph's output, or read for
        # log-probabilities), and penalties on bfloat16 logits would round
        logits = logits.to(torch.float32, copy=True)
        if rules.bias_rows is not None:
            logits.index_put_((rules.bias_rows, rules.bias_token_ids), rules.bias_values,
                              accumulate=True)
        if rules.penalty_rows is not None:
            rows = logits[rules.penalty_rows]
            counts = self.counts[rules.penalty_slots]
            generated = counts > 0
            seen = generated | self.in_prompt[rules.penalty_slots]
            repetition = rules.repetition_penalty[:, None]
            rows = torch.where(seen, torch.where(rows > 0, rows / repetition, rows * repetition),
                               rows)
            rows -= rules.frequency_penalty[:, None] * counts
            rows -= rules.presence_penalty[:, None] * generated
            logits[rules.penalty_rows] = rows
        return logits

    def record(self, sampled: torch.Tensor, rules: SamplingTensors) -> None:
        """Count the tokens the penalized rows just sampled (a penalized row never checks
        drafts, so each has one)."""
        if rules.penalty_rows is not None:
            tokens = sampled[rules.penalty_rows]
            self.counts.index_put_((rules.penalty_slots, tokens),
                                   torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
