"""Errors the engine raises for requests it cannot serve (the server turns them into HTTP 400s).

Plain exception types whose args are all they carry, so they survive pickling when the engine
runs in another process.
"""


class InvalidRequestError(ValueError):
    """A request the engine refuses. args: (message, param), param naming the request field
    to change (prompt, max_tokens, stop, ...) or None."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def param(self) -> str | None:
        return self.args[1] if len(self.args) > 1 else None


class PromptTooLongError(InvalidRequestError):
    """The prompt plus the tokens asked for do not fit in the model's context window."""


def prompt_too_long(num_prompt_tokens: int, num_completion_tokens: int,
                    max_model_len: int) -> PromptTooLongError:
    total = num_prompt_tokens + num_completion_tokens
    # The same wording as OpenAI, so clients that parse it keep working.
    return PromptTooLongError(
        f"This model's maximum context length is {max_model_len} tokens. "
        f"However, you requested {total} tokens ({num_prompt_tokens} in the prompt, "
        f"{num_completion_tokens} in the completion). "
        "Please reduce the length of the prompt or completion.", "prompt")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or a step raised), so it cannot serve a request."""


class EngineShuttingDownError(EngineDeadError):
    """The server is shutting down: it admits nothing new, and ends what is still queued."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (the engine goes on serving the others)."""
