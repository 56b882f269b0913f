"""The demo tokenizer and tiny model directories behave like real Hugging Face checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.demo.random_model import build_model_dir
from bench.demo.tokenizer import CHATML_TEMPLATE, corpus_from_stdlib, train_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
]


@pytest.mark.parametrize(
    "text",
    ["", "def f(x):\n    return x  # done\n", "  leading and trailing  ", "héllo wörld 😀\t\r\n"],
)
def test_tokenizer_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer.encode(token) == [tokenizer.convert_tokens_to_ids(token)]
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_renders(tokenizer):
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    closed = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert closed.endswith("<|im_start|>user\nHi!<|im_end|>\n")


def test_corpus_is_capped_and_deterministic():
    texts = corpus_from_stdlib(50_000)
    assert 0 < sum(len(t.encode()) for t in texts) <= 50_000
    assert texts == corpus_from_stdlib(50_000)


def test_training_is_deterministic():
    corpus = corpus_from_stdlib(50_000)
    assert train_tokenizer(corpus, 300).get_vocab() == train_tokenizer(corpus, 300).get_vocab()


def test_model_dir_loads_with_transformers(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")

    ids = tokenizer("def main():\n    print('hello')\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]  # [num_tokens, vocab_size]
    assert torch.isfinite(logits).all()
    # Not degenerate: the logits are spread out and greedy decoding does not repeat one token.
    assert logits.std() > 0.5
    out = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert len(set(out[0, ids.shape[1] :].tolist())) > 8


def test_saved_files(model_dir):
    names = {p.name for p in Path(model_dir).iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    generation = json.loads((Path(model_dir) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]  # <|im_end|>, <|endoftext|>


def test_qwen2_has_nonzero_qkv_bias(qwen2_dir):
    config = json.loads((Path(qwen2_dir) / "config.json").read_text())
    assert "head_dim" not in config  # real Qwen2 configs derive it from hidden_size
    model = AutoModelForCausalLM.from_pretrained(qwen2_dir)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0


def test_llama_uses_llama3_rope_scaling(llama_dir):
    config = AutoModelForCausalLM.from_pretrained(llama_dir).config
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "llama3"
    assert rope["original_max_position_embeddings"] * rope["factor"] == 512
    assert not config.tie_word_embeddings


def test_build_is_deterministic(tokenizer, tmp_path):
    first = build_model_dir(tmp_path / "a", "qwen3", tokenizer, num_hidden_layers=1)
    second = build_model_dir(tmp_path / "b", "qwen3", tokenizer, num_hidden_layers=1)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
