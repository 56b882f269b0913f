"""Incremental detokenization: turn one more token id into the text it adds."""

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

CONTEXT_TOKENS = 5  # prompt tokens decoded alongside, so a word's leading space comes out right


class IncrementalDetokenizer:
    """Decodes a growing token list without re-decoding all of it every step.

    A token can end in the middle of a UTF-8 character, and some tokenizers change how a token
    reads depending on what comes before it. So we decode a short window twice (with and without
    the newest tokens) and emit the difference, holding text back while it ends in a broken
    character (U+FFFD). A fast (Rust) tokenizer does the same inside its own `DecodeStream`, one
    call per token and several times quicker: at 256 requests a step, that is milliseconds.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        context = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust core
        self.stream = (DecodeStream(ids=context, skip_special_tokens=True)
                       if self.backend is not None else None)
        self.token_ids = context
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.token_ids)  # tokens before this are already emitted

    def add(self, token_id: int) -> str:
        """Append one token and return the text that is now final."""
        if self.stream is not None:
            return self.stream.step(self.backend, token_id) or ""
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.token_ids[self.prefix_offset : self.read_offset],
                        skip_special_tokens=True)
        full = decode(self.token_ids[self.prefix_offset :], skip_special_tokens=True)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an unfinished character, or a token with no text (a special token)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix) :]
