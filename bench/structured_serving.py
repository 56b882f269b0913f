"""Structured output through the server: the same chat requests with and without a JSON schema
in `response_format`, all sent at once to a running server, in pairs of passes (schema, then
plain).

    nanoserve --model bench/demo_models/pycode-8m &
    python -m bench.structured_serving --base-url http://127.0.0.1:8000 --num-requests 256

For each pass: output tokens per second (the server's own `usage.completion_tokens`, summed,
over the pass's wall time), and for the schema passes how many outputs parse and validate
against their schema (`jsonschema`) and how many max_tokens cut. A schema's output ends where
the JSON does, so the plain pass after it asks each request for exactly the tokens its schema
twin wrote (`ignore_eos`): the same requests, the same work, only the grammar removed. The
schemas are bench.structured_output's four.
"""

import argparse
import asyncio
import json
import statistics
import time

import httpx

from bench.structured_output import PROMPTS, SCHEMAS


async def one_pass(base_url: str, model: str, max_tokens: list[int], constrained: bool) -> dict:
    """Request i asks for max_tokens[i] tokens (exactly that many when not constrained)."""
    async def send(client: httpx.AsyncClient, i: int) -> tuple[int, bool | None, str]:
        body = {"model": model, "max_tokens": max_tokens[i], "temperature": 0.8, "seed": i,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "ignore_eos": not constrained}
        schema = SCHEMAS[i % len(SCHEMAS)]
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": f"schema{i % len(SCHEMAS)}", "schema": schema, "strict": True}}
        response = await client.post(f"{base_url}/v1/chat/completions", json=body)
        response.raise_for_status()
        reply = response.json()
        finish = reply["choices"][0]["finish_reason"]
        if not constrained:
            return reply["usage"]["completion_tokens"], None, finish
        try:
            import jsonschema

            jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), schema)
            valid = True
        except Exception:  # (json or jsonschema: either way the output is not valid)
            valid = False
        return reply["usage"]["completion_tokens"], valid, finish

    num_requests = len(max_tokens)
    limits = httpx.Limits(max_connections=num_requests, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(send(client, i) for i in range(num_requests)))
        seconds = time.perf_counter() - start
    tokens = sum(n for n, _, _ in results)
    row = {"constrained": constrained, "seconds": seconds, "output_tokens": tokens,
           "output_tokens_per_s": tokens / seconds, "requests": num_requests,
           "lengths": [n for n, _, _ in results]}
    if constrained:
        row["valid"] = sum(1 for _, valid, _ in results if valid)
        row["cut_by_max_tokens"] = sum(1 for _, _, finish in results if finish == "length")
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.structured_serving",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--pairs", type=int, default=2, help="(schema, plain) passes")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from bench.results import environment, write_result

    model = httpx.get(f"{args.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    asyncio.run(one_pass(args.base_url, model, [8] * 8, True))  # warm-up: grammars compiled
    rows = []
    for _ in range(args.pairs):
        rows.append(asyncio.run(one_pass(args.base_url, model,
                                         [args.max_tokens] * args.num_requests, True)))
        rows.append(asyncio.run(one_pass(args.base_url, model, rows[-1]["lengths"], False)))
        for row in rows[-2:]:
            print(f"{'schema' if row['constrained'] else 'plain '}: "
                  f"{row['output_tokens_per_s']:8.1f} tok/s, {row['output_tokens']} tokens in "
                  f"{row['seconds']:.2f} s" + (f", valid {row['valid']}/{row['requests']}, cut "
                                               f"by max_tokens {row['cut_by_max_tokens']}"
                                               if row["constrained"] else ""), flush=True)
    plain = statistics.median(r["output_tokens_per_s"] for r in rows if not r["constrained"])
    schema = statistics.median(r["output_tokens_per_s"] for r in rows if r["constrained"])
    result = {"kind": "structured_serving", "env": environment("auto"), "model": model,
              "schemas": SCHEMAS, "workload": {"num_requests": args.num_requests,
                                               "max_tokens": args.max_tokens},
              "rows": rows, "ratio_median": schema / plain}
    print(f"schema / plain (medians): {schema / plain:.3f}")
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
