"""Find a model (local dir, shipped config, or hub id), build our module, and fill its weights."""

import glob
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from serve.models import model_class_for
from serve.parallel import TensorParallel

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"

# checkpoint name -> (our merged module, the part it fills)
MERGED_PARTS = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                "v_proj": ("qkv_proj", "v"), "gate_proj": ("gate_up_proj", "gate"),
                "up_proj": ("gate_up_proj", "up")}


def resolve_model_path(model: str) -> str:
    """A local directory as is; a shipped config name to its JSON; otherwise a hub download."""
    if os.path.isdir(model):
        return model
    shipped = SHIPPED_CONFIGS / f"{model}.json"
    if shipped.exists():
        return str(shipped)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                        "*.model", "*.txt"])
    except Exception as exc:
        shipped_names = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json")))
        raise ValueError(f"cannot find model {model!r}: not a local directory, not a shipped "
                         f"config ({shipped_names}), and the hub download failed: {exc}") from exc


def load_config(path: str):
    """The HF config of a model directory or of a shipped config file."""
    return AutoConfig.from_pretrained(path)


def build_model(config, path: str, load_format: str, dtype: torch.dtype, device: torch.device,
                seed: int, tp: TensorParallel = TensorParallel()) -> nn.Module:
    """Construct this rank's part of the module directly on the device in the target dtype,
    then load or randomize it."""
    if load_format == "auto":
        load_format = "dummy" if path.endswith(".json") else "safetensors"
    if load_format == "safetensors" and path.endswith(".json"):
        raise ValueError(f"{path} is a shipped config without weights: use --load-format dummy")
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class_for(config)(config, tp)
    finally:
        torch.set_default_dtype(old_dtype)
    if load_format == "dummy":
        fill_random_weights(model, seed)  # the same on every rank: replicated biases agree
    elif load_format == "safetensors":
        load_safetensors(model, path)
    else:
        raise ValueError(f"unknown load format {load_format!r} (auto, safetensors, dummy)")
    return model.eval()


def fill_random_weights(model: nn.Module, seed: int) -> None:
    """Random weights for benchmarks: real shapes and dtype, values that stay finite."""
    device = next(model.parameters()).device
    # Drawn on the device itself: an 8B model's worth of CPU random numbers takes minutes.
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0, 0.02, generator=generator)


def load_safetensors(model: nn.Module, path: str) -> None:
    """Copy each checkpoint tensor into its parameter: q/k/v and gate/up into merged weights, and
    with tensor parallelism only this rank's rows or columns, which are all that is read from
    the file (a safetensors slice reads the bytes it is indexed with)."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    loaded: set[str] = set()
    # A tied LM head is the embedding under a second name, which named_parameters() skips.
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - params.keys()
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name not in tied:  # a tied head is the embedding, already loaded
                        loaded.add(_load_one(name, f.get_slice(name), params, modules))
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint in {path} lacks weights for: {sorted(missing)[:5]} ...")


def _load_one(name: str, source, params: dict, modules: dict) -> str:
    """Load one checkpoint tensor (a safetensors slice, read lazily); return the name of the
    parameter it went into. A module with a `load` method reads its own part of it."""
    module_path, leaf = name.rsplit(".", 1)  # e.g. model.layers.0.self_attn.q_proj, weight
    parent, child = module_path.rsplit(".", 1) if "." in module_path else ("", module_path)
    part = None
    if child in MERGED_PARTS:
        merged_name, part = MERGED_PARTS[child]
        module_path = f"{parent}.{merged_name}"
        name = f"{module_path}.{leaf}"  # the merged weight counts as loaded once any part does
    if name not in params:
        if name.endswith("rotary_emb.inv_freq"):  # old checkpoints store RoPE tables
            return name
        raise ValueError(f"unexpected weight {name!r} in checkpoint")
    load = getattr(modules[module_path], "load", None)
    if load is not None:
        load(params[name], source, part)
    else:
        params[name].copy_(source[:])
    return name

