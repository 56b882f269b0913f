"""A tensor-parallel worker, ranks 1..N-1: `python -m serve.core.tp_worker SPEC`, started by rank
0's ParallelRunner (serve/core/parallel_runner.py tells its life)."""

import json
import logging
import os
import sys

import torch

from serve.config import EngineConfig
from serve.core.model_runner import ModelRunner
from serve.core.parallel_runner import StepMessage
from serve.heartbeat import start_child_process
from serve.models.loader import load_config
from serve.parallel import join_group, leave_group

logger = logging.getLogger(__name__)

FAIL_RANK_FOR_TESTS = "NANOSERVE_TEST_FAIL_RANK"  # a rank that raises while loading (tests)


# --8<-- [start:run_worker]
def run_worker(config: EngineConfig, model_path: str, max_model_len: int, rank: int,
               address: str, report) -> None:
    """A worker rank's whole life: load, report, then run every step rank 0 broadcasts."""
    try:
        if config.torch_device().type == "cuda":
            torch.cuda.set_device(rank)  # rank r runs on GPU r ("cuda" means this one from now)
        tp = join_group(rank, config.tensor_parallel_size, address, config.torch_device())
        if os.environ.get(FAIL_RANK_FOR_TESTS) == str(rank):
            raise RuntimeError("a failure injected for a test")
        runner = ModelRunner(config, load_config(model_path), model_path, max_model_len, tp,
                             loaded=lambda: _send(report, "ok"))
    except Exception as error:
        _send(report, f"{type(error).__name__}: {error}")
        raise SystemExit(1) from None
    while True:
        try:
            message: StepMessage = tp.broadcast()
        except RuntimeError as error:  # rank 0 is gone (its process ended or crashed)
            logger.warning("rank 0 is gone, rank %d stops: %s", rank, str(error)[:200])
            raise SystemExit(1) from None
        if message.inputs is None:
            break
        logits = runner.execute_model(message.inputs)
        mask = tp.broadcast() if message.inputs.masked else None  # a grammar's, from rank 0
        runner.sample(logits, mask)  # its tokens stay in its slots
    leave_group()
# --8<-- [end:run_worker]


def _send(report, line: str) -> None:
    report.write(line.replace("\n", " ") + "\n")
    report.flush()


def main(argv: list[str]) -> None:
    config, model_path, max_model_len, rank, address, report_fd, heartbeat_fd = \
        json.loads(argv[0])
    start_child_process("worker", heartbeat_fd)
    with os.fdopen(report_fd, "w") as report:
        run_worker(EngineConfig(**config), model_path, max_model_len, rank, address, report)


if __name__ == "__main__":
    main(sys.argv[1:])
