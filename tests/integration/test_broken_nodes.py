"""Nodes that betray the proxy from behind: they hang, reset mid-response, answer garbage, or announce
nonsense. raftlb applies the re-send rule, cuts the client connection rather than pass on a truncated answer,
rejects and counts bad announcements (logging them once per burst), and keeps serving throughout.

(The re-send rule for connections closed after a write, 421s and deposed leaders is pinned by
test_proxy_writes.py; single bad events on a bare subscription by tests/control/test_subscriptions.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from raftlb.config.model import ClusterConfig, NodeConfig, RouteConfig
from raftlb.server import Server
from tests.support.fakes import FakeCluster, FakeNode, FakeRequest, FakeResponse, fake_bytes, hang, sequence
from tests.support.faults import FaultRelay
from tests.support.harness import running, url_of, wait_for
from tests.support.raw_nodes import RawNode, parse_response, raw_config, read_until_close, send

pytestmark = pytest.mark.integration

READS_ANY = (RouteConfig(methods=frozenset({"GET", "HEAD"}), path=re.compile("^/r"), kind="read",
                         policy="any", idempotent=False),)
READS_LEADER = (RouteConfig(methods=frozenset({"GET", "HEAD"}), path=None, kind="read", policy="leader",
                            idempotent=False),)


def leader_of(srv: Server, name: str = "c1") -> str | None:
    return srv.proxies[name].table.leader(time.monotonic())


def no_crash_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that mean something escaped: an ERROR from raftlb, or the loop's exception handler."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.ERROR and (r.name.startswith("raftlb") or r.name == "asyncio")]


# -- nodes that accept and never answer --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def hung(fc: FakeCluster, node_id: str, how: str) -> AsyncIterator[dict[str, str]]:
    """Make a node's client port hang: its handler never answers ("handler"), or a blackhole relay in front of
    it accepts TCP and forwards nothing ("blackhole"). Yields client URL overrides for the config."""
    if how == "handler":
        fc[node_id].handler = hang
        yield {}
        return
    async with FaultRelay(fc[node_id].port) as relay:
        relay.partition("blackhole")
        yield {node_id: relay.url}


def config_with_urls(fc: FakeCluster, urls: dict[str, str], **overrides: Any) -> ClusterConfig:
    cfg = fc.config(**overrides)
    nodes = []
    for n in cfg.nodes:
        if n.id in urls:
            port = int(urls[n.id].rsplit(":", 1)[1])
            n = replace(n, url=urls[n.id], port=port)
        nodes.append(n)
    return replace(cfg, nodes=tuple(nodes))


@pytest.mark.parametrize("how", ["handler", "blackhole"])
async def test_reads_on_a_node_that_never_answers_time_out_and_are_resent_elsewhere(how: str) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with hung(fc, "n2", how) as urls:
            cfg = config_with_urls(fc, urls, routes=READS_ANY, response_timeout=0.25)
            async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
                await wait_for(lambda: len(srv.proxies["c1"].table.live_nodes(time.monotonic())) == 3)
                results = await asyncio.gather(*(c.get(f"/r/{i}") for i in range(30)))
                assert [r.status_code for r in results] == [200] * 30
                assert {r.headers["x-raft-node"] for r in results} <= {"n1", "n3"}
                stats = srv.proxies["c1"].stats
                # Some were sent to n2 first; each of those timed out once and was re-sent elsewhere (never
                # to n2 again: at most one re-send per read). Every answer came well inside the client's 5 s
                # timeout (which would have raised), so no read waited on n2 longer than its response timeout.
                assert 1 <= stats.resends.get("idempotent_retry", 0) <= 30
                assert stats.resends.keys() == {"idempotent_retry"}
                if how == "handler":
                    assert len(fc["n2"].requests) == stats.resends["idempotent_retry"]


@pytest.mark.parametrize("how", ["handler", "blackhole"])
async def test_writes_on_a_leader_that_never_answers_follow_the_resend_rule(how: str) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with hung(fc, "n1", how) as urls:
            cfg = config_with_urls(fc, urls, response_timeout=0.25, max_resends=2)
            async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
                await wait_for(lambda: leader_of(srv) == "n1")
                post, put, keyed = await asyncio.gather(
                    c.post("/kv/a", content=b"1"),  # not safe to repeat: one try, then the truth
                    c.put("/kv/b", content=b"2"),  # idempotent: re-sent until max_resends
                    c.post("/kv/c", content=b"3", headers={"Idempotency-Key": "k1"}))
                for r in (post, put, keyed):
                    assert r.status_code == 502 and r.json()["error"] == "outcome_unknown", r.text
                # The idempotent ones were tried 1 + max_resends times, and nothing waited forever: each
                # answer came before the client's own 10 s timeout (which would have raised).
                stats = srv.proxies["c1"].stats
                assert stats.resends.get("idempotent_retry", 0) == 4
                if how == "handler":
                    sent = sorted(r.path for r in fc["n1"].requests)
                    assert sent == ["/kv/a", "/kv/b", "/kv/b", "/kv/b", "/kv/c", "/kv/c", "/kv/c"]
                assert (await c.get("/kv/after", timeout=5)).status_code == 502  # still answering


async def test_a_keyed_write_whose_first_try_hangs_succeeds_on_the_resend() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].handler = sequence(hang, None)
        async with running(fc.config(response_timeout=0.25)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            t0 = time.monotonic()
            r = await c.post("/kv/k", content=b"v", headers={"Idempotency-Key": "once"})
            assert r.status_code == 200 and r.headers["x-raft-node"] == "n1"
            assert time.monotonic() - t0 >= 0.2  # not before the response timeout
            # Re-sent once, by the response timeout (the client's 5 s timeout would have raised otherwise).
            assert srv.proxies["c1"].stats.resends == {"idempotent_retry": 1}
            assert [q.header("idempotency-key") for q in fc["n1"].requests] == ["once", "once"]


# -- nodes that reset mid-response ---------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("where", ["node", "relay"])
async def test_reset_mid_response_cuts_the_client_and_never_completes_the_body(chunked: bool,
                                                                               where: str) -> None:
    size = 300_000
    async with FakeCluster(3) as fc, FaultRelay(0) as relay:
        fc.elect("n1")
        relay.target_port = fc["n1"].port
        urls: dict[str, str] = {}
        if where == "node":
            async def truncated(req: FakeRequest) -> FakeResponse | None:
                if req.path.startswith("/bytes/"):
                    return FakeResponse(200, [("x-raft-index", "1")], fake_bytes(size), chunked=chunked,
                                        truncate=100_000)
                return None

            fc["n1"].handler = truncated
        else:
            relay.reset_after = 150_000
            urls = {"n1": relay.url}
        cfg = config_with_urls(fc, urls, routes=READS_LEADER, max_resends=0)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            target = f"/bytes/{size}" + ("?chunked=1" if chunked else "")
            data, closed = await read_until_close(srv.listeners[0].port,
                                                  f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert closed  # the connection is cut, not left hanging
            status, headers, body, complete = parse_response(data)
            assert status == 200 and not complete
            assert 0 < len(body) < size and body == fake_bytes(size)[:len(body)]
            if chunked:
                assert headers.get("transfer-encoding") == "chunked" and not data.endswith(b"0\r\n\r\n")
            else:
                assert headers["content-length"] == str(size)
            # A strict client gets an error, never a short 200 presented as whole.
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(target)
            if where == "relay":
                relay.reset_after = None
            else:
                fc["n1"].handler = None
            r = await c.get(target)  # the proxy itself is fine
            assert r.status_code == 200 and r.content == fake_bytes(size)


async def test_a_small_answer_cut_short_is_re_sent_and_the_next_answer_relayed_whole() -> None:
    # Small answers are held until their body is in (one write to the client). One cut short is re-sent
    # (a GET may be); the answer to the re-send, here a large streamed one, is relayed whole: nothing of
    # the first attempt's held head or body may leak into it.
    big = fake_bytes(200_000)
    calls = 0

    async def flaky(req: FakeRequest) -> FakeResponse | None:
        nonlocal calls
        if not req.path.startswith("/r/"):
            return None
        calls += 1
        if calls == 1:
            return FakeResponse(200, [("x-raft-index", "1")], b"a" * 1000, truncate=500)
        return FakeResponse(200, [("x-raft-index", "2")], big)

    async with FakeCluster(1) as fc:
        fc.elect("n1")
        fc["n1"].handler = flaky
        async with running(fc.config(routes=READS_ANY)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            r = await c.get("/r/x")
            assert (r.status_code, len(r.content), r.headers["x-raft-index"]) == (200, len(big), "2")
            assert r.content == big
            assert calls == 2 and srv.proxies["c1"].stats.resends == {"idempotent_retry": 1}


async def test_reset_in_a_close_delimited_body_is_not_passed_on_as_complete() -> None:
    # An HTTP/1.0-style answer: no Content-Length, no chunking, the body ends when the node closes. Only a
    # clean close (FIN) ends it; a reset means the body was cut short.
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-Raft-Index: 1\r\n\r\n"
    async with FakeNode("n1", role="leader") as announcer, \
            RawNode(send(head + b"a" * 5000, then="reset")) as raw:
        async with running(raw_config(raw, announcer, routes=READS_LEADER, max_resends=0)) as srv:
            await wait_for(lambda: leader_of(srv) == "n1")
            data, closed = await read_until_close(srv.listeners[0].port,
                                                  b"GET /r HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body, complete = parse_response(data)
            assert status == 200 and body == b"a" * 5000
            assert closed and not complete  # fails today: the proxy writes the zero chunk


async def test_clean_close_ends_a_close_delimited_body() -> None:
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-Raft-Index: 1\r\n\r\n"
    async with FakeNode("n1", role="leader") as announcer, \
            RawNode(send(head + b"b" * 5000, then="close")) as raw:
        async with running(raw_config(raw, announcer, routes=READS_LEADER)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            r = await c.get("/r")
            assert r.status_code == 200 and r.content == b"b" * 5000
            assert r.headers["transfer-encoding"] == "chunked"  # re-framed, so the client knows where it ends


# -- nodes that answer garbage -----------------------------------------------------------------------------

GARBAGE = {
    "not_http": b"garbage garbage\r\n\r\n",
    "binary": bytes(range(256)) * 4,
    "bad_status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "bad_version": b"HTTP/9.9 200 OK\r\nContent-Length: 0\r\n\r\n",
    "two_lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "negative_length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "huge_length": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "length_and_chunked": (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"3\r\nabc\r\n0\r\n\r\n"),
    "bad_chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "bad_header": b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 0\r\n\r\n",
    "nul_in_header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "switching_protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    "bad_raft_index": (b"HTTP/1.1 200 OK\r\nX-Raft-Index: 12abc\r\nX-Raft-Term: -4\r\n"
                       b"Content-Length: 2\r\n\r\nok"),
    "informational_then_garbage": b"HTTP/1.1 100 Continue\r\n\r\nnonsense\r\n\r\n",
    "extra_bytes_after_answer": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
}


@pytest.mark.parametrize("name", list(GARBAGE))
async def test_garbage_from_a_node_is_a_clean_error_and_the_proxy_keeps_serving(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeNode("n1", role="leader") as announcer, RawNode(send(GARBAGE[name], then="stay")) as raw:
        cfg = raw_config(raw, announcer, routes=READS_LEADER, response_timeout=0.5, max_resends=1)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            for _ in range(3):
                for method in ("GET", "POST"):
                    try:
                        r = await c.request(method, "/kv/g", content=b"" if method == "GET" else b"v")
                    except httpx.RemoteProtocolError:
                        continue  # the head had gone out when the body broke: the connection was cut
                    if r.status_code == 200:
                        # Only an answer that parsed as a whole may pass; its body is what the node framed.
                        assert name == "extra_bytes_after_answer", r.text
                        assert r.content == b"ok"
                    else:
                        assert r.status_code in (502, 504), r.text
                        error = r.json()["error"]
                        assert error in ("upstream_failed", "upstream_timeout", "outcome_unknown")
                        if method == "POST":
                            assert error == "outcome_unknown"  # written, then garbage: never re-sent
            assert leader_of(srv) == "n1"
            assert no_crash_records(caplog) == []
            assert raw.requests >= 3
            # Once the node talks sense again, so does the proxy.
            raw.script = send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            for method in ("GET", "POST"):
                r = await c.request(method, "/kv/g", content=b"" if method == "GET" else b"v")
                assert r.status_code == 200 and r.content == b"ok"


async def test_a_node_sending_endless_response_headers_is_cut_off() -> None:
    cap = 4 * 1024 * 1024  # the node gives up after this; the proxy should have hung up long before

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # (What the node writes piles up in kernel buffers too, so `sent` cannot show what the proxy read;
        # a 502 while the response timeout is a minute away can.)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while raw.sent < cap:
            writer.write(b"X-Junk: " + b"y" * 1000 + b"\r\n")
            raw.sent += 1010
            await writer.drain()
        await asyncio.sleep(30)

    async with FakeNode("n1", role="leader") as announcer, RawNode(endless) as raw:
        # A one-minute response timeout against the client's 10 s: only the cut-off on the header size can
        # answer in time (without it: every byte read and kept as a header, then a 504 a minute later).
        cfg = raw_config(raw, announcer, routes=READS_LEADER, response_timeout=60.0, max_resends=0)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            r = await c.get("/r")
            assert r.status_code == 502 and r.json()["error"] == "upstream_failed"


async def test_a_second_answer_to_one_request_never_reaches_another_request() -> None:
    """A node answers request A twice in one write. The extra answer must not be taken for the answer to
    request B, which is waiting for a connection at that moment (B was never even sent yet)."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # with the accept queue full, new connects stall (their SYNs are dropped)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    sockets: list[socket.socket] = [listener]  # all closed at the end, whatever happens
    served: set[asyncio.Task[None]] = set()

    async def serve(conn: socket.socket) -> None:  # any later connection: answer B properly
        with contextlib.suppress(OSError):
            data = await loop.sock_recv(conn, 65536)
            if data.startswith(b"GET /b "):
                await loop.sock_sendall(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfor-b")
            await asyncio.sleep(10)

    async def accept_all() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            sockets.append(conn)
            served.add(asyncio.create_task(serve(conn)))

    async with FakeNode("n1", role="leader") as announcer:
        node = NodeConfig(id="n1", url=f"http://127.0.0.1:{port}", announce_url=announcer.url,
                          host="127.0.0.1", port=port)
        cfg = ClusterConfig(name="c1", kind="native", nodes=(node,), routes=READS_LEADER, connect_timeout=5.0)
        acceptor: asyncio.Task[None] | None = None
        try:
            async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
                await wait_for(lambda: leader_of(srv) == "n1")
                task_a = asyncio.create_task(c.get("/a"))
                conn_a, _ = await loop.sock_accept(listener)
                conn_a.setblocking(False)
                sockets.append(conn_a)
                assert (await loop.sock_recv(conn_a, 65536)).startswith(b"GET /a ")
                for _ in range(3):
                    f = socket.socket()
                    sockets.append(f)
                    f.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        f.connect(("127.0.0.1", port))
                task_b = asyncio.create_task(c.get("/b"))
                pool = srv.proxies["c1"].pools["n1"]
                await wait_for(lambda: len(pool.waiters) == 1)  # B waits for a connection
                await loop.sock_sendall(conn_a, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfor-a"
                                                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
                r_a = await task_a
                assert r_a.content == b"for-a"
                acceptor = asyncio.create_task(accept_all())
                r_b = await asyncio.wait_for(task_b, 8)
                assert r_b.content != b"EVIL"  # fails today: B is answered with A's extra bytes
                assert r_b.status_code == 200 and r_b.content == b"for-b"
        finally:
            for t in [*served, *([acceptor] if acceptor is not None else [])]:
                t.cancel()
            await asyncio.gather(*served, *([acceptor] if acceptor is not None else []),
                                 return_exceptions=True)
            for sock in sockets:
                sock.close()


# -- nodes that announce nonsense --------------------------------------------------------------------------

NONSENSE: dict[str, Callable[[FakeNode], None]] = {
    "malformed_json": lambda n: n.inject_raw(b'data: {"node": "n2", "term": \n\n'),
    "not_an_object": lambda n: n.inject_raw(b"data: [1, 2, 3]\n\n"),
    "deep_json": lambda n: n.inject_raw(b"data: " + b"[" * 100_00 + b"]" * 100_00 + b"\n\n"),
    "term_not_int": lambda n: n.inject_event(term=1e309),
    "term_negative": lambda n: n.inject_event(term=-3),
    "term_bool": lambda n: n.inject_event(term=True),
    "unknown_role": lambda n: n.inject_event(role="emperor"),
    "claims_another_id": lambda n: n.inject_event(node="n1", role="leader", term=999, leader="n1"),
    "unknown_id": lambda n: n.inject_event(node="n9", role="leader", term=999),
    "seq_backwards": lambda n: n.inject_event(seq=1, role="leader", term=999),
}


async def test_announced_nonsense_is_rejected_counted_and_never_moves_the_leader(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="raftlb")
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=1.0)) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            proxy, subs = srv.proxies["c1"], srv.subscriptions["c1"]
            await wait_for(lambda: leader_of(srv) == "n1")
            term = proxy.table.term
            liar = fc["n2"]
            opens = liar.stream_opens
            stop = asyncio.Event()
            statuses: list[int] = []

            async def writer() -> None:  # the data path keeps working through the flood
                i = 0
                while not stop.is_set():
                    statuses.append((await c.post(f"/kv/{i}", content=b"v")).status_code)
                    i += 1

            task = asyncio.create_task(writer())
            for _ in range(50):
                for inject in NONSENSE.values():
                    inject(liar)
                await asyncio.sleep(0.002)
            # A node whose own term goes backwards (a stale stream replayed, a node that lost its state).
            for _ in range(50):
                liar.inject_event(term=term - 1 if term > 1 else 0)
            await wait_for(lambda: sum(subs.rejected.values()) >= 50 * len(NONSENSE) - 50)
            await wait_for(lambda: proxy.stats.rejected_announcements >= 50)
            await wait_for(lambda: len(statuses) >= 20)
            stop.set()
            await task

            assert set(statuses) == {200}
            assert leader_of(srv) == "n1" and proxy.table.term == term  # term 999 was never believed
            assert liar.stream_opens == opens  # nothing ended the stream
            reasons = subs.rejected
            assert {"malformed_json", "invalid_fields", "wrong_node", "seq_backwards"} <= set(reasons)
            assert sum(reasons.values()) == 50 * len(NONSENSE)
            # Counted in the metric, per reason; term going backwards shows up as the table's rejection.
            text = srv.metrics.exposition().decode()
            for reason in ("malformed_json", "invalid_fields", "wrong_node", "seq_backwards", "table"):
                pattern = r'raftlb_announcements_rejected_total\{[^}]*reason="' + reason + r'"[^}]*\} (\d+)'
                m = re.search(pattern, text)
                assert m and int(m.group(1)) > 0, reason
            # One warning per reason for the whole burst, not one per event.
            warnings = [r.getMessage() for r in caplog.records if "rejected announcement" in r.getMessage()]
            assert 0 < len(warnings) <= len(set(reasons))
            # The liar's honest events still count: it is live, and it follows n1.
            assert "n2" in proxy.table.live_nodes(time.monotonic())
            # And the stream still delivers: a real change on it is seen at once.
            fc.elect("n2")
            await wait_for(lambda: leader_of(srv) == "n2")


