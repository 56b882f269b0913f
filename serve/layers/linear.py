"""Linear layers that hold several checkpoint matrices in one, so one matmul does the work of many.

A checkpoint stores q_proj, k_proj and v_proj (and gate_proj, up_proj) separately; we stack them
into one weight at load time, because one large matmul is faster than three small ones.
"""

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One nn.Linear whose output rows are the concatenation of several named parts."""

    def __init__(self, in_features: int, part_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(part_sizes.values()), bias=bias)
        self.part_sizes = part_sizes
        self.part_offsets: dict[str, int] = {}
        offset = 0
        for name, size in part_sizes.items():
            self.part_offsets[name] = offset
            offset += size

    def load_part(self, param: nn.Parameter, loaded: torch.Tensor, part: str) -> None:
        """Copy one checkpoint matrix (or bias) into its rows of the merged parameter."""
        start, size = self.part_offsets[part], self.part_sizes[part]
        param.data[start : start + size].copy_(loaded)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(list(self.part_sizes.values()), dim=-1)
