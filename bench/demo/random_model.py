"""Build a tiny random model directory that nanoserve can serve without downloading anything.

The weights are random, so the model talks noise; what matters is that the directory has exactly
the shape of a real Hugging Face checkpoint (config.json, model.safetensors, tokenizer files, a
chat template), so every code path from loading to detokenizing runs for real.

    python -m bench.demo.random_model --out .models/tiny-qwen3
"""

import argparse
import inspect
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from bench.demo.tokenizer import END_OF_TEXT, corpus_from_stdlib, train_tokenizer

ARCH_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "qwen3": Qwen3Config,
    "qwen2": Qwen2Config,  # q/k/v projections always carry a bias in this architecture
    "llama": LlamaConfig,
}

TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)

# Each architecture with the choices its real checkpoints make (Qwen3-0.6B, Qwen2.5-0.5B,
# Llama-3.1-8B), so the tiny models exercise the same code paths as the real ones.
ARCH_DEFAULTS: dict[str, dict] = {
    "qwen3": dict(tie_word_embeddings=True, rope_theta=1_000_000.0),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1_000_000.0),
    "llama": dict(tie_word_embeddings=False, rope_theta=500_000.0),
}

# Llama 3.1 stretches RoPE's low frequencies by `factor` beyond the length it was pretrained on.
LLAMA3_ROPE_SCALING = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0
)

# RMSNorm gives the last hidden vector a norm of about sqrt(hidden_size), and a logit is its dot
# product with an embedding row, so logits have a spread of about sqrt(hidden_size) * std. At the
# usual std of 0.02 a tiny model's logits are nearly flat (greedy repeats one token, and near-ties
# let rounding flip the argmax); this target makes the winner clear.
TARGET_LOGIT_STD = 1.6

# transformers 5 keeps RoPE's theta and scaling together in one `rope_parameters` dict;
# transformers 4 spreads them over `rope_theta` and `rope_scaling`.
_USES_ROPE_PARAMETERS = "rope_parameters" in inspect.signature(Qwen3Config.__init__).parameters


def build_model_dir(
    out_dir: str | os.PathLike,
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Write a random `arch` model sized to `tokenizer` as a Hugging Face directory; return it."""
    config = make_config(arch, tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _randomize_defaults(model, config.initializer_range)
    model.to(dtype)
    # A real Qwen3 stops on either token: <|im_end|> ends a chat turn, <|endoftext|> a document.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, config.pad_token_id],
        pad_token_id=config.pad_token_id,
    )
    out = Path(out_dir)
    model.save_pretrained(out)  # config.json, generation_config.json, model.safetensors
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    return out


def make_config(arch: str, tokenizer: PreTrainedTokenizerFast, **overrides) -> PretrainedConfig:
    """The tiny Hugging Face config for `arch`, with `overrides` applied on top."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCH_CONFIGS)}")
    fields = {**TINY_SIZES, **ARCH_DEFAULTS[arch], **overrides}
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("initializer_range", TARGET_LOGIT_STD / math.sqrt(fields["hidden_size"]))
    fields.update(
        bos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TEXT),  # as in Qwen's configs
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "qwen2":
        _drop_head_dim(fields)
    scaling = None
    if arch == "llama":
        # The scaled context is exactly max_position_embeddings; a small original length means
        # even short test prompts cross into the stretched frequencies.
        original = int(fields["max_position_embeddings"] // LLAMA3_ROPE_SCALING["factor"])
        scaling = {**LLAMA3_ROPE_SCALING, "original_max_position_embeddings": original}
    theta = fields.pop("rope_theta")
    return ARCH_CONFIGS[arch](**fields, **_rope_fields(theta, scaling))


def _drop_head_dim(fields: dict) -> None:
    """Qwen2 configs have no head_dim: it is always hidden_size / num_attention_heads."""
    head_dim = fields.pop("head_dim", None)
    implied = fields["hidden_size"] // fields["num_attention_heads"]
    if head_dim is not None and head_dim != implied:
        raise ValueError(
            f"qwen2 has no head_dim field: head_dim must be hidden_size / num_attention_heads "
            f"= {implied}, got {head_dim}"
        )


def _rope_fields(theta: float, scaling: dict | None) -> dict:
    """RoPE settings under the names this transformers version uses."""
    if _USES_ROPE_PARAMETERS:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **(scaling or {})}}
    return {"rope_theta": theta, "rope_scaling": scaling}


@torch.no_grad()
def _randomize_defaults(model: torch.nn.Module, std: float) -> None:
    """Move norm weights off 1 and biases off 0, so a loader that skips them fails a test."""
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, std)
        elif param.ndim == 1:  # RMSNorm scales: the only 1-D weights in these models
            param.add_(torch.randn_like(param), alpha=0.1)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        sys.exit(f"{out} already exists; pass --force to rebuild it")
    started = time.perf_counter()
    tokenizer = train_tokenizer(corpus_from_stdlib(args.corpus_bytes), args.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename at the end, so an interrupted run never leaves a
    # half-written directory that `make demo-model` would mistake for a finished one.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the finished model is an ordinary directory
    try:
        build_model_dir(
            staging,
            args.arch,
            tokenizer,
            seed=args.seed,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads,
            num_key_value_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            max_position_embeddings=args.max_position_embeddings,
        )
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    print(f"wrote a random {args.arch} model (vocab {len(tokenizer)}) to {out} in {seconds:.1f}s")
    print("its weights are random, so what it generates is noise: it exists to run the engine")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo.random_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument("--arch", choices=sorted(ARCH_CONFIGS), default="qwen3")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument(
        "--corpus-bytes",
        type=int,
        default=3_000_000,
        help="how much standard-library source to train the tokenizer on",
    )
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=768)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
