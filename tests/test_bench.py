"""The benchmark CLIs: workloads are reproducible, results are complete and counts are exact."""

import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from bench import hf_baseline, mixed_step, prefix_eviction, probe, serving, throughput, workloads
from bench import timeline as timeline_module
from bench.course import compare, plot_stages, repeat_throughput, stage_trees, stages
from bench.course.run_files import RunFiles, pack, resolve, stage_folder, unpack
from bench.model_config import vocab_size_of
from bench.results import (
    REPO_ROOT,
    command_line,
    environment,
    read_result,
    result_name,
    short_device_name,
    speedups,
    write_result,
)
from bench.step_hook import StepHook
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


def test_a_conversation_workload_shares_its_prefixes():
    """prefix-chat: every prompt starts with the one system prompt, and a conversation's turn
    resends its previous turn's prompt and reply before its own question."""
    workload = WORKLOADS["prefix-chat"]
    requests = make_requests(workload, vocab_size=1000)
    assert requests == make_requests(workload, vocab_size=1000) and len(requests) == 256
    system = requests[0][0][:2048]
    conversations = 256 // workload.turns
    for index, (prompt, params) in enumerate(requests):
        assert prompt[:2048] == system
        assert 64 <= params.max_tokens <= 192
        if index >= conversations:  # a later turn: the previous one, its reply, a question
            previous, previous_params = requests[index - conversations]
            assert prompt[:len(previous)] == previous
            extra = len(prompt) - len(previous) - previous_params.max_tokens
            assert 32 <= extra <= 128
    assert max(len(p) + params.max_tokens for p, params in requests) <= workload.max_seq_len


def test_another_seed_is_another_sample_of_the_same_workload():
    args = argparse.Namespace(workload="prefix-chat", num_prompts=None, input_len=None,
                              shared_prefix_len=None, turns=None, long_every=None,
                              long_input_len=None,
                              output_len=None, temperature=None, ignore_eos=None, seed=7)
    workload = workloads.workload_from_args(args)
    assert (workload.name, workload.seed) == ("prefix-chat", 7)
    args.num_prompts = 8
    assert workloads.workload_from_args(args).name == "custom"


def test_compare_variants_become_engine_args_and_server_flags():
    label, settings = compare.parse_variant("cache-off:enable_prefix_caching=false,page_size=32")
    assert label == "cache-off"
    assert compare.server_flags(settings) == ["--no-enable-prefix-caching", "--page-size", "32"]
    assert compare.server_flags(["enforce_eager=true"]) == ["--enforce-eager"]


def test_the_workloads_cli_writes_the_requests_the_probe_reads(tiny_config_dir, tmp_path):
    out = tmp_path / "requests.json"
    workloads.main(["--model", tiny_config_dir, "--workload", "course", "--out", str(out)])
    expected = make_requests(WORKLOADS["course"], TINY_QWEN3["vocab_size"])
    assert json.loads(out.read_text()) == [
        {"prompt": prompt, "max_tokens": params.max_tokens, "temperature": params.temperature,
         "ignore_eos": params.ignore_eos} for prompt, params in expected]
    with pytest.raises(FileExistsError):  # never overwrites a requests file
        workloads.main(["--model", tiny_config_dir, "--out", str(out)])


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


def test_results_are_never_overwritten(tmp_path):
    write_result(tmp_path / "r.json", {"a": 1})
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_result(tmp_path / "r.json", {"a": 2})
    assert read_result(tmp_path / "r.json") == {"a": 1}


def test_result_names_say_what_ran():
    env = {"git_commit": "043b376f4b540d13", "git_dirty": False,
           "device_name": "NVIDIA H100 80GB HBM3"}
    assert result_name("step-profile", env, "bs1") == "step-profile-h100-043b376f-bs1.json"
    assert short_device_name("AMD EPYC") == "cpu"
    assert command_line(["/x/y.py", "--a"]) == "python /x/y.py --a"
    assert command_line([str(Path(throughput.__file__)), "--model", "m"]) == \
        "python -m bench.throughput --model m"


