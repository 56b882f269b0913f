"""After each sampled token: detokenize, decide whether the request stops, and report it."""

from transformers import PreTrainedTokenizerBase

from serve.core.request import CompletionOutput, Request, RequestOutput, RequestStatus
from serve.engine.detokenizer import IncrementalDetokenizer


class OutputProcessor:
    """Owns the per-request detokenizers and every stopping rule (EOS, stop ids, stop strings,
    max_tokens; max_tokens never lets a request outgrow the context)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add_request(self, request: Request) -> None:
        if self.tokenizer is not None:
            self.detokenizers[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids
            )

    # --8<-- [start:process_token]
    def process_token(self, request: Request, token_id: int) -> RequestOutput:
        """Record one new token for `request` and build what this step reports for it."""
        request.output_token_ids.append(token_id)
        params = request.params
        if not params.ignore_eos and token_id in self.eos_ids:
            self._finish(request, "stop")
        elif token_id in params.stop_token_ids:
            self._finish(request, "stop")
        else:  # a stop token's own text is never shown, as in vLLM
            self._append_text(request, token_id)
        if not request.finished and len(request.output_token_ids) >= request.max_tokens:
            self._finish(request, "length")
        return self.make_output(request, [token_id])
    # --8<-- [end:process_token]

    def abort(self, request: Request, error: str | None = None) -> RequestOutput:
        """End the request now; `error` says why when it failed rather than was cancelled."""
        self._finish(request, "abort")
        output = self.make_output(request, [])
        output.error = error
        return output

    def make_output(self, request: Request, new_token_ids: list[int]) -> RequestOutput:
        """This step's new tokens and the text that became safe to show; the whole output once
        the request has finished."""
        unsent = request.unsent_text
        keep = 0  # characters held back: a tail that could still grow into a stop string
        if not request.finished and request.params.stop:
            keep = min(len(unsent), max(len(s) for s in request.params.stop) - 1)
        new_text = unsent[: len(unsent) - keep]
        if new_text:
            request.sent_text.append(new_text)
            request.unsent_text = unsent[len(unsent) - keep :]
        outputs = []
        if request.finished:
            self.detokenizers.pop(request.request_id, None)
            outputs.append(CompletionOutput(0, request.output_text,
                                            list(request.output_token_ids),
                                            request.finish_reason))
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=request.finished,
            new_text=new_text,
            new_token_ids=new_token_ids,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _append_text(self, request: Request, token_id: int) -> None:
        detokenizer = self.detokenizers.get(request.request_id)
        if detokenizer is None:
            return  # no tokenizer: token ids only
        piece = detokenizer.add(token_id)
        if not piece:
            return
        # A stop string can only end in the new piece and start in the held-back text: text
        # reported earlier was at least (longest stop - 1) characters from the end when it went.
        start = len(request.unsent_text)
        request.unsent_text += piece
        found = [at for stop in request.params.stop
                 if (at := request.unsent_text.find(stop, max(0, start - len(stop) + 1))) != -1]
        if found:
            request.unsent_text = request.unsent_text[: min(found)]
            self._finish(request, "stop")

    @staticmethod
    def _finish(request: Request, reason: str) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
