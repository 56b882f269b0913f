"""Loading the tokenizer (optional: a shipped config has none) and finding the stop tokens."""

import json
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer in a model directory, or None where there is none (dummy benchmark models)."""
    if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(path)
    return None


def eos_token_ids(config, path: str, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """Every id that ends generation: the config's, generation_config.json's and the tokenizer's."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config, "eos_token_id", None))
    gen_config = os.path.join(path, "generation_config.json") if os.path.isdir(path) else ""
    if os.path.exists(gen_config):
        with open(gen_config) as f:
            add(json.load(f).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids
