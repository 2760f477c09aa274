"""Read placement by load through raftlb, on fake nodes whose answers the test controls: followers first,
the leader's spare capacity too (`raftlb.core.readplace`; docs/how-it-works.md, "Reads").

Count-based: what each node served or holds, never how long anything took.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest

from raftlb.config.model import ClusterConfig, RouteConfig
from tests.support.fakes import FakeCluster, FakeRequest, FakeResponse, delay
from tests.support.harness import running, url_of, wait_for

pytestmark = pytest.mark.integration

MARGIN = ClusterConfig.leader_read_margin  # the default

FENCED = (RouteConfig(methods=frozenset({"GET"}), path=re.compile("^/kv"), kind="read", policy="fenced",
                      idempotent=False),)


def leader_of(srv: Any) -> str | None:
    return srv.proxies["c1"].table.leader(time.monotonic())  # type: ignore[no-any-return]


def at_index(srv: Any, index: int) -> bool:
    return all(v.applied_index == index for v in srv.proxies["c1"].table.nodes.values())


def cluster_at(fc: FakeCluster, index: int) -> None:
    fc.elect("n1")
    for n in fc.nodes:
        n.set(applied_index=index, commit_index=index)


async def test_with_idle_followers_the_leader_serves_under_5_percent_of_reads() -> None:
    """Every node answers after 5 ms; 8 clients keep reading: followers that keep up serve (nearly) all."""
    async with FakeCluster(3) as fc:
        cluster_at(fc, 50)
        for n in fc.nodes:
            n.handler = delay(0.005)
        async with running(fc.config(routes=FENCED)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1" and at_index(srv, 50))
            served: dict[str, int] = {}

            async def client(k: int) -> None:
                for i in range(50):
                    r = await c.get(f"/kv/{k}-{i}", headers={"X-Raft-Min-Index": "50"})
                    assert r.status_code == 200
                    served[r.headers["x-raft-node"]] = served.get(r.headers["x-raft-node"], 0) + 1

            await asyncio.gather(*(client(k) for k in range(8)))
            stats = srv.proxies["c1"].stats
    assert sum(served.values()) == 400
    assert served.get("n1", 0) < 0.05 * 400, served
    assert stats.reads_leader < 0.05 * (stats.reads_leader + stats.reads_follower)  # the metric agrees
    assert served.get("n2", 0) > 0 and served.get("n3", 0) > 0


async def held_reads(margin: int | None, reads: int = 60) -> tuple[dict[str, int], dict[str, int]]:
    """Followers hold every read until released; the leader answers at once. `reads` reads at once:
    (reads the leader served while the followers held theirs, reads each follower held)."""
    async with FakeCluster(3) as fc:
        cluster_at(fc, 50)
        gate = asyncio.Event()

        async def held(req: FakeRequest) -> FakeResponse | None:
            await gate.wait()
            return None

        fc["n2"].handler = fc["n3"].handler = held
        kw: dict[str, Any] = {} if margin == MARGIN else {"leader_read_margin": margin}
        async with running(fc.config(routes=FENCED, **kw)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), limits=httpx.Limits(max_connections=reads)) as c:
            await wait_for(lambda: leader_of(srv) == "n1" and at_index(srv, 50))
            pending = [asyncio.ensure_future(c.get(f"/kv/{i}", headers={"X-Raft-Min-Index": "50"}))
                       for i in range(reads)]
            by_node: dict[str, int] = {}

            def placed() -> bool:
                by_node.update({n.id: len([r for r in n.requests if r.path.startswith("/kv/")])
                                for n in fc.nodes})
                return sum(by_node.values()) == reads

            await wait_for(placed)  # every read has reached a node: the leader's are answered
            leader_served = {"n1": by_node["n1"]}
            followers = {"n2": by_node["n2"], "n3": by_node["n3"]}
            gate.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(*pending))
    return leader_served, followers


async def test_an_idle_leader_takes_the_reads_saturated_followers_would_queue() -> None:
    """Followers that hold their reads (saturated): each takes about the margin more than the leader holds,
    then the leader's spare capacity serves the rest."""
    assert MARGIN is not None
    leader, followers = await held_reads(MARGIN)
    assert all(MARGIN <= n <= MARGIN + 4 for n in followers.values()), followers  # followers first
    assert leader["n1"] == 60 - sum(followers.values()) >= 60 - 2 * (MARGIN + 4), (leader, followers)


async def test_leader_read_margin_never_keeps_every_read_on_followers() -> None:
    leader, followers = await held_reads(None)
    assert leader == {"n1": 0} and sum(followers.values()) == 60, (leader, followers)


async def test_prefer_followers_false_spreads_reads_over_every_node() -> None:
    """No bias: the leader, answering at once, takes every read once the followers hold one each."""
    async with FakeCluster(3) as fc:
        cluster_at(fc, 50)
        gate = asyncio.Event()

        async def held(req: FakeRequest) -> FakeResponse | None:
            await gate.wait()
            return None

        fc["n2"].handler = fc["n3"].handler = held
        route = (RouteConfig(methods=frozenset({"GET"}), path=re.compile("^/kv"), kind="read",
                             policy="fenced", idempotent=False, prefer_followers=False),)
        async with running(fc.config(routes=route)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), limits=httpx.Limits(max_connections=20)) as c:
            await wait_for(lambda: leader_of(srv) == "n1" and at_index(srv, 50))
            pending = [asyncio.ensure_future(c.get(f"/kv/{i}", headers={"X-Raft-Min-Index": "50"}))
                       for i in range(20)]
            await wait_for(lambda: sum(len(n.requests) for n in fc.nodes) >= 20)
            held_by_followers = len(fc["n2"].requests) + len(fc["n3"].requests)
            gate.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(*pending))
    assert held_by_followers <= 20 // 2, held_by_followers  # most reads went to the idle leader
