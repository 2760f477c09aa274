"""HTTP/1.1 through raftlb: big streamed bodies, pipelining, framing, headers, and hostile requests."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest

from raftlb.config.model import LimitsConfig, RouteConfig
from raftlb.server import Server
from tests.support.fakes import FakeCluster, echo, fake_bytes
from tests.support.harness import raw_exchange, running, url_of, wait_for

pytestmark = pytest.mark.integration

READS = (RouteConfig(methods=frozenset({"GET", "HEAD"}), path=None, kind="read", policy="leader",
                     idempotent=False),)


def _leader_ready(srv: Server) -> bool:
    return srv.proxies["c1"].table.leader(time.monotonic()) is not None


async def test_5mb_chunked_upload_and_download_are_byte_identical() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].handler = echo
        async with running(fc.config(), limits=LimitsConfig(max_body_bytes=64 << 20)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), timeout=30) as c:
            await wait_for(lambda: _leader_ready(srv))
            payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(payload), 70_001):
                    yield payload[i:i + 70_001]

            r = await c.post("/echo", content=chunks())  # no length: chunked upload
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(payload).hexdigest()
            assert fc["n1"].requests[-1].body == payload
            fc["n1"].handler = None

            n = 5 * 1024 * 1024 + 17
            r = await c.get(f"/bytes/{n}?chunked=1")
            assert r.status_code == 200
            assert r.headers.get("transfer-encoding") == "chunked"
            assert r.content == fake_bytes(n)
            r = await c.get(f"/bytes/{n}")
            assert r.headers["content-length"] == str(n)
            assert r.content == fake_bytes(n)


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(routes=READS)) as srv:
            await wait_for(lambda: _leader_ready(srv))
            reqs = b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(10))
            reqs += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            out = await raw_exchange(srv.listeners[0].port, reqs)
            assert out.count(b"HTTP/1.1 200 OK") == 11
            positions = [out.index(b'"path": "/p%d"' % i) for i in range(10)]
            assert positions == sorted(positions)
            assert out.index(b'"path": "/last"') > positions[-1]


async def test_head_204_and_304_have_no_body_and_connection_stays_usable() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(routes=READS)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: _leader_ready(srv))
            r = await c.head("/bytes/1000")
            assert r.status_code == 200 and r.headers["content-length"] == "1000" and r.content == b""
            r = await c.get("/bytes/10")
            assert r.content == fake_bytes(10)
            out = await raw_exchange(srv.listeners[0].port,
                                     b"HEAD /bytes/5 HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET /bytes/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert out.count(b"HTTP/1.1 200") == 2
            assert out.endswith(fake_bytes(5))


async def test_hop_by_hop_headers_dropped_and_forwarding_headers_added() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config()) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: _leader_ready(srv))
            r = await c.post("/kv/h", content=b"v", headers={
                "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
                "X-Forwarded-For": "10.1.2.3", "X-Custom": "kept"})
            assert r.status_code == 200
            req = fc["n1"].requests[-1]
            assert req.header("x-secret-hop") is None
            assert req.header("keep-alive") is None
            assert req.header("x-custom") == "kept"
            assert req.header("x-forwarded-for") == "10.1.2.3, 127.0.0.1"
            # Several X-Forwarded-For headers are one list (RFC 9110 §5.3): all of it is kept, in order.
            raw = await raw_exchange(srv.listeners[0].port,
                                     b"GET /kv/x HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.1\r\n"
                                     b"X-Forwarded-For: 10.0.0.2, 10.0.0.3\r\nConnection: close\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 200 ")
            forwarded = [v for k, v in fc["n1"].requests[-1].headers if k == "x-forwarded-for"]
            assert forwarded == ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
            assert req.header("x-forwarded-proto") == "http"
            assert r.headers["x-raft-node"] == "n1"
            assert "x-raft-term" in r.headers and "x-raft-index" in r.headers


async def test_absolute_form_targets_are_routed_by_their_path() -> None:
    # `GET http://host/r/a` is a read on the /r route (a follower may serve it), not a write to the leader;
    # the node gets origin-form and the URL's authority as Host.
    reads = (RouteConfig(methods=frozenset({"GET", "HEAD"}), path=re.compile("^/r/"), kind="read",
                         policy="any", idempotent=False),)
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(routes=reads)) as srv:
            await wait_for(lambda: _leader_ready(srv))
            await wait_for(lambda: len(srv.proxies["c1"].table.live_nodes(time.monotonic())) == 3)
            for _ in range(10):
                raw = await raw_exchange(srv.listeners[0].port,
                                         b"GET http://kv.example:80/r/a?x=1 HTTP/1.1\r\n"
                                         b"Host: ignored\r\nConnection: close\r\n\r\n")
                assert raw.startswith(b"HTTP/1.1 200 "), raw
            got = [r for n in fc.nodes for r in n.requests]
            assert len(got) == 10
            assert {(r.target, r.header("host")) for r in got} == {("/r/a?x=1", "kv.example:80")}
            assert any(r.node.id != "n1" for r in got)  # reads went to followers: it was classified a read


async def test_expect_100_continue() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].handler = echo
        async with running(fc.config()) as srv:
            await wait_for(lambda: _leader_ready(srv))
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.listeners[0].port)
            writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert line.startswith(b"HTTP/1.1 100 Continue")
            writer.write(b"hello")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            body = await asyncio.wait_for(reader.readexactly(5), 5)
            assert body == b"hello"
            assert fc["n1"].requests[-1].header("expect") is None
            writer.close()


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
    (b"GARBAGE\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"100001\r\n" + b"a" * 0x100001 + b"\r\n0\r\n\r\n", 413),
])
async def test_bad_requests_get_a_clear_error_and_others_are_unaffected(request_bytes: bytes,
                                                                        status: int) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        limits = LimitsConfig(max_body_bytes=1 << 20)
        async with running(fc.config(), limits=limits) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: _leader_ready(srv))
            before = len(fc["n1"].requests)
            out = await raw_exchange(srv.listeners[0].port, request_bytes)
            assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
            assert b"connection: close" in out.lower()
            assert b'"error":' in out
            assert len(fc["n1"].requests) == before  # nothing reached the node
            r = await c.post("/kv/after", content=b"v")
            assert r.status_code == 200


async def test_too_many_headers_is_431() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(), limits=LimitsConfig(max_headers=20)) as srv:
            await wait_for(lambda: _leader_ready(srv))
            hdrs = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
            request = b"GET / HTTP/1.1\r\nHost: x\r\n" + hdrs + b"\r\n"
            out = await raw_exchange(srv.listeners[0].port, request)
            assert out.startswith(b"HTTP/1.1 431 ")


async def test_slow_headers_get_408_and_other_clients_are_served(limits: LimitsConfig) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        lim = replace(limits, header_timeout=0.4)
        async with running(fc.config(), limits=lim) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            await wait_for(lambda: _leader_ready(srv))
            partial = b"GET / HTTP/1.1\r\nHost: x\r\nX-A"
            # The client itself would wait a minute: only the server's header timeout can end this exchange
            # within the 10 s bound, and only with the 408 the header timeout sends.
            slow = asyncio.create_task(raw_exchange(srv.listeners[0].port, partial, read_timeout=60))
            for _ in range(5):
                assert (await c.post("/kv/ok", content=b"v")).status_code == 200
            out = await asyncio.wait_for(slow, 10)
            assert out.startswith(b"HTTP/1.1 408 ")


async def test_slow_body_gets_408(limits: LimitsConfig) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        lim = replace(limits, body_timeout=0.4)
        async with running(fc.config(), limits=lim) as srv:
            await wait_for(lambda: _leader_ready(srv))
            out = await raw_exchange(srv.listeners[0].port,
                                     b"POST /kv/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                                     b"only-part",
                                     read_timeout=5)
            # The request was already on its way to the leader, so the client sees the failure as a 408
            # (nothing acknowledged), and the connection is closed.
            assert out.startswith(b"HTTP/1.1 408 "), out[:100]


async def test_idle_keepalive_connections_are_closed(limits: LimitsConfig) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        # The header and body timeouts are long: only the idle timeout can close this connection in time.
        lim = replace(limits, idle_timeout=0.3, header_timeout=60.0, body_timeout=60.0)
        async with running(fc.config(), limits=lim) as srv:
            await wait_for(lambda: _leader_ready(srv))
            t0 = time.monotonic()
            # Closed by the server's idle timeout, not the client's read timeout: the client would wait a
            # minute, so only the server closing the connection ends the exchange within the 10 s bound.
            out = await asyncio.wait_for(
                raw_exchange(srv.listeners[0].port, b"POST /kv/x HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 1\r\n\r\nv", read_timeout=60), 10)
            assert out.startswith(b"HTTP/1.1 200 ")
            assert time.monotonic() - t0 >= 0.25  # not before the idle timeout


async def test_connection_limit_answers_503() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config()) as srv:
            srv.listeners[0].max_connections = 2
            conns = [await asyncio.open_connection("127.0.0.1", srv.listeners[0].port) for _ in range(2)]
            await wait_for(lambda: len(srv.listeners[0].connections) == 2)
            out = await raw_exchange(srv.listeners[0].port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 503 ") and b"overloaded" in out
            for _, w in conns:
                w.close()