def requests_file(tmp_path, vocab_size: int) -> Path:
    requests = make_requests(Workload("custom", 3, (4, 12), (3, 6), seed=2), vocab_size)
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([{"prompt": prompt, "max_tokens": params.max_tokens,
                                 "temperature": params.temperature,
                                 "ignore_eos": params.ignore_eos}
                                for prompt, params in requests]))
    return path


def test_probe_counts_every_step_and_records_a_decode_step(qwen3_dir, tmp_path):
    requests = json.loads(requests_file(tmp_path, vocab_size_of(qwen3_dir)).read_text())
    out, timeline_out = tmp_path / "probe.json", tmp_path / "timeline-v9.9-abc.json"
    result = probe.main(["--model", qwen3_dir, "--load-format", "auto", "--device", "cpu",
                         "--requests", str(tmp_path / "requests.json"), "--out", str(out),
                         "--timeline-out", str(timeline_out)])
    summary = result["summary"]
    prompt_tokens = sum(len(r["prompt"]) for r in requests)
    output_tokens = sum(r["max_tokens"] for r in requests)
    # a paged engine computes no padding and no finished rows
    assert summary["prefill"]["prompt_tokens"] == summary["prefill"]["tokens_computed"] \
        == prompt_tokens
    assert summary["decode"]["idle_rows"] == 0
    assert summary["prefill"]["tokens_out"] + summary["decode"]["tokens_out"] == output_tokens
    assert summary["decode"]["steps"] == max(r["max_tokens"] for r in requests) - 1
    assert result["hooked"] == ["model", "forward", "sample", "output"]
    step = result["decode_step"]
    assert step["rows"] == 3 and step["cpu_ops"] > 10 and step["kernels"] == 0
    timeline = json.loads(timeline_out.read_text())
    assert {p[0] for p in timeline["phases"]} >= {"forward", "sample", "output"}
    png = timeline_module.draw_file(timeline_out)
    assert png.exists() and png.stat().st_size > 10_000


def test_probe_counts_the_tokens_of_a_step_that_never_calls_the_model(qwen3_dir, tmp_path):
    """A replayed CUDA graph runs the model without calling its forward: the probe counts a
    step's tokens where the runner takes them, so such a step is still seen as a decode step."""
    from serve import LLM

    # without overlap scheduling, as the probe builds it
    engine = LLM(qwen3_dir, device="cpu", num_pages=64, overlap_scheduling=False).engine
    runner, vocab = engine.runner, engine.hf_config.vocab_size
    replayed = []

    def replay(inputs):  # stands in for a graph replay: the model's forward is not called
        replayed.append(inputs.attention.num_seqs)
        return torch.zeros(len(inputs.sample_indices), vocab)

    requests = json.loads(requests_file(tmp_path, vocab).read_text())
    lengths = probe.add_requests(engine, requests, "r", max_tokens=3)
    started = set()
    with probe.Recorder(engine) as recorder:
        prefill = probe.run_step(engine, recorder, torch.device("cpu"), lengths, started)
        runner.logits = replay
        decode = probe.run_step(engine, recorder, torch.device("cpu"), lengths, started)
    assert not probe.is_decode(prefill) and probe.is_decode(decode)
    assert replayed == [len(requests)] and decode["tokens"] == decode["rows"] == len(requests)


