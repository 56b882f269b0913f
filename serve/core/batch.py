"""The persistent batch: per-slot columns that a step's arrays are gathered from.

A running request owns a slot for as long as it holds pages: its row of the block table
(PageAllocator.block_table), which lists its pages and is patched only when they change. Beside
it, per slot, the request's sampling rules are written once, when it is admitted. A step then
needs only each scheduled request's slot, how many tokens it computes and how many it has
computed: everything else (positions, KV slots, page lists, sampling rules, noise keys) is numpy
indexing into these columns, not Python per request. Sampled tokens never come back through
here: they stay on the device in the runner's token column, indexed by the same slot
(ModelRunner.last_tokens), and feed the next step from there.
"""

import numpy as np

from serve.core.sampler import SamplingTensors, noise_keys, seed_hash
from serve.sampling_params import SamplingParams


class PersistentBatch:
    """Sampling rules per slot, on the host, written at admission and read by index each step."""

    def __init__(self, num_slots: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.temperature = np.ones(num_slots, np.float32)  # 1 for greedy rows, which ignore it
        self.top_k = np.full(num_slots, vocab_size, np.int32)  # the vocabulary where off
        self.top_p = np.ones(num_slots, np.float32)
        self.min_p = np.zeros(num_slots, np.float32)
        self.greedy = np.ones(num_slots, np.bool_)
        self.seed_hash = np.zeros(num_slots, np.uint64)  # the seed's half of every noise key

    # --8<-- [start:admit]
    def admit(self, slot: int, params: SamplingParams, seed: int) -> None:
        """Write a request's sampling rules into its slot (once per admission)."""
        self.temperature[slot] = 1.0 if params.greedy else params.temperature
        self.top_k[slot] = min(params.top_k, self.vocab_size) if params.top_k > 0 \
            else self.vocab_size
        self.top_p[slot] = params.top_p
        self.min_p[slot] = params.min_p
        self.greedy[slot] = params.greedy
        self.seed_hash[slot] = seed_hash(seed)
    # --8<-- [end:admit]

    # --8<-- [start:sampling]
    def sampling(self, slots: np.ndarray, positions: np.ndarray) -> SamplingTensors:
        """The rules of the rows that sample, row r being slot slots[r], which samples the token
        at positions[r]: a gather per column, no loop over rows."""
        greedy, top_k = self.greedy[slots], self.top_k[slots]
        top_p, min_p = self.top_p[slots], self.min_p[slots]
        return SamplingTensors.from_arrays(
            self.temperature[slots], top_k, top_p, min_p, greedy,
            noise_keys(self.seed_hash[slots], positions), self.vocab_size)
    # --8<-- [end:sampling]
