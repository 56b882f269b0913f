"""Speculative decoding against plain decoding, on code the demo model never saw.

    python -m bench.spec_decode --model bench/demo_models/pycode-8m --batch-sizes 1 8 \
        --ks 2 4 --draft-model bench/demo_models/pycode-2m --out spec.json

The workload continues Python files held out of the demo models' training (the standard
library's files that bench.demo.train set aside by a hash of their path): each prompt is the
first --prompt-len tokens of one file (then of the next window of --prompt-len + --output-len
tokens, when there are more prompts than files), and the engine writes --output-len more. For
each batch size (the engine's max_num_seqs: at most that many requests run at once), plain
decoding and each method (n-gram; a draft model with --draft-model) with each k (drafts per
step) run the same requests --repeats times after a warm-up; the median run's output tokens
per second is reported, with the mean acceptance length (tokens a verify row yielded: 1 + its
accepted drafts, vLLM's definition), the share of drafts accepted and the acceptance by draft
position. Greedy runs also check that every run gave the plain run's tokens.
"""

import argparse
import gc
import statistics
import time

import torch

from serve.spec.config import DEFAULT_DISABLE_BY_BATCH_SIZE


def held_out_prompts(tokenizer, num_prompts: int, prompt_len: int, output_len: int) -> list:
    """num_prompts prompts of prompt_len tokens, each with output_len tokens of the file after
    it: the first window of every held-out file long enough, then the second window of each
    (where a file has one), and so on."""
    from bench.demo.train import load_corpus

    window = prompt_len + output_len
    files = [tokenizer(text, add_special_tokens=False)["input_ids"]
             for text in load_corpus().held_out]
    prompts = [ids[start : start + prompt_len]
               for start in range(0, max(map(len, files)), window)
               for ids in files if len(ids) >= start + window]
    if len(prompts) < num_prompts:
        raise SystemExit(f"the held-out files hold {len(prompts)} windows of {window} tokens")
    return prompts[:num_prompts]


def speculative_config(args, method: str, k: int) -> dict | None:
    if method == "none":
        return None
    switch_off = args.disable_by_batch_size or None  # 0: never
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k,
                "disable_by_batch_size": switch_off, "prompt_lookup_max": args.lookup_max,
                "prompt_lookup_min": args.lookup_min}
    return {"method": "draft_model", "model": args.draft_model, "num_speculative_tokens": k,
            "disable_by_batch_size": switch_off}


def run_config(args, prompts: list, batch_size: int, method: str, k: int) -> tuple[dict, list]:
    from serve import LLM, SamplingParams

    spec = speculative_config(args, method, k)
    max_model_len = args.prompt_len + args.output_len
    # a pool for the batch's full contexts, sized here: measuring what fits the GPU would count
    # the memory an earlier configuration's engine may still hold
    num_pages = batch_size * -(-max_model_len // 16) + 16
    llm = LLM(args.model, device=args.device, max_num_seqs=batch_size, num_pages=num_pages,
              speculative_config=spec, max_model_len=max_model_len)
    snapshots = []
    take = llm.engine.take_stats
    llm.engine.take_stats = lambda: snapshots.append(take()) or snapshots[-1]
    params = [SamplingParams(temperature=args.temperature, seed=i, max_tokens=args.output_len,
                             ignore_eos=True) for i in range(len(prompts))]
    llm.generate(prompts[:batch_size], params[:batch_size], use_tqdm=False)  # warm-up
    runs, tokens = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = [o.outputs[0].token_ids for o in outputs]
        runs.append(sum(map(len, tokens)) / seconds)
    llm.shutdown()
    del llm
    gc.collect()  # the next configuration's engine sizes its pool from the free memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    stats = snapshots[-1]  # the last run's
    row = {"batch_size": batch_size, "method": method, "k": k,
           "output_tokens_per_s": statistics.median(runs), "runs_output_tokens_per_s": runs,
           "num_output_tokens": sum(map(len, tokens))}
    if stats.spec_num_drafts:
        row |= {"mean_acceptance_length": 1 + stats.spec_num_accepted_tokens
                / stats.spec_num_drafts,
                "draft_acceptance_rate": stats.spec_num_accepted_tokens
                / stats.spec_num_draft_tokens,
                "num_verify_rows": stats.spec_num_drafts,
                "accepted_per_position": [count / stats.spec_num_drafts
                                          for count in stats.spec_accepted_per_pos]}
    return row, tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.spec_decode",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench/demo_models/pycode-8m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="drafts per step")
    parser.add_argument("--draft-model", help="also speculate with this draft model")
    parser.add_argument("--disable-by-batch-size", type=int, default=0,
                        help="no drafts while more requests run (0: speculate at any batch; "
                        f"the engine's default is {DEFAULT_DISABLE_BY_BATCH_SIZE})")
    parser.add_argument("--lookup-max", type=int, default=4)
    parser.add_argument("--lookup-min", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from bench.results import environment, write_result
    from serve.engine.tokenizer import load_tokenizer

    prompts = held_out_prompts(load_tokenizer(args.model), args.num_prompts, args.prompt_len,
                               args.output_len)
    rows = []
    methods = ["ngram"] + (["draft_model"] if args.draft_model else [])
    configs = [("none", 0)] + [(method, k) for method in methods for k in args.ks]
    for batch_size in args.batch_sizes:
        plain = None
        for method, k in configs:
            row, tokens = run_config(args, prompts, batch_size, method, k)
            if plain is None:
                plain, plain_tokens = row, tokens
            else:
                row["speedup_vs_plain"] = row["output_tokens_per_s"] / plain["output_tokens_per_s"]
                if args.temperature == 0:
                    row["same_tokens_as_plain"] = tokens == plain_tokens
            rows.append(row)
            print(f"batch {batch_size:3d} {method:11s} k {k}: "
                  f"{row['output_tokens_per_s']:8.1f} tok/s"
                  + (f", acceptance length {row['mean_acceptance_length']:.2f}"
                     if "mean_acceptance_length" in row else "")
                  + (f", {row['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in row else ""),
                  flush=True)
    result = {"kind": "spec_decode", "env": environment(args.device),
              "model": args.model, "draft_model": args.draft_model,
              "workload": {"source": "held-out standard-library files",
                           "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
                           "output_len": args.output_len, "temperature": args.temperature,
                           "prompt_lookup_min": args.lookup_min,
                           "prompt_lookup_max": args.lookup_max,
                           "disable_by_batch_size": args.disable_by_batch_size or None},
              "repeats": args.repeats, "rows": rows}
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
