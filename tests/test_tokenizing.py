"""Tokenizing is bounded and never one queue: a prompt that cannot fit is refused after a prefix,
short prompts overtake long ones, a job whose client left is dropped, and over HTTP a small
request is answered promptly while huge prompts are being refused."""

import asyncio
import threading
import time
from pathlib import Path

import httpx

from serve.engine.errors import PromptTooLongError
from serve.engine.input_processor import (
    CUT_SLACK_TOKENS,
    PREFIX_CHARS_PER_TOKEN,
    ChatPrompt,
    InputProcessor,
)
from serve.engine.tokenizer_pool import TokenizerPool
from serve.sampling_params import SamplingParams
from tests.test_server_lifecycle import make_engine
from tests.test_server_openai_client import ServerThread

SOURCE = (Path(__file__).parent.parent / "serve" / "core" / "scheduler.py").read_text()


class CountingTokenizer:
    """One token per `chars_per_token` characters; remembers the length of every text read."""

    def __init__(self, chars_per_token: int) -> None:
        self.chars_per_token = chars_per_token
        self.read: list[int] = []
        self.chat_template = "{{ messages }}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.read.append(len(text))
        return [1] * -(-len(text) // self.chars_per_token)

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(m["content"] for m in messages)


def test_a_prompt_that_cannot_fit_is_refused_after_a_prefix():
    tokenizer = CountingTokenizer(chars_per_token=3)
    processor = InputProcessor(tokenizer, vocab_size=10, max_model_len=100)
    cut = (100 + 1) * PREFIX_CHARS_PER_TOKEN
    for prompt in ["x" * 4_000_000, ChatPrompt([{"role": "user", "content": "x" * 4_000_000}])]:
        tokenizer.read.clear()
        try:
            processor.process(prompt, SamplingParams(max_tokens=1))
            raise AssertionError("a 4M-character prompt was accepted")
        except PromptTooLongError as error:
            assert "maximum context length is 100 tokens" in str(error)
        assert tokenizer.read == [cut]  # the prefix only, never the whole text


def test_a_long_text_of_long_tokens_is_still_tokenized_whole():
    """Past the cut, but its prefix fits (16 characters a token): no refusal on a guess."""
    tokenizer = CountingTokenizer(chars_per_token=16)
    processor = InputProcessor(tokenizer, vocab_size=10, max_model_len=100)
    text = "x" * (90 * 16)
    assert len(text) > (100 + 1) * PREFIX_CHARS_PER_TOKEN
    result = processor.process(text, SamplingParams(max_tokens=1))
    assert len(result.prompt_token_ids) == 90 and tokenizer.read[-1] == len(text)


def test_the_cut_never_refuses_a_real_prompt_that_fits(tokenizer):
    """With the test BPE: a prompt of exactly max_model_len - 1 tokens, however it is cut."""
    processor = InputProcessor(tokenizer, tokenizer.vocab_size, max_model_len=64)
    ids = tokenizer.encode(SOURCE, add_special_tokens=False)
    for start in range(0, 400, 37):
        text = tokenizer.decode(ids[start : start + 63])
        assert len(processor.encode(text, add_special_tokens=False)) < 64 + CUT_SLACK_TOKENS


def run_pool(coroutine):
    return asyncio.run(coroutine)


class GatedProcessor:
    """An InputProcessor stand-in whose first job waits for a gate; records what it processed."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen: list[str] = []

    def copy(self) -> "GatedProcessor":
        return self

    def process(self, prompt, params):
        if not self.seen:
            self.seen.append(prompt)
            self.gate.wait(10)
        else:
            self.seen.append(prompt)
        return prompt


def test_short_prompts_overtake_long_ones_and_a_departed_client_costs_nothing():
    processor = GatedProcessor()
    pool = TokenizerPool(processor, num_workers=1)

    async def scenario() -> None:
        params = SamplingParams()
        blocker = asyncio.ensure_future(pool.process("first", params))
        await asyncio.sleep(0.1)  # the only worker is busy with it
        long = asyncio.ensure_future(pool.process("l" * 1000, params))
        gone = asyncio.ensure_future(pool.process("g" * 10, params))
        short = asyncio.ensure_future(pool.process("s", params))
        await asyncio.sleep(0.05)
        gone.cancel()  # its client hung up while it waited
        processor.gate.set()
        assert await asyncio.gather(blocker, short, long) == ["first", "s", "l" * 1000]

    try:
        run_pool(scenario())
    finally:
        pool.shutdown()
    assert processor.seen == ["first", "s", "l" * 1000]


def test_huge_prompts_do_not_hold_up_a_small_request(qwen3_dir, monkeypatch):
    """Four prompts of 4 MiB each end in a 400 (context_length_exceeded) while a 2-token request
    is answered within a second of its own work (it used to queue behind them for ~15 s)."""
    huge_started = threading.Event()
    process = InputProcessor.process

    def noting_process(self, prompt, params):
        if len(prompt) > 2**20:
            huge_started.set()
        return process(self, prompt, params)

    monkeypatch.setattr(InputProcessor, "process", noting_process)
    engine = make_engine(qwen3_dir)
    huge = (SOURCE * (4 * 2**20 // len(SOURCE) + 1))[: 4 * 2**20]
    app_args = {"model_names": "m", "max_request_bytes": 16 * 2**20}
    from serve.server.app import build_app

    with ServerThread(build_app(engine, **app_args)) as server:
        base_url = f"http://127.0.0.1:{server.port}"
        small = {"prompt": "hi", "max_tokens": 2}
        httpx.post(f"{base_url}/v1/completions", json=small, timeout=30)  # warm up
        started = time.monotonic()
        httpx.post(f"{base_url}/v1/completions", json=small, timeout=30)
        alone = time.monotonic() - started

        refusals = []

        def send_huge() -> None:
            response = httpx.post(f"{base_url}/v1/completions", timeout=60,
                                  json={"prompt": huge, "max_tokens": 2})
            refusals.append((response.status_code, response.json()["error"]["code"]))

        senders = [threading.Thread(target=send_huge) for _ in range(4)]
        for sender in senders:
            sender.start()
        assert huge_started.wait(30)
        time.sleep(0.3)  # the other huge prompts have arrived by now
        started = time.monotonic()
        response = httpx.post(f"{base_url}/v1/completions", json=small, timeout=30)
        beside_huge = time.monotonic() - started
        for sender in senders:
            sender.join(60)
    assert response.status_code == 200
    assert refusals == [(400, "context_length_exceeded")] * 4
    assert beside_huge < alone + 1.0
