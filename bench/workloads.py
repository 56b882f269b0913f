"""Named benchmark workloads, and the deterministic random requests each one stands for.

    python -m bench.workloads --model qwen3-0.6b --workload course --out requests.json

writes a workload's requests as the JSON that bench/probe.py reads (--requests), the file
bench.course.stages hands every stage's probe.
"""

import argparse
import json
import random
from dataclasses import asdict, dataclass, replace

from serve.sampling_params import SamplingParams


@dataclass(frozen=True)
class Workload:
    """How many requests, how long their prompts and outputs are, and how they sample."""

    name: str
    num_prompts: int
    input_len: tuple[int, int]  # inclusive range of prompt lengths, in tokens
    output_len: tuple[int, int]  # inclusive range of output lengths, in tokens
    temperature: float = 0.6
    ignore_eos: bool = True  # every request produces exactly its output length
    seed: int = 0
    # Conversations: every prompt starts with one system prompt of this many tokens, and each
    # conversation is `turns` requests long, turn t resending turns 1..t-1 (question and reply)
    # before its own question (input_len). 0 and 1: independent random prompts.
    shared_prefix_len: int = 0
    turns: int = 1
    # Interference: every long_every-th request has a prompt of long_input_len tokens instead
    # (0: none), the long prompt a chunked prefill must not let stall the others.
    long_every: int = 0
    long_input_len: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        for field_name in ("input_len", "output_len"):
            low, high = getattr(self, field_name)
            if not 1 <= low <= high:
                raise ValueError(f"{field_name} must satisfy 1 <= low <= high, got {low}:{high}")

    @property
    def max_seq_len(self) -> int:
        """The longest prompt plus the longest output: what max_model_len must hold."""
        exchange = max(self.input_len[1], self.long_input_len) + self.output_len[1]
        return self.shared_prefix_len + self.turns * exchange

    def to_dict(self) -> dict:
        return asdict(self)


WORKLOADS = {
    # Small enough for the stage-0 engine (one request at a time) to finish in about three
    # minutes: it decoded 27 tok/s at batch size 1 for a Qwen3-0.6B-shaped model in bf16 on an
    # H100 (2026-11-25; per-token Python overhead, not the GPU, sets that pace), and this
    # workload asks for 4847 output tokens (seed 0) ≈ 180 s. 64 prompts still leave a batching
    # engine a batch worth having, and are exactly one HF static batch of 64 (no stragglers).
    "course": Workload("course", num_prompts=64, input_len=(64, 256), output_len=(32, 128)),
    # nano-vllm's bench.py workload, so our numbers can be set beside its published ones.
    "nano-vllm": Workload("nano-vllm", num_prompts=256, input_len=(100, 1024),
                          output_len=(100, 1024)),
    # 64 chats of 4 turns behind one 2,048-token system prompt, turn by turn: every prompt
    # shares the system prompt, and each turn resends the whole conversation so far (SGLang's
    # generated-shared-prefix benchmark, with the history a chat client resends).
    "prefix-chat": Workload("prefix-chat", num_prompts=256, input_len=(32, 128),
                            output_len=(64, 192), shared_prefix_len=2048, turns=4),
    # Steady chat-sized requests, and every 25th an 8,192-token prompt (a document to
    # summarize): at 8 requests/s, a long prompt every few seconds lands among running decodes.
    "interference": Workload("interference", num_prompts=200, input_len=(64, 256),
                             output_len=(128, 512), long_every=25, long_input_len=8192),
}


def make_requests(workload: Workload, vocab_size: int) -> list[tuple[list[int], SamplingParams]]:
    """Random prompts and their sampling params; the same workload always gives the same list."""
    if workload.shared_prefix_len or workload.turns > 1:
        return conversation_requests(workload, vocab_size)
    rng = random.Random(workload.seed)
    requests = []
    for index in range(workload.num_prompts):
        input_len = rng.randint(*workload.input_len)
        if workload.long_every and (index + 1) % workload.long_every == 0:
            input_len = workload.long_input_len
        output_len = rng.randint(*workload.output_len)
        prompt = [rng.randrange(vocab_size) for _ in range(input_len)]
        params = SamplingParams(temperature=workload.temperature, max_tokens=output_len,
                                ignore_eos=workload.ignore_eos)
        requests.append((prompt, params))
    return requests


