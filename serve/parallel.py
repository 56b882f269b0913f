"""Tensor parallelism's group: which slice of the model this process holds, and the collectives
that join the slices (torch.distributed: NCCL between GPUs, gloo between CPU processes).

With one rank every collective is a no-op, so the model's code reads the same either way.
"""

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A rank that died leaves the others blocked in a collective; gloo gives up after this long.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among `size` ranks that each hold 1/size of every large matrix."""

    rank: int = 0
    size: int = 1
    control: "dist.ProcessGroup | None" = None  # a gloo group, for host objects and integers

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal part of `total` rows (heads, columns)."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor parallel size "
                             f"({self.size})")
        length = total // self.size
        return self.rank * length, length

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x, on every rank (in place)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x side by side along the last dimension, on every rank."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def min(self, value: int) -> int:
        """The smallest of every rank's value (e.g. how many KV pages fit), on every rank."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control)
        return int(tensor.item())

    def broadcast(self, obj=None):
        """Rank 0's obj, on every rank (pickled over the control group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


def join_group(rank: int, size: int, address: str, device: torch.device) -> TensorParallel:
    """Join the ranks at address (tcp://host:port) and return this rank's place."""
    if size == 1:
        return TensorParallel()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) \
        if backend != "gloo" else dist.group.WORLD
    return TensorParallel(rank, size, control)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
