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
import torch

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
        self.logprobs_k = np.full(num_slots, -1, np.int32)  # -1: no log-probabilities
        # rules few requests use (serve/core/penalties.py): a flag column each, so that a step
        # whose rows use none pays one gather per flag
        self.penalized = np.zeros(num_slots, np.bool_)
        self.penalties = np.zeros((num_slots, 3), np.float32)  # presence, frequency, repetition
        self.has_bias = np.zeros(num_slots, np.bool_)
        self.bias: list[tuple[np.ndarray, np.ndarray] | None] = [None] * num_slots
        self._resets: list[tuple[int, list[int], list[int]]] = []  # (slot, prompt, output)

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
        self.logprobs_k[slot] = -1 if params.logprobs is None else params.logprobs
        self.penalized[slot] = params.penalized
        self.penalties[slot] = (params.presence_penalty, params.frequency_penalty,
                                params.repetition_penalty)
        self.has_bias[slot] = bool(params.logit_bias)
        self.bias[slot] = (np.fromiter(params.logit_bias.keys(), np.int64),
                           np.fromiter(params.logit_bias.values(), np.float32)) \
            if params.logit_bias else None
    # --8<-- [end:admit]

    def admit_history(self, slot: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """A penalized request's tokens so far, for its slot's counts on the device (sent with
        the next step's rules)."""
        self._resets.append((slot, prompt_ids, [t for t in output_ids if t >= 0]))

    # --8<-- [start:sampling]
    def sampling(self, slots: np.ndarray, positions: np.ndarray) -> SamplingTensors:
        """The rules of the rows that sample, row r being slot slots[r], which samples the token
        at positions[r]: a gather per column, no loop over rows."""
        greedy, top_k = self.greedy[slots], self.top_k[slots]
        top_p, min_p = self.top_p[slots], self.min_p[slots]
        rules = SamplingTensors.from_arrays(
            self.temperature[slots], top_k, top_p, min_p, greedy,
            noise_keys(self.seed_hash[slots], positions), self.vocab_size)
        rules.logprobs_k = int(self.logprobs_k[slots].max(initial=-1))
        penalized, has_bias = self.penalized[slots], self.has_bias[slots]
        if penalized.any():
            rows = np.flatnonzero(penalized)
            presence, frequency, repetition = self.penalties[slots[rows]].T
            rules.penalty_rows, rules.penalty_slots = _tensor(rows), _tensor(slots[rows])
            rules.presence_penalty, rules.frequency_penalty = _tensor(presence), _tensor(frequency)
            rules.repetition_penalty = _tensor(repetition)
        if has_bias.any():
            rows = np.flatnonzero(has_bias)
            biases = [self.bias[slot] for slot in slots[rows]]
            rules.bias_rows = _tensor(np.repeat(rows, [len(ids) for ids, _ in biases]))
            rules.bias_token_ids = _tensor(np.concatenate([ids for ids, _ in biases]))
            rules.bias_values = _tensor(np.concatenate([values for _, values in biases]))
        if self._resets:
            self._take_resets(rules)
        return rules
    # --8<-- [end:sampling]

    def _take_resets(self, rules: SamplingTensors) -> None:
        resets, self._resets = self._resets, []
        slots = np.array([slot for slot, _, _ in resets], np.int64)
        rules.reset_slots = _tensor(slots)
        for name, index in (("prompt", 1), ("output", 2)):
            ids = [np.asarray(reset[index], np.int64) for reset in resets]
            setattr(rules, f"{name}_token_slots", _tensor(np.repeat(slots, [len(i) for i in ids])))
            setattr(rules, f"{name}_token_ids", _tensor(np.concatenate(ids)))


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))
