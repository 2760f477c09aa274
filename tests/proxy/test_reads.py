"""Where a read goes among the nodes at its index (`place_read`), and the proxy applying it (no sockets)."""

from __future__ import annotations

import re
import time

import pytest

from raftlb.config.model import ClusterConfig, NodeConfig, RouteConfig
from raftlb.core.leader_table import Announcement
from raftlb.core.placement import place
from raftlb.core.readplace import place_read
from raftlb.proxy.cluster import ClusterProxy
from tests.support.proxies import RecordingPool, send

FIRST, LAST = (lambda: 0.0), (lambda: 0.999)  # the rng's draw among equally loaded nodes


@pytest.mark.parametrize(("at_index", "coming", "load", "waited", "rng", "expected"), [
    # The least loaded node at the index serves the read.
    (["a"], [], {"a": 0}, 0.0, FIRST, "a"),
    (["a", "b"], [], {"a": 3, "b": 1}, 0.0, FIRST, "b"),
    (["a", "b", "c"], [], {"a": 2, "b": 1, "c": 4}, 0.0, FIRST, "b"),  # all of them, not a sample of two
    # ... ties are drawn at random.
    (["a", "b"], [], {"a": 1, "b": 1}, 0.0, FIRST, "a"),
    (["a", "b"], [], {"a": 1, "b": 1}, 0.0, LAST, "b"),
    # A busy node at the index is passed over for a while when an idle one is about to reach it:
    (["a"], ["b"], {"a": 1, "b": 0}, 0.01, FIRST, None),
    # ... only for a while (patience: 0.05 s here).
    (["a"], ["b"], {"a": 1, "b": 0}, 0.05, FIRST, "a"),
    # ... and only for an idle one: a busy node coming is no better.
    (["a"], ["b"], {"a": 3, "b": 1}, 0.01, FIRST, "a"),
    # An idle node at the index serves at once, whoever is coming.
    (["a", "c"], ["b"], {"a": 2, "b": 0, "c": 0}, 0.01, FIRST, "c"),
    (["a"], ["b"], {"a": 0, "b": 0}, 0.01, FIRST, "a"),
    # Nobody coming: nothing to wait for.
    (["a"], [], {"a": 5}, 0.0, FIRST, "a"),
])
def test_place_read(at_index: list[str], coming: list[str], load: dict[str, int], waited: float,
                    rng: object, expected: str | None) -> None:
    assert place_read(at_index, coming, load.__getitem__, waited, 0.05, rng) == expected  # type: ignore[arg-type]


def test_place_read_never_waits_without_patience() -> None:
    assert place_read(["a"], ["b"], {"a": 9, "b": 0}.__getitem__, 0.0, 0.0) == "a"


# -- the proxy applying it ---------------------------------------------------------------------------------

FENCED = RouteConfig(methods=frozenset({"GET"}), path=re.compile("^/kv"), kind="read", policy="fenced",
                     idempotent=False)


def fenced_proxy(follower_wait: float = 0.05) -> tuple[ClusterProxy, dict[str, RecordingPool]]:
    nodes = tuple(NodeConfig(id=f"n{i}", url=f"http://127.0.0.1:{7000 + i}", announce_url="",
                             host="127.0.0.1", port=7000 + i) for i in (1, 2, 3))
    proxy = ClusterProxy(ClusterConfig(name="c", kind="native", nodes=nodes, routes=(FENCED,),
                                       fence_wait=1.0, follower_wait=follower_wait))
    pools = {n.id: RecordingPool(n.id) for n in nodes}
    proxy.pools = pools  # type: ignore[assignment]
    return proxy, pools


def announce(proxy: ClusterProxy, node: str, applied: int) -> None:
    role = "leader" if node == "n1" else "follower"
    proxy.on_announcement(node, Announcement(node=node, term=2, role=role, leader="n1", commit_index=applied,
                                             applied_index=applied, has_quorum=role == "leader" or None))


