"""The trained demo models (bench/demo_models/): Hugging Face checkpoints in bf16, a target and a
draft with one tokenizer, that the engine runs exactly as transformers does; the result file of
their training describes these very checkpoints; and the training command still runs."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from bench.demo import train
from bench.demo.train import DEMO_MODELS, demo_models
from bench.results import REPO_ROOT
from serve import LLM, SamplingParams

CHECKPOINT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja"}
# Code a learner would type; none ends in a newline (the tokenizer merges a newline with the
# indentation after it, so a prompt cut after one asks for a token split the model never saw).
PROMPTS = ["import os\n\n\ndef read_lines(path):", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "def fibonacci(n):\n    if n < 2:"]


def parameters(checkpoint: Path) -> tuple[int, set[str]]:
    """(how many weights the checkpoint holds, their dtypes)."""
    with safe_open(checkpoint / "model.safetensors", "pt") as tensors:
        slices = [tensors.get_slice(name) for name in tensors.keys()]
        return sum(math.prod(s.get_shape()) for s in slices), {s.get_dtype() for s in slices}


def test_the_demo_models_are_bf16_checkpoints_with_one_tokenizer():
    result, target, draft = demo_models()
    for role, checkpoint in (("target", target), ("draft", draft)):
        assert CHECKPOINT_FILES <= {path.name for path in checkpoint.iterdir()}
        count, dtypes = parameters(checkpoint)
        assert dtypes == {"BF16"}
        assert count == result["models"][role]["parameters"]  # the file describes these weights
    assert (target / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    assert result["models"]["draft"]["parameters"] * 4 <= result["models"]["target"]["parameters"]
    # Both travel in the repository (and to the GPU machine, whose copy is limited to 64 MiB).
    assert sum(path.stat().st_size for path in DEMO_MODELS.rglob("*")) < 24e6


def test_the_training_reached_its_targets():
    result, _, _ = demo_models()
    target, draft = result["models"]["target"], result["models"]["draft"]
    assert target["held_out"]["top1_accuracy"] >= 0.45
    assert draft["held_out"]["top1_accuracy"] < target["held_out"]["top1_accuracy"]
    assert 0 < result["draft_agreement"]["agreement"] < 1


@pytest.mark.parametrize("role", ["target", "draft"])
def test_greedy_output_equals_transformers(role):
    """Our engine and transformers, both in float32 on this CPU, give the same greedy tokens."""
    _, target, draft = demo_models()
    checkpoint = str(target if role == "target" else draft)
    llm = LLM(checkpoint, device="cpu", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ours = [output.token_ids for output in llm.generate(PROMPTS, params, use_tqdm=False)]
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        with torch.no_grad():
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids),
                                          max_new_tokens=48, min_new_tokens=48, do_sample=False,
                                          pad_token_id=0)
        assert tokens == expected[0, ids.shape[1]:].tolist(), prompt


def test_the_training_command_runs_a_few_steps(tmp_path):
    """--smoke: tiny models, a corner of the corpus, a few steps, on this CPU."""
    result = train.main(["--smoke", "--out-dir", str(tmp_path / "models"),
                              "--results-dir", str(tmp_path)])
    for role in ("target", "draft"):
        entry = result["models"][role]
        assert entry["steps"] > 0 and entry["curve"] and 0 <= entry["held_out"]["top1_accuracy"]
        assert CHECKPOINT_FILES <= {p.name for p in (tmp_path / "models" / entry["name"]).iterdir()}
    written = json.loads(next(tmp_path.glob("train-demo-*.json")).read_text())
    assert written["corpus"]["held_out_files"] > 0 and written["tokenizer"]["held_out_tokens"] > 0


def test_the_readme_shows_what_the_demo_model_wrote():
    """The README's sample is a committed sample's beginning, not text written by hand."""
    readme = (REPO_ROOT / "README.md").read_text()
    shown = readme.split("continues a class like this", 1)[1].split("```python\n", 1)[1]
    shown = shown.split("```", 1)[0]
    samples = "\n".join(path.read_text() for path in DEMO_MODELS.glob("demo-samples-*.md"))
    assert len(shown) > 100 and shown in samples
