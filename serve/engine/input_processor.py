"""From what a user sends (text, token ids or a chat conversation) to checked token ids.

One input path for the server and the offline API. It runs wherever the caller likes: the
server calls it on worker threads (TokenizerPool), so that tokenizing a huge prompt or rendering a
chat template stalls neither the event loop nor the engine's step loop.
"""

import copy
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from serve.engine.errors import InvalidRequestError, PromptTooLongError, prompt_too_long
from serve.sampling_params import SamplingParams

# A text far longer than the context is refused after tokenizing a prefix of it: real text runs
# 3-5 characters a token, so (max_model_len + 1) x this many characters already hold more tokens
# than the context unless the text is unusual (long runs of spaces, say), and then it is
# tokenized whole. A 4 MiB prompt costs a tokenizer a few seconds; its prefix, milliseconds.
PREFIX_CHARS_PER_TOKEN = 8
# Cutting a text can split its last word, whose pieces may then be a few more tokens than the
# same characters were inside the whole word; this many tokens of slack make the refusal safe.
CUT_SLACK_TOKENS = 16


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the model's chat template: [{"role", "content"}, ...]."""

    messages: list[dict]


Prompt = str | list[int] | ChatPrompt


@dataclass(frozen=True)
class EngineInput:
    """A request the engine can queue as is: token ids, and every limit resolved."""

    prompt_token_ids: list[int]
    prompt: str | None  # the text, when the prompt came as text
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what is left of the context


class InputProcessor:
    """Tokenizes, renders chat templates, and checks a request against the model's limits."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, max_model_len: int
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def copy(self) -> "InputProcessor":
        """The same processor with a tokenizer of its own, for another thread (a fast
        tokenizer is not meant to be called from two threads at once)."""
        return InputProcessor(copy.deepcopy(self.tokenizer), self.vocab_size, self.max_model_len)

    # --8<-- [start:process]
    def process(self, prompt: Prompt, params: SamplingParams) -> EngineInput:
        text, token_ids = self._token_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer, and this model has none: "
                                      "use stop_token_ids", "stop")
        if any(not 0 <= t < self.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")
        # max_tokens is resolved here and only here: unset means "until the context is full".
        max_tokens = params.max_tokens or self.max_model_len - len(token_ids)
        if max_tokens < 1 or len(token_ids) + max_tokens > self.max_model_len:
            raise prompt_too_long(len(token_ids), max(max_tokens, 1), self.max_model_len)
        return EngineInput(token_ids, text, params, max_tokens)
    # --8<-- [end:process]

    def _token_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, ChatPrompt):
            return None, self.render_chat(prompt.messages)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids as the "
                                          "prompt", "prompt")
            ids = self.encode(prompt, add_special_tokens=True)
            text = prompt
        else:
            ids, text = list(prompt), None
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(ids) > self.max_model_len:  # before reading every id of a huge list
            raise prompt_too_long(len(ids), 1, self.max_model_len)
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})",
                                      "prompt")
        return text, ids

    def render_chat(self, messages: list[dict]) -> list[int]:
        """The conversation's token ids, ending with the assistant's header."""
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions "
                                      "instead", "messages")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as error:  # the template rejects the conversation (jinja2 raises its own)
            raise InvalidRequestError(f"cannot apply the chat template: {error}",
                                      "messages") from error
        # The template already holds every special token, so none are added while tokenizing.
        ids = self.encode(text, add_special_tokens=False)
        if not ids:
            raise InvalidRequestError("the conversation renders to no tokens", "messages")
        return ids

    # --8<-- [start:encode]
    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenize text, or refuse it after a prefix when that prefix alone cannot fit."""
        cut = (self.max_model_len + 1) * PREFIX_CHARS_PER_TOKEN
        if len(text) > cut:
            num_prefix_tokens = len(self.tokenizer.encode(text[:cut],
                                                          add_special_tokens=add_special_tokens))
            if num_prefix_tokens > self.max_model_len + CUT_SLACK_TOKENS:
                raise PromptTooLongError(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your prompt is longer: its first {cut} characters alone are "
                    f"{num_prefix_tokens} tokens. Please reduce the length of the prompt.",
                    "prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    # --8<-- [end:encode]
