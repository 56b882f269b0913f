"""Tensor parallelism on the CPU: two processes joined by gloo hold half the model each and give
the tokens one process gives; each rank reads only its slice of the checkpoint; a rank that
fails to start, or dies, is an error rather than a hang."""

import pytest
import torch
from safetensors import safe_open

from serve import LLM, SamplingParams
from serve.models import loader
from serve.models.loader import build_model, load_config
from serve.parallel import TensorParallel

PROMPTS = ["def main():", "import os\nimport sys\n", "x = [1, 2, 3]", "class A:"]
PARAMS = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True)] * 2


@pytest.mark.parametrize("arch", ["qwen3", "llama"])  # a tied head, and a head of its own
def test_two_ranks_give_the_tokens_of_one(arch, request):
    model = request.getfixturevalue(f"{arch}_dir")
    outputs = {}
    for size in (1, 2):
        llm = LLM(model, device="cpu", tensor_parallel_size=size, max_num_batched_tokens=8)
        outputs[size] = [o.token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
        llm.shutdown()
    assert outputs[2] == outputs[1]


class RecordingSlice:
    """A safetensors slice that records which rows and columns were asked of it."""

    def __init__(self, name: str, real, reads: dict) -> None:
        self.name, self.real, self.reads = name, real, reads

    def __getitem__(self, index):
        self.reads.setdefault(self.name, []).append(index)
        return self.real[index]


def test_each_rank_reads_only_its_slice_of_the_checkpoint(qwen3_dir, monkeypatch):
    reads: dict[str, list] = {}

    class RecordingFile:
        def __init__(self, *args, **kwargs):
            self.file = safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return RecordingSlice(name, self.inner.get_slice(name), reads)

    config = load_config(qwen3_dir)
    full = build_model(config, qwen3_dir, "safetensors", torch.float32, torch.device("cpu"), 0)
    monkeypatch.setattr(loader, "safe_open", RecordingFile)
    half = build_model(config, qwen3_dir, "safetensors", torch.float32, torch.device("cpu"), 0,
                       TensorParallel(rank=1, size=2))
    layer, full_layer = half.model.layers[0], full.model.layers[0]
    q_rows = config.num_attention_heads * config.head_dim // 2  # rank 1: the second half
    assert torch.equal(layer.self_attn.qkv_proj.weight[:q_rows],
                       full_layer.self_attn.qkv_proj.weight[q_rows : 2 * q_rows])
    assert torch.equal(layer.self_attn.o_proj.weight,
                       full_layer.self_attn.o_proj.weight[:, q_rows:])
    assert torch.equal(layer.mlp.down_proj.weight,
                       full_layer.mlp.down_proj.weight[:, config.intermediate_size // 2 :])
    assert torch.equal(half.model.embed_tokens.weight,
                       full.model.embed_tokens.weight[config.vocab_size // 2 :])
    # every split matrix was read as a slice of rows or of columns, never whole
    for name, indexes in reads.items():
        if "norm" not in name:
            assert all(index != slice(None) for index in indexes), name


def test_a_rank_that_fails_to_start_is_one_clear_error(qwen3_dir, monkeypatch):
    monkeypatch.setenv("NANOSERVE_TEST_FAIL_RANK", "1")
    with pytest.raises(RuntimeError, match="rank 1 failed to start: RuntimeError: a failure"):
        LLM(qwen3_dir, device="cpu", tensor_parallel_size=2)


def test_heads_that_do_not_divide_are_refused(qwen3_dir):
    with pytest.raises(ValueError, match="num_attention_heads .4. is not divisible by the "
                                         "tensor parallel size .3."):
        LLM(qwen3_dir, device="cpu", tensor_parallel_size=3)


def test_a_dead_rank_fails_the_next_step_instead_of_hanging(qwen3_dir):
    llm = LLM(qwen3_dir, device="cpu", tensor_parallel_size=2)
    llm.engine.core.runner.workers[0].kill()
    with pytest.raises(RuntimeError):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    llm.shutdown()  # the live ranks' group is left, so a later engine can form one
