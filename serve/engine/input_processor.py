"""From what a user sends (text, token ids or a chat conversation) to checked token ids.

One input path for the server and the offline API. It runs wherever the caller likes: the
server calls it in a worker thread, so that tokenizing a huge prompt or rendering a chat template
stalls neither the event loop nor the engine's step loop.
"""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from serve.engine.errors import InvalidRequestError, prompt_too_long
from serve.sampling_params import SamplingParams


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
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            text = prompt
        else:
            ids, text = list(prompt), None
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
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
            # The template already holds every special token, so none are added while tokenizing.
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        except Exception as error:  # the template rejects the conversation (jinja2 raises its own)
            raise InvalidRequestError(f"cannot apply the chat template: {error}",
                                      "messages") from error
        if not ids:
            raise InvalidRequestError("the conversation renders to no tokens", "messages")
        return list(ids)
