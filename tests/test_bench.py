"""The benchmark CLIs: workloads are reproducible, results are complete and counts are exact."""

import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from bench import hf_baseline, serving, throughput
from bench.model_config import vocab_size_of
from bench.results import environment, read_result, speedups, write_result
from bench.workloads import WORKLOADS, Workload, make_requests
from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app

ENV_KEYS = {
    "git_commit",
    "git_tag",
    "git_dirty",
    "device",
    "device_name",
    "torch",
    "cuda",
    "transformers",
    "python",
    "timestamp",
}
SMALL = ["--num-prompts", "4", "--input-len", "3:9", "--output-len", "2:6", "--seed", "1"]

TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


@pytest.fixture
def tiny_config_dir(tmp_path):
    """A config-only model dir: enough for dummy weights and for the HF baseline."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN3))
    return str(tmp_path)


def test_workloads_are_deterministic_and_in_range():
    workload = Workload("t", num_prompts=50, input_len=(3, 9), output_len=(5, 7), seed=3)
    requests = make_requests(workload, vocab_size=100)
    assert requests == make_requests(workload, vocab_size=100)
    assert requests != make_requests(Workload("t", 50, (3, 9), (5, 7), seed=4), vocab_size=100)
    assert len(requests) == 50
    for prompt, params in requests:
        assert 3 <= len(prompt) <= 9 and all(0 <= token < 100 for token in prompt)
        assert 5 <= params.max_tokens <= 7 and params.ignore_eos
    nano = WORKLOADS["nano-vllm"]
    assert (nano.num_prompts, nano.input_len, nano.output_len) == (256, (100, 1024), (100, 1024))


def test_result_env_has_the_keys_and_round_trips(tmp_path):
    env = environment("cpu")
    assert ENV_KEYS <= set(env) and env["device"] == "cpu"
    result = {"kind": "throughput", "env": env, "metrics": {"output_tokens_per_s": 30.0}}
    write_result(tmp_path / "out" / "r.json", result)
    assert read_result(tmp_path / "out" / "r.json") == result
    assert speedups([result, {"metrics": {"output_tokens_per_s": 90.0}}]) == [1.0, 3.0]


def check_throughput_result(path, requests):
    result = json.loads(path.read_text())
    assert result["kind"] == "throughput" and ENV_KEYS <= set(result["env"])
    expected = sum(params.max_tokens for _, params in requests)
    assert result["metrics"]["num_output_tokens"] == expected
    assert result["metrics"]["num_input_tokens"] == sum(len(prompt) for prompt, _ in requests)
    return result


def test_throughput_with_hf_baseline(tiny_config_dir, tmp_path):
    out = tmp_path / "throughput.json"
    throughput.main(
        [
            "--model",
            tiny_config_dir,
            "--load-format",
            "dummy",
            "--device",
            "cpu",
            *SMALL,
            "--hf-baseline",
            "--hf-batch-size",
            "3",
            "--out",
            str(out),
        ]
    )
    requests = make_requests(Workload("custom", 4, (3, 9), (2, 6), seed=1), 256)
    result = check_throughput_result(out, requests)
    assert result["hf_baseline"]["num_output_tokens"] == result["metrics"]["num_output_tokens"]
    assert result["ratio_vs_hf"] > 0


def test_throughput_on_the_fixture_model(qwen3_dir, tmp_path):
    out = tmp_path / "throughput.json"
    throughput.main(
        ["--model", str(qwen3_dir), "--device", "cpu", *SMALL, "--warmup", "--out", str(out)]
    )
    check_throughput_result(
        out,
        make_requests(Workload("custom", 4, (3, 9), (2, 6), seed=1), vocab_size_of(str(qwen3_dir))),
    )


def test_hf_baseline_standalone(tiny_config_dir, tmp_path):
    out = tmp_path / "hf.json"
    hf_baseline.main(["--model", tiny_config_dir, *SMALL, "--out", str(out)])
    metrics = read_result(out)["metrics"]
    # Only each request's own output counts, though every row runs to the batch's longest.
    assert metrics["num_output_tokens"] < metrics["num_padded_output_tokens"]


def fake_openai_app() -> FastAPI:
    """Streams max_tokens one-token chunks, then usage, like /v1/completions with ignore_eos."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(body: dict):
        if body.get("model") != "fake":
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        count = body["max_tokens"]

        def events():
            for index in range(count):
                finish = "length" if index == count - 1 else None
                choice = {"index": 0, "text": "x", "finish_reason": finish}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": count}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@contextmanager
def running(app: FastAPI):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def fake_server():
    with running(fake_openai_app()) as base_url:
        yield base_url


def check_serving_result(path, model: str, vocab_size: int) -> dict:
    result = read_result(path)
    metrics = result["metrics"]
    requests = make_requests(Workload("c", 4, (3, 9), (2, 6), seed=1), vocab_size)
    expected = sum(params.max_tokens for _, params in requests)
    assert result["kind"] == "serving" and result["model"] == model
    assert (metrics["completed"], metrics["failed"], metrics["output_len_mismatches"]) == (4, 0, 0)
    assert metrics["total_output_tokens"] == expected
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = metrics[name]
        assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"]
    assert metrics["ttft_ms"]["p99"] <= metrics["e2e_ms"]["p99"]
    return result


@pytest.mark.parametrize("rate", ["inf", "50"])
def test_serving_against_a_streaming_server(fake_server, tmp_path, rate):
    out = tmp_path / "serving.json"
    serving.main(
        [
            "--base-url",
            fake_server,
            "--vocab-size",
            "100",
            *SMALL,
            "--request-rate",
            rate,
            "--max-concurrency",
            "2",
            "--out",
            str(out),
        ]
    )
    check_serving_result(out, "fake", vocab_size=100)


def test_serving_against_the_real_server(qwen3_dir, tmp_path):
    engine = AsyncEngine(LLMEngine(EngineConfig(str(qwen3_dir), device="cpu")))
    out = tmp_path / "serving.json"
    with running(build_app(engine)) as base_url:
        serving.main(["--base-url", base_url, *SMALL, "--out", str(out)])
    check_serving_result(out, str(qwen3_dir), vocab_size_of(str(qwen3_dir)))


def test_serving_counts_failures(fake_server, tmp_path):
    out = tmp_path / "serving.json"
    serving.main(
        [
            "--base-url",
            fake_server,
            "--model",
            "other",
            "--vocab-size",
            "100",
            *SMALL,
            "--out",
            str(out),
        ]
    )
    result = read_result(out)
    assert result["metrics"]["failed"] == 4 and result["metrics"]["ttft_ms"]["p50"] is None
    assert result["errors"] and "404" in result["errors"][0]