def test_the_step_hook_sees_and_stubs_steps_and_puts_the_engine_back(qwen3_dir):
    """Every tool that looks inside a step goes through bench.step_hook: it sees each step enter
    the runner, can stub the model out, and leaves the engine as it found it."""
    from serve import LLM, SamplingParams
    from serve.core.model_runner import LaunchedStep

    engine = LLM(qwen3_dir, device="cpu", num_pages=64).engine
    runner = engine.runner
    own = {name: getattr(runner, name) for name in ("execute_model", "sample", "logits",
                                                    "sampler")}
    entered, returned, sampled, tokens = [], [], [], []
    with StepHook(engine) as hook:
        hook.before.append(entered.append)
        hook.after.append(lambda: returned.append(True))
        hook.stub = lambda inputs: LaunchedStep(None, torch.full((len(inputs.sample_indices),), 7),
                                                None)
        assert hook.wrap_phase("output", lambda process, *args: sampled.append(1) or
                               process(*args))
        engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
        while engine.has_unfinished_requests():
            tokens += [t for output in engine.step() for t in output.new_token_ids]
    assert tokens == [7, 7, 7] and sampled  # the stub's tokens, through the output processor
    assert entered[0] == 3 and set(entered[1:]) == {1} and len(returned) == len(entered)
    assert {name: getattr(runner, name) for name in own} == own
    assert not {"execute_model", "sample", "logits"} & vars(runner).keys()
    assert "process" not in vars(engine.output_processor)


@pytest.mark.skipif(not (REPO_ROOT / ".stages" / "v0.0-naive-single-request").is_dir(),
                    reason="run `make stage-sources` to export v0.0")
def test_the_probe_runs_in_the_first_stages_own_tree(qwen3_dir, tmp_path):
    """bench.course.stages runs this checkout's bench/probe.py inside each stage's tree, where
    `bench` is the stage's own: the probe finds its step hook beside it, and in the first stage,
    whose engine calls the model itself, counts each step's tokens at the model's forward."""
    stage = REPO_ROOT / ".stages" / "v0.0-naive-single-request"
    requests = requests_file(tmp_path, vocab_size_of(qwen3_dir))
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "probe.py"), "--model", qwen3_dir,
                    "--load-format", "auto", "--device", "cpu", "--requests", str(requests),
                    "--out", str(out), "--timeline-out", str(tmp_path / "timeline.json")],
                   cwd=stage, env={**os.environ, "PYTHONPATH": str(stage)}, check=True,
                   capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    prompt_tokens = sum(len(r["prompt"]) for r in json.loads(requests.read_text()))
    assert result["hooked"] == ["model", "forward", "sample", "output"]
    assert result["summary"]["prefill"]["tokens_computed"] == prompt_tokens
    assert result["summary"]["decode"]["idle_rows"] == 0


def fake_run(root: Path, probe_result: dict | None = None) -> Path:
    """A run as bench.course.stages lays it out under root (milestones/), with made-up numbers."""
    files = RunFiles(root, "20260101-000000-gpu-course", "gpu", "course")
    hf = {"output_tokens_per_s": 100.0, "batch_size": 64}
    env = {"git_commit": "c0", "device_name": "Some GPU", "torch": "2.x",
           "timestamp": "2026-01-01T00:00:00+00:00"}
    workload = {"name": "course", "num_prompts": 64, "input_len": [64, 256],
                "output_len": [32, 128], "temperature": 0.6}
    stages = []
    for tag, tok_s in (("v0.0-a", 25.0), ("v0.1-b", 400.0)):
        out = files.stage_file("bench", tag, "c0" * 4)
        write_result(out, {"env": env, "metrics": {"output_tokens_per_s": tok_s},
                           "hf_baseline": hf, "run_id": files.run_id})
        stages.append({"tag": tag, "commit": "c0" * 4, "throughput": files.listed(out)})
    if probe_result:
        out = files.stage_file("probe", "v0.1-b", "c0" * 4)
        write_result(out, probe_result)
        stages[1]["probe"] = files.listed(out)
    write_result(files.folder / "hf-baseline.json", {"metrics": hf})
    write_result(files.folder / "run.json", {
        "run_id": files.run_id, "command": "python -m x", "started": "2026-01-01T00:00:00",
        "workload": workload, "model": "m", "notes": [], "stages": stages,
        "hf_baseline": files.listed(files.folder / "hf-baseline.json")})
    return files.folder


