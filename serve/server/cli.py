"""`python -m serve --model DIR`: serve one model over the OpenAI API."""

import argparse
import logging
import sys

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from serve.server.lifecycle import run_server


# --8<-- [start:parser]
def make_parser() -> argparse.ArgumentParser:
    """Every flag of the server, in one place so that each stage adds its own here."""
    parser = argparse.ArgumentParser(
        prog="python -m serve", description="Serve one model over an OpenAI-compatible API."
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a local Hugging Face directory, a shipped config name (qwen3-0.6b) or a hub id",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; vLLM's default is "
        "0.0.0.0, which exposes the server to the network)",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "dummy"],
        help="dummy: random weights from the config (for benchmarks)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default: the config's max_position_embeddings)",
    )
    parser.add_argument("--seed", type=int, default=0)
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
        "--max-num-batched-tokens", type=int, default=None,
        help="most tokens one step may compute, prompts and decodes together "
        "(default: max(16384, max model len))",
    )
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument(
        "--num-pages", type=int, default=None,
        help="KV pool size in pages (default: measured from free GPU memory; on CPU a few "
        "full-length sequences)",
    )
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9,
        help="share of the GPU's memory the engine may use, KV pool included",
    )
    parser.add_argument(
        "--attention-backend", default="auto", choices=["auto", "torch", "flashinfer"],
        help="auto: flashinfer on CUDA when installed, else torch",
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=None,
        help="ignored: requests join the running batch at every step (kept so that old "
        "command lines still start)",
    )
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0,
        help="on SIGTERM, how long running requests may take to finish before they are ended",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
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
    )


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.batch_wait_ms is not None:
        logging.getLogger(__name__).warning(
            "--batch-wait-ms has no effect: requests join the running batch at every step")
    engine = AsyncEngine(LLMEngine(engine_config(args)))
    app = build_app(engine, model_name=args.served_model_name)
    # The app's lifespan starts the engine's loop thread and stops it at shutdown.
    sys.exit(run_server(app, engine, args.host, args.port, args.log_level,
                        args.shutdown_timeout))
