"""The production setup end to end: the engine core in its own process, overlap scheduling and two
tensor-parallel ranks on gloo, all at once, give the tokens and text of the plain in-process
engine: greedy and seeded requests, prompts cut into chunks, preemptions, and a stop string that
the server side finds and the core (in the other process) ends."""

from serve import SamplingParams
from tests.helpers import generate_on_cpu

PROMPTS = ["def main():", "import os\nimport sys\n" * 3, "x = [1, 2, 3]",
           "class A:\n    pass\n" * 4,
           "for i in range(10):", "y"]


def run(model: str, prompts: list[str], params: list[SamplingParams], **config) -> list[tuple]:
    return generate_on_cpu(model, prompts, params, max_num_batched_tokens=24, num_pages=24,
                           page_size=4, **config)[0]


def test_core_process_overlap_and_two_ranks_give_the_in_process_engines_output(qwen3_dir):
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True)] * 3
    plain = run(qwen3_dir, PROMPTS, params)
    # a stop string taken from the middle of a greedy output's text: it ends that request there
    tokens, text, _ = plain[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params[0] = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    plain = run(qwen3_dir, PROMPTS, params, overlap_scheduling=False)
    production = run(qwen3_dir, PROMPTS, params, core_process=True, overlap_scheduling=True,
                     tensor_parallel_size=2)
    assert production == plain
    assert plain[0][2] == "stop" and plain[0][1] == text[: text.index(stop)]
    assert len(plain[0][0]) < len(tokens)  # it ended early, across the process boundary
