"""After each sampled token: detokenize, decide whether the request stops, and report it."""

from transformers import PreTrainedTokenizerBase

from serve.engine.detokenizer import IncrementalDetokenizer
from serve.engine.request import CompletionOutput, Request, RequestOutput, RequestStatus


class OutputProcessor:
    """Owns the per-request detokenizers and every stopping rule (EOS, stop ids, stop strings,
    max_tokens; max_tokens never lets a request outgrow the context)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.num_chars_sent: dict[str, int] = {}

    def add_request(self, request: Request) -> None:
        if self.tokenizer is not None:
            self.detokenizers[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids
            )
        self.num_chars_sent[request.request_id] = 0

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
        """The full output so far plus the text that became safe to show in this step."""
        rid = request.request_id
        sent = self.num_chars_sent[rid]
        safe_end = len(request.output_text)
        if not request.finished and request.params.stop:
            # Hold back a tail that could still grow into a stop string.
            safe_end -= max(len(s) for s in request.params.stop) - 1
        safe_end = max(safe_end, sent)
        self.num_chars_sent[rid] = safe_end
        if request.finished:
            self.detokenizers.pop(rid, None)
            self.num_chars_sent.pop(rid, None)
        completion = CompletionOutput(
            0, request.output_text, list(request.output_token_ids), request.finish_reason
        )
        return RequestOutput(
            request_id=rid,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=request.finished,
            new_text=request.output_text[sent:safe_end],
            new_token_ids=new_token_ids,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _append_text(self, request: Request, token_id: int) -> None:
        detokenizer = self.detokenizers.get(request.request_id)
        if detokenizer is None:
            return  # no tokenizer: token ids only
        old_len = len(request.output_text)
        request.output_text += detokenizer.add(token_id)
        # only the new text, plus enough old text to complete a stop string, can hold a match
        found = [
            at
            for stop in request.params.stop
            if (at := request.output_text.find(stop, max(0, old_len - len(stop) + 1))) != -1
        ]
        if found:
            request.output_text = request.output_text[: min(found)]
            self._finish(request, "stop")

    @staticmethod
    def _finish(request: Request, reason: str) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
