"""Two replicas of the demo model on a local Ray cluster, behind one endpoint with an API key:
the openai client through it gets what one server gives, requests follow their prefix, the
metrics add up, and a replica killed mid-stream fails its own streams only and comes back.

Needs `pip install 'nanoserve[ray]'` (skipped without it); about a minute and a half on 2 CPUs.
"""

import socket
import threading
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from tests.helpers import wait_until
from tests.test_server_openai_client import ServerThread

ray = pytest.importorskip("ray", reason="the cluster needs ray[serve]: "
                                        "pip install 'nanoserve[ray]'")
pytest.importorskip("ray.serve", reason="the cluster needs ray[serve]")
from serve.cluster.cli import APP_NAME, make_parser, start  # noqa: E402
from serve.cluster.replica import REPLICA_HEADER  # noqa: E402

HEADER = REPLICA_HEADER.decode()

DEMO = "bench/demo_models/pycode-8m"
NAME = "pycode-8m"
KEY = "cluster-test-key"
MAX_BYTES = 100_000
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32"]
CHAT = [{"role": "system", "content": "You write Python."},
        {"role": "user", "content": "A class for a stack."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> str:
    port = free_port()
    args = make_parser().parse_args(["--model", DEMO, "--served-model-name", NAME,
                                     "--replicas", "2", "--port", str(port),
                                     "--max-request-bytes", str(MAX_BYTES), *ENGINE_FLAGS])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        start(args, api_key=KEY)
        yield f"http://127.0.0.1:{port}"
    finally:
        ray.serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single() -> str:
    """One `nanoserve` app of the same engine, for the cluster's answers to equal."""
    engine = AsyncEngine(LLMEngine(EngineConfig(model=DEMO, device="cpu", dtype="float32")))
    with ServerThread(build_app(engine, NAME)) as server:
        yield f"http://127.0.0.1:{server.port}"


def client(base_url: str, api_key: str = KEY, strict: bool = True) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120,
                         _strict_response_validation=strict)


def answers(base_url: str) -> list:
    """Greedy and seeded completions and chats, whole and streamed."""
    whole, lenient = client(base_url), client(base_url, strict=False)
    found = []
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):
        found.append(whole.completions.create(model=NAME, prompt="class Stack:", max_tokens=24,
                                              **sampling).choices[0].text)
        found.append("".join(chunk.choices[0].text for chunk in lenient.completions.create(
            model=NAME, prompt="class Stack:", max_tokens=24, stream=True, **sampling)))
        found.append(whole.chat.completions.create(model=NAME, messages=CHAT, max_tokens=24,
                                                   **sampling).choices[0].message.content)
        found.append("".join(chunk.choices[0].delta.content or "" for chunk in
                             whole.chat.completions.create(model=NAME, messages=CHAT,
                                                           max_tokens=24, stream=True,
                                                           **sampling)))
    return found


def test_the_openai_client_gets_what_one_server_gives(cluster, single):
    found = answers(cluster)
    assert found == answers(single)
    assert found[0] == found[1] and found[4] == found[5]  # a stream spells the whole answer
    assert found[0] != found[4]  # (the seeded answers are not the greedy ones)


def test_the_cluster_checks_the_key_and_relays_errors(cluster):
    with pytest.raises(openai.AuthenticationError):
        client(cluster, api_key="wrong").models.list()
    assert [model.id for model in client(cluster).models.list()] == [NAME]
    assert httpx.get(f"{cluster}/health").json() == {"status": "ok"}  # no key needed
    with pytest.raises(openai.BadRequestError) as refused:
        client(cluster).completions.create(model=NAME, prompt="x", max_tokens=-1)
    assert refused.value.body["param"] == "max_tokens"
    with pytest.raises(openai.APIStatusError) as too_large:  # refused before it is relayed
        client(cluster).completions.create(model=NAME, prompt="x" * MAX_BYTES)
    assert too_large.value.status_code == 413
    assert HEADER not in too_large.value.response.headers  # (no replica saw it)


