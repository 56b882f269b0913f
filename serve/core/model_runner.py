"""Owns the model on its device: loads it, sizes the KV pool, captures the decode CUDA graphs,
runs a step's inputs.

The runner knows nothing of requests or pages: it executes plain StepInputs (token ids,
positions, slots, the attention index arrays, which rows to sample) and returns tokens.
"""

import logging
import os
from dataclasses import dataclass

import torch

from serve.attention import make_backend
from serve.config import EngineConfig
from serve.core.cuda_graph import (
    CudaGraphRunner,
    bucket_for,
    graph_batch_sizes,
    pad_decode_inputs,
    pad_verify_inputs,
)
from serve.core.kv.kv_pool import KVPool
from serve.core.logprobs import LogprobsTensors, prompt_logprobs
from serve.core.penalties import Penalties
from serve.core.sampler import Sampler, SamplingTensors
from serve.core.step_inputs import (
    DeviceStaging,
    StepInputs,
    build_step_inputs,
    split_step_inputs,
)
from serve.layers.attention import Attention
from serve.models.loader import build_model
from serve.parallel import TensorParallel
from serve.structured.grammar import TokenBitmask, apply_bitmask

logger = logging.getLogger(__name__)

CPU_KV_POOL_BYTES = 1 << 30  # on a CPU, without --num-pages: at most 1 GiB of KV pool
MAX_VERIFY_GRAPH_ROWS = 32  # verify steps with more rows run eagerly


