"""`nanoserve-cluster --replicas N --model DIR` (or `python -m serve.cluster`): N replicas of the
engine on a Ray cluster, behind one OpenAI-compatible endpoint, routed by prefix.

Every flag of `nanoserve` means what it means there, for each replica; the cluster's own flags
say how many replicas, on which Ray cluster (a local one by default), with what resources, and
how requests are routed. It serves until SIGINT or SIGTERM, then stops the replicas.
"""

import argparse
import logging
import signal
import threading

import ray
import ray.serve

from serve.cluster.app import build
from serve.cluster.router import RoutingRule
from serve.models.loader import resolve_model_path
from serve.server import cli as server_cli
from serve.server.cli import api_key_of, as_flag, engine_config, number

logger = logging.getLogger(__name__)

APP_NAME = "nanoserve"


def make_parser() -> argparse.ArgumentParser:
    """Every flag of `nanoserve`, then the cluster's."""
    parser = server_cli.make_parser("nanoserve-cluster")
    parser.description = "Serve one model from several engine replicas on a Ray cluster."
    rule = RoutingRule()
    add = parser.add_argument_group("cluster", "The routing thresholds' defaults are SGLang's "
                                    "cache-aware router's.").add_argument
    add("--replicas", type=number(int, 1), default=2, help="engine replicas")
    add("--address", help="the Ray cluster to run on, as `ray start --head` printed it "
        "(host:port; default: start one on this machine, stopped on exit)")
    add("--num-gpus-per-replica", type=number(float, 0), help="GPUs Ray gives each replica "
        "(default: --tensor-parallel-size where the cluster has GPUs, else 0)")
    add("--num-cpus-per-replica", type=number(float, 0), default=1,
        help="CPUs Ray reserves for each replica")
    add("--routing", choices=["prefix", "pow2"], default="prefix", help="prefix: to the replica "
        "holding the longest run of the prompt's pages; pow2: Ray Serve's default, the less "
        "busy of two replicas picked at random")
    add("--cache-threshold", type=number(float, 0, 1), default=rule.cache_threshold,
        help="share of the prompt's pages a replica must hold for the prompt to follow them; "
        "below it, the prompt goes to the replica with the fewest pages")
    add("--balance-abs-threshold", type=number(int, 0), default=rule.balance_abs_threshold,
        help="the replica the cache picks is passed over for the least busy one when it has "
        "more than this many requests more than that one...")
    add("--balance-rel-threshold", type=number(float, 1), default=rule.balance_rel_threshold,
        help="...and more than this many times as many")
    return parser


def start(args: argparse.Namespace, api_key: str | None = None) -> None:
    """Deploy the replicas and the ingress on the Ray cluster this process is connected to,
    serving HTTP on --host and --port, and wait until they are ready. (A second call replaces
    the application; the port stays the first call's.)"""
    ray.serve.start(http_options={"host": args.host, "port": args.port})
    ray.serve.run(build(args, api_key), name=APP_NAME, route_prefix="/")


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:  # what can be checked here, before a cluster starts
        api_key = api_key_of(args)
        engine_config(args)
        resolve_model_path(args.model)  # (each replica loads it again, where it runs)
    except ValueError as error:
        parser.error(as_flag(str(error)))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    ray.init(address=args.address, logging_level=args.log_level.upper())
    try:
        start(args, api_key)
        logger.info("%d replicas serving on http://%s:%d", args.replicas, args.host, args.port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        logger.info("stopping the replicas (running requests get up to %.0f s)",
                    args.shutdown_timeout)
    finally:
        ray.serve.delete(APP_NAME)
        ray.shutdown()
