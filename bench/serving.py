"""Online serving: stream a workload's requests to a running server and measure latencies.

    python -m bench.serving --base-url http://127.0.0.1:8000 --workload course \\
        --request-rate 4 --max-concurrency 64 --out results/serving.json

Every request streams /v1/completions with token-id prompts and ignore_eos, so each one asks for
a known number of tokens. TTFT is the time to the first chunk that carries a choice, ITL the gaps
between such chunks, TPOT (e2e - ttft) / (output_tokens - 1), and e2e the whole request.
"""

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx

from bench.model_config import vocab_size_of
from bench.results import environment, write_result
from bench.workloads import add_workload_args, make_requests, workload_from_args
from serve.sampling_params import SamplingParams


@dataclass
class RequestResult:
    """What one streamed request measured; times in seconds from when it was sent."""

    prompt_len: int
    max_tokens: int
    ok: bool = False
    error: str = ""
    output_tokens: int = 0  # from the usage chunk; the number of content chunks if there is none
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache (usage chunk)
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between consecutive content chunks

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def read_stream(response: httpx.Response, result: RequestResult, start: float) -> None:
    """Consume the SSE stream, filling in the result's times and token count."""
    last_chunk_at, num_chunks = None, 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators and SSE comments
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        now = time.perf_counter()
        if "error" in chunk:
            raise ValueError(f"error in stream: {chunk['error']}")
        # A chunk with a choice is one engine step's output (its text may be empty while the
        # detokenizer holds back a partial character); the usage chunk has `choices: []`.
        if chunk.get("choices"):
            if last_chunk_at is None:
                result.ttft = now - start
            else:
                result.itl.append(now - last_chunk_at)
            last_chunk_at, num_chunks = now, num_chunks + 1
        if usage := chunk.get("usage"):
            result.output_tokens = usage["completion_tokens"]
            result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
                "cached_tokens") or 0
    if num_chunks == 0:
        raise ValueError("the stream ended without a single choice")
    result.output_tokens = result.output_tokens or num_chunks


async def send_request(client: httpx.AsyncClient, url: str, model: str | None,
                       prompt: list[int], params: SamplingParams) -> RequestResult:
    result = RequestResult(prompt_len=len(prompt), max_tokens=params.max_tokens)
    payload = {"prompt": prompt, "max_tokens": params.max_tokens,
               "temperature": params.temperature, "ignore_eos": params.ignore_eos,
               "stream": True, "stream_options": {"include_usage": True}}
    if model is not None:
        payload["model"] = model
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            await read_stream(response, result, start)
    except (httpx.HTTPError, ValueError, KeyError) as exc:  # JSONDecodeError is a ValueError
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.ok = True
    return result


async def run_requests(base_url: str, model: str | None, requests: list, request_rate: float,
                       max_concurrency: int | None, seed: int,
                       timeout_s: float) -> tuple[list[RequestResult], float]:
    """Send every request, arriving all at once (rate inf) or as a seeded Poisson process."""
    url = base_url.rstrip("/") + "/v1/completions"
    arrivals = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # httpx's default pool (100 connections) would silently cap the concurrency.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:

        async def one(prompt: list[int], params: SamplingParams) -> RequestResult:
            if gate is None:
                return await send_request(client, url, model, prompt, params)
            async with gate:
                return await send_request(client, url, model, prompt, params)

        start = time.perf_counter()
        tasks = []
        for prompt, params in requests:
            tasks.append(asyncio.create_task(one(prompt, params)))
            if not math.isinf(request_rate):
                await asyncio.sleep(arrivals.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize_ms(values: list[float]) -> dict:
    """mean/p50/p90/p99 in milliseconds; nulls when nothing was measured."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    summary = {"mean": sum(values) / len(values)}
    summary.update({f"p{q}": percentile(values, q) for q in (50, 90, 99)})
    return {key: value * 1000 for key, value in summary.items()}


def compute_metrics(results: list[RequestResult], duration: float, ignore_eos: bool) -> dict:
    done = [result for result in results if result.ok]
    input_tokens = sum(result.prompt_len for result in done)
    output_tokens = sum(result.output_tokens for result in done)
    return {
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        # With ignore_eos every request must produce exactly max_tokens; anything else is an
        # engine bug (or a server that ignores ignore_eos) and makes the throughput misleading.
        "output_len_mismatches": sum(result.output_tokens != result.max_tokens
                                     for result in done) if ignore_eos else None,
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        # prompt tokens the server did not compute (0 from a server without a prefix cache)
        "total_cached_tokens": sum(result.cached_tokens for result in done),
        "requests_per_s": len(done) / duration,
        "input_tokens_per_s": input_tokens / duration,
        "output_tokens_per_s": output_tokens / duration,
        "total_tokens_per_s": (input_tokens + output_tokens) / duration,
        "ttft_ms": summarize_ms([result.ttft for result in done]),
        "tpot_ms": summarize_ms([result.tpot for result in done if result.tpot is not None]),
        "itl_ms": summarize_ms([gap for result in done for gap in result.itl]),
        "e2e_ms": summarize_ms([result.e2e for result in done]),
    }


def served_model(base_url: str) -> str:
    """The first model the server lists under /v1/models."""
    response = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def print_summary(metrics: dict) -> None:
    print(f"completed {metrics['completed']}/{metrics['num_requests']} in "
          f"{metrics['duration_s']:.2f} s: {metrics['requests_per_s']:.2f} req/s, "
          f"{metrics['output_tokens_per_s']:.1f} output tok/s")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = metrics[name]
        if stats["p50"] is not None:
            print(f"{name:<8} mean {stats['mean']:9.2f}  p50 {stats['p50']:9.2f}  "
                  f"p90 {stats['p90']:9.2f}  p99 {stats['p99']:9.2f}")
    if metrics["failed"] or metrics["output_len_mismatches"]:
        print(f"WARNING: {metrics['failed']} failed, {metrics['output_len_mismatches']} with the "
              "wrong output length")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.serving",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="the served model's name (default: ask /v1/models)")
    parser.add_argument("--vocab-size", type=int,
                        help="prompt token ids are drawn below this (default: from the config)")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals; inf sends all at once")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may wait between two bytes")
    parser.add_argument("--out", help="write the result JSON here")
    add_workload_args(parser)
    args = parser.parse_args(argv)
    if args.request_rate <= 0:
        parser.error("--request-rate must be > 0 (inf sends every request at once)")
    workload = workload_from_args(args)
    model = args.model or served_model(args.base_url)
    vocab_size = args.vocab_size or vocab_size_of(model)
    requests = make_requests(workload, vocab_size)
    results, duration = asyncio.run(run_requests(
        args.base_url, model, requests, args.request_rate, args.max_concurrency, workload.seed,
        args.request_timeout))
    metrics = compute_metrics(results, duration, workload.ignore_eos)
    errors = sorted({request.error for request in results if not request.ok})
    result = {
        "kind": "serving",
        "env": environment(),  # the client's; the server may run elsewhere
        "workload": workload.to_dict(),
        "base_url": args.base_url,
        "model": model,
        # JSON has no infinity: "inf" means every request was sent at once.
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "metrics": metrics,
        "errors": errors[:10],  # distinct messages, so one cause doesn't hide another
    }
    print_summary(metrics)
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