class ModelRunner:
    """With tensor parallelism, one runner per rank holds that rank's part of the model and of
    the KV pool (its KV heads); every rank runs every step. `loaded` runs once the weights are
    in, before anything that communicates: the ranks check there that they all started."""

    def __init__(self, config: EngineConfig, hf_config, model_path: str, max_model_len: int,
                 tp: TensorParallel = TensorParallel(), loaded=None) -> None:
        self.device = config.torch_device()
        if self.device.type == "cuda":
            # The host only builds small index tensors, which torch's intra-op thread pool (a
            # thread per core) cannot speed up; and when other processes compete for the
            # cores, its threads wait on each other (bench.host_overhead measures how much).
            # vLLM sets one thread too.
            torch.set_num_threads(1)
        self.dtype = config.torch_dtype()
        self.hf_config = hf_config
        self.model = build_model(
            hf_config, model_path, config.load_format, self.dtype, self.device, config.seed, tp
        )
        self.shapes = shapes = self.model.shapes  # this rank's head counts and sizes
        if loaded is not None:
            loaded()
        num_params = sum(p.numel() for p in self.model.parameters())
        logger.info("model: %.1fM parameters%s, %s on %s", num_params / 1e6,
                    f" (rank {tp.rank} of {tp.size})" if tp.size > 1 else "", self.dtype,
                    self.device)
        self.page_size = config.page_size
        self.backend = make_backend(
            config.attention_backend, shapes.num_heads, shapes.num_kv_heads, shapes.head_dim,
            self.page_size, self.dtype, self.device,
        )
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler(shapes.vocab_size, self.device)
        self.penalties = Penalties(config.num_slots, shapes.vocab_size, self.device)
        self.is_driver = tp.rank == 0  # the rank whose log-probabilities the engine reads
        if self.device.type == "cuda":
            self.sampler.warm_up()
        self.stagings = (DeviceStaging(self.device), DeviceStaging(self.device))  # see execute
        # each slot's last sampled token (PersistentBatch): where the next step reads it
        self.last_tokens = torch.zeros(config.num_slots, dtype=torch.int64, device=self.device)
        self._parity = 0
        # (Overlap scheduling needs every host buffer a step copies from to stay untouched until
        # the copy has run: the stagings and FlashInfer's plans wait for their last copy, and the
        # sampled ids go to one of two host buffers, in turn.)
        self._sampled_host = [torch.empty(config.max_num_batched_tokens, dtype=torch.int64,
                                          pin_memory=self.device.type == "cuda")
                              for _ in range(2)]
        self.graphs: CudaGraphRunner | None = None  # captured once the pool exists
        graph_sizes = self._graph_batch_sizes(config)
        self.verify_sizes, self.verify_len = self._verify_shapes(config, graph_sizes)
        if graph_sizes:  # index buffers for the longest pages list a batch could ever have
            pages_per_seq = -(-max_model_len // self.page_size)
            pad_pages = 1 + self.verify_len // self.page_size  # a padded row's pad pages
            self.backend.enable_cuda_graphs(
                graph_sizes, (config.max_num_seqs + graph_sizes[-1]) * (pages_per_seq + pad_pages),
                self.verify_sizes)
        num_pages = config.num_pages or self._num_pages_that_fit(config, max_model_len,
                                                                 graph_sizes)
        num_pages = tp.min(num_pages)  # every rank holds every page: the smallest pool wins
        self._check_fits_memory(num_pages)
        self.kv_pool = self._make_pool(num_pages)
        self._bind(self.kv_pool)
        logger.info("KV pool: %s", self.kv_pool.describe())
        if graph_sizes:  # after the pool: a graph records the addresses of the pages it writes
            self.graphs = self._graph_runner(graph_sizes, self.kv_pool)
            self.graphs.capture()

    def _graph_batch_sizes(self, config: EngineConfig) -> list[int]:
        """The decode batch sizes to capture, or [] where steps run eagerly."""
        if self.device.type != "cuda":
            return []
        if config.enforce_eager:
            logger.info("CUDA graphs: off (enforce_eager)")
            return []
        if not self.backend.supports_cuda_graphs:
            logger.info("CUDA graphs: off (the %s attention backend cannot be captured)",
                        self.backend.name)
            return []
        return graph_batch_sizes(config.max_num_seqs)

    @staticmethod
    def _verify_shapes(config: EngineConfig, graph_sizes: list[int]) -> tuple[list[int], int]:
        """The verify steps to capture, with speculative decoding: (batch sizes, tokens a row).
        Only the batches that still speculate (up to disable_by_batch_size rows; at most
        MAX_VERIFY_GRAPH_ROWS when it never switches off); bigger verify steps run eagerly."""
        spec = config.speculative_config
        if not graph_sizes or spec is None:
            return [], 0
        most = min(spec.disable_by_batch_size or MAX_VERIFY_GRAPH_ROWS, config.max_num_seqs)
        return graph_batch_sizes(most), 1 + spec.num_speculative_tokens

    def _graph_runner(self, batch_sizes: list[int], kv_pool: KVPool) -> CudaGraphRunner:
        return CudaGraphRunner(self.model, self.backend, batch_sizes, self.page_size,
                               kv_pool.pad_page, self.device, self.verify_sizes, self.verify_len)

    def _make_pool(self, num_pages: int) -> KVPool:
        shapes = self.shapes
        return KVPool(shapes.num_layers, num_pages, self.page_size, shapes.num_kv_heads,
                      shapes.head_dim, self.dtype, self.device)

    def _bind(self, kv_pool: KVPool) -> None:
        """Point every attention layer at its pages of kv_pool."""
        for index, layer in enumerate(self.attention_layers):
            layer.bind(self.backend, kv_pool.layer(index))

    def _check_fits_memory(self, num_pages: int) -> None:
        """Refuse, in one line, a pool larger than the memory left (an absurd --num-pages or
        --page-size would otherwise fail deep inside the allocator with a traceback)."""
        needed = (num_pages + 1) * self._bytes_per_page()  # + the padding page
        available = _available_memory_bytes(self.device)
        if needed > available:
            raise ValueError(
                f"a KV pool of {num_pages} pages x {self.page_size} tokens needs "
                f"{needed / 2**30:,.1f} GiB and the {self.device.type} has "
                f"{available / 2**30:,.1f} GiB available: lower --num-pages or --page-size")

    def _bytes_per_page(self) -> int:
        shapes = self.shapes
        return KVPool.bytes_per_page(shapes.num_layers, self.page_size, shapes.num_kv_heads,
                                     shapes.head_dim, self.dtype)

    # --8<-- [start:pool_size]
    def _num_pages_that_fit(self, config: EngineConfig, max_model_len: int,
                            graph_sizes: list[int]) -> int:
        """As many pages as the memory left after the weights, the largest step's activations
        and the CUDA graphs.

        On a GPU we measure: run the biggest step the engine will ever run (max_num_batched_tokens
        tokens, in sequences no longer than max_model_len: a longer one would read past the
        model's RoPE table) and read the peak allocation, then capture the largest
        decode graph (the graphs share one memory pool, so it needs the most) and read how much
        memory that took; the pool gets what is left of gpu_memory_utilization x the card. On a
        CPU there is nothing to measure against, so the pool holds a few full-length sequences,
        within CPU_KV_POOL_BYTES.
        """
        pages_per_seq = -(-max_model_len // self.page_size)
        if self.device.type != "cuda":
            return max(pages_per_seq, min(4 * pages_per_seq,
                                          CPU_KV_POOL_BYTES // self._bytes_per_page()))
        largest_step, num_scratch_pages = largest_step_inputs(
            config.max_num_batched_tokens, max_model_len, self.page_size)
        self._check_fits_memory(num_scratch_pages)
        scratch = self._make_pool(num_scratch_pages)
        self._bind(scratch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.forward(largest_step)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - scratch.num_bytes
        graph_bytes = 0
        if graph_sizes:
            probe = self._graph_runner(graph_sizes[-1:], scratch)
            probe.capture()
            graph_bytes = probe.memory_bytes
            del probe
        del scratch
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info()
        budget = config.gpu_memory_utilization * total - peak - graph_bytes
        if budget < (pages_per_seq + 1) * self._bytes_per_page():  # + the padding page
            raise ValueError(f"after the weights and activations ({peak / 2**30:.1f} GiB) there is "
                             "no room for one full-length sequence's KV pages: lower "
                             "--max-model-len or raise --gpu-memory-utilization")
        return int(budget // self._bytes_per_page()) - 1  # the pool adds its padding page
    # --8<-- [end:pool_size]

    # --8<-- [start:forward]
    # --8<-- [start:execute]
    @torch.inference_mode()
    def execute_model(self, inputs: StepInputs) -> "StepLogits":
        """Start one step's forward pass on the device and return its sampled rows' logits
        without waiting for them. Rows whose input is their slot's last sampled token read it
        on the device, where the step before left it (the host may not have seen it yet: overlap
        scheduling)."""
        # (at most two parts, each copied through its own staging buffer)
        parts = [self.to_device(part, staging) for part, staging
                 in zip(self.split_for_graphs(inputs), self.stagings, strict=False)]
        for part in parts:
            if part.read_rows is not None and len(part.read_rows):
                part.token_ids[part.read_rows] = self.last_tokens[part.read_slots]
        prompt = None
        if len(parts) == 1 and parts[0].prompt_logprob_rows is not None:
            logits, prompt = self._eager(parts[0])
        elif len(parts) == 1:
            logits = self.logits(parts[0])  # [sampled rows, vocab]
        else:
            logits = torch.cat([self.logits(part) for part in parts])
        return StepLogits(logits, parts[0].sampling, parts[0].write_slots, prompt)

    @torch.inference_mode()
    def sample(self, step: "StepLogits", mask: TokenBitmask | None = None) -> "LaunchedStep":
        """Sample a step's logits (bias and penalties first change them, then a grammar's mask
        takes out the tokens it does not allow), leave each token in its slot on the device for
        the next step, and copy the tokens, and the log-probabilities asked for, to the host in
        the background."""
        rules, sampled, logprobs = step.sampling, None, None
        if rules is not None:
            self.penalties.admit(rules)
        if len(step.logits):  # (a step of prefill chunks only samples nothing)
            raw = None  # the model's own log-probabilities, before anything changes the logits
            if rules is not None and rules.logprobs_k >= 0 and self.is_driver:
                raw = step.logits.log_softmax(dim=-1, dtype=torch.float32)
            logits = self.penalties.apply(step.logits, rules)
            if mask is not None:
                apply_bitmask(logits, mask)
            sampled = self.sampler(logits, rules)
            self.penalties.record(sampled, rules)
            if step.write_slots is not None:
                self.last_tokens[step.write_slots] = sampled
            if raw is not None:
                logprobs = LogprobsTensors.gather(raw, sampled, rules.logprobs_k)
        prompt = step.prompt_logprobs
        if self.device.type != "cuda" or (sampled is None and prompt is None):
            return LaunchedStep(sampled, sampled, None, logprobs, prompt)
        host = None
        if sampled is not None:
            self._parity ^= 1  # two host buffers: the previous step's may still be unread
            host = self._sampled_host[self._parity][: len(sampled)]
            host.copy_(sampled, non_blocking=True)
        logprobs = logprobs.to_host() if logprobs is not None else None
        prompt = prompt.to_host() if prompt is not None else None
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(sampled, host, done, logprobs, prompt)
    # --8<-- [end:execute]

    @staticmethod
    def collect(launched: "LaunchedStep") -> list[int]:
        """The sampled token ids of a launched step (waits for it: the step's one host sync);
        its log-probabilities are then valid too."""
        if launched.done is not None:
            launched.done.synchronize()
        return launched.host.tolist() if launched.host is not None else []

    def split_for_graphs(self, inputs: StepInputs) -> list[StepInputs]:
        """A mixed step (the scheduler puts decode rows first, prompt chunks after) as two: its
        decode rows replay their CUDA graph and the chunks run eagerly, instead of all of it
        eagerly. Any other step is one part."""
        graphs = self.graphs
        if graphs is None or inputs.attention.is_decode:  # the usual step: nothing to split
            return [inputs]
        if graphs.verify_bucket_for(inputs) is not None:  # all of it in one verify graph
            return [inputs]
        if inputs.prompt_logprob_rows is not None:  # its rows are counted in the whole step
            return [inputs]
        query_lens = inputs.attention.qo_indptr.diff()
        num_decode = int((query_lens == 1).cumprod(0).sum())  # the leading one-token rows
        if num_decode in (0, len(query_lens)) or bucket_for(num_decode, graphs.batch_sizes) \
                is None:
            return [inputs]
        return list(split_step_inputs(inputs, num_decode))

    def to_device(self, inputs: StepInputs, staging: DeviceStaging | None = None) -> StepInputs:
        """Pad a decode or verify step to its graph's shape, then copy it in one host-to-device
        transfer."""
        graphs = self.graphs
        if graphs is not None and (bucket := graphs.bucket_for(inputs)) is not None:
            inputs = pad_decode_inputs(inputs, bucket, self.kv_pool.pad_page)
        elif graphs is not None and (bucket := graphs.verify_bucket_for(inputs)) is not None:
            inputs = pad_verify_inputs(inputs, bucket, graphs.verify_len, self.kv_pool.pad_page)
        return (staging or self.stagings[0]).to_device(inputs)

    def logits(self, inputs: StepInputs) -> torch.Tensor:
        """The model over inputs already on the device: the sampled rows' logits. A step whose
        shape was captured replays its graph; any other runs eagerly."""
        graphs = self.graphs
        if graphs is not None and graphs.bucket_for(inputs) == inputs.attention.num_seqs:
            # The graph computes every row's logits; in a decode step every real row samples,
            # and they come first: a view, not a gather of [rows, vocab].
            return graphs.replay(inputs)[: len(inputs.sample_indices)]
        num_seqs = inputs.attention.num_seqs
        if graphs is not None and graphs.verify_bucket_for(inputs) == num_seqs \
                and inputs.num_tokens == graphs.verify_len * num_seqs:  # padded by to_device
            return graphs.replay(inputs)[inputs.sample_indices]
        return self._eager(inputs)[0]

    def _eager(self, inputs: StepInputs) -> tuple[torch.Tensor, LogprobsTensors | None]:
        """The model run eagerly: the sampled rows' logits, and the log-probabilities of the
        prompt tokens the step's rows predict, where a request asked for them."""
        self.backend.plan(inputs.attention)  # once per step, shared by every layer
        hidden = self.model(inputs.token_ids, inputs.positions, inputs.attention)
        prompt = None
        if inputs.prompt_logprob_rows is not None:  # (every rank: the LM head all-gathers)
            prompt = prompt_logprobs(self.model, hidden, inputs.prompt_logprob_rows,
                                     inputs.prompt_logprob_targets, inputs.prompt_logprobs_k)
        return self.model.compute_logits(hidden[inputs.sample_indices]), prompt
    # --8<-- [end:forward]

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step and return the sampled rows' logits, sampling nothing (tests, profiling)."""
        return self.execute_model(inputs).logits


def largest_step_inputs(num_tokens: int, max_model_len: int,
                        page_size: int) -> tuple[StepInputs, int]:
    """A prefill of num_tokens tokens in sequences of at most max_model_len (positions past it
    would read beyond the RoPE table), and the number of pages it writes."""
    seq_lens = [max_model_len] * (num_tokens // max_model_len)
    seq_lens += [num_tokens % max_model_len] if num_tokens % max_model_len else []
    page_lists, num_pages = [], 0
    for seq_len in seq_lens:
        num_seq_pages = -(-seq_len // page_size)
        page_lists.append(list(range(num_pages, num_pages + num_seq_pages)))
        num_pages += num_seq_pages
    inputs = build_step_inputs([[0] * n for n in seq_lens], [0] * len(seq_lens), page_lists,
                               page_size)
    return inputs, num_pages


def _available_memory_bytes(device: torch.device) -> int:
    """Memory that a new allocation could take: the GPU's free memory, or the host's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:  # Linux: what can be had without swapping
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class StepLogits:
    """A step between its forward pass and its sampling: the sampled rows' logits (on the
    device, maybe not computed yet), their sampling rules and the slots their tokens go to."""

    logits: torch.Tensor  # [sampled rows, vocab], the model's dtype
    sampling: "SamplingTensors | None"
    write_slots: torch.Tensor | None
    prompt_logprobs: LogprobsTensors | None = None


@dataclass
class LaunchedStep:
    """A step on its way: its sampled ids on the device, their copy on the host (valid once
    `done` has passed) and the event that marks it."""

    sampled: torch.Tensor | None
    host: torch.Tensor | None
    done: "torch.cuda.Event | None"
    logprobs: LogprobsTensors | None = None  # of the sampled tokens, where a row asked
    prompt_logprobs: LogprobsTensors | None = None  # of the prompt tokens the step computed
