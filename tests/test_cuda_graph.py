"""The CUDA-graph bookkeeping that runs on the host: bucket choice and padding (CPU).

Replaying the graphs themselves needs a GPU: tests/test_gpu_cuda_graph.py.
"""

import pytest
import torch

from serve.config import EngineConfig
from serve.core.cuda_graph import (
    CudaGraphRunner,
    bucket_for,
    graph_batch_sizes,
    pad_decode_inputs,
    pad_verify_inputs,
)
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


TABLES = [[7, 2], [0, 5, 3], [6]]  # three requests' pages, of the pool's 16 (pages of 4)


def run_padded_and_plain(qwen3_dir, prompts, inputs, pad):
    """Prefill prompts into TABLES' pages, then run inputs padded (pad(inputs, pad_page)) and
    unpadded from that cache: both steps' logits, and which slots of the requests' pages the
    padded step wrote."""
    config = EngineConfig(qwen3_dir, device="cpu", dtype="float32", page_size=4, num_pages=16)
    runner = ModelRunner(config, load_config(qwen3_dir), qwen3_dir, max_model_len=64)
    assert runner.kv_pool.pad_page == 16 and runner.kv_pool.k.shape[1] == 17
    runner.forward(build_step_inputs(prompts, [0] * len(prompts), TABLES, 4))
    pool = runner.kv_pool
    before = torch.stack([pool.k[:, :16], pool.v[:, :16]])
    padded = runner.forward(pad(inputs, pool.pad_page))
    changed = (torch.stack([pool.k[:, :16], pool.v[:, :16]]) != before).flatten(4).any(-1)
    written = changed.any(1).flatten(1)  # [k or v, slot]
    plain = runner.forward(inputs)
    assert written[0].equal(written[1])
    return padded, plain, written[0].nonzero().flatten().tolist()


def test_padded_step_gives_the_real_rows_the_same_logits(qwen3_dir):
    """Run a decode step padded to 8 rows and unpadded, from the same cache: the real rows'
    logits are identical and the padding touched no request's page."""
    inputs = build_step_inputs([[11], [12], [13]], [4, 8, 3], TABLES, 4)
    padded, plain, written = run_padded_and_plain(
        qwen3_dir, [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]], inputs,
        lambda step, pad_page: pad_decode_inputs(step, 8, pad_page))
    assert padded.shape == plain.shape == (3, padded.shape[1])
    # equal up to float32 rounding: a matmul over 8 rows may block its sums differently than 3
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-5)
    # the padded step wrote exactly the three real slots, nothing else of the requests' pages
    assert written == sorted(inputs.attention.slot_mapping.tolist())


def verify_inputs(page_size: int = 4):
    """A decode row (5 cached tokens), a verify row (its token and two drafts after 8) and a
    2-token prompt chunk after 1 cached token, whose padding to 4 tokens crosses into a page the
    request does not have."""
    return build_step_inputs([[11], [12, 13, 14], [15, 16]], [4, 8, 1], TABLES, page_size,
                             sampled=[1, 3, 1])


def test_verify_padding_gives_every_row_the_same_number_of_tokens():
    inputs = verify_inputs()
    padded = pad_verify_inputs(inputs, 4, query_len=4, pad_page=9)
    meta, pad = inputs.attention, padded.attention
    assert padded.num_tokens == 16 and pad.num_seqs == 4 and not pad.is_decode
    assert pad.qo_indptr.tolist() == [0, 4, 8, 12, 16]
    moved = [0, 4, 5, 6, 8, 9]  # each real token's new row
    assert padded.token_ids[moved].tolist() == inputs.token_ids.tolist()
    assert padded.positions[moved].tolist() == inputs.positions.tolist()
    assert padded.positions.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 4, 0, 1, 2, 3]
    assert pad.slot_mapping[moved].tolist() == meta.slot_mapping.tolist()
    assert sorted(set(range(16)) - set(moved)) == \
        [i for i in range(16) if pad.slot_mapping[i] == 9 * 4]  # padding writes the pad page
    # every row spans its own pages, then the pad page where they end
    assert pad.kv_indices.tolist() == [7, 2, 0, 5, 3, 6, 9, 9]
    assert pad.kv_indptr.tolist() == [0, 2, 5, 7, 8]
    assert pad.kv_last_page_len.tolist() == [4, 4, 1, 4]
    assert padded.sample_indices.tolist() == [0, 4, 5, 6, 9]


def test_padded_verify_step_gives_the_real_rows_the_same_logits(qwen3_dir):
    """A verify step padded to 4 rows of 4 tokens and unpadded, from the same cache: the
    sampled rows' logits are the same, and the padding wrote no request's page."""
    inputs = verify_inputs()
    padded, plain, written = run_padded_and_plain(
        qwen3_dir, [[1, 2, 3, 4], list(range(5, 13)), [13]], inputs,
        lambda step, pad_page: pad_verify_inputs(step, 4, 4, pad_page))
    assert padded.shape == plain.shape == (5, padded.shape[1])
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-5)
    assert written == sorted(inputs.attention.slot_mapping.tolist())


def test_enforce_eager_and_cpu_capture_no_graphs(qwen3_dir):
    for enforce_eager in (False, True):
        config = EngineConfig(qwen3_dir, device="cpu", num_pages=8, enforce_eager=enforce_eager)
        runner = ModelRunner(config, load_config(qwen3_dir), qwen3_dir, max_model_len=32)
        assert runner.graphs is None


class EagerGraphs(CudaGraphRunner):
    """The graphs' bookkeeping (buckets, padding, the rows read back) with every replay run
    eagerly over the padded step: what a CPU can check of the runner's graph path."""

    def replay(self, inputs):
        meta = inputs.attention
        self.replayed.append((meta.num_seqs, inputs.num_tokens // meta.num_seqs))
        self.backend.plan(meta)
        return self._forward(inputs)


def test_verify_steps_padded_for_their_graphs_give_the_tokens_of_plain_decoding():
    """n-gram speculation with the runner padding decode and verify steps to graph shapes (3
    drafts: rows of 4 tokens): greedy and seeded tokens equal plain decoding's."""
    from serve import LLM, SamplingParams
    from tests.helpers import generate_on_cpu
    from tests.test_speculative import CODE_PROMPTS, DEMO, NGRAM

    prompts = CODE_PROMPTS[:4]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=1, max_tokens=24, ignore_eos=True)] * 2
    plain, _ = generate_on_cpu(DEMO, prompts, params, dtype="float32")
    llm = LLM(DEMO, device="cpu", dtype="float32",
              speculative_config=NGRAM | {"num_speculative_tokens": 3})
    runner = llm.engine.core.runner
    runner.graphs = EagerGraphs(runner.model, runner.backend, [1, 2, 4], runner.page_size,
                                runner.kv_pool.pad_page, runner.device, [1, 2, 4], 4)
    runner.graphs.replayed = []
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.shutdown()
    assert [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
            for o in outputs] == plain
    assert {shape for shape in runner.graphs.replayed if shape[1] == 4} >= {(4, 4)}
    assert any(shape[1] == 1 for shape in runner.graphs.replayed)
