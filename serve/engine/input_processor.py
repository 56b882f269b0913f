"""From what a user sends (text, token ids or a chat conversation) to checked token ids.

One input path for the server and the offline API. It runs wherever the caller likes: the
server calls it on worker threads (TokenizerPool), so that tokenizing a huge prompt or rendering a
chat template stalls neither the event loop nor the engine's step loop.
"""

import copy
import functools
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from serve.engine.constraints import check_constraint
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
    """A conversation to render with the model's chat template: [{"role", "content"}, ...], and
    the tools the model may call (OpenAI's [{"type": "function", "function": {...}}, ...])."""

    messages: list[dict]
    tools: list[dict] | None = None


Prompt = str | list[int] | ChatPrompt


def prompt_list(prompts: str | list[int] | Sequence[str | list[int]]) -> list[str | list[int]]:
    """One prompt (a text, or a list of token ids) or several, as a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    return [prompts] if prompts and isinstance(prompts[0], int) else prompts


@dataclass(frozen=True)
class EngineInput:
    """A request the engine can queue as is: token ids, and every limit resolved."""

    prompt_token_ids: list[int]
    prompt: str | None  # the text, when the prompt came as text
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what is left of the context

    def for_sequence(self, index: int) -> "EngineInput":
        """Sequence `index` of the n this prompt asks for (SamplingParams.for_sequence)."""
        return replace(self, params=self.params.for_sequence(index))


@dataclass
class InputProcessor:
    """Tokenizes, renders chat templates, and checks a request against the model's limits."""

    tokenizer: PreTrainedTokenizerBase | None
    vocab_size: int
    max_model_len: int

    def copy(self) -> "InputProcessor":
        """The same processor with a tokenizer of its own, for another thread (a fast
        tokenizer is not meant to be called from two threads at once)."""
        return replace(self, tokenizer=copy.deepcopy(self.tokenizer))

    # --8<-- [start:process]
    def process(self, prompt: Prompt, params: SamplingParams) -> EngineInput:
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer, and this model has none: "
                                      "use stop_token_ids", "stop")
        self._check_in_vocab(params.stop_token_ids, "stop_token_ids", "stop_token_ids")
        self._check_in_vocab(params.logit_bias or (), "logit_bias token ids", "logit_bias")
        if params.top_k > self.vocab_size:
            raise InvalidRequestError(f"top_k must be -1 (every token) or in [1, {self.vocab_size}]"
                                      f" (the vocabulary's size), got {params.top_k}", "top_k")
        if params.structured_outputs is not None:
            if self.tokenizer is None:  # (a grammar is matched against the tokens' text)
                raise InvalidRequestError("structured output needs a tokenizer, and this model "
                                          "has none", "structured_outputs")
            check_constraint(params.structured_outputs)
        text, token_ids = self._token_ids(prompt)  # (the cheap checks first)
        # max_tokens is resolved here and only here: unset means "until the context is full".
        # (0 is a request for the prompt alone: its log-probabilities, or its echo)
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - len(token_ids)
            if max_tokens < 1:
                raise prompt_too_long(len(token_ids), 1, self.max_model_len)
        if len(token_ids) + max_tokens > self.max_model_len:
            raise prompt_too_long(len(token_ids), max_tokens, self.max_model_len)
        return EngineInput(token_ids, text, params, max_tokens)
    # --8<-- [end:process]

    def _token_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, ChatPrompt):
            return None, self.render_chat(prompt.messages, prompt.tools)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids as the "
                                          "prompt", "prompt")
            text, ids = prompt, self.encode(prompt, add_special_tokens=True)
        else:
            ids, text = list(prompt), None
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(ids) > self.max_model_len:  # before reading every id of a huge list
            raise prompt_too_long(len(ids), 1, self.max_model_len)
        self._check_in_vocab(ids, "prompt token ids", "prompt")
        return text, ids

    def _check_in_vocab(self, token_ids: Iterable[int], what: str, param: str) -> None:
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"{what} must be in [0, {self.vocab_size})", param)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The conversation's token ids, ending with the assistant's header. A special-token
        string typed in a message's content or name is tokenized as text, so only the template
        writes control tokens. The tools go to a template that renders them, and only to one."""
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions "
                                      "instead", "messages")
        tools = self._template_tools(tools)
        text = self._apply_chat_template(messages, tools)
        # The template already holds every special token, so none are added while tokenizing.
        # This is also where a huge conversation is refused after a prefix, before any work below.
        ids = self.encode(text, add_special_tokens=False)
        # Tokenized whole, "<|im_end|>" typed in a message becomes the control token, and a user
        # can end their turn and forge a system one. Only a conversation holding such a string
        # (one regex scan finds it) is tokenized again, in pieces, so every other one keeps
        # exactly the ids of one pass over the render, as the model's own tokenizer gives them.
        # (transformers' apply_chat_template(sanitize_control_tokens=True) only tokenizes inside
        # the template call, where encode's prefix cut cannot refuse a huge conversation.)
        places = self._special_text_places(messages)
        if places:
            ids = self._encode_typed_specials_as_text(messages, places, text, ids, tools)
        if not ids:
            raise InvalidRequestError("the conversation renders to no tokens", "messages")
        return ids

    def _template_tools(self, tools: list[dict] | None) -> list[dict] | None:
        """The tools to render, if the template renders tools at all (one that never names
        `tools` cannot); refused if they hold a special-token string, which the template would
        copy into the prompt as a control token (their text is not split out like a message's)."""
        if not tools or "tools" not in str(self.tokenizer.chat_template):
            return None
        found = self._special_text.search(json.dumps(tools, ensure_ascii=False))
        if found:
            raise InvalidRequestError(f"tools hold the special token {found.group()!r}, which "
                                      "this model's chat template would render as one: remove "
                                      "special-token strings from the tools", "tools")
        return tools

    def _apply_chat_template(self, messages: list[dict], tools: list[dict] | None) -> str:
        with_tools = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False, **with_tools)
        except Exception as error:  # the template rejects the conversation (jinja2 raises its own)
            raise InvalidRequestError(f"cannot apply the chat template: {error}",
                                      "messages") from error

    @functools.cached_property
    def _special_text(self) -> re.Pattern:
        """Matches any of the tokenizer's special-token strings, the longest first (so a refusal
        names a whole token)."""
        tokens = {token.content for token in self.tokenizer.added_tokens_decoder.values()
                  if token.special}
        tokens.update(self.tokenizer.all_special_tokens)
        return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")

    def _special_text_places(self, messages: list[dict]) -> list[tuple[int, str]]:
        """(message index, key) of each user-typed string holding a special-token string."""
        return [(index, key) for index, message in enumerate(messages)
                for key in ("content", "name")  # what a user types; the role is one of a few
                if isinstance(message.get(key), str) and self._special_text.search(message[key])]

    def _encode_typed_specials_as_text(self, messages: list[dict], places: list[tuple[int, str]],
                                       text: str, whole_ids: list[int],
                                       tools: list[dict] | None = None) -> list[int]:
        """The ids of `text`, the render of `messages`, with the strings at `places` tokenized as
        plain text and the template's own text as before; refused where that is not possible."""
        # encode's prefix cut counts each typed special string as one token, so a render of them
        # gets past it; as text they are more tokens, so one already too long is refused here,
        # and the work below is only ever done on a prompt that fits the context.
        if len(whole_ids) > self.max_model_len:
            raise prompt_too_long(len(whole_ids), 1, self.max_model_len)
        pieces = self._split_render(messages, places, tools)
        # The template must have copied each string verbatim: one that trims or rewrites it is
        # refused rather than guessed at, since what it wrote may still hold the special text.
        if "".join(pieces) != text:
            raise self._refusal(messages, places, "this model's chat template changes message "
                                "text instead of copying it")
        ids = []
        for number, piece in enumerate(pieces):
            if number % 2:
                ids += self.tokenizer.encode(piece, add_special_tokens=False,
                                             split_special_tokens=True)
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
        # A piece tokenized alone may differ from the same text inside the whole only at its
        # edges: for a byte-level BPE at most in how a run of whitespace splits (the same text),
        # but a SentencePiece tokenizer adds a space before a text's start (other text). So the
        # ids must spell what one pass gave (the typed special strings, as text, decode the same).
        if self.tokenizer.decode(ids) != self.tokenizer.decode(whole_ids):
            raise self._refusal(messages, places, "this model's tokenizer would change the text "
                                "around it")
        return ids

    def _split_render(self, messages: list[dict], places: list[tuple[int, str]],
                      tools: list[dict] | None) -> list[str]:
        """The render of `messages` in pieces: the template's text at even indices, the strings
        at `places` at odd ones, wherever the template put them."""
        # Where the template puts each string is found, not guessed: it renders again with a
        # placeholder no user can type (a fresh random nonce) in place of each string.
        nonce = secrets.token_hex(16)
        marked = [dict(message) for message in messages]
        strings = {}
        for number, (index, key) in enumerate(places):
            placeholder = f"[{nonce}:{number}]"
            strings[placeholder] = messages[index][key]
            marked[index][key] = placeholder
        pattern = "(" + "|".join(map(re.escape, strings)) + ")"
        return [strings.get(piece, piece)
                for piece in re.split(pattern, self._apply_chat_template(marked, tools))]

    def _refusal(self, messages: list[dict], places: list[tuple[int, str]],
                 why: str) -> InvalidRequestError:
        index, key = places[0]
        token = self._special_text.search(messages[index][key]).group()
        return InvalidRequestError(
            f"messages[{index}].{key} holds the special token {token!r}, which must stay plain "
            f"text, and {why}: remove special-token strings from the messages", "messages")

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
