"""Reads through raftlb against fake nodes: fencing by index, fallback, stale answers, cookies, bounded
lag, linearizable read-index rounds, and per-session write ordering."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest

from raftlb.config.model import RouteConfig
from tests.support.fakes import FakeCluster, FakeRequest, FakeResponse, delay
from tests.support.harness import running, url_of, wait_for

pytestmark = pytest.mark.integration


def reads(policy: str = "fenced", **kw: Any) -> tuple[RouteConfig, ...]:
    route = RouteConfig(methods=frozenset({"GET"}), path=re.compile("^/kv"), kind="read",
                        policy=policy, idempotent=False, **kw)  # type: ignore[arg-type]
    return (route,)


def leader_of(srv: object) -> str | None:
    return srv.proxies["c1"].table.leader(time.monotonic())  # type: ignore[attr-defined,no-any-return]


def applied(srv: object, node: str) -> int | None:
    return srv.proxies["c1"].table.nodes[node].applied_index  # type: ignore[attr-defined,no-any-return]


async def test_fenced_reads_go_to_followers_that_reached_the_token() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].set(applied_index=100, commit_index=100)
        fc["n2"].set(applied_index=100)
        fc["n3"].set(applied_index=40)
        async with running(fc.config(routes=reads())) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1" and applied(srv, "n3") == 40)
            nodes = [(await c.get("/kv/a", headers={"X-Raft-Min-Index": "90"})).headers["x-raft-node"]
                     for _ in range(20)]
            assert set(nodes) == {"n2"}  # n3 is behind the token; the leader is only a fallback
            nodes = [(await c.get("/kv/a")).headers["x-raft-node"] for _ in range(30)]
            assert set(nodes) == {"n2", "n3"}  # no token: any follower
            stats = srv.proxies["c1"].stats
            assert stats.reads_follower == 50 and stats.reads_leader == 0


async def test_fenced_read_waits_for_an_announcement_then_goes() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        for n in fc.nodes:
            n.set(applied_index=10, commit_index=10)
        cfg = fc.config(routes=reads(), fence_wait=3.0)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: applied(srv, "n2") == 10)
            task = asyncio.create_task(c.get("/kv/a", headers={"X-Raft-Min-Index": "12"}))
            await wait_for(lambda: srv.proxies["c1"].fence_waiting != [])
            fc["n3"].set(applied_index=12)
            r = await task
            assert r.headers["x-raft-node"] == "n3"
            assert srv.proxies["c1"].stats.fence_waited == 1


async def test_the_index_on_answers_counts_between_announcements() -> None:
    # Nodes that announce only once in a long while (tick-only, here 30 s): a follower's answers show it has
    # applied index 50 while its last announcement said 10. A read with token 30 goes to it at once, where
    # it would otherwise wait out fence_wait, fall back to the leader (at 10) and fail.
    async with FakeCluster(3, tick=30.0) as fc:
        fc.elect("n1")
        for n in fc.nodes:
            n.set(applied_index=10, commit_index=10)
        cfg = fc.config(routes=reads(), fence_wait=2.0, liveness_timeout=60.0)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: all(applied(srv, n) == 10 for n in ("n1", "n2", "n3")))
            fc["n2"].applied_index = 50  # no announcement: only its answers say so
            for _ in range(40):
                if (await c.get("/kv/a")).headers["x-raft-node"] == "n2":
                    break
            assert applied(srv, "n2") == 50
            r = await c.get("/kv/a", headers={"X-Raft-Min-Index": "30"})
            assert (r.status_code, r.headers["x-raft-node"], r.headers["x-raft-index"]) == (200, "n2", "50")
            # It did not wait for an announcement: none can come (30 s tick), it never entered the fence
            # wait, and a wait would have ended on the leader (at 10), not on n2.
            assert srv.proxies["c1"].stats.fence_waited == 0
            assert applied(srv, "n3") == 10  # nothing learned about the others


async def test_fenced_read_falls_back_to_the_leader_after_fence_wait() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        for n in fc.nodes:
            n.set(applied_index=5, commit_index=5)

        async def fresh(req: FakeRequest) -> FakeResponse:  # the leader's announcements trail its state
            return FakeResponse(200, [("X-Raft-Index", "60")], b"fresh")

        fc["n1"].handler = fresh
        cfg = fc.config(routes=reads(), fence_wait=0.2)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: applied(srv, "n3") == 5 and applied(srv, "n1") == 5)
            t0 = time.monotonic()
            r = await c.get("/kv/a", headers={"X-Raft-Min-Index": "60"})
            assert time.monotonic() - t0 >= 0.15  # it waited for an announcement first
            assert r.headers["x-raft-node"] == "n1" and r.content == b"fresh"
            assert srv.proxies["c1"].stats.fence_fallback == 1
            # A token nobody can serve, not even the leader: a clear 504, never older state.
            r = await c.get("/kv/a", headers={"X-Raft-Min-Index": "1000"})
            assert r.status_code == 504 and r.json()["error"] == "index_not_reached"


async def test_answer_below_the_token_is_never_returned() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].set(applied_index=20, commit_index=20)
        fc["n2"].set(applied_index=20)
        fc["n3"].set(applied_index=20)

        async def lagging(req: FakeRequest) -> FakeResponse:  # announces 20, answers from index 3
            return FakeResponse(200, [("X-Raft-Index", "3")], b"old")

        fc["n2"].handler = lagging
        fc["n3"].handler = lagging
        async with running(fc.config(routes=reads())) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: applied(srv, "n3") == 20)
            for _ in range(5):
                r = await c.get("/kv/a", headers={"X-Raft-Min-Index": "15"})
                assert r.status_code == 200 and r.content != b"old"
                assert r.headers["x-raft-node"] == "n1"
            assert srv.proxies["c1"].stats.fence_stale == 5


async def test_cookie_token_gives_plain_clients_read_your_writes() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].set(applied_index=7, commit_index=7)
        fc["n2"].set(applied_index=3)
        fc["n3"].set(applied_index=3)
        cfg = fc.config(routes=reads(), index_cookie=True, fence_wait=0.1)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: applied(srv, "n2") == 3 and applied(srv, "n1") == 7)
            r = await c.put("/kv/a", content=b"v")  # the fake leader answers with index 8
            assert r.cookies.get("raftlb-index") == r.headers["x-raft-index"] == "8"
            # The cookie comes back by itself: the followers (at 3) are not eligible any more.
            r = await c.get("/kv/a")
            assert r.status_code == 200, r.text
            assert r.headers["x-raft-node"] == "n1"
            assert r.cookies.get("raftlb-index") == "8"


async def test_bounded_reads_skip_followers_that_lag_too_far() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].set(applied_index=1000, commit_index=1000)
        fc["n2"].set(applied_index=995)
        fc["n3"].set(applied_index=900)
        cfg = fc.config(routes=reads("bounded", max_lag_entries=10))
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: applied(srv, "n3") == 900 and applied(srv, "n2") == 995)
            nodes = {(await c.get("/kv/a")).headers["x-raft-node"] for _ in range(20)}
            assert nodes == {"n2"}


async def test_consistency_header_overrides_the_route_policy() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(routes=reads("any"))) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            nodes = {(await c.get("/kv/a", headers={"X-Raft-Consistency": "leader"})).headers["x-raft-node"]
                     for _ in range(10)}
            assert nodes == {"n1"}


async def test_linearizable_reads_share_read_index_rounds_and_are_served_by_followers() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        for n in fc.nodes:
            n.set(applied_index=30, commit_index=30)
        rounds = 0

        async def read_index(req: FakeRequest) -> FakeResponse | None:
            nonlocal rounds
            if req.path == "/raft/read_index":
                rounds += 1
                await asyncio.sleep(0.05)  # confirming leadership takes a heartbeat round
                return FakeResponse.json({"read_index": 30, "term": fc.term})
            return None

        fc["n1"].handler = read_index
        # Forty reads released at once: with the default leader_read_margin the leader would take its share
        # of such a burst (tests/integration/test_read_placement.py); here the followers serve them all.
        async with running(fc.config(routes=reads("linearizable"), leader_read_margin=None)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), limits=httpx.Limits(max_connections=100)) as c:
            await wait_for(lambda: applied(srv, "n3") == 30)
            results = await asyncio.gather(*(c.get(f"/kv/{i}") for i in range(40)))
            assert all(r.status_code == 200 for r in results)
            assert {r.headers["x-raft-node"] for r in results} <= {"n2", "n3"}
            assert 1 <= rounds <= 5  # forty reads, a handful of rounds
            assert srv.proxies["c1"].broker.reads == 40


async def test_a_failed_read_index_round_does_not_use_up_the_reads_resends() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        for n in fc.nodes:
            n.set(applied_index=30, commit_index=30)
        rounds = reads_served = 0

        async def handler(req: FakeRequest) -> FakeResponse | None:
            nonlocal rounds, reads_served
            if req.path == "/raft/read_index":
                rounds += 1
                if rounds == 1:  # the first round fails (a leader busy confirming its term)
                    return FakeResponse.json({"error": "not ready"}, 503)
                return FakeResponse.json({"read_index": 30, "term": fc.term})
            reads_served += 1
            if reads_served == 1:  # the node serving the read dies after it was sent: a GET is re-sent
                return FakeResponse(action="close")
            return None

        for n in fc.nodes:
            n.handler = handler
        async with running(fc.config(routes=reads("linearizable"), max_resends=1)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1" and applied(srv, "n3") == 30)
            r = await c.get("/kv/a")
            # Today: 502 upstream_failed; the failed round used up the one re-send `max_resends` allows.
            assert r.status_code == 200, r.text
            assert (rounds, reads_served) == (2, 2)
            assert srv.proxies["c1"].stats.resends == {"idempotent_retry": 1}


async def test_session_writes_reach_the_leader_in_seq_order() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].handler = delay(0.05)
        async with running(fc.config(session_gap_wait=2.0)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), limits=httpx.Limits(max_connections=20)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")

            async def write(seq: int, after: float) -> httpx.Response:
                await asyncio.sleep(after)
                return await c.post(f"/kv/s{seq}", content=b"v",
                                    headers={"X-Raft-Session": "s1", "X-Raft-Seq": str(seq)})

            # Seq 1 starts the session; 4, 3 and 2 arrive out of order and wait for their turn.
            results = await asyncio.gather(write(1, 0), write(4, 0.02), write(3, 0.03), write(2, 0.04))
            assert [r.status_code for r in results] == [200] * 4
            assert [q.path for q in fc["n1"].requests] == ["/kv/s1", "/kv/s2", "/kv/s3", "/kv/s4"]
            assert all(q.header("x-raft-session") == "s1" for q in fc["n1"].requests)


async def test_session_gap_that_never_fills_gets_a_clear_error() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(session_gap_wait=0.2)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            h = {"X-Raft-Session": "s2"}
            assert (await c.post("/kv/a", content=b"1", headers={**h, "X-Raft-Seq": "1"})).status_code == 200
            r = await c.post("/kv/a", content=b"3", headers={**h, "X-Raft-Seq": "3"})  # 2 never comes
            assert r.status_code == 409 and r.json()["error"] == "session_seq_gap"
            assert [q.body for q in fc["n1"].requests] == [b"1"]


async def test_read_waits_briefly_for_a_follower_when_only_the_leader_has_the_index() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].set(applied_index=10, commit_index=10)
        fc["n2"].set(applied_index=9)
        fc["n3"].set(applied_index=9)
        async with running(fc.config(routes=reads(), follower_wait=2.0)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: applied(srv, "n1") == 10 and applied(srv, "n3") == 9)
            task = asyncio.create_task(c.get("/kv/a", headers={"X-Raft-Min-Index": "10"}))
            await wait_for(lambda: srv.proxies["c1"].fence_waiting != [])
            fc["n2"].set(applied_index=10)  # the follower applies the entry a heartbeat later
            assert (await task).headers["x-raft-node"] == "n2"
            assert srv.proxies["c1"].stats.follower_waited == 1
        fc["n2"].set(applied_index=9)
        async with running(fc.config(routes=reads(), follower_wait=0.1)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: applied(srv, "n1") == 10 and applied(srv, "n3") == 9)
            r = await c.get("/kv/a", headers={"X-Raft-Min-Index": "10"})
            assert r.headers["x-raft-node"] == "n1"  # no follower in time: the leader, not an error
            stats = srv.proxies["c1"].stats
            assert (stats.follower_waited, stats.fence_fallback) == (1, 0)


async def test_any_ignores_the_token() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        for n in fc.nodes:
            n.set(applied_index=5, commit_index=5)
        async with running(fc.config(routes=reads("any"))) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: applied(srv, "n3") == 5)
            r = await c.get("/kv/a", headers={"X-Raft-Min-Index": "99"})
            assert r.status_code == 200  # served at once from index 5: `any` promises nothing
            assert srv.proxies["c1"].stats.fence_stale == 0


@pytest.mark.parametrize(("headers", "error"), [
    ({"X-Raft-Consistency": "bogus"}, "bad_consistency"),
    ({"X-Raft-Consistency": "bounded"}, "bad_consistency"),  # the route sets no lag limits
    ({"X-Raft-Min-Index": "ninety"}, "bad_min_index"),
    ({"X-Raft-Min-Index": "-5"}, "bad_min_index"),
])
async def test_a_consistency_request_raftlb_cannot_honour_is_a_400_and_reaches_no_node(
        headers: dict[str, str], error: str) -> None:
    # Served as the route's default, a client asking for a guarantee would silently get another one.
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(routes=reads())) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            r = await c.get("/kv/a", headers=headers)
            assert (r.status_code, r.json()["error"]) == (400, error), r.text
            assert all(n.requests == [] for n in fc.nodes)


async def test_every_read_answer_says_which_policy_served_it() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(routes=reads())) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            assert (await c.get("/kv/a")).headers.get_list("x-raft-consistency") == ["fenced"]
            r = await c.get("/kv/a", headers={"X-Raft-Consistency": "leader"})
            assert (r.headers.get_list("x-raft-consistency"), r.headers["x-raft-node"]) == (["leader"], "n1")
            w = await c.put("/kv/a", content=b"v")  # a write is not a read: no policy header
            assert w.status_code == 200 and "x-raft-consistency" not in w.headers


@pytest.mark.parametrize("seq", ["two", "-1", "9" * 5000])
async def test_a_session_write_with_an_unusable_seq_is_a_400_not_a_plain_write(seq: str) -> None:
    # Sent on as a plain write, it would lose the at-most-once the client asked for; 5000 digits also
    # overflowed int() in the request path.
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(routes=reads())) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            r = await c.put("/kv/a", content=b"v", headers={"X-Raft-Session": "s1", "X-Raft-Seq": seq})
            assert (r.status_code, r.json()["error"]) == (400, "bad_request"), r.text
            assert all(n.requests == [] for n in fc.nodes)
