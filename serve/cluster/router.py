"""Prefix-aware routing: a request goes where its prompt's pages most likely are cached.

The router cannot see the replicas' radix caches, so it keeps its own picture of them: for each
replica, the pages of the prompts it was sent (as chained keys, see page_keys), up to a bound
past which the least recently sent are forgotten (the replica's own evictions are not seen: the
picture is a guess, and a wrong guess costs what blind routing costs). A new prompt goes to the
replica that holds the longest run of its first pages, unless that replica is much busier than
the least busy one.
The rule and its defaults are SGLang's cache-aware router's; it runs inside Ray Serve's public
RequestRouter API, in the process that calls the replicas (the ingress).
"""

import random
from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


# --8<-- [start:page_keys]
def page_keys(token_ids: list[int], page_size: int, salt: str | None = None) -> list[int]:
    """One key per full page of the prompt, naming that page and every page before it (a chained
    hash), so two prompts share key i exactly when they share their first i + 1 pages, as the
    engine's radix cache shares them. The cache salt starts the chain: salted prompts share
    pages only with prompts of the same salt, as in the engine. (Python's hash of a str differs
    between processes: the keys mean something only in the process that made them.)"""
    keys, key = [], hash(salt)
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        key = hash((key, *token_ids[start:start + page_size]))
        keys.append(key)
    return keys
# --8<-- [end:page_keys]


@dataclass
class RoutingRule:
    """When to follow the cache and when the load (SGLang's router's defaults)."""

    # the share of a prompt's pages a replica must hold for the prompt to follow them
    cache_threshold: float = 0.3
    # the cache's choice is overruled when its queue exceeds the shortest by more than this
    # many requests and by more than this factor, both
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    # pages remembered per replica: past this, the least recently sent are forgotten
    max_pages_per_replica: int = 1 << 16


class PrefixTable:
    """Which page keys each replica was sent, least recently sent first."""

    def __init__(self, max_pages: int) -> None:
        self.max_pages = max_pages
        self.pages: dict[str, OrderedDict[int, None]] = {}

    def matched(self, replica: str, keys: list[int]) -> int:
        """How many of the prompt's first pages the replica holds, in a row."""
        held = self.pages.get(replica, {})
        return next((i for i, key in enumerate(keys) if key not in held), len(keys))

    def record(self, replica: str, keys: list[int]) -> None:
        held = self.pages.setdefault(replica, OrderedDict())
        for key in keys:
            held[key] = None
            held.move_to_end(key)
        while len(held) > self.max_pages:
            held.popitem(last=False)

    def keep_only(self, replicas: set[str]) -> None:
        """Forget the replicas that are gone (a restarted one comes back with an empty cache
        and a new id)."""
        for replica in self.pages.keys() - replicas:
            del self.pages[replica]


# --8<-- [start:choose]
def choose(keys: list[int], loads: dict[str, int], table: PrefixTable,
           rule: RoutingRule) -> list[list[str]]:
    """Ranks of replicas to try, best first (Ray Serve takes the least loaded replica of the
    first rank that has one with room). `loads`: each replica's requests in flight."""
    replicas = list(loads)
    if not keys:  # nothing to match (a short prompt, or no prompt): power of two choices
        return [random.sample(replicas, min(2, len(replicas)))]
    matched = {replica: table.matched(replica, keys) for replica in replicas}
    best = max(replicas, key=lambda r: (matched[r], -loads[r], random.random()))
    if matched[best] < rule.cache_threshold * len(keys):
        # No replica holds enough of it: a new prefix goes where fewest pages are, so that
        # prefixes spread over the replicas instead of piling onto the first one.
        best = min(replicas, key=lambda r: (len(table.pages.get(r, ())), loads[r],
                                            random.random()))
    shortest = min(loads.values())
    if (loads[best] - shortest > rule.balance_abs_threshold
            and loads[best] > rule.balance_rel_threshold * shortest):
        return [replicas]  # too busy: the least loaded of all
    return [[best], replicas]
# --8<-- [end:choose]


class PrefixAwareRouter(RequestRouter):
    """Ray Serve's request router for the replicas: `choose` over the replicas' queue lengths,
    and the table updated with each request routed. The request's first argument carries its
    page keys (`.page_keys`, computed by the ingress)."""

    def initialize_state(self, **rule) -> None:
        self.rule = RoutingRule(**rule)
        self.table = PrefixTable(self.rule.max_pages_per_replica)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        # Ray's cached count of each replica's requests in flight; unknown counts as idle
        # (an entry goes stale after seconds without a request sent there)
        loads = {name: self.replica_queue_len_cache.get(replica.replica_id) or 0
                 for name, replica in by_id.items()}
        ranks = choose(_keys_of(pending_request), loads, self.table, self.rule)
        return [[by_id[name] for name in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        self.table.record(replica_id.unique_id, _keys_of(pending_request))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.table.keep_only({replica.replica_id.unique_id for replica in replicas})


def _keys_of(pending_request: PendingRequest | None) -> list[int]:
    args = pending_request.args if pending_request is not None else []
    return getattr(args[0], "page_keys", []) if args else []
