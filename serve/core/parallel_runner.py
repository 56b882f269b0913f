"""Tensor parallelism's processes: rank 0 runs the engine core and a model runner; every other
rank is a worker process that runs only its model runner, step for step with rank 0.

Each step, rank 0 broadcasts the step's host inputs over a gloo group, then every rank runs the
same step on its part of the model. The model's all-reduces join the ranks inside the step; the
LM head's all-gather gives every rank the whole vocabulary's logits, and every rank samples the
same tokens from them (the sampler draws from a hash of seed and position, not from a
generator), so each rank's own slots hold the same last tokens for the next step, as rank 0's.

Start-up: every rank loads its weights, then reports through a pipe; rank 0 waits for all of
them before anything that communicates, so a rank that fails to load is one clear error, not a
hang. Then each worker beats on a second pipe (serve/heartbeat.py), which rank 0 checks while
idle. A worker is `python -m serve.core.tp_worker`: a fresh interpreter that imports only the
engine (multiprocessing's spawn would import the user's script again).
"""

import atexit
import dataclasses
import json
import logging
import os
import select
import socket
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch

from serve.config import EngineConfig
from serve.core.model_runner import LaunchedStep, ModelRunner, StepLogits
from serve.core.step_inputs import StepInputs
from serve.heartbeat import ProcessWatch
from serve.parallel import join_group, leave_group
from serve.structured.grammar import TokenBitmask

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600  # loading an 8B model's shard from a slow disk


@dataclass
class StepMessage:
    """What rank 0 broadcasts for one step: None as inputs stops the workers. The step's arrays
    travel as numpy arrays: pickle copies their memory as it is, where a torch tensor's pickle
    goes through torch's storage machinery, ten times slower, on every step's critical path."""

    inputs: StepInputs | None

    def __getstate__(self) -> dict:
        return {"inputs": _convert(self.inputs, torch.Tensor, torch.Tensor.numpy)}

    def __setstate__(self, state: dict) -> None:
        self.inputs = _convert(state["inputs"], np.ndarray, torch.from_numpy)


def _convert(value, kind: type, to):
    """value, with every `kind` in it (through nested dataclasses) replaced by to(it)."""
    if isinstance(value, kind):
        return to(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _convert(getattr(value, f.name), kind, to)
                                             for f in dataclasses.fields(value)})
    return value


class ParallelRunner(ModelRunner):
    """Rank 0's runner: a ModelRunner for rank 0's part of the model that starts the workers
    and gives them every step it launches."""

    def __init__(self, config: EngineConfig, hf_config, model_path: str,
                 max_model_len: int) -> None:
        size = config.tensor_parallel_size
        address = f"tcp://127.0.0.1:{_free_port()}"
        self.workers, reports, self.watches, self.stopped = [], [], [], False
        self.failed = False  # a worker died or stopped: shut down without asking the others
        for rank in range(1, size):
            read, write = os.pipe()
            beats, beats_to_worker = os.pipe()
            spec = json.dumps([dataclasses.asdict(config), model_path, max_model_len, rank,
                               address, write, beats_to_worker])
            worker = subprocess.Popen([sys.executable, "-m", "serve.core.tp_worker", spec],
                                      pass_fds=[write, beats_to_worker])
            os.close(write)
            os.close(beats_to_worker)
            self.workers.append(worker)
            reports.append(os.fdopen(read))
            self.watches.append(ProcessWatch(worker, beats, f"tensor parallel rank {rank}",
                                             config.heartbeat_timeout))
        try:
            try:
                self.tp = join_group(0, size, address, config.torch_device())
            except Exception as error:  # a worker that never joined: say which
                gone = [f"rank {r} exited with status {w.poll()}"
                        for r, w in enumerate(self.workers, start=1) if w.poll() is not None]
                raise RuntimeError(f"tensor parallel ranks did not meet ({'; '.join(gone)}): "
                                   f"{error}") from error
            super().__init__(config, hf_config, model_path, max_model_len, self.tp,
                             loaded=lambda: _wait_for(reports, self.workers))
        except BaseException:
            self.shutdown(force=True)
            raise
        for watch in self.watches:
            watch.start()
        atexit.register(self.shutdown)  # a script that never calls shutdown still stops them

    # --8<-- [start:execute]
    def execute_model(self, inputs: StepInputs) -> StepLogits:
        self.tp.broadcast(StepMessage(inputs))
        return super().execute_model(inputs)

    def sample(self, step: StepLogits, mask: TokenBitmask | None = None) -> LaunchedStep:
        if mask is not None:  # (the workers wait for it: their step's inputs say masked)
            self.tp.broadcast(mask)
        return super().sample(step, mask)
    # --8<-- [end:execute]

    def check_health(self) -> None:
        """RuntimeError if a worker has exited or stopped beating."""
        for watch in self.watches:
            if problem := watch.problem():
                self.failed = True
                raise RuntimeError(problem)

    def shutdown(self, force: bool = False) -> None:
        """Stop the workers: tell them, or (force, or a worker has failed) kill them. Once is
        enough."""
        if self.stopped:
            return
        self.stopped = True
        force = force or self.failed  # a stopped rank would hold the broadcast for minutes
        if not force:
            try:
                self.tp.broadcast(StepMessage(None))
            except Exception:  # a worker already gone: nobody to tell
                force = True
        for worker in self.workers:
            try:
                worker.wait(timeout=None if not force else 0.1)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        for watch in self.watches:
            watch.close()
        leave_group()


def _wait_for(reports: list, workers: list[subprocess.Popen]) -> None:
    """Every worker's report that its weights are in; the first failure is raised here."""
    for rank, (report, worker) in enumerate(zip(reports, workers, strict=True), start=1):
        ready, _, _ = select.select([report], [], [], START_TIMEOUT_S)
        line = report.readline().strip() if ready else None
        if line == "ok":
            continue
        if line is None:
            raise RuntimeError(f"tensor parallel rank {rank} did not start in {START_TIMEOUT_S} s")
        raise RuntimeError(f"tensor parallel rank {rank} failed to start: "
                           f"{line or f'its process exited with status {worker.wait()}'}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

