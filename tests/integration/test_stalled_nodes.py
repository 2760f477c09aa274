"""Nodes that stall or answer in ways raftlb must not pass on, and the timers around a node's answer.

- An answer that stops arriving (after its head, or part of its body) is cut after `response_timeout` of
  silence, or as soon as its node is marked down; the client connection is cut (never a second answer),
  the node connection discarded, and every count returns to zero. So does everything a client leaves
  behind when it closes while its answer stalls.
- The response timer starts once the whole request has been sent: a slow upload is not a slow node.
- The hold timeout counts time spent holding, and a write that reached a node is never answered
  `no_leader` (its outcome is unknown).
- A node's answer with a transfer coding other than `chunked`, or with two (or an unparsable)
  `X-Raft-Index`, is a malformed answer: refused with a clean error, never relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from raftlb.config.model import HoldConfig, LimitsConfig, RouteConfig
from raftlb.server import Server
from tests.support.fakes import FakeCluster, FakeNode, FakeRequest, FakeResponse, fake_bytes, hang
from tests.support.faults import reset_connection
from tests.support.harness import running, url_of, wait_for
from tests.support.raw_nodes import RawNode, parse_response, raw_config, read_until_close, send

pytestmark = pytest.mark.integration

READS_LEADER = (RouteConfig(methods=frozenset({"GET", "HEAD"}), path=None, kind="read", policy="leader",
                            idempotent=False),)
BIG = 100_000  # above the size of answers raftlb holds back until whole: their heads are relayed at once


def leader_of(srv: Server) -> str | None:
    return srv.proxies["c1"].table.leader(time.monotonic())


def leftovers(srv: Server) -> dict[str, int]:
    """What raftlb still holds for requests: all zero once every exchange is over."""
    proxy = srv.proxies["c1"]
    return {
        # (an idle keep-alive connection of a client still open is not something left behind)
        "busy_client_connections": sum(not conn.idle for lst in srv.listeners for conn in lst.connections),
        "inflight": len(proxy.inflight),
        "held": len(proxy.held),
        "outstanding": sum(p.outstanding for p in proxy.pools.values()),
        "busy_node_connections": sum(len(p.busy) for p in proxy.pools.values()),
    }


async def settled(srv: Server, timeout: float = 5.0) -> None:
    try:
        await wait_for(lambda: not any(leftovers(srv).values()), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"left behind: {leftovers(srv)}") from None


def stalling(sent: int, total: int = BIG, chunked: bool = False) -> FakeResponse:
    """A 200 whose body stops after `sent` of its `total` bytes, the connection left open."""

    async def body() -> AsyncIterator[bytes]:
        if sent:
            yield fake_bytes(sent)
        await asyncio.Event().wait()

    headers = [("x-raft-index", "1")] + ([] if chunked else [("content-length", str(total))])
    return FakeResponse(200, headers, body(), chunked=chunked)


@contextlib.asynccontextmanager
async def one_leader(**cluster: Any) -> AsyncIterator[tuple[Server, FakeNode]]:
    async with FakeCluster(1) as fc:
        fc.elect("n1")
        async with running(fc.config(**cluster), drain_timeout=1.0) as srv:
            await wait_for(lambda: leader_of(srv) == "n1")
            yield srv, fc["n1"]


# -- item 2: an answer that stops arriving -------------------------------------------------------------


@pytest.mark.parametrize("sent", [0, 1000], ids=["head", "part_of_body"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_answer_that_stalls_after_its_head_cuts_the_client_and_releases_everything(
        sent: int, chunked: bool) -> None:
    async with one_leader(routes=READS_LEADER, response_timeout=0.5, max_resends=0) as (srv, node):
        async def handler(req: FakeRequest) -> FakeResponse | None:
            return stalling(sent, chunked=chunked) if req.path == "/stall" else None

        node.handler = handler
        data, closed = await read_until_close(srv.listeners[0].port,
                                              b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        # Today: no timeout once the head is in; the client waits forever (the read times out).
        assert closed, "the client was left waiting on a stalled answer"
        status, headers, body, complete = parse_response(data)
        assert status == 200 and not complete and body == fake_bytes(sent)
        assert data.count(b"HTTP/1.1 ") == 1  # cut, never a second answer after the first head
        await settled(srv)
        assert srv.proxies["c1"].stats.responses_by_class[2] == 1
        async with httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            assert (await c.get("/after")).status_code == 200  # the proxy itself is fine


async def test_a_small_answer_that_stalls_before_it_is_relayed_gets_a_clean_error() -> None:
    # Small answers are held back until their body is in: nothing has reached the client yet, so it gets
    # a clean 504 rather than a cut connection.
    async with one_leader(routes=READS_LEADER, response_timeout=0.5, max_resends=0) as (srv, node):
        node.handler = lambda req: asyncio.sleep(0, stalling(10, total=100))
        async with httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            r = await c.get("/small")
            assert r.status_code == 504 and r.json()["error"] == "upstream_timeout", r.text
        await settled(srv)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_that_closes_while_its_answer_stalls_leaves_nothing_behind(how: str) -> None:
    async with one_leader(routes=READS_LEADER, response_timeout=1.0) as (srv, node):
        node.handler = lambda req: asyncio.sleep(0, stalling(1000))
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.listeners[0].port)
            writer.write(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # the head is relayed
            await asyncio.wait_for(reader.readexactly(1000), 5)  # and what came of the body
            assert leftovers(srv)["outstanding"] == 1
            if how == "reset":
                reset_connection(writer.transport)
            else:
                writer.close()
            # Today (FIN): the client connection, the node connection and the outstanding count stay.
            await settled(srv)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_a_client_that_resets_while_waiting_for_a_head_is_noticed_at_once() -> None:
    async with one_leader(routes=READS_LEADER, response_timeout=30.0) as (srv, node):
        node.handler = hang
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.listeners[0].port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await node.wait_until(lambda: len(node.requests) == 1)
        reset_connection(writer.transport)
        await settled(srv, timeout=5.0)  # long before the 30 s response timeout


async def test_a_node_marked_down_cuts_its_stalled_answers_but_not_flowing_ones() -> None:
    # A frozen node: its announcements stop and so does the answer it was streaming. Once it is marked down
    # the stalled answer is cut at once (the response timeout here is far away); an answer still flowing
    # from it is left to finish.
    async def trickle() -> AsyncIterator[bytes]:
        for i in range(100):
            yield fake_bytes(BIG)[i * 1000:(i + 1) * 1000]
            await asyncio.sleep(0.02)

    async def handler(req: FakeRequest) -> FakeResponse | None:
        if req.path == "/stall":
            return stalling(1000)
        if req.path == "/flow":
            return FakeResponse(200, [("x-raft-index", "1"), ("content-length", "100000")], trickle())
        return None

    async with one_leader(routes=READS_LEADER, response_timeout=30.0, liveness_timeout=1.0) as (srv, node):
        node.handler = handler
        async with httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
            flow = asyncio.create_task(c.get("/flow"))
            stalled = asyncio.create_task(read_until_close(
                srv.listeners[0].port, b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n", timeout=8))
            await node.wait_until(lambda: len(node.requests) == 2)
            node.silence()
            await wait_for(lambda: srv.proxies["c1"].table.nodes["n1"].down, timeout=5)
            data, closed = await stalled
            assert closed  # today: held until the 30 s response timeout
            status, _, body, complete = parse_response(data)
            assert status == 200 and not complete and body == fake_bytes(1000)
            r = await flow
            assert r.status_code == 200 and r.content == fake_bytes(BIG)
        await settled(srv)


async def test_a_stream_route_is_not_cut_for_a_quiet_gap() -> None:
    # A watch (a route with `stream: true`) may be quiet for longer than the response timeout.
    async def watch() -> AsyncIterator[bytes]:
        yield b"created\n"
        await asyncio.sleep(1.5)
        yield b"event\n"

    async def handler(req: FakeRequest) -> FakeResponse | None:
        if req.path != "/watch":
            return None
        return FakeResponse(200, [("x-raft-index", "1")], watch(), chunked=True)

    routes = (RouteConfig(methods=None, path=re.compile("^/watch"), kind="read", policy="any",
                          idempotent=False, stream=True), *READS_LEADER)
    async with one_leader(routes=routes, response_timeout=0.5) as (srv, node):
        node.handler = handler
        async with httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            r = await c.get("/watch")
            assert r.status_code == 200 and r.content == b"created\nevent\n"
        await settled(srv)


# -- item 4: the response timer starts once the request is sent -----------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_slow_upload_is_not_timed_out_by_the_response_timeout_nor_sent_twice(chunked: bool) -> None:
    limits = LimitsConfig(body_timeout=5.0)
    async with FakeCluster(1) as fc:
        fc.elect("n1")
        async with running(fc.config(response_timeout=0.4), limits=limits, drain_timeout=1.0) as srv:
            await wait_for(lambda: leader_of(srv) == "n1")
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.listeners[0].port)
            framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 5"
            writer.write(b"PUT /kv/slow HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
            for byte in b"hello":  # 5 bytes over ~1.25 s: three response timeouts
                writer.write(b"1\r\n%c\r\n" % byte if chunked else bytes([byte]))
                await asyncio.sleep(0.25)
            if chunked:
                writer.write(b"0\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert [(r.method, r.body) for r in fc["n1"].requests] == [("PUT", b"hello")]
            assert srv.proxies["c1"].stats.resends == {}  # today: re-sent after each response timeout
            await settled(srv)


# -- item 7a: the hold budget and a leader that hangs ---------------------------------------------------


async def test_a_put_to_a_live_leader_that_hangs_is_outcome_unknown_not_no_leader() -> None:
    async with one_leader(response_timeout=0.3, max_resends=3, hold=HoldConfig(timeout=0.5)) as (srv, node):
        node.handler = hang
        async with httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
            r = await c.put("/kv/x", content=b"v")
        # Today: 503 no_leader, the hold timer having run since the first re-send's backoff.
        assert r.status_code == 502 and r.json()["error"] == "outcome_unknown", r.text
        assert len(node.requests) == 4  # 1 + max_resends, each bounded by the response timeout
        stats = srv.proxies["c1"].stats
        assert stats.expired == 0 and stats.resends == {"idempotent_retry": 3}
        await settled(srv)


async def test_a_write_held_after_it_reached_a_node_expires_as_outcome_unknown() -> None:
    async with FakeCluster(2) as fc:
        fc.elect("n1")
        fc["n1"].handler = hang
        cfg = fc.config(response_timeout=0.3, hold=HoldConfig(timeout=0.5))
        async with running(cfg, drain_timeout=1.0) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            put = asyncio.create_task(c.put("/kv/x", content=b"v"))
            await fc["n1"].wait_until(lambda: len(fc["n1"].requests) == 1)
            fc.no_leader()
            await wait_for(lambda: leader_of(srv) is None)
            r = await put
            # Today: 503 no_leader, which says nothing reached a node; n1 may have applied it.
            assert r.status_code == 502 and r.json()["error"] == "outcome_unknown", r.text
            assert "n1" in r.json()["detail"]
            # A write that never reached a node is still no_leader.
            r = await c.put("/kv/y", content=b"v")
            assert r.status_code == 503 and r.json()["error"] == "no_leader", r.text
            assert srv.proxies["c1"].stats.expired == 2
            await settled(srv)


# -- item 7b: transfer codings raftlb does not decode -------------------------------------------------

GZIP = bytes.fromhex("1f8b08000000000000ff2b4bcc29cd0500be6e1a4105000000")  # gzip("value")
CODED = {
    "gzip_chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nX-Raft-Index: 1\r\n\r\n"
                     + b"%x\r\n" % len(GZIP) + GZIP + b"\r\n0\r\n\r\n", "stay"),
    "gzip_then_chunked_headers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n"
                                  b"Transfer-Encoding: chunked\r\nX-Raft-Index: 1\r\n\r\n"
                                  + b"%x\r\n" % len(GZIP) + GZIP + b"\r\n0\r\n\r\n", "stay"),
    "gzip_close_delimited": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n"
                             b"X-Raft-Index: 1\r\n\r\n" + GZIP, "close"),
    "chunked_twice": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\nX-Raft-Index: 1\r\n\r\n"
                      b"5\r\nvalue\r\n0\r\n\r\n", "stay"),
}


@pytest.mark.parametrize("name", list(CODED))
async def test_an_answer_with_a_transfer_coding_other_than_chunked_is_refused_cleanly(name: str) -> None:
    answer, then = CODED[name]
    async with FakeNode("n1", role="leader") as announcer, RawNode(send(answer, then=then)) as raw:
        cfg = raw_config(raw, announcer, routes=READS_LEADER, max_resends=1)
        async with running(cfg, drain_timeout=1.0) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            # Today: 200 with the gzip bytes as the body and no coding header (or the client is cut).
            r = await c.get("/kv/g")
            assert r.status_code == 502 and r.json()["error"] == "upstream_failed", r.text
            assert "Transfer-Encoding" in r.json()["detail"]
            assert raw.requests == 2  # a read: re-sent once, as a malformed answer is
            r = await c.post("/kv/g", content=b"v")
            assert r.status_code == 502 and r.json()["error"] == "outcome_unknown", r.text
            await settled(srv)
            raw.script = send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nvalue\r\n0\r\n\r\n")
            r = await c.get("/kv/g")  # plain chunked is of course fine
            assert r.status_code == 200 and r.content == b"value"


# -- item 7c: X-Raft-Index that cannot be trusted ------------------------------------------------------


@pytest.mark.parametrize("values", [("10", "3"), ("3", "10"), ("10, 3",), ("1" * 30,)],
                         ids=["fresh_then_stale", "stale_then_fresh", "list", "huge"])
async def test_an_answer_with_two_or_an_unparsable_raft_index_is_refused(values: tuple[str, ...]) -> None:
    async def handler(req: FakeRequest) -> FakeResponse:
        return FakeResponse(200, [("x-raft-index", v) for v in values], b"stale?")

    async with one_leader(routes=READS_LEADER, max_resends=1) as (srv, node):
        node.handler = handler
        async with httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            # The client has seen index 5: an answer at 3 must never reach it. Today the first header is
            # taken, so "10" then "3" passes the fence.
            r = await c.get("/kv/k", headers={"X-Raft-Min-Index": "5"})
            assert r.status_code == 502 and r.json()["error"] == "upstream_failed", r.text
            assert re.search("X-Raft-Index", r.json()["detail"], re.I)
            assert len(node.requests) == 2  # treated as a malformed answer: re-sent once, then refused
            r = await c.post("/kv/k", content=b"v")
            assert r.status_code == 502 and r.json()["error"] == "outcome_unknown", r.text
        await settled(srv)


@pytest.mark.parametrize("value", ["no response", "stalled"])
async def test_a_malformed_answer_is_a_failure_whatever_its_text_says(value: str) -> None:
    # 504 (timeout) or 502 (failure) follows from what happened to the answer, never from the words of
    # the reason, where a node's own header value can appear.
    async def handler(req: FakeRequest) -> FakeResponse:
        return FakeResponse(200, [("x-raft-index", value)], b"?")

    async with one_leader(routes=READS_LEADER, max_resends=0) as (srv, node):
        node.handler = handler
        async with httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            r = await c.get("/kv/k")
            # Today: 504 upstream_timeout, because the reason quotes the header and contains the words.
            assert r.status_code == 502 and r.json()["error"] == "upstream_failed", r.text
            assert value in r.json()["detail"]
        await settled(srv)
