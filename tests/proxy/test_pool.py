"""The keep-alive pool of one node (`NodePool`, `UpstreamConn`) against a small local asyncio server whose
answers each test scripts: connections handed out and given back, reused only after a whole keep-alive
answer, opened one per waiter and handed out first come first served, the pool's counts, its limits
(max_idle, the idle, response and connect timeouts) and its close. No sockets are mocked."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from raftlb.proxy.pool import NodePool, UpstreamConn

REQUEST = b"GET /k HTTP/1.1\r\nHost: node\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
WAIT = 5.0  # every wait is bounded by this


@dataclass
class Node:
    """A node's client port: answers each request head with the next scripted answer; after the answer,
    "keep" the connection open or "close" it. `connections` counts the connections accepted."""

    answers: list[tuple[bytes, str]] = field(default_factory=list)
    connections: int = 0
    heads: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.heads += 1
                if not self.answers:
                    continue  # scripted silence: the node never answers
                answer, then = self.answers.pop(0)
                writer.write(answer)
                await writer.drain()
                if then == "close":
                    writer.close()
                    return

    def close_all(self) -> None:
        """The node closes every connection it has accepted (e.g. it restarted)."""
        for w in self.writers:
            w.close()


@contextlib.asynccontextmanager
async def node(*answers: tuple[bytes, str]) -> AsyncIterator[Node]:
    n = Node(answers=list(answers))
    n.server = await asyncio.start_server(n.serve, "127.0.0.1", 0)
    n.port = n.server.sockets[0].getsockname()[1]
    try:
        yield n
    finally:
        n.close_all()
        n.server.close()


@contextlib.asynccontextmanager
async def pool_for(n: Node, **kw: float) -> AsyncIterator[NodePool]:
    settings: dict[str, float] = {"connect_timeout": 2.0, "response_timeout": 5.0, "max_idle": 8,
                                  "idle_timeout": 60.0, **kw}
    pool = NodePool("n1", "127.0.0.1", n.port, connect_timeout=settings["connect_timeout"],
                    response_timeout=settings["response_timeout"], max_idle=int(settings["max_idle"]),
                    idle_timeout=settings["idle_timeout"])
    try:
        yield pool
    finally:
        pool.close()


class Request:
    """An `UpstreamListener`: what one request heard from the pool and its connection."""

    def __init__(self) -> None:
        self.finished = False
        self.ready: asyncio.Future[UpstreamConn] = asyncio.get_running_loop().create_future()
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.body = bytearray()
        self.error: tuple[str, bool, bool] | None = None
        self.noted: list[tuple[bytes, bytes]] = []
        self.relay = b""

    def on_upstream_ready(self, conn: UpstreamConn) -> None:
        self.ready.set_result(conn)

    def on_upstream_head(self, conn: UpstreamConn, status: int, noted: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.noted = list(noted)
        self.relay = b"".join(conn.relay)

    def on_upstream_body(self, data: bytes) -> None:
        self.body += data

    def on_upstream_done(self) -> None:
        self.ended.set_result("done")

    def on_upstream_error(self, reason: str, written: bool, timeout: bool = False) -> None:
        self.error = (reason, written, timeout)
        self.ended.set_result("error")

    def on_upstream_pause(self) -> None:
        pass

    def on_upstream_resume(self) -> None:
        pass


async def connection_for(pool: NodePool, req: Request) -> UpstreamConn:
    pool.acquire(req)
    return await asyncio.wait_for(req.ready, WAIT)


async def send(pool: NodePool) -> tuple[Request, UpstreamConn]:
    """One request through the pool, to its end (answer or error)."""
    req = Request()
    conn = await connection_for(pool, req)
    conn.start(req, head_only=False)
    conn.write(REQUEST)
    conn.request_sent()
    await asyncio.wait_for(req.ended, WAIT)
    return req, conn


async def wait_until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.005)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- a connection goes back to the pool only after a whole keep-alive answer ---------------------------------

CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"


@pytest.mark.parametrize(("answer", "then", "ended", "reused"), [
    # A whole answer framed by its length or its chunks, on a keep-alive connection: reused.
    (OK, "keep", "done", True),
    (CHUNKED, "keep", "done", True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", "keep", "done", True),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", "keep", "done", True),
    # The node says it closes: never reused, even if the socket is still open when the answer ends.
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", "keep", "done", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "keep", "done", False),
    # A close-delimited body ends with the connection.
    (b"HTTP/1.1 200 OK\r\n\r\nok", "close", "done", False),
    # A broken connection: garbage, a coding other than chunked, an answer cut short, a second answer.
    (b"NOT HTTP\r\n\r\n", "keep", "error", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "keep", "error", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok", "close", "error", False),
    (OK + OK, "keep", "done", False),
], ids=["length", "chunked", "204", "http10_keep_alive", "connection_close", "http10", "close_delimited",
        "garbage", "gzip", "cut_short", "second_answer"])
async def test_a_connection_is_reused_only_after_a_whole_keep_alive_answer(
        answer: bytes, then: str, ended: str, reused: bool) -> None:
    async with node((answer, then), (OK, "keep")) as n, pool_for(n) as pool:
        first, conn = await send(pool)
        assert first.ended.result() == ended, first.error
        if reused:
            assert pool.idle == [conn] and not conn.closed
        else:
            assert conn.closed and conn not in pool.idle
        assert not pool.busy
        second, conn2 = await send(pool)
        assert second.ended.result() == "done" and bytes(second.body) == b"ok"
        assert (conn2 is conn) is reused
        assert n.connections == (1 if reused else 2)


async def test_the_answer_headers_are_sorted_in_one_pass_relayed_in_order_and_the_read_ones_noted() -> None:
    answer = (b"HTTP/1.1 200 OK\r\nServer: n\r\nX-Raft-Index:  12 \r\nConnection: keep-alive\r\n"
              b"X-Raft-Term: 3\r\nKeep-Alive: timeout=5\r\nX-Raft-Node: n9\r\nETag: \"a\"\r\n"
              b"X-Raft-Leader: n1\r\nX-Raft-Consistency: any\r\nContent-Length: 2\r\n\r\nok")
    async with node((answer, "keep")) as n, pool_for(n) as pool:
        req, _ = await send(pool)
        assert req.ended.result() == "done" and bytes(req.body) == b"ok"
        # Hop-by-hop, framing and the headers raftlb sets are not relayed; X-Raft-Index as read (stripped).
        assert req.relay == (b"server: n\r\nx-raft-index: 12\r\nx-raft-term: 3\r\netag: \"a\"\r\n"
                             b"x-raft-leader: n1\r\n")
        assert req.noted == [(b"x-raft-index", b"12 "), (b"x-raft-term", b"3"), (b"x-raft-leader", b"n1")]


async def test_acquire_and_release_move_a_connection_between_busy_and_idle() -> None:
    async with node((OK, "keep")) as n, pool_for(n) as pool:
        req = Request()
        conn = await connection_for(pool, req)
        assert (pool.busy, pool.idle, pool.connecting, len(pool.waiters)) == ({conn}, [], 0, 0)
        conn.start(req, head_only=False)
        conn.write(REQUEST)
        await asyncio.wait_for(req.ended, WAIT)
        assert (req.status, bytes(req.body)) == (200, b"ok")
        assert (pool.busy, pool.idle) == (set(), [conn])
        assert pool.take_idle() is conn  # the idle one, marked busy again
        assert (pool.busy, pool.idle) == ({conn}, [])
        assert pool.take_idle() is None
        pool.release(conn)
        assert (pool.busy, pool.idle) == (set(), [conn])


async def test_keep_alive_reuses_the_warmest_connection_first() -> None:
    async with node(*[(OK, "keep")] * 4) as n, pool_for(n) as pool:
        a, b = Request(), Request()
        conn_a, conn_b = await connection_for(pool, a), await connection_for(pool, b)
        assert conn_a is not conn_b and n.connections == 2
        for req, conn in ((a, conn_a), (b, conn_b)):  # a finishes first, b last: b is the warmest
            conn.start(req, head_only=False)
            conn.write(REQUEST)
            await asyncio.wait_for(req.ended, WAIT)
        assert pool.idle == [conn_a, conn_b]
        _, conn = await send(pool)
        assert conn is conn_b and conn.requests == 2
        _, conn = await send(pool)
        assert conn is conn_b and conn.requests == 3 and n.connections == 2


async def test_a_connection_the_node_closed_while_idle_is_not_handed_out() -> None:
    async with node((OK, "keep"), (OK, "keep")) as n, pool_for(n) as pool:
        _, conn = await send(pool)
        assert pool.idle == [conn]
        n.close_all()  # the node restarts, or drops idle connections
        await wait_until(lambda: conn.closed)
        assert pool.idle == [] and pool.take_idle() is None
        second, conn2 = await send(pool)
        assert second.ended.result() == "done" and conn2 is not conn and n.connections == 2


async def test_a_head_answer_ends_at_its_head_and_the_connection_is_reused() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"  # the length of the body a GET would get
    async with node((head, "keep"), (OK, "keep")) as n, pool_for(n) as pool:
        req = Request()
        conn = await connection_for(pool, req)
        conn.start(req, head_only=True)
        conn.write(b"HEAD /k HTTP/1.1\r\nHost: node\r\n\r\n")
        assert await asyncio.wait_for(req.ended, WAIT) == "done" and req.body == b""
        assert pool.idle == [conn]
        second, conn2 = await send(pool)
        assert conn2 is conn and bytes(second.body) == b"ok"


# -- waiters: one connection opened per waiter, handed out first come first served ---------------------------


async def test_each_waiter_opens_one_connection_and_they_are_handed_out_in_arrival_order() -> None:
    async with node(*[(OK, "keep")] * 3) as n, pool_for(n) as pool:
        reqs = [Request() for _ in range(3)]
        order: list[int] = []

        def arrived(i: int) -> Callable[[asyncio.Future[UpstreamConn]], None]:
            return lambda _: order.append(i)

        for i, req in enumerate(reqs):
            pool.acquire(req)
            req.ready.add_done_callback(arrived(i))
        assert (pool.connecting, len(pool.waiters)) == (3, 3)
        conns = [await asyncio.wait_for(r.ready, WAIT) for r in reqs]
        assert order == [0, 1, 2] and len(set(conns)) == 3
        assert (pool.connecting, len(pool.waiters), pool.busy) == (0, 0, set(conns))
        assert n.connections == 3


async def test_a_freed_connection_goes_to_the_oldest_waiter_before_the_idle_list() -> None:
    async with node((OK, "keep"), (OK, "keep")) as n, pool_for(n) as pool:
        first = Request()
        conn = await connection_for(pool, first)
        waiter = Request()
        pool.acquire(waiter)  # no idle connection: it waits (and a second connection starts to open)
        assert list(pool.waiters) == [waiter]
        conn.start(first, head_only=False)
        conn.write(REQUEST)
        await asyncio.wait_for(first.ended, WAIT)
        # The first one to free up serves the waiter: the one that finished, or the one just opened.
        got = await asyncio.wait_for(waiter.ready, WAIT)
        assert not pool.waiters and got in pool.busy
        await wait_until(lambda: pool.connecting == 0)
        assert len(pool.idle) + len(pool.busy) == 2 and n.connections == 2


async def test_a_waiter_that_left_is_skipped_and_the_connection_goes_idle() -> None:
    async with node() as n, pool_for(n) as pool:
        gone, waiting = Request(), Request()
        pool.acquire(gone)
        pool.acquire(waiting)
        gone.finished = True  # its client went away before a connection opened
        conn = await asyncio.wait_for(waiting.ready, WAIT)
        await wait_until(lambda: pool.connecting == 0)
        assert not gone.ready.done() and pool.busy == {conn}
        assert len(pool.idle) == 1 and pool.idle[0] is not conn


# -- limits -------------------------------------------------------------------------------------------------


async def test_no_more_than_max_idle_connections_are_kept() -> None:
    async with node(*[(OK, "keep")] * 3) as n, pool_for(n, max_idle=1) as pool:
        reqs = [Request() for _ in range(3)]
        conns = [await connection_for(pool, r) for r in reqs]
        for req, conn in zip(reqs, conns, strict=True):
            conn.start(req, head_only=False)
            conn.write(REQUEST)
            await asyncio.wait_for(req.ended, WAIT)
        assert pool.idle == [conns[0]] and conns[1].closed and conns[2].closed and not pool.busy


async def test_idle_connections_past_the_idle_timeout_are_closed_by_the_sweep() -> None:
    async with node((OK, "keep")) as n, pool_for(n, idle_timeout=30.0) as pool:
        _, conn = await send(pool)
        pool.sweep(time.monotonic() + 10)
        assert pool.idle == [conn]
        pool.sweep(time.monotonic() + 31)
        assert pool.idle == [] and conn.closed


async def test_a_node_that_never_answers_is_cut_by_the_sweep_at_the_response_timeout() -> None:
    async with node() as n, pool_for(n, response_timeout=3.0) as pool:  # no answers scripted: silence
        req = Request()
        conn = await connection_for(pool, req)
        conn.start(req, head_only=False)
        conn.write(REQUEST)
        conn.request_sent()
        await wait_until(lambda: n.heads == 1)
        pool.sweep(time.monotonic() + 1)
        assert not req.ended.done()
        pool.sweep(time.monotonic() + 4)
        assert await asyncio.wait_for(req.ended, WAIT) == "error"
        assert req.error == ("no response within 3s", True, True)  # written: the node may have acted on it
        assert conn.closed and not pool.busy and not pool.idle


async def test_a_refused_connect_fails_the_waiter_as_not_sent() -> None:
    async with node() as n:
        n.port = dead_port()
        async with pool_for(n) as pool:
            req = Request()
            pool.acquire(req)
            assert await asyncio.wait_for(req.ended, WAIT) == "error"
            assert req.error is not None
            reason, written, timeout = req.error
            assert reason.startswith("connect failed") and (written, timeout) == (False, False)
            assert (pool.connect_failures, pool.connecting, len(pool.waiters)) == (1, 0, 0)
            assert not pool.busy and not pool.idle


async def test_close_fails_the_waiters_and_closes_every_connection() -> None:
    async with node((OK, "keep")) as n, pool_for(n) as pool:
        _, idle = await send(pool)
        busy = await connection_for(pool, Request())
        waiter = Request()
        pool.acquire(waiter)  # no idle connection: it waits for the one being opened ...
        pool.close()  # ... when the node is removed from the config
        assert idle.closed and busy.closed and not pool.idle and not pool.busy
        assert waiter.error == ("node removed", False, False)
