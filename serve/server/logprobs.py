"""Log-probabilities in the API's shapes: the engine reports token ids and numbers
(TokenLogprobs), a client reads tokens as text.

Each token id is decoded alone, as vLLM does, so a character split over several tokens shows
as "\ufffd" in each of its pieces; a chat token's `bytes` are the UTF-8 of that text.
"""

import copy

from transformers import PreTrainedTokenizerBase

from serve.engine.outputs import RequestOutput, TokenLogprobs
from serve.server.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)

# JSON has no -Infinity: a token whose probability underflows to 0 gets OpenAI's stand-in for
# "very unlikely" instead.
LOGPROB_FLOOR = -9999.0

# A token and its log-probabilities; None for a prompt's first token (nothing predicts it)
Scored = tuple[int, TokenLogprobs | None]


class TokenTexts:
    """Each token id's text, decoded alone and remembered: a vocabulary is finite, and a
    response with top_logprobs names up to 21 tokens for every token it has."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        # A copy of its own: the engine's thread detokenizes with the original, and a fast
        # tokenizer is not meant to be called from two threads at once.
        self._tokenizer = copy.deepcopy(tokenizer)
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self._texts:  # (without a tokenizer: vLLM's name for the token)
            self._texts[token_id] = (self._tokenizer.decode([token_id]) if self._tokenizer
                                     else f"token_id:{token_id}")
        return self._texts[token_id]

    def prompt_text(self, output: RequestOutput) -> str:
        """The prompt as text (echo): as sent, or decoded when it came as token ids."""
        if output.prompt is not None:
            return output.prompt
        return self._tokenizer.decode(output.prompt_token_ids) if self._tokenizer else ""


def prompt_scored(output: RequestOutput) -> list[Scored]:
    """The prompt's tokens with their log-probabilities (None where the engine gave none)."""
    logprobs = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
    return list(zip(output.prompt_token_ids, logprobs, strict=True))


def generated_scored(logprobs: list[TokenLogprobs] | None) -> list[Scored]:
    return [(entry.token_id, entry) for entry in logprobs or []]


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


# --8<-- [start:completion_logprobs]
def completion_logprobs(scored: list[Scored], num_top: int, texts: TokenTexts,
                        offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """/v1/completions' logprobs for these tokens, their text_offset counted from `offset`
    (where the first one's text starts in the choice's text), and where the next one starts.
    top_logprobs holds the num_top likeliest tokens and the token itself (OpenAI: "up to
    logprobs + 1 elements"); of two tokens with the same text, the likelier."""
    logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, entry in scored:
        text = texts(token_id)
        logprobs.tokens.append(text)
        logprobs.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
            continue
        top: dict[str, float] = {}
        for top_id, top_logprob in entry.top[:num_top]:
            top.setdefault(texts(top_id), _finite(top_logprob))
        top.setdefault(text, _finite(entry.logprob))
        logprobs.token_logprobs.append(_finite(entry.logprob))
        logprobs.top_logprobs.append(top)
    return logprobs, offset
# --8<-- [end:completion_logprobs]


def chat_logprobs(logprobs: list[TokenLogprobs], num_top: int, texts: TokenTexts) -> ChatLogprobs:
    """/v1/chat/completions' logprobs: per token its text, log-probability and bytes, and the
    num_top likeliest tokens' at its position."""
    content = [TokenLogprob(**_top_logprob(entry.token_id, entry.logprob, texts),
                            top_logprobs=[TopLogprob(**_top_logprob(top_id, top_logprob, texts))
                                          for top_id, top_logprob in entry.top[:num_top]])
               for entry in logprobs]
    return ChatLogprobs(content=content)


def _top_logprob(token_id: int, logprob: float, texts: TokenTexts) -> dict:
    text = texts(token_id)
    return {"token": text, "logprob": _finite(logprob),
            "bytes": list(text.encode("utf-8", "replace"))}


def vllm_prompt_logprobs(scored: list[Scored], num_top: int,
                         texts: TokenTexts) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token {"token id": {logprob, rank, decoded_token}}
    for the token and the num_top likeliest at its position; null for the first token."""
    found: PromptLogprobs = []
    for token_id, entry in scored:
        if entry is None:
            found.append(None)
            continue
        top = entry.top[:num_top]
        ranks = {top_id: rank for rank, (top_id, _) in enumerate(top, 1)}
        tokens = {token_id: entry.logprob}
        for top_id, top_logprob in top:
            tokens.setdefault(top_id, top_logprob)
        found.append({str(token): PromptLogprob(logprob=_finite(logprob), rank=ranks.get(token),
                                                decoded_token=texts(token))
                      for token, logprob in tokens.items()})
    return found