def read(proxy: ClusterProxy, token: int) -> None:
    send(proxy, b"GET /kv/a HTTP/1.1\r\nHost: x\r\nX-Raft-Min-Index: %d\r\n\r\n" % token)


def targets(pools: dict[str, RecordingPool]) -> dict[str, int]:
    return {n: len(p.acquired) for n, p in pools.items() if p.acquired}


def cluster_at(applied: int) -> tuple[ClusterProxy, dict[str, RecordingPool]]:
    """Leader n1, followers n2 and n3, all caught up at `applied`; n2 busy with 3 requests, n3 idle."""
    proxy, pools = fenced_proxy()
    for node in ("n1", "n2", "n3"):
        announce(proxy, node, applied)
    pools["n2"].outstanding = 3
    return proxy, pools


async def test_a_read_whose_index_a_busy_follower_announces_first_goes_to_the_idle_one() -> None:
    proxy, pools = cluster_at(10)
    announce(proxy, "n1", 11)
    read(proxy, 11)  # only the leader has it: waits for a follower (follower_wait)
    announce(proxy, "n2", 11)  # the busy follower announces it first: not released to it...
    assert targets(pools) == {} and len(proxy.fence_waiting) == 1
    announce(proxy, "n3", 11)  # ...but to the idle one, a moment later
    assert targets(pools) == {"n3": 1}
    pools["n3"].outstanding = 0  # (its answer came back)
    # Already at the index when the read arrives: the same rule.
    announce(proxy, "n1", 12)
    announce(proxy, "n2", 12)
    read(proxy, 12)
    assert targets(pools) == {"n3": 1} and len(proxy.fence_waiting) == 1
    announce(proxy, "n3", 12)
    assert targets(pools) == {"n3": 2}


async def test_the_wait_for_an_idle_follower_is_short() -> None:
    proxy, pools = cluster_at(10)
    announce(proxy, "n1", 11)
    announce(proxy, "n2", 11)
    read(proxy, 11)
    proxy.sweep(time.monotonic())
    assert targets(pools) == {}
    proxy.sweep(time.monotonic() + 0.06)  # min(follower_wait, fence_wait / 4) later: the busy follower
    assert targets(pools) == {"n2": 1} and proxy.stats.fence_fallback == 0


async def test_a_follower_that_is_not_keeping_up_is_not_waited_for() -> None:
    proxy, pools = fenced_proxy()
    announce(proxy, "n1", 100)
    announce(proxy, "n2", 100)
    announce(proxy, "n3", 5)  # replaying its log: never caught up with the leader's commit
    pools["n2"].outstanding = 3
    read(proxy, 100)
    assert targets(pools) == {"n2": 1}


async def test_no_wait_with_follower_wait_zero() -> None:
    proxy, pools = fenced_proxy(follower_wait=0)
    for node in ("n1", "n2", "n3"):
        announce(proxy, node, 10)
    pools["n2"].outstanding = 3
    announce(proxy, "n1", 11)
    announce(proxy, "n2", 11)
    read(proxy, 11)
    assert targets(pools) == {"n2": 1}


async def test_a_resent_read_avoids_the_follower_that_failed_even_when_only_the_leader_remains() -> None:
    """A read re-sent away from a follower (`avoid`: it failed) goes to the leader when that follower was
    the only one at the index. (Before read placement by load it went back to the follower that failed: the
    leader was set aside for preferring followers before the failed node was.)"""
    proxy, pools = fenced_proxy()
    announce(proxy, "n3", 10)  # behind the token, and never caught up: not waited for
    announce(proxy, "n1", 20)
    announce(proxy, "n2", 20)
    read(proxy, 20)
    assert targets(pools) == {"n2": 1}  # followers first
    req = pools["n2"].acquired[0]
    req.avoid = "n2"  # what a failed attempt on n2 sets before the re-send
    now = time.monotonic()
    assert place(req, proxy.table, now, proxy.follower_wait, proxy.caught_up_at, proxy.load,
                 proxy.cluster.leader_read_margin) == "n1"
