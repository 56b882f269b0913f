"""The output processor reports each step's new part only, and cuts at stop strings that may
span any number of detokenized pieces."""

from hypothesis import given
from hypothesis import strategies as st

from serve.engine.output_processor import OutputProcessor
from serve.messages import CoreOutput
from serve.sampling_params import SamplingParams


class PieceDetokenizer:
    """Token id i reads as pieces[i]."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def add(self, token_id: int) -> str:
        return self.pieces[token_id]


def run(pieces: list[str], stop: list[str]):
    processor = OutputProcessor(tokenizer=None)
    params = SamplingParams(max_tokens=len(pieces), stop=stop, ignore_eos=True)
    processor.add_request("r", None, [1, 2, 3], params)
    state = processor.requests["r"]
    state.detokenizer = PieceDetokenizer(pieces)
    outputs = []
    for token_id in range(len(pieces)):
        last = token_id == len(pieces) - 1  # the core ends it at max_tokens
        outputs.append(processor.process(CoreOutput("r", [token_id], "length" if last else None)))
        longest = max((len(s) for s in stop), default=1)
        assert len(state.unsent_text) <= max(longest - 1, 0) or outputs[-1].finished
        if outputs[-1].finished:
            break
    return outputs


def reference(pieces: list[str], stop: list[str]) -> tuple[str, str]:
    """(text, finish reason) by brute force: after each piece, search the whole text so far."""
    text = ""
    for piece in pieces:
        text += piece
        cuts = [at for s in stop if (at := text.find(s)) != -1]
        if cuts:
            return text[: min(cuts)], "stop"
    return text, "length"


@given(pieces=st.lists(st.text(alphabet="ab", max_size=3), min_size=1, max_size=30),
       stop=st.lists(st.text(alphabet="ab", min_size=1, max_size=4), max_size=2))
def test_streamed_text_is_the_final_text_cut_at_the_first_stop(pieces, stop):
    outputs = run(pieces, stop)
    final = outputs[-1]
    assert (final.text, final.finish_reason) == reference(pieces, stop)
    assert "".join(o.new_text for o in outputs) == final.text
    assert not any(s in o.new_text for o in outputs for s in stop)
    # before the end, an output carries its new part only: no copy of everything so far
    assert all(o.outputs == [] and o.token_ids == [] for o in outputs[:-1])
    assert final.token_ids == list(range(len(outputs)))
