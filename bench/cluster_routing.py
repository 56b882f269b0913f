"""Prefix-aware routing against Ray Serve's default on a multi-tenant chat workload, and what the
cluster adds to a request's latency.

    python -m bench.cluster_routing --model bench/demo_models/pycode-8m --replicas 2 4 \\
        --out milestones/13/cluster-routing-cpu-<commit>.json

The workload: --tenants system prompts (the first --system-tokens tokens of as many source files
of this repository), each with --conversations conversations of --turns turns. A turn's prompt
is its tenant's system prompt, the conversation so far and a new user line; its greedy answer
joins the conversation. All conversations run at once, each one's turns in order. For each
replica count the cluster is deployed afresh twice, with Ray Serve's default router (power of
two choices) and with the prefix-aware one, and the share of prompt tokens that the replicas
found in their prefix caches (usage.prompt_tokens_details.cached_tokens) is summed over every
request. Then latency: --latency-requests short requests (one token out), one at a time, to
one `nanoserve` server and to a cluster of two replicas with the same engine flags, in turn, so
that both see the same load from the rest of the machine; p50 and p99 of each. The server runs
torch on one thread, as Ray runs each replica (it sets OMP_NUM_THREADS to the replica's CPUs).
"""

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
REPLICA_HEADER = "x-nanoserve-replica"


def system_prompts(tokenizer, count: int, num_tokens: int) -> list[str]:
    """The first num_tokens tokens of `count` source files of this repository, as text."""
    files = sorted(path for path in (REPO / "serve").rglob("*.py")
                   if len(path.read_text()) > 8 * num_tokens)[:count]
    return [tokenizer.decode(tokenizer.encode(path.read_text(), add_special_tokens=False)
                             [:num_tokens]) for path in files]


async def conversation(client: httpx.AsyncClient, system: str, name: str, args,
                       delay_s: float, results: list[dict]) -> None:
    """One conversation's turns, in order, each prompt holding the conversation so far."""
    await asyncio.sleep(delay_s)
    history = ""
    for turn in range(args.turns):
        history += f"\n# {name}, turn {turn}: what does this do next?\n"
        response = await client.post("/v1/completions", json={
            "model": args.model_name, "prompt": system + history,
            "max_tokens": args.answer_tokens, "temperature": 0})
        response.raise_for_status()
        answer = response.json()
        usage = answer["usage"]
        results.append({"prompt_tokens": usage["prompt_tokens"],
                        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                        "replica": response.headers.get(REPLICA_HEADER)})
        history += answer["choices"][0]["text"]


async def run_workload(base_url: str, prompts: list[str], args) -> dict:
    """Every tenant's conversations at once, their starts spread over the first second in a
    seeded order; the prompt tokens found cached, over all requests."""
    rng = random.Random(args.seed)
    results: list[dict] = []
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        await asyncio.gather(*(
            conversation(client, system, f"user {t}.{c}", args, rng.random(), results)
            for t, system in enumerate(prompts) for c in range(args.conversations)))
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    cached_tokens = sum(r["cached_tokens"] for r in results)
    replicas = sorted({r["replica"] for r in results})
    return {"requests": len(results), "prompt_tokens": prompt_tokens,
            "cached_tokens": cached_tokens, "cached_share": cached_tokens / prompt_tokens,
            "requests_per_replica": sorted(sum(r["replica"] == name for r in results)
                                           for name in replicas),
            "seconds": time.perf_counter() - start}


def cluster_args(args, replicas: int, routing: str) -> argparse.Namespace:
    from serve.cluster.cli import make_parser

    return make_parser().parse_args([
        "--model", args.model, "--served-model-name", args.model_name, "--port", str(args.port),
        "--replicas", str(replicas), "--routing", routing, "--num-cpus-per-replica", "1",
        *args.engine_flags])