def test_a_runs_stage_files_lie_beside_their_chapters():
    files = RunFiles(Path("/r/milestones"), "20261125-213914-h100-course", "h100", "course")
    out = files.stage_file("bench", "v0.2-paged-kv", "9e80078f3021eee9")
    assert out == Path("/r/milestones/02/bench-h100-9e80078f-course-20261125-213914.json")
    assert files.listed(out) == "milestones/02/bench-h100-9e80078f-course-20261125-213914.json"
    assert resolve(files.folder, files.listed(out)) == out
    assert files.stage_file("serving", "v0.3-x", "7fa5f39f-dirty", "r16").name == \
        "serving-h100-7fa5f39f-dirty-course-r16-20261125-213914.json"
    assert [stage_folder(t) for t in ("v0.0-a", "v0.10-b", "v1.0-c")] == ["00", "10", "12"]
    with pytest.raises(ValueError):
        stage_folder("nightly")


def test_stage_table_and_plot_come_from_one_run(tmp_path):
    run_dir = fake_run(tmp_path / "milestones")
    table = plot_stages.render_table(run_dir)
    assert "| v0.1 | `c0c0c0c0` | 400.0 | 16.00× | 4.00× |" in table
    assert "| HF `generate` (batch 64) | transformers | 100.0 |" in table
    assert "20260101-000000-gpu-course" in table
    plot_stages.main(["--run", str(run_dir), "--table", str(tmp_path / "stages.md"),
                      "--plot", str(tmp_path / "stages.png")])
    assert plot_stages.table_run(tmp_path / "stages.md") is not None
    assert (tmp_path / "stages.png").stat().st_size > 10_000
    # a run without probes draws throughput alone, not an empty decode-step panel beside it
    width = int.from_bytes((tmp_path / "stages.png").read_bytes()[16:20], "big")
    assert width == 780


def test_a_stage_table_of_repeated_runs_shows_their_spread_and_what_it_cannot_rank(tmp_path):
    run_dir = fake_run(tmp_path / "milestones")
    manifest = json.loads((run_dir / "run.json").read_text())
    for entry, speeds in zip(manifest["stages"], ([25.0], [380.0, 400.0, 430.0]), strict=True):
        path = resolve(run_dir, entry["throughput"])
        result = json.loads(path.read_text())
        result["metrics"]["repeats"] = [{"output_tokens_per_s": v, "wall_time_s": 1.0}
                                        for v in speeds]
        path.write_text(json.dumps(result))
    table = plot_stages.render_table(run_dir)
    assert "| v0.0 | `c0c0c0c0` | 25.0 | 1 | — | 0.25× |" in table
    assert "| v0.1 | `c0c0c0c0` | 400.0 | 3: 380–430 | 16.00× | 4.00× |" in table
    assert "†" not in table  # 25 tok/s is far below 380-430: ranked
    path = resolve(run_dir, manifest["stages"][0]["throughput"])
    result = json.loads(path.read_text())
    result["metrics"]["repeats"] = [{"output_tokens_per_s": v, "wall_time_s": 1.0}
                                    for v in (300.0, 390.0, 395.0)]
    result["metrics"]["output_tokens_per_s"] = 390.0
    path.write_text(json.dumps(result))
    table = plot_stages.render_table(run_dir)
    assert "| v0.1 | `c0c0c0c0` | 400.0 | 3: 380–430 | 1.03× † |" in table
    assert "does not rank the two" in table
    plot_stages.write_plot(plot_stages.load_run(run_dir), tmp_path / "stages.png")
    assert (tmp_path / "stages.png").stat().st_size > 10_000


