"""Prefix caching in the engine: requests that share a prompt prefix compute it once, and get
exactly the tokens they get without the cache, greedy and seeded, also on a pool so small that
cached pages are evicted and requests preempted; the counters say what was found."""

import pytest

from serve import LLM, SamplingParams
from serve.engine.llm_engine import LLMEngine

PAGE_SIZE = 4
PREFIX = list(range(100, 140))  # 40 tokens, 10 pages, shared by every prompt below
PROMPTS = [PREFIX + [200 + i] * (3 + i) for i in range(6)]
PARAMS = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True)] * 3


def make_llm(model_dir: str, prefix_caching: bool, num_pages: int = 256, **config) -> LLM:
    return LLM(model_dir, device="cpu", page_size=PAGE_SIZE, num_pages=num_pages,
               enable_prefix_caching=prefix_caching, **config)


def run_to_end(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize("num_pages", [256, 24], ids=["roomy", "tight"])
def test_shared_prefixes_give_the_tokens_they_give_without_the_cache(qwen3_dir, num_pages):
    """Four requests run at once; those admitted after the first step find the prefix. In 24
    pages (two or three of these requests), cached pages are evicted and requests preempted."""
    outputs, engines = {}, {}
    for prefix_caching in (False, True):
        llm = make_llm(qwen3_dir, prefix_caching, num_pages, max_num_seqs=4)
        outputs[prefix_caching] = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        engines[prefix_caching] = llm.engine
    assert [o.token_ids for o in outputs[True]] == [o.token_ids for o in outputs[False]]
    assert all(o.num_cached_tokens == 0 for o in outputs[False])
    assert {o.num_cached_tokens for o in outputs[True]} == {0, len(PREFIX)}
    engine = engines[True]
    if num_pages == 24:
        assert engine.scheduler.num_preemptions > 0 and engine.cache.num_evicted_pages > 0
    assert engine.allocator.num_used_pages == 0
    assert engine.allocator.num_evictable_pages == engine.cache.num_cached_pages > 0


@pytest.mark.parametrize("prompt_len", [8, 9])  # with pages of 4: the last token alone, or 4
@pytest.mark.parametrize("params", [PARAMS[0], PARAMS[1]], ids=["greedy", "seeded"])
def test_a_fully_cached_prompt_still_computes_its_last_token(qwen3_dir, prompt_len, params):
    """The same prompt twice: the second finds every whole page but the one holding its last
    token, whose logits it needs, and gives the same tokens."""
    llm = make_llm(qwen3_dir, True)
    prompt = PREFIX[:prompt_len]
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    second = llm.generate([prompt], params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (prompt_len - 1) // PAGE_SIZE * PAGE_SIZE
    assert second.token_ids == first.token_ids


def test_stats_count_lookups_hits_and_cached_pages(qwen3_dir):
    """vLLM's counters: each admission looks up its tokens (queries) and finds some (hits).
    A prompt is cached as soon as its prefill is done, not when its request finishes."""
    engine = make_llm(qwen3_dir, True).engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("a", PREFIX[:10], params)
    engine.step()  # "a" prefills its 10 tokens: 2 full pages go into the cache at once
    assert engine.cache.num_cached_pages == 2
    engine.add_request("b", PREFIX[:10] + [7, 7], params)
    engine.step()  # "b" finds a's 8 tokens while "a" is still decoding
    assert engine.scheduler.find("a") is not None
    assert engine.scheduler.find("b").num_cached_tokens == 8
    stats = engine.take_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 12, 8)
    # b's prefill cached its third page; a's third holds its output, cached when it ends
    assert stats.num_cached_pages == 3
    assert stats.num_pages_used == 3 + 1  # b holds a's first two pages and one of its own
    run_to_end(engine)
    stats = engine.take_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)  # since the last
    # a computed 12 tokens: its third page joins the tree; b computed 14, still 3 pages
    assert stats.num_cached_pages == engine.cache.num_cached_pages == 2 + 1 + 1
    assert stats.num_pages_used == 0