def latencies(urls: dict[str, str], prompt: str, args) -> dict:
    """Per server, p50 and p99 of --latency-requests completions of one token, sent one at a
    time to each server in turn (so that both see the same load from the rest of the
    machine), after a warm-up of five each."""
    body = {"model": args.model_name, "prompt": prompt, "max_tokens": 1}
    times: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: httpx.Client(base_url=url, timeout=60) for name, url in urls.items()}
    for i in range(args.latency_requests + 5):
        for name, client in clients.items():
            start = time.perf_counter()
            client.post("/v1/completions", json=body).raise_for_status()
            if i >= 5:
                times[name].append(time.perf_counter() - start)
    for client in clients.values():
        client.close()
    return {name: {"requests": len(seconds), "p50_ms": 1000 * statistics.median(seconds),
                   "p99_ms": 1000 * statistics.quantiles(seconds, n=100)[98]}
            for name, seconds in times.items()}


def single_server(args) -> tuple[subprocess.Popen, str]:
    """`nanoserve` itself, in a process of its own, as it is run, once it answers /health."""
    url = f"http://127.0.0.1:{args.port + 1}"
    server = subprocess.Popen([sys.executable, "-m", "serve", "--model", args.model,
                               "--served-model-name", args.model_name, "--port",
                               str(args.port + 1), "--log-level", "warning", *args.engine_flags],
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("the single server did not start")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_routing",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench/demo_models/pycode-8m")
    parser.add_argument("--model-name", default="pycode-8m")
    parser.add_argument("--replicas", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--conversations", type=int, default=2, help="per tenant")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=320)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--latency-requests", type=int, default=200, help="0: skip")
    parser.add_argument("--num-pages", type=int, default=256, help="each replica's KV pool")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--port", type=int, default=8470)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    args.engine_flags = ["--device", "cpu", "--dtype", "float32", "--num-pages",
                         str(args.num_pages), "--max-model-len", str(args.max_model_len)]
    import ray
    import ray.serve
    from transformers import AutoTokenizer

    from bench.results import environment, write_result
    from serve.cluster.cli import APP_NAME, start

    prompts = system_prompts(AutoTokenizer.from_pretrained(args.model), args.tenants,
                             args.system_tokens)
    ray.init(num_cpus=max([2, *args.replicas]), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        base_url = f"http://127.0.0.1:{args.port}"
        for replicas in args.replicas:
            row = {"replicas": replicas}
            for routing in ("pow2", "prefix"):
                start(cluster_args(args, replicas, routing))
                row[routing] = asyncio.run(run_workload(base_url, prompts, args))
                ray.serve.delete(APP_NAME)
                print(f"{replicas} replicas, {routing:6}: {row[routing]['cached_share']:.1%} of "
                      f"prompt tokens cached, requests per replica "
                      f"{row[routing]['requests_per_replica']}", flush=True)
            row["share_ratio"] = row["prefix"]["cached_share"] / row["pow2"]["cached_share"]
            rows.append(row)
        latency = None
        if args.latency_requests:
            server, single_url = single_server(args)
            try:
                start(cluster_args(args, 2, "prefix"))
                # a prompt of several pages, so that the ingress's whole path runs
                latency = latencies({"single": single_url, "cluster": base_url},
                                    prompts[0][:400], args)
            finally:
                server.terminate()
                server.wait(60)
            for p in ("p50", "p99"):
                latency[f"added_{p}_ms"] = (latency["cluster"][f"{p}_ms"]
                                            - latency["single"][f"{p}_ms"])
            print(f"latency p50/p99: one server {latency['single']['p50_ms']:.1f}/"
                  f"{latency['single']['p99_ms']:.1f} ms, 2 replicas "
                  f"{latency['cluster']['p50_ms']:.1f}/{latency['cluster']['p99_ms']:.1f} ms",
                  flush=True)
    finally:
        ray.serve.shutdown()
        ray.shutdown()
    result = {"kind": "cluster_routing", "env": {**environment("cpu"), "ray": ray.__version__},
              "model": args.model,
              "workload": {key: getattr(args, key) for key in (
                  "tenants", "conversations", "turns", "system_tokens", "answer_tokens",
                  "num_pages", "max_model_len", "seed")},
              "engine_flags": args.engine_flags, "routing": rows, "latency": latency}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
