"""The shapes this rank's part of the model has: the one place that reads head counts and sizes
from the Hugging Face config and divides them among the tensor-parallel ranks."""

from dataclasses import dataclass

from serve.parallel import TensorParallel


@dataclass(frozen=True)
class ModelShapes:
    num_layers: int
    hidden_size: int
    head_dim: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # key/value heads on this rank (and in its KV pool)
    intermediate_size: int  # MLP columns on this rank
    vocab_size: int  # the whole vocabulary (every rank samples from all of it)
    tp: TensorParallel

    @classmethod
    def of(cls, config, tp: TensorParallel = TensorParallel()) -> "ModelShapes":
        """Every rank holds an equal share of the heads and of the MLP's columns (vLLM also
        replicates KV heads when there are fewer than ranks; we require them to divide)."""
        def share(name: str) -> int:
            return tp.shard(getattr(config, name), name)[1]

        return cls(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                   head_dim=head_dim_of(config), num_heads=share("num_attention_heads"),
                   num_kv_heads=share("num_key_value_heads"),
                   intermediate_size=share("intermediate_size"), vocab_size=config.vocab_size,
                   tp=tp)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
