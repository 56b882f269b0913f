"""On a GPU: a replayed decode graph computes what the same kernels compute eagerly, for every
bucket and for ragged batches; the engine gives the same tokens with and without graphs; a step
waits for the GPU only once, for its sampled tokens.

Skipped without CUDA and FlashInfer; run on the H100 with `pytest -m gpu`.
"""

import pytest
import torch

from serve import LLM, SamplingParams
from serve.core.cuda_graph import pad_decode_inputs
from serve.core.sampler import SamplingTensors
from serve.core.step_inputs import build_step_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MAX_NUM_SEQS = 20  # buckets 1, 2, 4, 8, 16, 20
TIE = 0.25  # as in test_gpu_engine: bf16 logits closer than this are a near-tie
PROMPTS = ["def main():", "import os\nimport sys\n", "class A(object):\n    def",
           "for i in range(10):\n    print(i)\n" * 20]


@pytest.fixture(scope="module")
def llm(gpu_model_dir) -> LLM:
    return LLM(gpu_model_dir, dtype="bfloat16", max_num_seqs=MAX_NUM_SEQS, num_pages=512)


def prefilled_decode_inputs(runner, num_seqs: int, seed: int):
    """Prefill num_seqs sequences of different lengths; the inputs of their next decode step."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 70, (num_seqs,), generator=generator).tolist()
    prompts = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in lengths]
    pages_per_seq = -(-71 // runner.page_size)
    tables = [list(range(i * pages_per_seq, (i + 1) * pages_per_seq)) for i in range(num_seqs)]
    runner.forward(build_step_inputs(prompts, [0] * num_seqs, tables, runner.page_size))
    next_tokens = [[int(t)] for t in torch.randint(3, 500, (num_seqs,), generator=generator)]
    return build_step_inputs(next_tokens, lengths, tables, runner.page_size)


@torch.inference_mode()
def eager_logits_with_graph_kernels(runner, inputs, bucket: int) -> torch.Tensor:
    """The padded step launched kernel by kernel with the graph's own attention plan: the
    same kernels a replay runs, so the logits must be bit-identical."""
    padded = pad_decode_inputs(inputs, bucket, runner.kv_pool.pad_page)
    device_inputs = runner.stagings[0].to_device(padded)
    runner.backend.plan(device_inputs.attention, for_cuda_graph=True)
    hidden = runner.model(device_inputs.token_ids, device_inputs.positions,
                          device_inputs.attention)
    return runner.model.compute_logits(hidden)[: len(device_inputs.sample_indices)]


@pytest.mark.parametrize("num_seqs", [1, 2, 3, 4, 7, 8, 13, 16, 19, 20])
def test_replay_equals_eager_launch_for_every_bucket_and_ragged_batches(llm, num_seqs):
    runner = llm.engine.runner
    assert runner.graphs is not None and runner.graphs.batch_sizes == [1, 2, 4, 8, 16, 20]
    inputs = prefilled_decode_inputs(runner, num_seqs, seed=num_seqs)
    bucket = runner.graphs.bucket_for(inputs)
    replayed = runner.forward(inputs)
    eager = eager_logits_with_graph_kernels(runner, inputs, bucket)
    assert torch.equal(replayed, eager)
    # and the plain eager path (its own decode plan, no padding) agrees within bf16 noise
    graphs, runner.graphs = runner.graphs, None
    try:
        plain = runner.forward(inputs)
    finally:
        runner.graphs = graphs
    torch.testing.assert_close(replayed, plain, rtol=0, atol=0.05)


def test_the_engine_keeps_torch_to_one_host_thread(llm):
    assert torch.get_num_threads() == 1


def test_batches_above_the_largest_bucket_and_prefill_run_eagerly(llm):
    runner = llm.engine.runner
    inputs = prefilled_decode_inputs(runner, MAX_NUM_SEQS + 1, seed=0)
    assert runner.graphs.bucket_for(inputs) is None
    prefill = build_step_inputs([[5, 6, 7]], [0], [[0]], runner.page_size)
    assert runner.graphs.bucket_for(prefill) is None
    assert runner.forward(inputs).shape[0] == MAX_NUM_SEQS + 1


def test_engine_tokens_agree_with_and_without_graphs(gpu_model_dir):
    """Greedy tokens agree except where a near-tie (bf16 rounding in a differently split
    attention reduction) sends the two continuations apart; every divergence must start at one."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llms = {eager: LLM(gpu_model_dir, dtype="bfloat16", enforce_eager=eager, num_pages=1024,
                       max_num_seqs=MAX_NUM_SEQS) for eager in (True, False)}
    assert llms[True].engine.runner.graphs is None and llms[False].engine.runner.graphs
    outputs = {eager: [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
               for eager, llm in llms.items()}
    tokenizer = llms[True].tokenizer
    for index, prompt in enumerate(PROMPTS):
        eager, graphed = outputs[True][index], outputs[False][index]
        same = next((i for i, (a, b) in enumerate(zip(eager, graphed, strict=True)) if a != b),
                    len(eager))
        if same == len(eager):
            continue
        prefix = tokenizer.encode(prompt) + eager[:same]
        runner = llms[True].engine.runner
        pages = list(range(-(-len(prefix) // runner.page_size)))
        logits = runner.forward(build_step_inputs([prefix], [0], [pages], runner.page_size))[0]
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] < TIE, f"prompt {index} diverged at token {same} with no tie"


@pytest.mark.parametrize("num_seqs", [3, MAX_NUM_SEQS + 1])  # a replayed and an eager decode
def test_a_step_waits_for_the_gpu_only_for_its_tokens(llm, num_seqs):
    """With CUDA's sync debug mode set to error, everything up to the sampled token ids runs
    without a host-device synchronization; the final .tolist() is the step's one sync."""
    runner = llm.engine.runner
    inputs = prefilled_decode_inputs(runner, num_seqs, seed=1)
    inputs.sampling = SamplingTensors.build(
        [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)] * num_seqs,
        list(range(num_seqs)), [10] * num_seqs, runner.hf_config.vocab_size)
    # warm: first calls may compile or load kernels
    runner.collect(runner.sample(runner.execute_model(inputs)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            on_device = runner.to_device(inputs)
            tokens = runner.sampler(runner.logits(on_device), on_device.sampling)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tokens.shape == (num_seqs,)
