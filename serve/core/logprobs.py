"""Log-probabilities: of the tokens a step sampled, and of a prompt's own tokens.

Both are read from the model's raw logits, before penalties, bias, temperature, filters and
grammars change them (vLLM's default, "raw_logprobs"): what the model thinks of the text, which
is what an evaluation harness scores. On the device, one log-softmax per row, then a gather (the
token's own) and a top-k (the most likely); only those few numbers per row reach the host.
"""

from dataclasses import dataclass

import torch

from serve.messages import LogprobsColumns

# Rows of prompt logits computed at once: a chunk of 8,192 prompt tokens times a 152k vocabulary
# is 5 GB of float32, where 1,024 rows at a time are 0.6 GB.
PROMPT_ROWS_PER_PASS = 1024


# --8<-- [start:device]
@dataclass
class LogprobsTensors:
    """Log-probabilities of n tokens: token i's own, and the k most likely at its position."""

    token_ids: torch.Tensor  # [n] int64
    logprobs: torch.Tensor  # [n] float32
    top_ids: torch.Tensor  # [n, k] int64
    top_logprobs: torch.Tensor  # [n, k] float32

    @classmethod
    def of(cls, logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> "LogprobsTensors":
        """From logits [n, vocab] (any dtype: the log-softmax runs in float32)."""
        return cls.gather(logits.log_softmax(dim=-1, dtype=torch.float32), token_ids, k)

    @classmethod
    def gather(cls, logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> "LogprobsTensors":
        """From log-probabilities [n, vocab] float32."""
        top = logprobs.topk(k, dim=-1)
        return cls(token_ids, logprobs.gather(1, token_ids[:, None])[:, 0], top.indices, top.values)

    # --8<-- [end:device]

    def to_host(self) -> "LogprobsTensors":
        """A copy in pinned host memory, made in the background (valid once the step's event
        has passed; on a CPU, the same tensors)."""
        if not self.logprobs.is_cuda:
            return self
        return LogprobsTensors(*(_pinned_copy(t) for t in (self.token_ids, self.logprobs,
                                                           self.top_ids, self.top_logprobs)))

    @staticmethod
    def cat(parts: list["LogprobsTensors"]) -> "LogprobsTensors":
        return LogprobsTensors(*(torch.cat([getattr(p, name) for p in parts])
                                 for name in ("token_ids", "logprobs", "top_ids", "top_logprobs")))

    def lists(self) -> "LogprobsLists":
        """As Python lists, converted once per step (then sliced per request)."""
        return LogprobsLists(self.token_ids.tolist(), self.logprobs.tolist(),
                             self.top_ids.tolist(), self.top_logprobs.tolist())


@dataclass
class LogprobsLists:
    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    def columns(self, start: int, end: int, k: int) -> LogprobsColumns:
        """Rows start..end-1, each with its k most likely tokens."""
        return LogprobsColumns(self.token_ids[start:end], self.logprobs[start:end],
                               [ids[:k] for ids in self.top_ids[start:end]],
                               [values[:k] for values in self.top_logprobs[start:end]])


# --8<-- [start:prompt]
def prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor,
                    targets: torch.Tensor, k: int) -> LogprobsTensors:
    """Log-probabilities of targets[i] (the prompt token after token row rows[i]) from the
    hidden states of those rows, PROMPT_ROWS_PER_PASS rows of logits at a time."""
    parts = []
    for start in range(0, len(rows), PROMPT_ROWS_PER_PASS):
        end = start + PROMPT_ROWS_PER_PASS
        logits = model.compute_logits(hidden[rows[start:end]])
        parts.append(LogprobsTensors.of(logits, targets[start:end], k))
    return LogprobsTensors.cat(parts)
# --8<-- [end:prompt]


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
