"""The CUDA-graph bookkeeping that runs on the host: bucket choice and padding (CPU).

Replaying the graphs themselves needs a GPU: tests/test_gpu_cuda_graph.py.
"""

import pytest
import torch

from serve.config import EngineConfig
from serve.core.cuda_graph import bucket_for, graph_batch_sizes, pad_decode_inputs
from serve.core.model_runner import ModelRunner
from serve.core.step_inputs import build_step_inputs
from serve.models.loader import load_config


def test_batch_sizes_are_powers_of_two_then_steps_of_16_up_to_max_num_seqs():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(1) == [1]


@pytest.mark.parametrize("max_num_seqs", [1, 3, 16, 20, 100, 256])
def test_every_batch_up_to_max_num_seqs_has_the_smallest_bucket_that_holds_it(max_num_seqs):
    sizes = graph_batch_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
    for num_seqs in range(1, max_num_seqs + 1):
        bucket = bucket_for(num_seqs, sizes)
        assert bucket >= num_seqs
        assert all(size < num_seqs for size in sizes if size < bucket)
    assert bucket_for(max_num_seqs + 1, sizes) is None


def decode_inputs(page_size: int = 4):
    """Three sequences of 5, 9 and 4 cached tokens, each feeding one token."""
    tables = [[7, 2], [0, 5, 3], [6]]
    return build_step_inputs([[11], [12], [13]], [4, 8, 3], tables, page_size)


def test_padding_rows_write_and_read_only_the_pad_page():
    inputs = decode_inputs()
    padded = pad_decode_inputs(inputs, 8, pad_page=9)
    meta, pad = inputs.attention, padded.attention
    assert padded.num_tokens == 8 and pad.num_seqs == 8 and pad.is_decode
    assert torch.equal(padded.token_ids[:3], inputs.token_ids)
    assert torch.equal(padded.positions[:3], inputs.positions)
    assert padded.token_ids[3:].eq(0).all() and padded.positions[3:].eq(0).all()
    assert torch.equal(pad.slot_mapping[:3], meta.slot_mapping)
    assert pad.slot_mapping[3:].eq(9 * 4).all()  # slot 0 of the pad page
    assert torch.equal(pad.kv_indices[: len(meta.kv_indices)], meta.kv_indices)
    assert pad.kv_indices[len(meta.kv_indices):].eq(9).all()
    assert pad.kv_indptr.tolist() == meta.kv_indptr.tolist() + [7, 8, 9, 10, 11]
    assert pad.kv_last_page_len.tolist() == meta.kv_last_page_len.tolist() + [1] * 5
    assert pad.qo_indptr.tolist() == list(range(9))
    assert torch.equal(padded.sample_indices, inputs.sample_indices)  # real rows only
    assert pad_decode_inputs(inputs, 3, pad_page=9) is inputs


def test_padded_step_gives_the_real_rows_the_same_logits(qwen3_dir):
    """Run a decode step padded to 8 rows and unpadded, from the same cache: the real rows'
    logits are identical and the padding touched no request's page."""
    config = EngineConfig(qwen3_dir, device="cpu", dtype="float32", page_size=4, num_pages=16)
    runner = ModelRunner(config, load_config(qwen3_dir), qwen3_dir, max_model_len=64)
    assert runner.kv_pool.pad_page == 16 and runner.kv_pool.k.shape[1] == 17
    tables = [[7, 2], [0, 5, 3], [6]]
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]
    runner.forward(build_step_inputs(prompts, [0, 0, 0], tables, 4))
    before = runner.kv_pool.k[:, :16].clone(), runner.kv_pool.v[:, :16].clone()
    inputs = build_step_inputs([[11], [12], [13]], [4, 8, 3], tables, 4)
    padded = runner.forward(pad_decode_inputs(inputs, 8, runner.kv_pool.pad_page))
    after_padded = runner.kv_pool.k[:, :16].clone(), runner.kv_pool.v[:, :16].clone()
    plain = runner.forward(inputs)
    assert padded.shape == plain.shape == (3, runner.hf_config.vocab_size)
    # equal up to float32 rounding: a matmul over 8 rows may block its sums differently than 3
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-5)
    # the padded step wrote exactly the three real slots, nothing else of the requests' pages
    slots = inputs.attention.slot_mapping
    for cache_before, cache_after in zip(before, after_padded, strict=True):
        changed = (cache_before != cache_after).flatten(3).any(-1).any(0).flatten()  # [slots]
        assert changed.nonzero().flatten().tolist() == sorted(slots.tolist())


def test_enforce_eager_and_cpu_capture_no_graphs(qwen3_dir):
    for enforce_eager in (False, True):
        config = EngineConfig(qwen3_dir, device="cpu", num_pages=8, enforce_eager=enforce_eager)
        runner = ModelRunner(config, load_config(qwen3_dir), qwen3_dir, max_model_len=32)
        assert runner.graphs is None
