"""What the demo model writes: a few code prompts continued at a few temperatures, by the engine
itself (offline API), with fixed seeds so that a rerun on the same machine writes the same text.

    python -m bench.demo.samples                                    # print them
    python -m bench.demo.samples --out-dir bench/demo_models        # and write a result file
"""

import argparse
import time
from pathlib import Path

from bench.demo.train import demo_models
from bench.results import environment, result_name, write_result
from serve import LLM, SamplingParams

# None ends in a newline: the tokenizer merges a newline with the indentation after it, so a
# prompt cut after one asks for a token split the model never saw in training.
PROMPTS = ["import os\n\n\ndef read_lines(path):",
           "class Stack:\n    \"\"\"A last-in, first-out list.\"\"\"\n\n    def __init__(self):",
           "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\""]
TEMPERATURES = (0.0, 0.6, 1.0)


def sample(model: str, max_tokens: int, seed: int) -> list[dict]:
    llm = LLM(model, device="cpu", dtype="float32")
    samples = []
    for temperature in TEMPERATURES:
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
        for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False),
                                  strict=True):
            completion = output.outputs[0]
            samples.append({"prompt": prompt, "temperature": temperature, "seed": seed,
                            "text": completion.text, "finish_reason": completion.finish_reason,
                            "num_tokens": len(completion.token_ids)})
    llm.shutdown()
    return samples


def as_markdown(samples: list[dict]) -> str:
    """Each sample as a code block under a line that says how it was made."""
    blocks = []
    for item in samples:
        how = (f"temperature {item['temperature']:g}" if item["temperature"] else "greedy") + \
            f", {item['num_tokens']} tokens ({item['finish_reason']})"
        blocks.append(f"**{how}**\n\n```python\n{item['prompt']}{item['text']}\n```\n")
    return "\n".join(blocks)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.demo.samples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint (default: the demo target)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", help="write the samples there, as JSON and as markdown")
    args = parser.parse_args(argv)
    model = args.model or str(demo_models()[1])
    started = time.perf_counter()
    samples = sample(model, args.max_tokens, args.seed)
    result = {"kind": "demo-samples", "env": environment("cpu"), "model": model,
              "seconds": round(time.perf_counter() - started, 1), "samples": samples}
    print(as_markdown(samples))
    if args.out_dir:
        path = Path(args.out_dir) / result_name("demo-samples", result["env"],
                                                Path(model).name)
        write_result(path, result)
        path.with_suffix(".md").write_text(as_markdown(samples))
        print(f"wrote {path} and {path.with_suffix('.md').name}")
    return result


if __name__ == "__main__":
    main()