def conversation_requests(workload: Workload,
                          vocab_size: int) -> list[tuple[list[int], SamplingParams]]:
    """Every conversation's first turn, then every second turn, ...: a turn comes after the one
    it extends. A reply is random tokens of the turn's output length, standing for what the
    client resends (the engine's own reply would make the prompts depend on the engine)."""
    rng = random.Random(workload.seed)
    system = [rng.randrange(vocab_size) for _ in range(workload.shared_prefix_len)]
    num_conversations = -(-workload.num_prompts // workload.turns)
    histories = [system] * num_conversations
    requests = []
    for _ in range(workload.turns):
        for index in range(num_conversations):
            if len(requests) == workload.num_prompts:
                break
            question = [rng.randrange(vocab_size) for _ in range(rng.randint(*workload.input_len))]
            output_len = rng.randint(*workload.output_len)
            prompt = histories[index] + question
            requests.append((prompt, SamplingParams(temperature=workload.temperature,
                                                    max_tokens=output_len,
                                                    ignore_eos=workload.ignore_eos)))
            histories[index] = prompt + [rng.randrange(vocab_size) for _ in range(output_len)]
    return requests


def requests_as_json(requests: list[tuple[list[int], SamplingParams]]) -> list[dict]:
    """What bench/probe.py reads: one {prompt, max_tokens, temperature, ignore_eos} per request."""
    return [{"prompt": prompt, "max_tokens": params.max_tokens,
             "temperature": params.temperature, "ignore_eos": params.ignore_eos}
            for prompt, params in requests]


def parse_range(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B); a single 'N' means exactly N."""
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        message = f"expected a length N or a range A:B, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """--workload NAME, or a custom workload; explicit flags override the named one's fields."""
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", choices=sorted(WORKLOADS),
                       help="a named workload (default: course when no custom lengths are given)")
    group.add_argument("--num-prompts", type=int)
    group.add_argument("--input-len", type=parse_range, metavar="A:B")
    group.add_argument("--output-len", type=parse_range, metavar="C:D")
    group.add_argument("--temperature", type=float)
    group.add_argument("--seed", type=int)
    group.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", default=None,
                       help="let requests stop at EOS (then output lengths are upper bounds)")
    group.add_argument("--shared-prefix-len", type=int,
                       help="tokens of a system prompt that every prompt starts with")
    group.add_argument("--turns", type=int, help="requests per conversation")
    group.add_argument("--long-every", type=int,
                       help="every N-th request gets a prompt of --long-input-len tokens")
    group.add_argument("--long-input-len", type=int)


def workload_from_args(args: argparse.Namespace) -> Workload:
    overrides = {
        "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "temperature": args.temperature,
        "ignore_eos": args.ignore_eos, "shared_prefix_len": args.shared_prefix_len,
        "turns": args.turns, "long_every": args.long_every, "long_input_len": args.long_input_len,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    named = WORKLOADS[args.workload or "course"]
    workload = replace(named, **overrides)
    # A named workload with any field changed is no longer that workload: don't let its results
    # be plotted beside the real one under the same name. Another seed draws another sample of
    # the same workload (its results record the seed).
    if workload != named:
        workload = replace(workload, name="custom")
    return workload if args.seed is None else replace(workload, seed=args.seed)


def main(argv: list[str] | None = None) -> None:
    from bench.model_config import vocab_size_of  # reads the model's config: only for the CLI

    parser = argparse.ArgumentParser(prog="python -m bench.workloads",
                                     description="write a workload's requests for bench/probe.py")
    parser.add_argument("--model", required=True, help="whose vocabulary the prompts draw from")
    parser.add_argument("--out", required=True)
    add_workload_args(parser)
    args = parser.parse_args(argv)
    requests = make_requests(workload_from_args(args), vocab_size_of(args.model))
    with open(args.out, "x") as file:  # a new file: nothing overwrites a requests file in use
        json.dump(requests_as_json(requests), file)
    print(f"{args.out}: {len(requests)} requests")


if __name__ == "__main__":
    main()
