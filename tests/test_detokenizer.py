"""Incremental detokenization gives the same text as decoding everything at once."""

import random

from serve.engine.detokenizer import IncrementalDetokenizer


def test_incremental_text_equals_full_decode(tokenizer):
    rng = random.Random(0)
    text = "naïve café — 東京 🚀 def f(x): return x ** 2  # ünïcödé"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    prompt = tokenizer.encode("prompt: ", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)

    for _ in range(20):  # random ids: the concatenation always equals one full decode
        ids = [rng.randrange(len(tokenizer)) for _ in range(30)]
        detok = IncrementalDetokenizer(tokenizer, prompt)
        joined = "".join(detok.add(t) for t in ids)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert joined == full.rstrip("\ufffd") or joined == full


def test_the_stream_and_the_window_give_the_same_text(tokenizer):
    """A fast tokenizer decodes through its DecodeStream; the two-window decode is the fallback
    for any other tokenizer. Both emit exactly the same pieces."""
    rng = random.Random(1)
    prompt = tokenizer.encode("prompt: ", add_special_tokens=False)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(40)]
        streamed = IncrementalDetokenizer(tokenizer, prompt)
        assert streamed.stream is not None
        windowed = IncrementalDetokenizer(tokenizer, prompt)
        windowed.stream = None
        assert [streamed.add(t) for t in ids] == [windowed.add(t) for t in ids]
