"""The messages between the server side and the engine core: typed, and encodable as they are,
so that the core can move to a process of its own without changing them."""

import ast
from pathlib import Path

import msgspec

from serve.messages import CoreOutput, CoreRequest, EngineStats, FinishedRequestStats
from serve.sampling_params import SamplingParams

SERVE = Path(__file__).parent.parent / "serve"


def roundtrip(message, kind):
    return msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=kind)


def test_messages_survive_msgpack():
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=5, stop=["\n"], seed=3,
                            stop_token_ids=[7], ignore_eos=True)
    request = CoreRequest("r1", [1, 2, 3], params, max_tokens=5, seed=3, arrival_time=12.5)
    assert roundtrip(request, CoreRequest) == request
    output = CoreOutput("r1", [42], "length", num_cached_tokens=16)
    assert roundtrip(output, CoreOutput) == output
    stats = EngineStats(2, 1, 10, 100, num_generation_tokens=2, time_to_first_token_s=(0.1,),
                        finished=(FinishedRequestStats("stop", 1.5, 3, 2),))
    assert roundtrip(stats, EngineStats) == stats


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


# The one place the server side builds a core: the engine in this process. Nothing else on the
# server side may reach into the core, the model or the GPU code.
IN_PROCESS_CORE = {SERVE / "engine" / "llm_engine.py": {"serve.core.engine_core",
                                                       "serve.models.loader"}}
CORE_SIDE = ("serve.core", "serve.models", "serve.layers", "serve.attention")


def test_only_messages_cross_between_the_server_side_and_the_core():
    for folder in ("engine", "server"):
        for path in (SERVE / folder).rglob("*.py"):
            crossing = {name for name in imports_of(path) if name.startswith(CORE_SIDE)}
            assert crossing <= IN_PROCESS_CORE.get(path, set()), (path, crossing)
    for folder in ("core", "models", "layers", "attention"):
        for path in (SERVE / folder).rglob("*.py"):
            crossing = {name for name in imports_of(path)
                        if name.startswith(("serve.engine", "serve.server"))}
            assert not crossing, (path, crossing)


def test_a_request_the_core_cannot_queue_fails_alone_across_the_boundary(qwen3_dir, monkeypatch):
    """In the core's process, a request whose queueing raises is reported back as that
    request's failure (CoreOutput.error) instead of ending the core; the server side ends that
    request with the error and serves the next."""
    from serve.config import EngineConfig
    from serve.core.core_process import CoreProcess
    from serve.engine.llm_engine import LLMEngine

    class RefusingCore:
        def add_request(self, message):
            raise RuntimeError(f"cannot queue {message.request_id}")

        def take_stats(self):
            return EngineStats(0, 0, 0, 8)

        def shutdown(self):
            pass

    process = CoreProcess("ipc:///nonexistent/in", "ipc:///nonexistent/out")
    sent = []
    process.core, process.send = RefusingCore(), sent.append
    params = SamplingParams(max_tokens=2)
    process.apply(CoreRequest("r1", [1, 2], params, max_tokens=2, seed=0, arrival_time=0.0))
    process.close()
    [step] = sent
    assert step.outputs == [CoreOutput("r1", [], "abort",
                                       error="RuntimeError: cannot queue r1")]
    engine = LLMEngine(EngineConfig(model=qwen3_dir, device="cpu", dtype="float32"))
    engine.add_request("r1", "x", params)
    monkeypatch.setattr(engine.core, "step", lambda: roundtrip(step, type(step)).outputs)
    [failed] = engine.step()
    assert failed.finished and failed.error == "RuntimeError: cannot queue r1"
    assert engine.request_ids() == []
