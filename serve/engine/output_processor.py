"""The server side of each step: turn the core's new tokens into text, apply stop strings, report.

The core ends a request at a token (EOS, a stop token, max_tokens); text is decided here, where
the tokenizer is. A request whose text meets a stop string ends here, and the engine tells the
core to stop it too.
"""

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from serve.engine.detokenizer import IncrementalDetokenizer
from serve.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from serve.messages import CoreOutput, LogprobsColumns
from serve.sampling_params import SamplingParams


@dataclass
class RequestState:
    """What the server side keeps of one request. The text is the pieces already reported
    (joined once, at the end) and the tail held back because it could still grow into a stop
    string: appending to one string every step would copy the whole text every step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    sent_text: list[str] = field(default_factory=list)
    unsent_text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def text(self) -> str:
        return "".join(self.sent_text) + self.unsent_text


class OutputProcessor:
    """Owns every request's detokenizer and text, and the stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        detokenizer = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids)
                       if self.tokenizer is not None else None)
        self.requests[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, params, detokenizer,
            logprobs=[] if params.logprobs is not None else None)

    # --8<-- [start:process]
    def process(self, output: CoreOutput) -> RequestOutput:
        """Record the core's new tokens for one request and build what this step reports."""
        state = self.requests[output.request_id]
        state.token_ids += output.new_token_ids
        state.num_cached_tokens = output.num_cached_tokens
        state.finish_reason = output.finish_reason
        new_logprobs = _token_logprobs(output.new_logprobs) if output.new_logprobs else []
        new_ids = output.new_token_ids
        stopped = output.finish_reason == "stop"  # EOS or a stop token: its text is never shown
        for kept, token_id in enumerate(new_ids[:-1] if stopped else new_ids, 1):
            if self._append_text(state, token_id):
                # a stop string: the tokens after the one that completed it are dropped (a
                # verify step brings several at once)
                del state.token_ids[len(state.token_ids) - len(new_ids) + kept :]
                new_ids, new_logprobs = new_ids[:kept], new_logprobs[:kept]
                break
        return self._report(state, new_ids, new_logprobs, output)
    # --8<-- [end:process]

    def abort(self, request_id: str, error: str | None = None,
              error_param: str | None = None) -> RequestOutput | None:
        """End the request now; `error` says why when it failed rather than was cancelled, and
        `error_param` which field of the request was at fault, when one was."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        state.finish_reason = "abort"
        output = self._report(state, [], [])
        output.error, output.error_param = error, error_param
        return output

    def _report(self, state: RequestState, new_token_ids: list[int],
                new_logprobs: list[TokenLogprobs],
                core_output: CoreOutput | None = None) -> RequestOutput:
        """This step's new tokens and the text that became safe to show; the whole output once
        the request has finished."""
        if state.logprobs is not None:
            state.logprobs += new_logprobs
        finished = state.finish_reason is not None
        new_text = state.unsent_text
        if not finished and state.params.stop:
            # held back: a tail that could still grow into a stop string
            keep = min(len(new_text), max(len(s) for s in state.params.stop) - 1)
            new_text = new_text[: len(new_text) - keep]
        if new_text:
            state.sent_text.append(new_text)
            state.unsent_text = state.unsent_text[len(new_text) :]
        outputs = []
        if finished:
            del self.requests[state.request_id]
            outputs.append(CompletionOutput(
                0, state.text, state.token_ids, state.finish_reason, state.logprobs,
                sum(t.logprob for t in state.logprobs) if state.logprobs is not None else None))
        prompt_logprobs = None  # on the output that brings them, and on the finished one
        if core_output is not None and core_output.prompt_logprobs is not None:
            prompt_logprobs = state.prompt_logprobs = [
                None, *_token_logprobs(core_output.prompt_logprobs)]
        elif finished:
            prompt_logprobs = state.prompt_logprobs
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs,
                             finished, new_text, new_token_ids,
                             num_cached_tokens=state.num_cached_tokens,
                             new_logprobs=new_logprobs if state.logprobs is not None else [],
                             prompt_logprobs=prompt_logprobs)

    @staticmethod
    def _append_text(state: RequestState, token_id: int) -> bool:
        """Detokenize one token; True when the text now meets a stop string (cut before it)."""
        if state.detokenizer is None:
            return False  # no tokenizer: token ids only
        piece = state.detokenizer.add(token_id)
        if not piece:
            return False
        if not state.params.stop:  # the usual request: nothing to search
            state.unsent_text += piece
            return False
        # A stop string can only end in the new piece and start in the held-back text: text
        # reported earlier was at least (longest stop - 1) characters from the end when it went.
        start = len(state.unsent_text)
        state.unsent_text += piece
        found = [at for stop in state.params.stop
                 if (at := state.unsent_text.find(stop, max(0, start - len(stop) + 1))) != -1]
        if not found:
            return False
        state.unsent_text = state.unsent_text[: min(found)]
        state.finish_reason = "stop"
        return True


def _token_logprobs(columns: LogprobsColumns) -> list[TokenLogprobs]:
    """The core's columns as one TokenLogprobs per token."""
    return [TokenLogprobs(token_id, logprob, list(zip(ids, values, strict=True)))
            for token_id, logprob, ids, values in zip(
                columns.token_ids, columns.logprobs, columns.top_ids, columns.top_logprobs,
                strict=True)]
