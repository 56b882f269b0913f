"""The Ray Serve application: N replicas behind one ingress, and the metrics board."""

import argparse

import ray
import ray.serve
from ray.serve.config import RequestRouterConfig

from serve.cluster.ingress import Ingress
from serve.cluster.metrics import MetricsBoard
from serve.cluster.replica import Replica
from serve.cluster.router import PrefixAwareRouter

# Requests one replica or the ingress may have in flight before Ray Serve holds more back. The
# engine queues and sheds load itself (--max-queued-requests), so Ray's cap (5 by default)
# must not do it first.
MAX_ONGOING_REQUESTS = 100_000
HEALTH_CHECK_PERIOD_S = 2.0  # how soon a replica whose engine died is replaced


# --8<-- [start:build]
def build(args: argparse.Namespace, api_key: str | None = None) -> ray.serve.Application:
    """The application the flags describe, for ray.serve.run (in a process connected to the
    Ray cluster: the board is created there, and lives as long as that process)."""
    router = None
    if args.routing == "prefix":
        router = RequestRouterConfig(request_router_class=PrefixAwareRouter,
                                     request_router_kwargs=dict(
                                         cache_threshold=args.cache_threshold,
                                         balance_abs_threshold=args.balance_abs_threshold,
                                         balance_rel_threshold=args.balance_rel_threshold))
    gpus = args.num_gpus_per_replica
    if gpus is None:  # a GPU per tensor-parallel rank, where the cluster has GPUs to use
        has_gpus = args.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        gpus = args.tensor_parallel_size if has_gpus else 0
    replicas = ray.serve.deployment(Replica).options(
        num_replicas=args.replicas, max_ongoing_requests=MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": args.num_cpus_per_replica,
                           "num_gpus": gpus},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=args.shutdown_timeout,
        **({"request_router_config": router} if router else {}))
    ingress = ray.serve.deployment(ray.serve.ingress()(Ingress)).options(
        num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0})
    board = ray.remote(num_cpus=0)(MetricsBoard).remote()
    return ingress.bind(replicas.bind(args, board), board, args, api_key)
# --8<-- [end:build]