def test_an_aborted_request_leaves_what_it_computed_in_the_cache(qwen3_dir):
    engine = make_llm(qwen3_dir, True).engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("computed", PREFIX[:14], params)
    engine.add_request("queued", PREFIX[20:34], params)
    engine.step()
    engine.step()  # "computed" has 15 tokens computed: 3 full pages
    assert engine.abort_request("computed").finish_reason == "abort"
    assert engine.cache.num_cached_pages == 3 + 3  # "queued" prefilled too (its 14: 3 pages)
    engine.abort_request("queued")
    engine.add_request("again", PREFIX[:14], params)
    engine.step()
    assert engine.scheduler.find("again").num_cached_tokens == 12
    assert engine.allocator.num_used_pages == 4  # "again": 3 cached pages and its own


def test_with_prefix_caching_off_nothing_is_cached(qwen3_dir):
    llm = make_llm(qwen3_dir, False)
    engine = llm.engine
    assert engine.cache is None and engine.scheduler.cache is None
    outputs = [llm.generate([PREFIX], PARAMS[0], use_tqdm=False)[0] for _ in range(2)]
    assert [o.num_cached_tokens for o in outputs] == [0, 0]
    engine.add_request("x", PREFIX, PARAMS[0])
    run_to_end(engine)
    stats = engine.take_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)
    assert stats.num_cached_pages == 0
    assert engine.allocator.num_free_pages == 256  # every page back on the free list


def test_reset_prefix_cache_forgets_every_prompt(qwen3_dir):
    llm = make_llm(qwen3_dir, True)
    llm.generate(PROMPTS[:2], PARAMS[:2], use_tqdm=False)
    assert llm.engine.cache.num_cached_pages > 0
    assert llm.reset_prefix_cache()
    assert llm.engine.cache.num_cached_pages == 0
    assert llm.engine.allocator.num_free_pages == 256
    again = llm.generate(PROMPTS[:1], PARAMS[:1], use_tqdm=False)
    assert again[0].num_cached_tokens == 0


def test_the_server_reports_cached_tokens_and_counts_them(qwen3_dir):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field), in a response and in a
    stream's usage chunk; /metrics counts lookups and hits in tokens (vLLM's counters)."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from serve.engine.async_engine import AsyncEngine
    from serve.server.app import build_app

    engine = AsyncEngine(make_llm(qwen3_dir, True).engine)
    body = {"prompt": PROMPTS[0], "max_tokens": 2, "ignore_eos": True}
    with TestClient(build_app(engine, model_names="m")) as client:
        first = client.post("/v1/completions", json=body).json()["usage"]
        second = client.post("/v1/completions", json=body).json()["usage"]
        events = client.post("/v1/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}).text
        metrics = {sample.name: sample.value
                   for family in text_string_to_metric_families(client.get("/metrics").text)
                   for sample in family.samples}
    cached = (len(PROMPTS[0]) - 1) // PAGE_SIZE * PAGE_SIZE
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"] == {"cached_tokens": cached}
    usage_event = [line for line in events.split("\n\n") if '"usage"' in line][-1]
    assert f'"prompt_tokens_details":{{"cached_tokens":{cached}}}' in usage_event
    assert metrics["nanoserve:prefix_cache_queries_total"] == 3 * len(PROMPTS[0])
    assert metrics["nanoserve:prefix_cache_hits_total"] == 2 * cached
    assert metrics["nanoserve_prefix_cache_pages"] > 0


def test_a_cache_salt_keeps_one_clients_prompts_from_another(qwen3_dir):
    """cache_salt (vLLM's extra field, on both endpoints): a prompt another client cached is
    not found under another salt, nor without one, so cached_tokens reveals nothing of it; the
    same salt shares as before. An empty salt is refused."""
    from fastapi.testclient import TestClient

    from serve.engine.async_engine import AsyncEngine
    from serve.server.app import build_app

    engine = AsyncEngine(make_llm(qwen3_dir, True).engine)
    victim = {"prompt": PROMPTS[0], "max_tokens": 1}
    chat = {"messages": [{"role": "user", "content": "my PIN is 4711"}], "max_tokens": 1}

    def cached(path: str, body: dict, salt: str | None) -> int:
        salted = {**body, "cache_salt": salt} if salt is not None else body
        response = client.post(path, json=salted)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    with TestClient(build_app(engine, model_names="m")) as client:
        for path, body in [("/v1/completions", victim), ("/v1/chat/completions", chat)]:
            assert cached(path, body, "victim-salt") == 0
            assert cached(path, body, "prober-salt") == 0
            assert cached(path, body, None) == 0
            assert cached(path, body, "victim-salt") > 0  # the owner still shares with itself
        refused = client.post("/v1/completions", json={**victim, "cache_salt": ""})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt"
