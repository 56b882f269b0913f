"""A model without a tokenizer (a config with dummy weights, as benchmarks use) still streams a
chunk per step that produced tokens (steps its reader fell behind on merged into one, as vLLM
does), so that online benchmarks can time them."""

import json
import shutil

from fastapi.testclient import TestClient

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app


def test_token_id_prompts_stream_a_chunk_per_step(qwen3_dir, tmp_path):
    shutil.copy(f"{qwen3_dir}/config.json", tmp_path / "config.json")  # no tokenizer files
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy",
                                                device="cpu")))
    with TestClient(build_app(engine, model_names="m")) as client:
        body = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 9, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        chunks = [json.loads(line[len("data: "):]) for line in lines]
        with_choices = [c for c in chunks if c["choices"]]
        assert 1 <= len(with_choices) <= 9  # one per step, or fewer where steps merged
        assert chunks[-1]["usage"]["completion_tokens"] == 9
        text = client.post("/v1/completions", json={**body, "stream": False}).json()
        assert text["usage"]["completion_tokens"] == 9
