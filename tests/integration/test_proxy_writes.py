"""Writes through raftlb against fake announcing nodes: leader moves, holds, deposed leaders, 421s,
re-sends."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import httpx
import pytest

from raftlb.config.model import HoldConfig
from tests.support.fakes import FakeCluster, FakeRequest, FakeResponse, close_after_read, hang
from tests.support.harness import running, url_of, wait_for

pytestmark = pytest.mark.integration


def leader_of(server: object, name: str = "c1") -> str | None:
    proxy = server.proxies[name]  # type: ignore[attr-defined]
    return proxy.table.leader(time.monotonic())  # type: ignore[no-any-return]


async def test_writes_follow_the_leader_as_it_moves() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=0.5)) as srv:
            await wait_for(lambda: leader_of(srv) == "n1")
            sent: list[tuple[int, str]] = []  # (sequence number, leader the fakes had when it was sent)
            stop = asyncio.Event()

            async def writer() -> None:
                async with httpx.AsyncClient(base_url=url_of(srv)) as c:
                    i = 0
                    while not stop.is_set():
                        r = await c.put(f"/kv/k{i}", content=str(i).encode())
                        assert r.status_code == 200, r.text
                        sent.append((i, r.headers["x-raft-node"]))
                        i += 1

            task = asyncio.create_task(writer())
            for new in ("n2", "n3", "n1"):
                await wait_for(lambda: len(sent) > 20)
                before = len(sent)
                fc.elect(new)
                await wait_for(lambda n=new: leader_of(srv) == n)
                await wait_for(lambda b=before: len(sent) > b + 20)
            stop.set()
            await task
            # Every acknowledged write was accepted by a node that was leader when it arrived there; a
            # node that had just stepped down answered 421 (not applied) and the write was re-sent.
            seen = {(n.id, r.path): r.role for n in fc.nodes for r in n.requests}
            for i, node_id in sent:
                assert seen[(node_id, f"/kv/k{i}")] == "leader"
            # Each write that reached a non-leader was either answered 421 and re-sent, or (a PUT is
            # idempotent) pre-empted and re-sent when the new term arrived first.
            stats = srv.proxies["c1"].stats
            misdirected = sum(r.role != "leader" for n in fc.nodes for r in n.requests)
            assert misdirected <= stats.misdirected + stats.preempted
            # Once the new leader is in the table, writes go to it and nowhere else.
            assert [n for _, n in sent[-10:]] == ["n1"] * 10


async def test_first_write_after_announcement_lands_on_new_leader() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=0.5)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            assert (await c.put("/kv/a", content=b"1")).headers["x-raft-node"] == "n1"
            fc.elect("n3")
            await wait_for(lambda: leader_of(srv) == "n3")
            r = await c.put("/kv/a", content=b"2")
            assert r.headers["x-raft-node"] == "n3"
            assert r.headers["x-raft-term"] == str(fc.term)


async def test_short_leaderless_gap_holds_writes_and_releases_them_in_order() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        cfg = fc.config(liveness_timeout=0.5, hold=HoldConfig(timeout=3.0))
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            fc.no_leader()
            await wait_for(lambda: leader_of(srv) is None)
            tasks = []
            for i in range(20):
                tasks.append(asyncio.create_task(c.put(f"/kv/h{i}", content=str(i).encode())))
                await asyncio.sleep(0.01)
            await wait_for(lambda: len(srv.proxies["c1"].held) == 20)
            assert not any(r for n in fc.nodes for r in n.requests)
            fc.elect("n2")
            results = await asyncio.gather(*tasks)
            assert [r.status_code for r in results] == [200] * 20
            assert {r.headers["x-raft-node"] for r in results} == {"n2"}
            assert sorted(r.path for r in fc["n2"].requests) == sorted(f"/kv/h{i}" for i in range(20))
            # (The release order itself is pinned by tests/proxy/test_proxy.py: across 20 fresh connections
            # the node may read them in any order.)
            stats = srv.proxies["c1"].stats
            assert (stats.held, stats.released, stats.expired) == (20, 20, 0)


async def test_long_leaderless_gap_answers_503_with_retry_after() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        cfg = fc.config(liveness_timeout=0.5, hold=HoldConfig(timeout=0.3), retry_after=2)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            fc.no_leader()
            await wait_for(lambda: leader_of(srv) is None)
            t0 = time.monotonic()
            r = await c.put("/kv/x", content=b"1", timeout=10)
            assert r.status_code == 503
            assert r.json()["error"] == "no_leader"
            assert r.headers["retry-after"] == "2"
            # Held, not refused at once (not before the hold timeout), and answered because the hold
            # expired: the expiry counter is the only way to a 503 here.
            assert time.monotonic() - t0 >= 0.25
            assert srv.proxies["c1"].stats.expired == 1
            # When a leader is back, writes flow again without a restart.
            fc.elect("n3")
            await wait_for(lambda: leader_of(srv) == "n3")
            assert (await c.put("/kv/x", content=b"2")).status_code == 200


async def test_hold_queue_is_bounded() -> None:
    async with FakeCluster(3) as fc:
        fc.no_leader()
        cfg = fc.config(hold=HoldConfig(timeout=2.0, max_requests=3))
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: srv.proxies["c1"].table.term == fc.term)
            tasks = [asyncio.create_task(c.put(f"/kv/{i}", content=b"v")) for i in range(3)]
            await wait_for(lambda: len(srv.proxies["c1"].held) == 3)
            r = await c.put("/kv/overflow", content=b"v")
            assert r.status_code == 503 and r.json()["error"] == "hold_queue_full"
            fc.elect("n1")
            assert [t.status_code for t in await asyncio.gather(*tasks)] == [200, 200, 200]


async def test_deposed_leader_still_announcing_old_term_never_gets_a_write() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=1.0)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            old_term = fc.term
            # n1 is partitioned from its peers: it keeps announcing leadership at its old term to us.
            new_term = old_term + 1
            fc["n2"].set(term=new_term, role="leader", leader="n2")
            fc["n3"].set(term=new_term, role="follower", leader="n2")
            await wait_for(lambda: leader_of(srv) == "n2")
            n1_before = len(fc["n1"].requests)
            for i in range(30):
                r = await c.post(f"/kv/d{i}", content=b"v")
                assert r.status_code == 200
                assert r.headers["x-raft-node"] == "n2"
                fc["n1"].set(term=old_term, role="leader", leader="n1")  # keeps lying, loudly
            assert len(fc["n1"].requests) == n1_before
            assert srv.proxies["c1"].table.is_deposed("n1")


async def test_misdirected_421_hint_is_followed() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=1.0)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            # n1 stepped down and n2 won, but the announcements have not reached us yet: n1 answers 421.
            for n in fc.nodes:
                n.silence()
            term = fc.term + 1
            fc["n1"].term, fc["n1"].role, fc["n1"].leader = term, "follower", "n2"
            fc["n2"].term, fc["n2"].role, fc["n2"].leader = term, "leader", "n2"
            r = await c.post("/kv/m", content=b"payload")
            assert r.status_code == 200
            assert r.headers["x-raft-node"] == "n2"
            assert [q.body for q in fc["n2"].requests] == [b"payload"]
            assert srv.proxies["c1"].stats.misdirected == 1
            for n in fc.nodes:
                n.resume()


async def test_connect_failure_is_resent_to_the_new_leader() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=0.4, hold=HoldConfig(timeout=5.0))) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            await fc["n1"].stop()  # the leader dies; its port refuses connections
            r_task = asyncio.create_task(c.post("/kv/after-crash", content=b"v"))
            await asyncio.sleep(0.2)
            fc["n2"].set(term=fc.term + 1, role="leader", leader="n2")
            fc["n3"].set(term=fc.term, role="follower", leader="n2")
            r = await r_task
            assert r.status_code == 200
            assert r.headers["x-raft-node"] == "n2"


async def test_non_idempotent_write_cut_after_sending_is_outcome_unknown() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].handler = close_after_read
        async with running(fc.config(liveness_timeout=1.0)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            r = await c.post("/kv/ambiguous", content=b"v")
            assert r.status_code == 502
            assert r.json()["error"] == "outcome_unknown"
            assert len(fc["n1"].requests) == 1  # sent once, never blindly repeated


async def test_idempotent_writes_are_resent_after_an_ambiguous_failure() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        calls = 0

        async def flaky(req: FakeRequest) -> FakeResponse | None:
            nonlocal calls
            calls += 1
            if calls == 1:
                return await close_after_read(req)
            return None

        fc["n1"].handler = flaky
        async with running(fc.config(liveness_timeout=1.0)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            r = await c.put("/kv/idem", content=b"v")  # PUT is idempotent
            assert r.status_code == 200
            r = await c.post("/kv/keyed", content=b"v", headers={"Idempotency-Key": "abc"})
            assert r.status_code == 200
            assert calls == 3


async def test_write_waiting_on_a_deposed_leader_is_not_left_hanging() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].handler = hang  # partitioned leader: accepts, never answers (etcd hangs 6-7 s here)
        cfg = fc.config(liveness_timeout=2.0, response_timeout=30.0)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            put = asyncio.create_task(c.put("/kv/p", content=b"v"))
            post = asyncio.create_task(c.post("/kv/q", content=b"v"))
            await wait_for(lambda: len(fc["n1"].requests) == 2)
            fc.elect("n2")
            # Not left hanging: the response timeout (30 s) is far beyond the client's 10 s, so only the
            # preemption on the leader change can answer them (the client would raise otherwise).
            r_put, r_post = await put, await post
            assert r_put.status_code == 200 and r_put.headers["x-raft-node"] == "n2"  # idempotent: re-sent
            assert r_post.status_code == 502 and r_post.json()["error"] == "outcome_unknown"
            assert srv.proxies["c1"].stats.preempted == 2


async def test_response_timeout_applies_to_a_hung_leader() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].handler = hang
        cfg = replace(fc.config(liveness_timeout=2.0), response_timeout=0.3, max_resends=1)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            r = await c.post("/kv/slow", content=b"v")
            assert r.status_code == 502
            assert r.json()["error"] == "outcome_unknown"
