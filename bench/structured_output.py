"""What a grammar costs: the same requests with and without a JSON schema, and the host's time
to fill each step's token bitmasks.

    python -m bench.structured_output --model bench/demo_models/pycode-8m --num-prompts 64 \
        --out structured.json

Every request writes up to --max-tokens tokens from the same short code prompts. Three runs of
the same requests: unconstrained; all constrained by one JSON schema each (four schemas in
turn: objects, arrays, enums, nested); half and half. For each, the median of --repeats runs'
output tokens per second, and, from the engine's own bitmask fills, the host time per step
spent filling masks (median) and per constrained row. The masks are filled on the host while
the device runs the step's forward pass, so that time is hidden where the forward pass is
longer (a GPU at a large batch) and adds up where it is not.
"""

import argparse
import statistics
import time

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "email": {"type": "string", "maxLength": 24}},
     "required": ["name", "age", "email"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9999}, "minItems": 2,
     "maxItems": 8},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", "black"]},
                                      "shade": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["color", "shade"]},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                   "y": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["x", "y"]}}}, "required": ["points"]},
]
PROMPTS = ["def config():\n    return ", "data = ", "# the answer\nresult = ",
           "x = json.loads('"]


def run(args, share_constrained: float) -> dict:
    from serve import LLM, SamplingParams

    llm = LLM(args.model, device=args.device, max_num_seqs=args.max_num_seqs)
    params = []
    for i in range(args.num_prompts):
        constrained = i < share_constrained * args.num_prompts
        params.append(SamplingParams(
            temperature=args.temperature, seed=i, max_tokens=args.max_tokens,
            structured_outputs={"json": SCHEMAS[i % len(SCHEMAS)]} if constrained else None))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up (compiles the grammars)
    fills = []  # (seconds, rows) of every fill
    core = llm.engine.core
    steps = [0]  # steps sampled (one _sample call each)
    sample = core._sample

    def counted_sample(forward):
        steps[0] += 1
        return sample(forward)

    core._sample = counted_sample
    grammars = core.grammars
    if grammars is not None:
        fill = grammars.fill

        def timed_fill(rows):
            start = time.perf_counter()
            mask = fill(rows)
            fills.append((time.perf_counter() - start, len(rows)))
            return mask

        grammars.fill = timed_fill
    runs = []
    for _ in range(args.repeats):
        fills.clear()
        steps[0] = 0
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        runs.append((tokens / seconds, tokens, seconds, list(fills), steps[0]))
    llm.shutdown()
    runs.sort(key=lambda run: run[0])
    tok_s, tokens, seconds, median_fills, num_steps = runs[len(runs) // 2]
    row = {"share_constrained": share_constrained, "output_tokens_per_s": tok_s,
           "runs_output_tokens_per_s": sorted(r[0] for r in runs), "output_tokens": tokens,
           "seconds": seconds, "steps": num_steps, "ms_per_step": 1e3 * seconds / num_steps,
           "runs_ms_per_step": sorted(1e3 * r[2] / r[4] for r in runs)}
    if median_fills:
        row |= {"fill_ms_per_step_median": 1e3 * statistics.median(s for s, _ in median_fills),
                "fill_us_per_row": 1e6 * sum(s for s, _ in median_fills)
                / sum(n for _, n in median_fills),
                "fill_ms_total": 1e3 * sum(s for s, _ in median_fills),
                "masked_steps": len(median_fills)}
    return row


def compile_times(model: str) -> list[dict]:
    """Each schema's compile time against the model's vocabulary: cold (a fresh compiler) and
    cached (the same schema again, as a second request sending it finds it)."""
    from transformers import AutoConfig, AutoTokenizer

    from serve.structured.grammar import build_grammar
    from serve.structured.manager import GrammarManager
    from serve.structured.params import StructuredOutputsParams

    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab_size = AutoConfig.from_pretrained(model).vocab_size
    manager = GrammarManager(model, vocab_size, {tokenizer.eos_token_id})
    times = []
    for schema in SCHEMAS:
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            manager.compiler.compile_grammar(build_grammar(StructuredOutputsParams(json=schema)))
            seconds.append(time.perf_counter() - start)
        times.append({"cold_ms": 1e3 * seconds[0], "cached_ms": 1e3 * seconds[1]})
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.structured_output",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench/demo_models/pycode-8m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from bench.results import environment, write_result

    rows = []
    for share in (0.0, 1.0, 0.5):
        rows.append(run(args, share))
        row = rows[-1]
        print(f"constrained {share:4.0%}: {row['output_tokens_per_s']:8.1f} tok/s, "
              f"{row['ms_per_step']:.3f} ms/step"
              + (f", mask fill {row['fill_ms_per_step_median']:.3f} ms/step, "
                 f"{row['fill_us_per_row']:.1f} us/row" if "fill_us_per_row" in row else ""),
              flush=True)
    compiles = compile_times(args.model)
    print("compile ms (cold/cached): " + ", ".join(
        f"{c['cold_ms']:.1f}/{c['cached_ms']:.3f}" for c in compiles), flush=True)
    result = {"kind": "structured_output", "env": environment(args.device),
              "model": args.model, "schemas": SCHEMAS,
              "workload": {"num_prompts": args.num_prompts, "max_num_seqs": args.max_num_seqs,
                           "max_tokens": args.max_tokens, "temperature": args.temperature},
              "repeats": args.repeats, "rows": rows,
              "compile": compiles}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
