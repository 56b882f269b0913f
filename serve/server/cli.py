"""`nanoserve --model DIR` (or `python -m serve --model DIR`): serve one model over the OpenAI API.

Every value is checked before anything loads. A bad one ends the program with one line on stderr
and exit status 2, as argparse does for a missing flag; so does a model the engine cannot serve
as asked (an unknown directory, an unsupported architecture, a context past the RoPE table).
"""

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.sampling_params import SEED_MAX, SEED_MIN
from serve.server.app import build_app
from serve.server.body_limit import DEFAULT_MAX_REQUEST_BYTES
from serve.server.lifecycle import run_server

logger = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # vLLM's default too: long enough for most answers to finish


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line: argparse's usage block, with this many flags, would bury the message.
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except None: the flag's help says what None stands for."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        value = int(text)  # argparse reports a ValueError as "invalid int value: 'x'"
        if value < low or (high is not None and value > high):
            rule = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def finite_float(low: float | None = None) -> Callable[[str], float]:
    """An argparse type: a float that is not NaN or infinite, and >= low when low is given."""

    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


# --8<-- [start:parser]
def make_parser(prog: str = "nanoserve") -> argparse.ArgumentParser:
    """Every flag of the server, in one place so that each stage adds its own here.

    Engine flags whose ranges EngineConfig checks take plain types here (see engine_config);
    the rest are checked by their argparse type.
    """
    parser = _Parser(
        prog=prog,
        description="Serve one model over an OpenAI-compatible API.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a local Hugging Face directory, a shipped config name (qwen3-0.6b) or a hub id",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (this machine only; vLLM's default is 0.0.0.0, which exposes "
        "the server to the network)",
    )
    parser.add_argument("--port", type=int_in(1, 65535), default=8000, help="port to listen on")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="auto: CUDA when there is one",
    )
    parser.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "dummy"],
        help="dummy: random weights from the config (for benchmarks)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int_in(1),
        default=None,
        help="context length (default: the config's max_position_embeddings)",
    )
    parser.add_argument(
        "--seed", type=int_in(SEED_MIN, SEED_MAX), default=0,
        help="seeds random weights and the requests that bring no seed of their own",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send and /v1/models reports (default: --model)",
    )
    parser.add_argument(
        "--max-num-seqs", "--max-batch-size", dest="max_num_seqs", type=int, default=256,
        help="most requests running at once (an upper bound: free KV pages decide how many fit)",
    )
    parser.add_argument(
        "--max-num-batched-tokens", type=int_in(1), default=None,
        help="most tokens one step may compute, prompts and decodes together "
        "(default: max(16384, max model len))",
    )
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument(
        "--num-pages", type=int_in(1), default=None,
        help="KV pool size in pages (default: measured from free GPU memory; on CPU a few "
        "full-length sequences)",
    )
    parser.add_argument(
        "--gpu-memory-utilization", type=finite_float(), default=0.9,
        help="share of the GPU's memory the engine may use, KV pool included",
    )
    parser.add_argument(
        "--attention-backend", default="auto", choices=["auto", "torch", "flashinfer"],
        help="auto: flashinfer on CUDA when installed, else torch",
    )
    parser.add_argument(
        "--enforce-eager", action="store_true",
        help="run every step eagerly: capture no CUDA graphs (slower decode, faster start-up)",
    )
    parser.add_argument(
        "--batch-wait-ms", type=finite_float(), default=None,
        help="ignored: requests join the running batch at every step (kept so that older "
        "command lines still start)",
    )
    parser.add_argument(
        "--max-request-bytes", type=int_in(1), default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body accepted; a larger one gets 413",
    )
    parser.add_argument(
        "--shutdown-timeout", type=finite_float(0), default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="seconds that requests still running at SIGTERM get to finish",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
        help="the server's and uvicorn's log level",
    )
    return parser


# --8<-- [end:parser]


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        seed=args.seed,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        page_size=args.page_size,
        num_pages=args.num_pages,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
    )


def as_flag(message: str) -> str:
    """EngineConfig's "page_size must be >= 1, got 0" as the CLI's "--page-size must be ..."."""
    field, _, rest = message.partition(" ")
    if field in {f.name for f in dataclasses.fields(EngineConfig)}:
        return f"--{field.replace('_', '-')} {rest}"
    return message


def build_engine(args: argparse.Namespace, parser: argparse.ArgumentParser) -> AsyncEngine:
    """The engine the flags ask for, or exit 2 with one line when the flags cannot be served."""
    try:
        config = engine_config(args)
    except ValueError as error:  # EngineConfig names the field that is out of range
        parser.error(as_flag(str(error)))
    try:
        return AsyncEngine(LLMEngine(config))
    except ValueError as error:  # no such model, an unsupported architecture, a context too long
        logger.debug("the engine could not be built", exc_info=True)
        parser.error(as_flag(str(error)))


def main(argv: list[str] | None = None, prog: str = "nanoserve") -> None:
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.batch_wait_ms is not None:
        logger.warning("--batch-wait-ms has no effect: requests join the running batch at "
                       "every step")
    engine = build_engine(args, parser)
    app = build_app(engine, model_name=args.served_model_name,
                    max_request_bytes=args.max_request_bytes)
    # The app's lifespan starts the engine's loop thread. SIGTERM drains: nothing new is
    # admitted, running requests get --shutdown-timeout seconds, then the process exits 0;
    # an engine failure exits 1.
    sys.exit(run_server(app, engine, args.host, args.port, args.log_level,
                        args.shutdown_timeout))
