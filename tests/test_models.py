"""Our model code against transformers' on the same weights (CPU, float32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve import LLM, SamplingParams
from serve.config import EngineConfig
from serve.engine.model_runner import ModelRunner
from serve.models import model_class_for
from serve.models.loader import load_config


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def test_logits_match_transformers_prefill_and_decode(model_dir):
    reference = hf_model(model_dir)
    runner = ModelRunner(EngineConfig(model_dir, device="cpu", dtype="float32"),
                         load_config(model_dir), model_dir)
    ids = random_prompt(reference.config.vocab_size, 48, seed=1)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]  # [48, vocab]

    # Prefill the first 32 tokens, then feed the rest one at a time through the KV cache.
    cache = runner.allocate_kv_cache(len(ids))
    got = [runner.forward(ids[:32], 0, cache)[0]]
    for pos in range(32, len(ids)):
        got.append(runner.forward([ids[pos]], pos, cache)[0])
    got = torch.stack(got)
    want = expected[31:]
    assert (got - want).abs().max().item() <= 1e-4


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
