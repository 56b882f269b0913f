"""The demo models' tokenizer: a byte-level BPE with ChatML's special tokens, trained on this
Python's standard library (so nothing is downloaded), and that corpus itself."""

import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)  # ids 0, 1, 2: the trainer adds them first

# ChatML, the format Qwen models are trained on. The assistant turn ends with <|im_end|>, which is
# why that token (not <|endoftext|>) is the end-of-sequence token a chat reply stops on.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (the GPT-2/Qwen kind) with ChatML special tokens."""
    num_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < num_bytes + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {num_bytes + len(SPECIAL_TOKENS)} "
            f"(one token per byte plus {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    bpe = Tokenizer(models.BPE())
    # Byte-level: text is split into bytes before merging, so every string encodes (there is no
    # unknown token) and decoding gives back exactly the string that went in.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        # The "clean up" pass deletes spaces before punctuation, which breaks the round trip.
        clean_up_tokenization_spaces=False,
    )


def corpus_from_stdlib(max_bytes: int) -> list[str]:
    """The text of this Python's standard-library .py files, in path order, at most max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in stdlib_sources(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # a few test files are deliberately not UTF-8
            continue
        data = text.encode("utf-8")
        if total + len(data) > max_bytes:
            texts.append(data[: max_bytes - total].decode("utf-8", errors="ignore"))
            break
        texts.append(text)
        total += len(data)
    if not texts:
        raise RuntimeError(f"found no readable .py files under {root}")
    return texts


def stdlib_sources(root: Path) -> list[Path]:
    """Every .py file under root, sorted, skipping installed packages."""
    skip = {"site-packages", "dist-packages", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        found += [Path(dirpath, name) for name in filenames if name.endswith(".py")]
    return sorted(found)
