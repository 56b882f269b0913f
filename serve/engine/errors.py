"""Errors the engine raises for requests it cannot serve (the server turns them into HTTP 400s)."""


class PromptTooLongError(ValueError):
    """The prompt plus the tokens asked for do not fit in the model's context window."""

    def __init__(
        self, num_prompt_tokens: int, num_completion_tokens: int, max_model_len: int
    ) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.num_completion_tokens = num_completion_tokens
        self.max_model_len = max_model_len
        total = num_prompt_tokens + num_completion_tokens
        # The same wording as OpenAI, so clients that parse it keep working.
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, you requested {total} tokens ({num_prompt_tokens} in the prompt, "
            f"{num_completion_tokens} in the completion). "
            "Please reduce the length of the prompt or completion."
        )


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or a step raised), so it cannot serve a request."""
