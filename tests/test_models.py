"""Our model code against transformers' on the same weights (CPU, float32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve import LLM, SamplingParams
from serve.config import EngineConfig
from serve.core.model_runner import ModelRunner
from serve.core.step_inputs import build_step_inputs
from serve.models import model_class_for
from serve.models.loader import load_config


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def teacher_forced_logits(runner: ModelRunner, prompts: list[list[int]], follow: list[list[int]]):
    """Prefill the prompts as one ragged batch over the paged pool, then feed each row its
    `follow` tokens one decode step at a time; returns [rows, steps, vocab] logits."""
    # Each row gets its own pages, dealt out backwards so that no table is contiguous.
    pages_per_row = -(-max(len(p) + len(f) for p, f in zip(prompts, follow, strict=True))
                      // runner.page_size)
    free = list(reversed(range(runner.kv_pool.num_pages)))
    tables = [[free.pop() for _ in range(pages_per_row)][::-1] for _ in prompts]
    steps = [runner.forward(build_step_inputs(prompts, [0] * len(prompts), tables,
                                              runner.page_size))]
    for step in range(len(follow[0])):
        computed = [len(p) + step for p in prompts]
        tokens = [[f[step]] for f in follow]
        steps.append(runner.forward(build_step_inputs(tokens, computed, tables,
                                                      runner.page_size)))
    return torch.stack(steps, dim=1)


def test_logits_match_transformers_prefill_and_decode(model_dir):
    reference = hf_model(model_dir)
    config = EngineConfig(model_dir, device="cpu", dtype="float32", page_size=4)
    runner = ModelRunner(config, load_config(model_dir), model_dir, max_model_len=512)
    vocab = reference.config.vocab_size
    # Two rows of different lengths: the shorter one is left-padded in the batch.
    full = [random_prompt(vocab, 48, seed=1), random_prompt(vocab, 30, seed=2)]
    num_decode = 16
    prompts = [ids[:-num_decode] for ids in full]
    follow = [ids[-num_decode:] for ids in full]
    got = teacher_forced_logits(runner, prompts, follow)  # [2, 17, vocab]
    for row, ids in enumerate(full):
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0]  # [len, vocab]
        want = expected[len(prompts[row]) - 1 : -1]  # the logits after each fed token
        assert (got[row, :-1] - want).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(model_dir):
    reference = hf_model(model_dir)
    llm = LLM(model_dir, device="cpu", dtype="float32")
    prompts = [random_prompt(reference.config.vocab_size, n, seed=n) for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    reference.generation_config.eos_token_id = None  # no early stop: compare all 40 tokens
    for prompt, output in zip(prompts, outputs, strict=False):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0
            )[0, len(prompt):].tolist()
        assert output.token_ids == expected
        assert output.finish_reason == "length"


def test_unsupported_architecture_is_a_clear_error():
    class Config:
        architectures = ["GPT2LMHeadModel"]

    with pytest.raises(ValueError, match="supports: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        model_class_for(Config())


def test_dummy_weights_are_seeded(qwen3_dir):
    first = LLM(qwen3_dir, device="cpu", load_format="dummy", seed=3)
    second = LLM(qwen3_dir, device="cpu", load_format="dummy", seed=3)
    params = zip(first.engine.runner.model.parameters(),
                 second.engine.runner.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in params)


def test_max_model_len_beyond_the_rope_table_is_refused(qwen3_dir):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(qwen3_dir, device="cpu", max_model_len=10_000)