def post(base_url: str, body: dict) -> httpx.Response:
    response = httpx.post(f"{base_url}/v1/completions", json={"model": NAME, **body},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    response.raise_for_status()
    return response


def test_a_prompt_follows_its_cached_pages(cluster):
    """Four prompts of many pages, each sent three times: every repeat goes to the replica that
    computed it, and finds all its full pages cached; the four spread over both replicas."""
    sources = sorted(Path("serve/server").glob("*.py"))[:4]
    prompts = [path.read_text()[:1200] for path in sources]
    served: dict[int, set[str]] = {i: set() for i in range(len(prompts))}
    for repeat in range(3):
        for i, prompt in enumerate(prompts):
            response = post(cluster, {"prompt": prompt, "max_tokens": 1})
            served[i].add(response.headers[HEADER])
            usage = response.json()["usage"]
            if repeat:
                full_pages = (usage["prompt_tokens"] - 1) // 16 * 16
                assert usage["prompt_tokens_details"]["cached_tokens"] == full_pages
    assert all(len(replicas) == 1 for replicas in served.values()), served
    assert len(set.union(*served.values())) == 2, served


def all_samples(base_url: str, name: str) -> list:
    """The samples `name` of the cluster's /metrics."""
    text = httpx.get(f"{base_url}/metrics").text
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def samples(base_url: str, name: str) -> dict[str | None, float]:
    """The sample `name` of the cluster's /metrics, by replica (None: the total)."""
    return {sample.labels.get("replica"): sample.value for sample in all_samples(base_url, name)}


def test_metrics_per_replica_and_in_total(cluster):
    post(cluster, {"prompt": "import os", "max_tokens": 2})
    name = "nanoserve:generation_tokens_total"
    assert wait_until(lambda: len(samples(cluster, name)) == 3, timeout=10)
    found = samples(cluster, name)
    total = found.pop(None)
    assert total == sum(found.values()) and min(found.values()) > 0


def test_a_client_that_goes_away_stops_its_request(cluster):
    """The replica hears that the client hung up, and aborts the request."""
    body = {"model": NAME, "prompt": "def main():", "max_tokens": 900, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{cluster}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        next(response.iter_lines())
    aborted = 'nanoserve:request_success_total'
    assert wait_until(lambda: any(
        sample.labels == {"finished_reason": "abort"} for sample in all_samples(cluster, aborted)),
        timeout=20)


def stream(base_url: str, prompt: str, out: dict) -> None:
    """Stream a long completion; record which replica serves it, when it started, and how it
    ended ("length", or the error it raised)."""
    stream = client(base_url, strict=False).completions.create(
        model=NAME, prompt=prompt, max_tokens=900, stream=True, extra_body={"ignore_eos": True})
    out["replica"] = stream.response.headers[HEADER]
    try:
        for chunk in stream:
            out["started"] = True
            if chunk.choices and chunk.choices[0].finish_reason:
                out["end"] = chunk.choices[0].finish_reason
    except openai.APIError as error:
        out["end"] = error


def prefixes_on_both_replicas(base_url: str) -> list[str]:
    """A 300-character prompt prefix cached on each replica. A new prefix goes to the replica
    that holds the fewest pages, so long new prompts (about 600 tokens) reach the other one as
    soon as it holds fewer (earlier tests may have left either one with more)."""
    texts = [path.read_text() for path in sorted(Path("serve").rglob("*.py"))]
    found: dict[str, str] = {}
    for i, text in enumerate(text for text in texts if len(text) > 2000):
        seed = f"# prefix {i}\n" + text[:2000]
        served = post(base_url, {"prompt": seed, "max_tokens": 1}).headers[HEADER]
        found.setdefault(served, seed[:300])
        if len(found) == 2:
            return list(found.values())
    raise AssertionError(f"every new prefix went to {set(found)}")


def test_a_killed_replica_fails_its_streams_only_and_comes_back(cluster):
    """Six streams, three on each replica (they follow prefixes cached there); the Ray actor of
    one replica is killed while they run: its streams end with an error, the others finish, a
    new replica takes its place, and requests keep being answered meanwhile."""
    prompts = [prefix + f"\n# stream {i}\n" for prefix in prefixes_on_both_replicas(cluster)
               for i in range(3)]
    outs = [{} for _ in prompts]
    threads = [threading.Thread(target=stream, args=(cluster, p, o), daemon=True)
               for p, o in zip(prompts, outs, strict=True)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: all(out.get("started") for out in outs), timeout=60)
    replicas = {out["replica"] for out in outs}
    assert len(replicas) == 2, "the streams should be on both replicas"
    victim = outs[0]["replica"]
    [actor] = [name for name in ray.util.list_named_actors(all_namespaces=True)
               if name["name"].endswith(f"#{victim}")]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    answer = post(cluster, {"prompt": "def f():", "max_tokens": 2})  # answered meanwhile
    assert answer.headers[HEADER] != victim
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a stream hangs"
    for out in outs:
        if out["replica"] == victim:
            assert isinstance(out["end"], openai.APIError), out
            assert "replica" in str(out["end"])
        else:
            assert out["end"] == "length"

    def two_running() -> bool:
        states = ray.serve.status().applications[APP_NAME].deployments["Replica"]
        return states.replica_states.get("RUNNING") == 2

    assert wait_until(two_running, timeout=120)
    def reported() -> set:  # the replicas the metrics board has heard from lately
        return set(samples(cluster, "nanoserve:num_requests_running")) - {None}

    assert wait_until(lambda: len(reported()) == 2 and victim not in reported(), timeout=30)
    assert post(cluster, {"prompt": "def f():", "max_tokens": 2}).json()["choices"]