async def test_term_going_backwards_is_logged_once_per_burst(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="raftlb")
    async with FakeCluster(3) as fc:
        fc.elect("n1", term=5)
        async with running(fc.config()) as srv:
            proxy = srv.proxies["c1"]
            await wait_for(lambda: leader_of(srv) == "n1")
            for _ in range(40):
                fc["n3"].inject_event(term=2)
            await wait_for(lambda: proxy.stats.rejected_announcements >= 40)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "backwards" in r.getMessage()]
    assert len(warnings) == 1


async def test_one_node_announcing_arbitrary_terms_stops_writes_only_while_it_is_live_and_claiming() -> None:
    """Issue #16: one event at term 2**63 once deposed the real leader until restart, and a 4299-digit term
    made every /metrics scrape fail. Now: writes reach the honest leader within one liveness timeout of
    the liar going silent or correcting itself, no restart, and /metrics answers 200 throughout."""
    liveness = 0.5
    async with FakeCluster(3) as fc:
        fc.elect("n1", term=5)
        async with running(fc.config(liveness_timeout=liveness), admin=True) as srv, \
                httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c, \
                httpx.AsyncClient(timeout=10) as scraper:
            proxy, subs = srv.proxies["c1"], srv.subscriptions["c1"]
            table, liar = proxy.table, fc["n3"]
            assert srv.admin is not None
            metrics_url = f"http://127.0.0.1:{srv.admin.port}/metrics"
            await wait_for(lambda: leader_of(srv) == "n1")
            scrapes: list[int] = []
            stop = asyncio.Event()

            async def scrape() -> None:
                while not stop.is_set():
                    scrapes.append((await scraper.get(metrics_url)).status_code)
                    await asyncio.sleep(0.01)

            async def write_reaches_n1(key: str) -> None:
                r = await c.put(f"/kv/{key}", content=b"v")
                assert (r.status_code, r.headers["x-raft-node"]) == (200, "n1")

            scraping = asyncio.create_task(scrape())
            # 1. A follower at an absurd term is one node's word: nothing changes for n1.
            liar.set(term=2**63)
            await wait_for(lambda: table.nodes["n3"].term == 2**63)
            await write_reaches_n1("a")
            # 2. Values no Raft node sends are refused and counted.
            for bad in (10**4298, 2**64, -1, 5.5, True, "7"):
                liar.inject_event(term=bad)
            await wait_for(lambda: subs.rejected.get("invalid_fields", 0) == 6)
            await write_reaches_n1("b")
            assert (leader_of(srv), table.term) == ("n1", 5)
            # 3. It claims leadership at 2**63: that governs while it is live and claiming...
            liar.set(role="leader", term=2**63)
            await wait_for(lambda: leader_of(srv) == "n3")
            # ...then tells the truth: refused as going back while its lie is fresh (counted, reason
            # table), so it stops counting as live, and n1 gets the writes again; then its truth is taken.
            rejected = proxy.stats.rejected_announcements
            liar.set(term=5, role="follower", leader="n1")
            await wait_for(lambda: leader_of(srv) == "n1")
            await write_reaches_n1("c")
            await wait_for(lambda: table.nodes["n3"].term == 5 and "n3" in table.live_nodes(time.monotonic()))
            assert proxy.stats.rejected_announcements > rejected
            # 4. It claims again, then falls silent: n1 again once the claim is a liveness timeout old.
            liar.set(role="leader", term=2**63)
            await wait_for(lambda: leader_of(srv) == "n3")
            liar.silence()
            await wait_for(lambda: leader_of(srv) == "n1")
            await write_reaches_n1("d")
            # 5. And it comes back with the truth: taken, since its lie is old.
            liar.set(term=5, role="follower", leader="n1")
            liar.resume()
            await wait_for(lambda: table.nodes["n3"].term == 5 and "n3" in table.live_nodes(time.monotonic()))
            await write_reaches_n1("e")
            stop.set()
            await scraping
            assert scrapes and set(scrapes) == {200}
            text = (await scraper.get(metrics_url)).text
            assert 'raftlb_cluster_term{cluster="c1"} 5.0' in text
            pattern = r'raftlb_announcements_rejected_total\{cluster="c1",reason="invalid_fields"\} 6'
            assert re.search(pattern, text)


async def test_status_poll_answering_nonsense_is_rejected_and_the_node_stays_down() -> None:
    # A polled node (no stream) whose status endpoint answers JSON that is not an announcement of its own.
    async with FakeCluster(3, serve_stream=False) as fc:
        fc.elect("n1")
        cfg = fc.config(liveness_timeout=0.5, poll_interval=0.02)
        async with running(cfg) as srv, httpx.AsyncClient(base_url=url_of(srv), timeout=5) as c:
            subs = srv.subscriptions["c1"]
            await wait_for(lambda: leader_of(srv) == "n1")
            bad = fc["n3"]
            bad.id = "n1"  # it now claims to be n1 (and a leader at a higher term) in every status answer
            bad.set(role="leader", term=fc.term + 5)
            await wait_for(lambda: subs.rejected.get("wrong_node", 0) >= 3)
            table = srv.proxies["c1"].table
            await wait_for(lambda: "n3" not in table.live_nodes(time.monotonic()), timeout=10)
            assert leader_of(srv) == "n1" and srv.proxies["c1"].table.term == fc["n1"].term
            assert (await c.post("/kv/x", content=b"v")).headers["x-raft-node"] == "n1"
            bad.id = "n3"

