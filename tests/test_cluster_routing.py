"""The prefix-aware router: its page keys and its rule, then, on a local Ray cluster, the
multi-tenant workload of bench.cluster_routing against Ray Serve's default router.

Needs `pip install 'nanoserve[ray]'` (skipped without it). The workload test is slow (about two
minutes on 2 CPUs: four clusters are deployed): `pytest -m slow tests/test_cluster_routing.py`.
"""

import pytest

pytest.importorskip("ray.serve", reason="the cluster needs ray[serve]: "
                                        "pip install 'nanoserve[ray]'")
from serve.cluster.router import PrefixTable, RoutingRule, choose, page_keys  # noqa: E402
from tests.test_cluster import free_port  # noqa: E402


def test_page_keys_name_whole_pages_and_what_comes_before():
    first = page_keys(list(range(40)), page_size=16)
    assert len(first) == 2  # the last 8 tokens fill no page
    assert page_keys(list(range(32)) + [99] * 16, 16)[:2] == first  # same first two pages
    assert page_keys([99] * 16 + list(range(16, 32)), 16)[1] != first[1]  # same page, not prefix
    assert page_keys(list(range(40)), 16, salt="a") != first  # a salt shares with its own only
    assert page_keys(list(range(15)), 16) == []


def table_of(**held: list[int]) -> PrefixTable:
    table = PrefixTable(max_pages=100)
    for replica, keys in held.items():
        table.record(replica, keys)
    return table


def test_the_rule_follows_the_cache_unless_its_replica_is_much_busier():
    rule = RoutingRule(balance_abs_threshold=4, balance_rel_threshold=1.5)
    table = table_of(a=[1, 2, 3], b=[7, 8])
    loads = {"a": 3, "b": 0}
    assert choose([1, 2, 3, 4], loads, table, rule)[0] == ["a"]  # 3 of 4 pages held
    assert choose([1, 2, 9, 9], loads, table, rule)[0] == ["a"]  # a run of 2 of 4
    # much busier: by more than 4 requests and 1.5 times: the least loaded of all instead
    assert choose([1, 2, 3, 4], {"a": 5, "b": 0}, table, rule) == [["a", "b"]]
    # new prefix (no replica holds 30 % of it): where the fewest pages are
    assert choose([5, 6, 7, 8], loads, table, rule)[0] == ["b"]
    assert choose([1, 5, 6, 7], loads, table, rule)[0] == ["b"]  # 1 of 4 is under 30 %
    ranks = choose([], loads, table, rule)  # nothing to match: two at random
    assert len(ranks) == 1 and sorted(ranks[0]) == ["a", "b"]


def test_the_table_forgets_the_least_recently_sent_pages():
    table = PrefixTable(max_pages=3)
    table.record("a", [1, 2])
    table.record("a", [3])
    table.record("a", [1, 4])  # 1 is sent again; 2 is the oldest now, and goes
    assert list(table.pages["a"]) == [3, 1, 4]
    assert table.matched("a", [1, 2]) == 1
    table.keep_only({"b"})
    assert table.pages == {}


@pytest.mark.slow
def test_prefix_routing_finds_more_of_the_prompts_cached():
    """8 tenants (system prompts of 12 pages), 2 conversations of 3 turns each, on replicas
    whose KV pool holds 48 pages: all the tenants' prompts fit in the pools of 4 replicas
    together, not in one. Ray's default router sends each turn anywhere."""
    from bench.cluster_routing import main

    result = main(["--replicas", "2", "4", "--tenants", "8", "--conversations", "2",
                   "--turns", "3", "--system-tokens", "192", "--answer-tokens", "16",
                   "--num-pages", "48", "--max-model-len", "512", "--latency-requests", "0",
                   "--port", str(free_port())])
    two, four = result["routing"]
    assert two["prefix"]["requests"] == two["pow2"]["requests"] == 8 * 2 * 3
    assert two["share_ratio"] > 1.0, two
    assert four["share_ratio"] >= 1.5, four
