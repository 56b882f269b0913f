"""The token embedding and the LM head, split across tensor-parallel ranks by vocabulary rows.

Each rank holds a contiguous 1/size of the vocabulary's rows (the last rank's share padded with
zero rows when the vocabulary does not divide). The embedding looks up the ids in its range and
contributes zeros for the others, and an all-reduce adds the ranks' lookups. The LM head gives
each rank the logits of its rows, and an all-gather puts the whole vocabulary's logits on every
rank, so that every rank samples the same token from the same numbers.
"""

import torch
import torch.nn.functional as F
from torch import nn

from serve.parallel import TensorParallel


# --8<-- [start:embedding]
class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int,
                 tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.rows = -(-vocab_size // tp.size)  # this rank's rows, padding included
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.start + self.rows)
        local = torch.where(mine, ids - self.start, 0)
        return self.tp.all_reduce(F.embedding(local, self.weight) * mine.unsqueeze(-1))

    def load(self, param: nn.Parameter, source, part: str | None = None) -> None:
        """This rank's rows of the checkpoint's matrix; padding rows stay zero."""
        end = min(self.start + self.rows, self.vocab_size)
        param.data.zero_()
        param.data[: end - self.start].copy_(source[self.start : end])


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the whole vocabulary; may share its weight with the embedding."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather(F.linear(hidden, self.weight))
        return logits[:, : self.vocab_size]  # drop the padding rows' logits
# --8<-- [end:embedding]