def test_a_stage_is_timed_again_until_its_runs_last_long_enough(monkeypatch):
    """repeat_throughput wraps a stage's own benchmark_engine: the warm-up once, then timed runs
    until they add up to the budget, an odd number of them, the median run's metrics first."""
    calls = []
    speeds = iter([90.0, 120.0, 100.0, 80.0, 110.0])

    class Engine:
        def step(self):
            return None

    class FakeLLM:
        def __init__(self):
            self.engine = Engine()
            self.resets = 0

        def reset_prefix_cache(self):
            self.resets += 1

    def benchmark_engine(llm, requests, warmup):
        calls.append(warmup)
        llm.engine.step = lambda: None  # the harness's step log wraps the engine for one run
        return {"wall_time_s": 0.3, "output_tokens_per_s": next(speeds), "steps": {}}

    llm = FakeLLM()
    result = repeat_throughput.repeat(benchmark_engine, budget_s=1.0, max_repeats=11)(
        llm, [], True)
    assert calls == [True, False, False, False, False]  # 4 runs reach 1.2 s; 5 is odd
    assert result["output_tokens_per_s"] == 100.0
    assert [r["output_tokens_per_s"] for r in result["repeats"]] == [90, 120, 100, 80, 110]
    assert llm.resets == 5 and "step" not in vars(llm.engine)  # no cache, no hook left behind
    calls.clear()
    speeds = iter([10.0])
    result = repeat_throughput.repeat(benchmark_engine, budget_s=0.1, max_repeats=11)(
        FakeLLM(), [], True)
    assert calls == [True] and len(result["repeats"]) == 1  # a slow stage runs once


