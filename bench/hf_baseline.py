"""The yardstick: the same requests through transformers' `generate` in static batches.

The model is built from the same config with random weights, so the tokens differ from the
engine's; only the speed is compared.

    python -m bench.hf_baseline --model qwen3-0.6b --workload course --out hf.json
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from bench.model_config import (
    dtype_name,
    load_hf_config,
    resolve_device,
    resolve_dtype,
    synchronize,
    vocab_size_of,
)
from bench.results import environment, write_result
from bench.workloads import add_workload_args, make_requests, workload_from_args
from serve.sampling_params import SamplingParams

Requests = list[tuple[list[int], SamplingParams]]
WARMUP_OUTPUT_LEN = 4  # output tokens per request of the warm-up batch


def build_model(model: str, dtype: torch.dtype, device: str, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    # Building under the device context initializes the weights there: much faster on a GPU.
    with torch.device(device):
        hf_model = AutoModelForCausalLM.from_config(load_hf_config(model), dtype=dtype)
    return hf_model.eval()


def left_pad(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, ...]:
    """Left padding, so every row's last prompt token sits at the same index and all rows
    start generating together; the attention mask hides the pads."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def generate_batch(hf_model: PreTrainedModel, batch: Requests, device: str) -> int:
    """Run one static batch; returns the number of tokens generated (padding rows included)."""
    # `generate` has one length per batch: every row runs to the batch's longest output_len.
    # min_new_tokens == max_new_tokens stops rows from ending early at EOS (ignore_eos).
    max_new_tokens = max(params.max_tokens for _, params in batch)
    temperature = batch[0][1].temperature
    pad_id = getattr(hf_model.config, "pad_token_id", None) or 0
    input_ids, attention_mask = left_pad([prompt for prompt, _ in batch], pad_id, device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_k=0, top_p=1.0,  # HF's default top_k=50 would do work the engine does not
        pad_token_id=pad_id, eos_token_id=hf_model.config.eos_token_id,
    )
    with torch.inference_mode():
        output = hf_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   generation_config=config)
    generated = output.shape[1] - input_ids.shape[1]
    if generated != max_new_tokens:
        raise RuntimeError(f"HF generated {generated} tokens per row, expected {max_new_tokens}")
    return generated * len(batch)


def run_hf_baseline(hf_model: PreTrainedModel, requests: Requests, device: str,
                    batch_size: int) -> dict:
    """Time all requests through `generate`, `batch_size` at a time in request order.

    Batches are not sorted by length: that is what a straightforward `generate` user gets, and
    the padding it costs is part of what a serving engine removes. Only each request's own
    output_len counts as useful output; the tokens padding rows generate past it do not.
    """
    batches = [requests[start:start + batch_size] for start in range(0, len(requests), batch_size)]
    synchronize()
    start = time.perf_counter()
    padded_output_tokens = sum(generate_batch(hf_model, batch, device) for batch in batches)
    synchronize()
    wall_time = time.perf_counter() - start
    num_input_tokens = sum(len(prompt) for prompt, _ in requests)
    num_output_tokens = sum(params.max_tokens for _, params in requests)
    return {
        "num_requests": len(requests),
        "batch_size": batch_size,
        "wall_time_s": wall_time,
        "num_input_tokens": num_input_tokens,
        "num_output_tokens": num_output_tokens,
        "num_padded_output_tokens": padded_output_tokens,
        "requests_per_s": len(requests) / wall_time,
        "input_tokens_per_s": num_input_tokens / wall_time,
        "output_tokens_per_s": num_output_tokens / wall_time,
        "total_tokens_per_s": (num_input_tokens + num_output_tokens) / wall_time,
    }


def benchmark_hf(model: str, requests: Requests, dtype: str = "auto", device: str = "auto",
                 batch_size: int = 64, seed: int = 0, warmup: bool = False) -> dict:
    """Build the HF model, optionally warm it up on a short batch, and time the requests."""
    device = resolve_device(device)
    hf_model = build_model(model, resolve_dtype(dtype, device), device, seed)
    if warmup:
        warmup_requests = [(prompt, SamplingParams(temperature=params.temperature,
                                                   max_tokens=WARMUP_OUTPUT_LEN))
                           for prompt, params in requests[:batch_size]]
        print(f"hf generate warmup (not timed): the first {len(warmup_requests)} requests as "
              f"one batch, {WARMUP_OUTPUT_LEN} output tokens each", flush=True)
        generate_batch(hf_model, warmup_requests, device)
    print(f"hf generate: {len(requests)} requests in batches of {batch_size}", flush=True)
    metrics = run_hf_baseline(hf_model, requests, device, batch_size)
    del hf_model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # leave the memory to whatever runs next in this process
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.hf_baseline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF dir, config .json, or shipped name")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--warmup", action="store_true",
                        help="first run the workload's first --hf-batch-size requests as one "
                             f"batch with {WARMUP_OUTPUT_LEN} output tokens each, not timed")
    parser.add_argument("--out", help="write the result JSON here")
    add_workload_args(parser)
    args = parser.parse_args(argv)
    workload = workload_from_args(args)
    requests = make_requests(workload, vocab_size_of(args.model))
    metrics = benchmark_hf(args.model, requests, args.dtype, args.device, args.hf_batch_size,
                           workload.seed, args.warmup)
    device = resolve_device(args.device)
    result = {
        "kind": "hf_baseline",
        "env": environment(device),
        "workload": workload.to_dict(),
        "engine_args": {"model": args.model, "dtype": dtype_name(resolve_dtype(args.dtype, device)),
                        "device": device, "hf_batch_size": args.hf_batch_size},
        "metrics": metrics,
    }
    print(f"hf generate: {metrics['output_tokens_per_s']:.1f} output tok/s, "
          f"{metrics['requests_per_s']:.2f} req/s, {metrics['wall_time_s']:.2f} s")
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
