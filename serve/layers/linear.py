"""Linear layers split across tensor-parallel ranks (Megatron-LM's column and row split).

A **column-parallel** layer gives each rank some of the output features: q/k/v by heads, gate/up
by intermediate columns. It needs no communication: each rank goes on with its own heads. A
**row-parallel** layer (o_proj, down_proj) takes those partial features as its input, so each
rank computes a partial sum of the full output, and one all-reduce adds them up. So a decoder
layer communicates twice, once after attention and once after the MLP.

A checkpoint stores q_proj, k_proj and v_proj (and gate_proj, up_proj) separately; the column
layer stacks them into one weight at load time, because one large matmul is faster than three
small ones. Each rank reads only its own rows or columns of the checkpoint (`load`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from serve.parallel import TensorParallel


# --8<-- [start:column]
class ColumnParallelLinear(nn.Module):
    """One matmul whose output is the concatenation of several named parts (q, k, v), each
    holding this rank's share of that part's rows."""

    def __init__(self, in_features: int, part_sizes: dict[str, int], bias: bool,
                 tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.tp = tp
        # (start, length) of this rank's rows, per part, in the checkpoint's matrix
        self.shards = {name: tp.shard(size, f"{name} rows") for name, size in part_sizes.items()}
        self.part_sizes = {name: length for name, (_, length) in self.shards.items()}
        self.part_offsets, offset = {}, 0
        for name, size in self.part_sizes.items():
            self.part_offsets[name] = offset
            offset += size
        self.weight = nn.Parameter(torch.empty(offset, in_features))
        self.bias = nn.Parameter(torch.empty(offset)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, param: nn.Parameter, source, part: str) -> None:
        """Copy this rank's rows of one checkpoint matrix (or bias) into its place in param;
        source is a safetensors slice (only those rows are read) or a tensor."""
        start, length = self.shards[part]
        offset = self.part_offsets[part]
        param.data[offset : offset + length].copy_(source[start : start + length])

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(list(self.part_sizes.values()), dim=-1)
# --8<-- [end:column]


# --8<-- [start:row]
class RowParallelLinear(nn.Module):
    """A matmul whose input features are split across ranks: each rank multiplies its share and
    an all-reduce adds the partial outputs (the bias is added once, after it)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.tp = tp
        self.start, length = tp.shard(in_features, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, length))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out

    def load(self, param: nn.Parameter, source, part: str | None = None) -> None:
        """This rank's columns of the weight; the whole bias."""
        if param is self.bias:
            param.data.copy_(source[:])
        else:
            param.data.copy_(source[:, self.start : self.start + param.shape[1]])
# --8<-- [end:row]