def test_repeated_throughput_runs_a_real_engine_in_a_stages_tree(qwen3_dir, tmp_path):
    """The driver, as bench.course.stages runs it: a file run in a stage's tree (this checkout
    here), its own bench.throughput's result file with the repeats in it."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "course" / "repeat_throughput.py"),
                    "--budget-s", "0", "--max-repeats", "3", "--", "--model", qwen3_dir,
                    "--device", "cpu", "--load-format", "dummy", "--num-prompts", "2",
                    "--input-len", "4:8", "--output-len", "2:3", "--out", str(out)],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    metrics = json.loads(out.read_text())["metrics"]
    assert len(metrics["repeats"]) == 1  # a budget of 0 s: one run is enough
    assert metrics["num_output_tokens"] >= 4


def test_a_run_archived_elsewhere_is_adopted_once(tmp_path):
    run_dir = fake_run(tmp_path / "made")
    archive = tmp_path / "run.tar.gz"
    pack(run_dir, archive)
    adopted = stages.adopt(str(archive), stage_table=False, root=tmp_path / "milestones")
    assert adopted == tmp_path / "milestones" / "runs" / run_dir.name
    assert (adopted / "run.json").exists() and (adopted / "stages.png").exists()
    assert sorted(p.name for p in (tmp_path / "milestones" / "01").iterdir()) == [
        "bench-gpu-c0c0c0c0-course-20260101-000000.json"]
    with pytest.raises(FileExistsError):
        stages.adopt(str(archive), stage_table=False, root=tmp_path / "milestones")
    stray = tmp_path / "stray.tar.gz"
    with tarfile.open(stray, "w:gz") as tar:
        tar.add(run_dir, arcname=f"runs/{run_dir.name}")
        tar.add(archive, arcname="notes/run.tar.gz")
    with pytest.raises(ValueError, match="not a run's file"):
        unpack(stray, tmp_path / "elsewhere")


def test_engine_args_parse_numbers_and_booleans():
    from bench.model_config import parse_engine_args

    assert parse_engine_args(["max_num_seqs=8", "gpu_memory_utilization=0.5",
                              "enforce_eager=false", "attention_backend=torch"]) == {
        "max_num_seqs": 8, "gpu_memory_utilization": 0.5, "enforce_eager": False,
        "attention_backend": "torch"}
    assert parse_engine_args(["enforce_eager=True"]) == {"enforce_eager": True}


def test_host_overhead_measures_each_batch_thread_and_neighbour_count(qwen3_dir, tmp_path):
    from bench import host_overhead

    threads = torch.get_num_threads()
    try:
        result = host_overhead.main(["--model", qwen3_dir, "--batch-sizes", "1", "3",
                                     "--threads", "1", "--busy-neighbours", "0", "1",
                                     "--steps", "3", "--out", str(tmp_path / "host.json")])
    finally:
        torch.set_num_threads(threads)
    assert [(r["busy_neighbours"], r["threads"], r["batch_size"]) for r in result["rows"]] == \
        [(0, 1, 1), (0, 1, 3), (1, 1, 1), (1, 1, 3)]
    assert all(r["host_step_us"] > 0 for r in result["rows"])
    assert json.loads((tmp_path / "host.json").read_text())["kind"] == "host_overhead"


def test_the_interference_workload_has_a_long_prompt_every_25_requests():
    workload = WORKLOADS["interference"]
    requests = make_requests(workload, vocab_size=1000)
    long = [index for index, (prompt, _) in enumerate(requests) if len(prompt) == 8192]
    assert long == list(range(24, 200, 25))
    assert all(64 <= len(prompt) <= 256 for index, (prompt, _) in enumerate(requests)
               if index not in long)
    assert workload.max_seq_len == 8192 + 512
    # the other workloads are the same requests as before these fields existed
    nano = make_requests(WORKLOADS["nano-vllm"], 151936)
    assert sum(len(prompt) for prompt, _ in nano) == 142809


def test_mixed_step_times_chunks_beside_decodes_and_profiles_one(qwen3_dir, tmp_path):
    timeline_out = tmp_path / "timeline-mixed.json"
    result = mixed_step.main([
        "--model", qwen3_dir, "--device", "cpu", "--batch-sizes", "0", "3", "--budgets", "8", "32",
        "--long-len", "40", "--max-model-len", "128", "--decode-prompt-len", "8", "--repeats", "1",
        "--timeline-batch", "3", "--timeline-budget", "8", "--timeline-out", str(timeline_out),
        "--out", str(tmp_path / "mixed.json")])
    rows = {(r["batch_size"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {(0, 8), (0, 32), (3, 8), (3, 32)}
    # 40 tokens in chunks of 8 - 3 = 5: eight full chunks; of 32 - 3 = 29: one full, one short
    assert rows[(3, 8)]["split"]["steps"] == 8 and rows[(3, 32)]["eager"]["steps"] == 1
    assert rows[(0, 32)]["split"]["decode_step_ms"] == 0 < rows[(3, 8)]["split"]["decode_step_ms"]
    assert result["cuda_graphs"] is False  # on the CPU both modes run the same eager step
    summary = json.loads(timeline_out.read_text())["summary"]
    assert summary["what"] == "one mixed step" and summary["rows"] == 3  # decode rows sampled
    assert summary["tokens"] == 8  # three decode tokens and a five-token chunk
    assert "mixed step" in timeline_module.title(json.loads(timeline_out.read_text()), "v9.9")


def test_gc_pause_measures_a_full_collection_before_and_after_freezing(qwen3_dir, tmp_path):
    import gc

    from bench import gc_pause

    try:
        result = gc_pause.main(["--model", qwen3_dir, "--device", "cpu",
                                "--out", str(tmp_path / "gc.json")])
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    pauses = result["full_collection_ms"]
    assert result["frozen"] > 0.9 * result["objects_tracked"]
    assert pauses["median_after"] < pauses["median_before"]


def test_an_export_of_another_tree_is_refused(tmp_path):
    """HEAD.json names the commit of the tree it was exported from; a harness run beside a
    newer tree (an export left over from an earlier call) must not name that commit."""
    (tmp_path / stage_trees.STAGES_FILE).write_text("{}")
    args = argparse.Namespace(stages_dir=str(tmp_path), only=None, current="v9.9-next")
    head = {"git_commit": "c0ffee", "git_dirty": False}
    (tmp_path / stage_trees.HEAD_FILE).write_text(json.dumps(
        {**head, "fingerprint": stage_trees.tree_fingerprint()}))
    tags, _, _ = stage_trees.load_stages(args, tmp_path)
    assert tags == {"v9.9-next": "c0ffee"}
    (tmp_path / stage_trees.HEAD_FILE).write_text(json.dumps({**head, "fingerprint": "0" * 16}))
    with pytest.raises(SystemExit, match="another tree"):
        stage_trees.load_stages(args, tmp_path)


def test_a_stage_run_cut_short_is_resumed_on_the_same_machine(tmp_path, monkeypatch):
    """A run of every stage can outlast one command (the GPU machine's 10-minute limit):
    --resume goes on with the stages the first command did not finish, in the same run, after
    removing what a stage cut short had written; on another machine it is refused."""
    exported = tmp_path / "stages"
    exported.mkdir()
    tags = {"v0.0-a": "a0" * 20, "v0.1-b": "b1" * 20, "v0.2-c": "c2" * 20}
    (exported / stage_trees.STAGES_FILE).write_text(json.dumps(tags))
    calls: list[str] = []
    cut_at = {"stage": "v0.1-b"}

    def fake_run(command, cwd, env=None):
        out = Path(command[command.index("--out") + 1])
        if "bench.hf_baseline" in command:
            calls.append("hf")
            out.write_text(json.dumps({"metrics": {"output_tokens_per_s": 10.0}}))
            return
        tag = Path(cwd).name
        if tag == cut_at["stage"]:
            raise KeyboardInterrupt  # the command's time limit
        calls.append(tag)
        out.write_text(json.dumps({"env": {"git_commit": tags[tag]},
                                   "metrics": {"output_tokens_per_s": 100.0 * len(calls)}}))

    monkeypatch.setattr(stages, "run", fake_run)
    results = tmp_path / "milestones"
    common = ["--stages-dir", str(exported), "--device", "cpu", "--no-probe",
              "--no-stage-table", "--results-dir", str(results)]
    with pytest.raises(KeyboardInterrupt):
        stages.main(common)
    (run_dir,) = (results / "runs").iterdir()
    started = "-".join(run_dir.name.split("-")[:2])
    leftover = results / "01" / f"probe-cpu-b1b1b1b1-course-{started}.json"
    leftover.parent.mkdir()
    leftover.write_text("{}")  # as a probe cut short would leave it
    cut_at["stage"] = None
    stages.main([*common, "--resume", str(run_dir)])
    assert calls == ["hf", "v0.0-a", "v0.1-b", "v0.2-c"]  # the baseline and v0.0 ran once
    manifest = json.loads((run_dir / "run.json").read_text())
    assert [entry["tag"] for entry in manifest["stages"]] == list(tags)
    assert "resumed" in manifest["notes"][-1]
    assert not leftover.exists() and not (run_dir / stages.PARTIAL_FILE).exists()
    assert "| v0.1 | `b1b1b1b1` | 300.0 | 1.50× |" in (run_dir / "stages.md").read_text()

    (run_dir / stages.PARTIAL_FILE).write_text(json.dumps({**manifest, "host": "elsewhere"}))
    with pytest.raises(SystemExit, match="not on this machine"):
        stages.main([*common, "--resume", str(run_dir)])


def is_own_checkout() -> bool:
    """Whether this tree is a git checkout's top. A stage's export in .stages/<tag>/ is not: git
    finds the enclosing checkout's history there, but cannot archive from inside the export."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    return top.returncode == 0 and Path(top.stdout.strip()).resolve() == REPO_ROOT.resolve()


@pytest.mark.skipif(not is_own_checkout(), reason="not a git checkout (a stage's export?)")
def test_a_code_only_export_leaves_out_chapters_and_results(tmp_path, monkeypatch):
    """What travels to the GPU machine for a run of every stage: each stage's code and
    harness, without its docs/ and milestones/ (which hold most of an export's bytes)."""
    tags = stage_trees.milestone_tags()
    assert tags, "make tags makes the milestone tags (the README's commands run it)"
    last = dict([list(tags.items())[-1]])
    monkeypatch.setattr(stage_trees, "milestone_tags", lambda: last)
    assert stage_trees.export_stages(tmp_path, code_only=True) == last
    folder = tmp_path / next(iter(last))
    assert (folder / "serve" / "__init__.py").exists() and (folder / "bench").is_dir()
    assert not (folder / "docs").exists() and not (folder / "milestones").exists()
    assert json.loads((tmp_path / stage_trees.STAGES_FILE).read_text()) == last


def test_prefix_eviction_bench_times_an_eviction_that_keeps_the_cache_full():
    result = prefix_eviction.main(["--leaves", "20", "200", "--repeats", "5"])
    assert [row["leaves"] for row in result["rows"]] == [20, 200]
    assert all(row["evict_one_ms"] > 0 for row in result["rows"])


def test_tp_step_messages_carry_the_same_step_three_ways():
    from bench import tp_step_message

    built, gather_ms = tp_step_message.messages(8)
    as_torch = pickle.loads(pickle.dumps(built["torch"])).inputs
    as_numpy = pickle.loads(pickle.dumps(built["numpy"])).inputs
    assert torch.equal(as_torch.attention.kv_indices, as_numpy.attention.kv_indices)
    assert torch.equal(as_torch.sampling.noise_keys, as_numpy.sampling.noise_keys)
    changes = built["changes"]
    assert len(changes["slots"]) == 8 and gather_ms > 0
    size, dump_ms, load_ms = tp_step_message.pickle_ms(built["changes"], 3)
    assert size < len(pickle.dumps(built["numpy"]))


def test_spec_decode_bench_compares_methods_on_held_out_code(tmp_path):
    from bench.spec_decode import main

    out = tmp_path / "spec.json"
    result = main(["--batch-sizes", "1", "--ks", "2", "--draft-model",
                   "bench/demo_models/pycode-2m", "--num-prompts", "2", "--prompt-len", "48",
                   "--output-len", "8", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {(row["method"], row["k"]): row for row in result["rows"]}
    assert set(rows) == {("none", 0), ("ngram", 2), ("draft_model", 2)}
    for key in (("ngram", 2), ("draft_model", 2)):
        assert rows[key]["same_tokens_as_plain"] is True
        assert rows[key]["speedup_vs_plain"] > 0
    assert all(row["num_output_tokens"] == 16 for row in rows.values())


def test_every_bench_module_imports():
    """A bench whose import breaks (a name it used is gone from serve/) fails here, not in
    front of a reader who runs it."""
    import importlib
    import pkgutil

    import bench

    for module in pkgutil.iter_modules(bench.__path__):
        if not module.ispkg:
            importlib.import_module(f"bench.{module.name}")


def test_verify_step_bench_times_both_steps(tmp_path, qwen3_dir):
    from bench.verify_step import main

    out = tmp_path / "verify.json"
    result = main(["--model", qwen3_dir, "--device", "cpu", "--batch-sizes", "1", "2",
                   "--ks", "1", "3", "--context-len", "20", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert [(row["batch_size"], row["k"]) for row in result["rows"]] == [(1, 1), (1, 3), (2, 1),
                                                                         (2, 3)]
    for row in result["rows"]:
        assert row["verify_over_decode"] == row["verify_step_ms"] / row["decode_step_ms"] > 0
def test_structured_output_bench_times_the_mask_fills(tmp_path):
    from bench.structured_output import main

    out = tmp_path / "structured.json"
    result = main(["--num-prompts", "4", "--max-tokens", "12", "--repeats", "1",
                   "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {row["share_constrained"]: row for row in result["rows"]}
    assert set(rows) == {0.0, 0.5, 1.0}
    assert "fill_us_per_row" not in rows[0.0]
    assert rows[1.0]["masked_steps"] > 0 and rows[1.0]["fill_us_per_row"] > 0
