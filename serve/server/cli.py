"""`nanoserve --model DIR` (or `python -m serve --model DIR`): serve one model over the OpenAI API.

Every value is checked before anything loads. A bad one ends the program with one line on stderr
and exit status 2, as argparse does for a missing flag; so does a model the engine cannot serve
as asked (an unknown directory, an unsupported architecture, a context past the RoPE table).
"""

import argparse
import dataclasses
import gc
import inspect
import logging
import math
import os
import re
import sys
import typing
from collections.abc import Callable
from typing import NoReturn

from serve.config import EngineConfig
from serve.engine.async_engine import AsyncEngine
from serve.engine.llm_engine import LLMEngine
from serve.server.app import build_app
from serve.server.body_limit import DEFAULT_MAX_REQUEST_BYTES
from serve.server.lifecycle import run_server

logger = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # vLLM's default too: long enough for most answers to finish
API_KEY_ENV = "NANOSERVE_API_KEY"


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


def number(kind: type, low: float | None = None, high: float | None = None) -> Callable:
    """An argparse type: a finite `kind` (int or float) in [low, high], either bound optional.
    argparse reports the ValueError of a non-number as "invalid int value: 'x'"."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and value < low) or (high is not None and value > high):
            rule = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def json_config(config_class: type) -> Callable:
    """An argparse type: config_class.from_json, its ValueError shown as argparse's error."""

    def parse(text: str):
        try:
            return config_class.from_json(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = config_class.__name__
    return parse


# --8<-- [start:parser]
def make_parser(prog: str = "nanoserve") -> argparse.ArgumentParser:
    """Every flag of the server: the engine's, one per EngineConfig field, then the server's."""
    parser = _Parser(prog=prog, description="Serve one model over an OpenAI-compatible API.",
                     formatter_class=_HelpFormatter)
    add_dataclass_flags(parser, EngineConfig, aliases={"max_num_seqs": ["--max-batch-size"],
                                                       "tensor_parallel_size": ["-tp"]})
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (this machine only; vLLM's "
        "default is 0.0.0.0, which exposes the server to the network)")
    add("--port", type=number(int, 1, 65535), default=8000, help="port to listen on")
    add("--served-model-name", nargs="+", help="the model names clients may send; responses "
        "and /v1/models carry the first (default: --model)")
    add("--api-key", help="require 'Authorization: Bearer KEY' on every path but /health and "
        f"/metrics (default: ${API_KEY_ENV}, if set)")
    add("--no-core-process", action="store_true", help="run the engine core in the server's "
        "process, on a thread (default: in a process of its own, so that the server's Python "
        "work never delays a step)")
    add("--batch-wait-ms", type=number(float), help="ignored: requests join the running batch "
        "at every step (kept so that older command lines still start)")
    add("--max-request-bytes", type=number(int, 1), default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body accepted; a larger one gets 413")
    add("--max-queued-requests", type=number(int, 1), help="answer a new generation request "
        "503, with Retry-After, while N requests wait for their first token: being tokenized, "
        "queued, or computing their prompt (each prompt of a request and each of its n choices "
        "counts; default: no limit)")
    add("--shutdown-timeout", type=number(float, 0), default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="seconds that requests still running at SIGTERM get to finish")
    add("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
        help="the server's and uvicorn's log level")
    return parser


def add_dataclass_flags(parser: argparse.ArgumentParser, config_class: type,
                        aliases: dict[str, list[str]]) -> None:
    """One flag per field of config_class: --field-name, of the field's type (a Literal gives
    the choices, a bool a switch), with the field's default, and its comment as the help.
    The ranges are the dataclass's own to check (see build_engine)."""
    hints = typing.get_type_hints(config_class)
    comments = field_comments(config_class)
    for field in dataclasses.fields(config_class):
        flag = f"--{field.name.replace('_', '-')}"
        kind = hints[field.name]
        required = field.default is dataclasses.MISSING
        options: dict = {"dest": field.name, "help": comments.get(field.name)}
        if not required:
            options["default"] = field.default
        if kind is bool:  # --enforce-eager; a field that defaults to on also gets --no-...
            options["action"] = argparse.BooleanOptionalAction if field.default else "store_true"
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        else:
            # int | None -> int; a config class (SpeculativeConfig) parses its JSON
            kind = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            options["type"] = json_config(kind) if hasattr(kind, "from_json") else kind
        parser.add_argument(flag, *aliases.get(field.name, []), required=required, **options)


def field_comments(config_class: type) -> dict[str, str]:
    """Each field's comment in the class's source: the lines just above it and the one at the
    end of its line, joined."""
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(config_class).splitlines()[1:]:
        line = line.strip()
        if line.startswith("def "):
            break
        if line.startswith("#"):
            above.append(line.lstrip("# "))
            continue
        if match := re.match(r"(\w+): [^#]*?(?:#\s*(.*))?$", line):
            comments[match[1]] = " ".join([*above, *([match[2]] if match[2] else [])])
        above = []
    return comments
# --8<-- [end:parser]


def api_key_of(args: argparse.Namespace) -> str | None:
    """--api-key, else $NANOSERVE_API_KEY (vLLM reads VLLM_API_KEY the same way), else none.
    An empty or all-blank key is a ValueError naming where it came from: served as "no key",
    it would turn authentication off while the command line looks as if it were on."""
    source, key = "--api-key", args.api_key
    if key is None:
        source, key = f"${API_KEY_ENV}", os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"{source} is empty; to serve without authentication, leave both "
                         f"--api-key and ${API_KEY_ENV} unset")
    return key


def as_flag(message: str) -> str:
    """EngineConfig's "page_size must be >= 1, got 0" as the CLI's "--page-size must be ..."."""
    field, _, rest = message.partition(" ")
    if field in {f.name for f in dataclasses.fields(EngineConfig)}:
        return f"--{field.replace('_', '-')} {rest}"
    return message


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the flags; a ValueError names the field that is out of range."""
    return EngineConfig(**{field.name: getattr(args, field.name)
                           for field in dataclasses.fields(EngineConfig)})


def make_engine(args: argparse.Namespace) -> AsyncEngine:
    """The engine the flags ask for; a ValueError says why the flags cannot be served (a field
    out of range, no such model, an unsupported architecture, a context too long)."""
    return AsyncEngine(LLMEngine(engine_config(args), core_process=not args.no_core_process),
                       max_queued_requests=args.max_queued_requests)


def build_engine(args: argparse.Namespace, parser: argparse.ArgumentParser) -> AsyncEngine:
    """The engine the flags ask for, or exit 2 with one line when the flags cannot be served."""
    try:
        return make_engine(args)  # (EngineConfig checks its fields before anything loads)
    except ValueError as error:
        logger.debug("the engine could not be built", exc_info=True)
        parser.error(as_flag(str(error)))


def main(argv: list[str] | None = None, prog: str = "nanoserve") -> None:
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    try:
        api_key = api_key_of(args)  # before anything loads, as every other flag is checked
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.batch_wait_ms is not None:
        logger.warning("--batch-wait-ms has no effect: requests join the running batch at "
                       "every step")
    engine = build_engine(args, parser)
    app = build_app(engine, model_names=args.served_model_name,
                    max_request_bytes=args.max_request_bytes,
                    api_key=api_key)
    # The app's lifespan starts the engine's loop thread. SIGTERM drains: nothing new is
    # admitted, running requests get --shutdown-timeout seconds, then the process exits 0;
    # an engine failure exits 1.
    gc.collect()  # what start-up built lives as long as the server: see core_process.py
    gc.freeze()
    sys.exit(run_server(app, engine, args.host, args.port, args.log_level,
                        args.shutdown_timeout))
