"""Upstream connections: a keep-alive pool per node, responses parsed with httptools.

An `UpstreamConn` carries one request at a time for one `UpstreamListener` (the proxy's per-request state)
and reports the response through callbacks. A `NodePool` hands out idle connections (LIFO, so the warm
ones are reused and the cold ones expire), opens new ones when none is idle, and enforces the connect and
response timeouts from a periodic sweep. The response timeout runs from the moment the whole request is sent
to the response head, then bounds each gap between reads of the answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from ssl import SSLContext
from typing import Protocol, cast

import httptools

log = logging.getLogger("raftlb.proxy.pool")

MAX_RESPONSE_HEAD = 256 * 1024  # a node's status line and headers; beyond this it is not a sane answer

# Answer headers never relayed to the client: hop-by-hop (RFC 9110 §7.6.1), the framing that is redone, and
# those raftlb sets itself (docs/headers.md).
RELAY_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"content-length", b"x-raft-node", b"x-raft-consistency",
})
# Relayed answer headers raftlb also reads (the listener gets them apart: `on_upstream_head`).
NOTED = frozenset({b"x-raft-index", b"x-raft-term", b"x-raft-leader"})
_READ = RELAY_DROP | NOTED

# Content-Length values read so far, and their numbers: a node's answers repeat their sizes, and `int()` on
# bytes costs more than a lookup. Bounded: once full, new sizes are parsed each time.
_LENGTHS: dict[bytes, int] = {}
_LENGTHS_MAX = 4096


class UpstreamListener(Protocol):
    finished: bool  # the request no longer needs a connection (its client went away)

    def on_upstream_ready(self, conn: UpstreamConn) -> None: ...
    # `noted`: the answer's NOTED headers (lowered names), in order; the lines relayed to the client (all
    # but RELAY_DROP, in order, lowered names) are `conn.relay`. (One pass over the answer's headers.)
    def on_upstream_head(self, conn: UpstreamConn, status: int,
                         noted: list[tuple[bytes, bytes]]) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def on_upstream_done(self) -> None: ...
    # `timeout`: the node did not answer, or its answer stalled, in time (504; other failures are 502).
    def on_upstream_error(self, reason: str, written: bool, timeout: bool = False) -> None: ...
    def on_upstream_pause(self) -> None: ...
    def on_upstream_resume(self) -> None: ...


class UpstreamConn(asyncio.Protocol):
    """One keep-alive connection to a node."""

    __slots__ = (
        "closed", "completed", "deadline", "extra", "feeding", "head_bytes", "head_only", "head_received",
        "noted", "relay", "idle_since", "informational", "keep_alive", "listener", "parser", "paused", "pool",
        "requests", "resp_chunked", "resp_length", "stream", "transport", "until_close", "written",
        "_cl", "_te",
    )

    def __init__(self, pool: NodePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.listener: UpstreamListener | None = None
        self.noted: list[tuple[bytes, bytes]] = []  # the answer's NOTED headers
        self.relay: list[bytes] = []  # ... and its lines for the client, as parts (name, ": ", value, CRLF)
        self.written = False
        self.head_received = False
        self.head_only = False
        self.informational = False
        self.until_close = False
        self.resp_length: int | None = None
        self.resp_chunked = False
        self.keep_alive = True
        self.closed = False
        self.deadline = 0.0
        self.idle_since = 0.0
        self.requests = 0
        self.head_bytes = 0
        self.feeding = False  # inside parser.feed_data
        self.completed = False  # an answer completed during this feed
        self.extra = False  # the node sent a message with no request outstanding
        self.paused = False  # reading paused for a slow client
        self.stream = False  # the answer is a long-lived stream: quiet gaps in it are not a stalled node
        self._cl: bytes | None = None  # the answer's Content-Length (llhttp refuses conflicting ones)
        self._te: list[bytes] | None = None  # ... and its Transfer-Encoding values

    def __repr__(self) -> str:
        state = "busy" if self.listener is not None else ("closed" if self.closed else "idle")
        return f"<UpstreamConn node={self.pool.node_id} {state} requests={self.requests}>"

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=self.pool.write_buffer_high)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        listener = self.listener
        if listener is None:
            return
        self.listener = None
        if self.head_received and self.until_close and exc is None:
            # A close-delimited body ends with a clean close (FIN); a reset means it was cut short.
            listener.on_upstream_done()
        else:
            reason = "connection closed by node" if exc is None else f"connection lost: {exc}"
            listener.on_upstream_error(reason, self.written)

    def pause_writing(self) -> None:
        if self.listener is not None:
            self.listener.on_upstream_pause()

    def resume_writing(self) -> None:
        if self.listener is not None:
            self.listener.on_upstream_resume()

    def data_received(self, data: bytes) -> None:
        if self.listener is None:
            # Bytes from a node with no request outstanding: the connection cannot be trusted any more.
            self.close()
            return
        if not self.head_received:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_RESPONSE_HEAD:
                self._fail(f"response head larger than {MAX_RESPONSE_HEAD} bytes")
                return
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed response from node: {exc}")
        finally:
            self.feeding = False
        if self.listener is not None and self.head_received and not self.paused:
            # Once the head is in, the response timeout is the longest gap between two reads of the answer
            # (a node that stalls mid-answer is given up, like one that never answers).
            self.deadline = time.monotonic() + self.pool.response_timeout
        if self.completed:
            # Released only now that the parser is done with these bytes: anything after the answer in the
            # same read (a second answer to one request) poisons the connection instead of being taken
            # for the next request's answer.
            self.completed = False
            if self.extra or self.closed or not self.keep_alive or self.until_close:
                self.close()
            else:
                self.pool.release(self)

    # -- parser callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.noted = []
        self.relay = []
        self._cl = self._te = None
        if self.listener is None:
            self.extra = True  # a message nobody asked for

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _READ:  # (one pass: the listener walks no headers but these)
            if name in NOTED:
                self.noted.append((name, value))
                if name == b"x-raft-index":
                    value = value.strip()  # (relayed as it is read: the number alone)
            elif name == b"content-length":
                self._cl = value
                return
            elif name == b"transfer-encoding":
                if self._te is None:
                    self._te = [value]
                else:
                    self._te.append(value)
                return
            else:
                return  # hop-by-hop, or set by raftlb: not relayed
        self.relay += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.informational = True
            if status == 101:
                self._fail("node switched protocols")
            return
        self.head_received = True
        self.deadline = 0.0
        self.keep_alive = self.parser.should_keep_alive()
        codings = self._te
        if codings is not None:
            if len(codings) > 1 or codings[0].strip().lower() != b"chunked":
                # Another coding (gzip, ...) would reach the client as raw coded bytes once the framing is
                # redone, and nodes have no reason to use one: a malformed answer, never relayed.
                value = b", ".join(codings).decode("latin-1")
                self._fail(f"malformed response from node: unsupported Transfer-Encoding {value!r} "
                           "(only chunked)")
                return
        cl = self._cl
        if cl is None:
            length = None
        else:
            length = _LENGTHS.get(cl)
            if length is None:
                length = int(cl)  # (llhttp has checked it is a number)
                if len(_LENGTHS) < _LENGTHS_MAX:
                    _LENGTHS[cl] = length
        self.resp_length = length
        chunked = self.resp_chunked = codings is not None
        self.until_close = not chunked and length is None and status not in (204, 304) and not self.head_only
        listener = self.listener
        if listener is not None:
            listener.on_upstream_head(self, status, self.noted)
        if self.head_only and self.listener is not None:
            # llhttp does not know the request was HEAD and would wait for a body: finish here and give
            # the connection a fresh parser.
            self.parser = httptools.HttpResponseParser(self)
            self._complete()

    def on_body(self, body: bytes) -> None:
        if self.listener is not None:
            self.listener.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        listener = self.listener
        if listener is not None:
            if self.feeding and not self.paused:
                # The common case, `_complete` inlined (per request): released by data_received once the
                # parser has returned.
                self.listener = None
                self.deadline = 0.0
                self.completed = True
                listener.on_upstream_done()
            else:
                self._complete()

    # -- request lifecycle --------------------------------------------------------------------------------

    def start(self, listener: UpstreamListener, head_only: bool, now: float | None = None,
              sent: bool = True, stream: bool = False) -> None:
        """Bind to a request; the caller writes it with `write`/`writelines` right after. `sent` is False
        while the request's body is still arriving from the client: the response timeout then starts at
        `request_sent`, not while the client uploads (its own body timeout governs that). `stream`: the
        answer is a long-lived stream (a route's `stream: true`), cut for a quiet gap only when its node
        is marked down."""
        self.listener = listener
        self.stream = stream
        self.head_only = head_only
        self.written = False
        self.head_received = False
        self.informational = False
        self.until_close = False
        self.head_bytes = 0
        self.requests += 1
        if self.paused:
            # The previous client was slow and its answer ended while reading was paused: this request
            # must hear its own answer.
            self.resume_reading()
        if not sent:
            self.deadline = 0.0
        else:
            self.deadline = (time.monotonic() if now is None else now) + self.pool.response_timeout

    def request_sent(self) -> None:
        """The whole request has been written: the response timeout runs from now (unless it has been
        answered already)."""
        if self.listener is not None and not self.head_received and not self.closed:
            self.deadline = time.monotonic() + self.pool.response_timeout

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.written = True
            self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.written = True
            self.transport.writelines(parts)

    def pause_reading(self) -> None:
        """Backpressure from a slow client; undone by `resume_reading` or when the next request starts."""
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.deadline = 0.0  # the node is not the slow one: the client's send timeout governs
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
            if self.listener is not None and self.head_received:
                self.deadline = time.monotonic() + self.pool.response_timeout
            self.transport.resume_reading()

    def _complete(self) -> None:
        listener = self.listener
        self.listener = None
        self.deadline = 0.0
        # The answer is all here: whatever backpressure its client applied is over. An idle connection
        # keeps reading, so a node closing it is noticed, and the next request hears its own answer.
        if self.paused:
            self.resume_reading()
        if self.feeding:
            self.completed = True  # released by data_received once the parser has returned
        elif self.keep_alive and not self.until_close and not self.closed:
            self.pool.release(self)
        else:
            self.close()
        if listener is not None:
            listener.on_upstream_done()

    def _fail(self, reason: str, timeout: bool = False) -> None:
        listener = self.listener
        self.listener = None
        self.close()
        if listener is not None:
            listener.on_upstream_error(reason, self.written, timeout)

    def timed_out(self) -> None:
        t = self.pool.response_timeout
        self._fail(f"answer stalled: nothing from the node for {t:g}s" if self.head_received
                   else f"no response within {t:g}s", timeout=True)

    def reject(self, reason: str) -> None:
        """Give up on the answer (malformed, or its node is gone): close the connection and report `reason`
        to the request as a failure of this node."""
        self._fail(reason)

    def abandon(self) -> None:
        """The request no longer wants this connection (client gone, leader deposed): close it quietly."""
        self.listener = None
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool._forget(self)
            if self.transport is not None:
                self.transport.close()


class NodePool:
    """Keep-alive connections to one node."""

    def __init__(self, node_id: str, host: str, port: int, *, connect_timeout: float, response_timeout: float,
                 max_idle: int, idle_timeout: float, write_buffer_high: int = 256 * 1024,
                 ssl: SSLContext | None = None) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.ssl = ssl  # https nodes
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.write_buffer_high = write_buffer_high
        self.idle: list[UpstreamConn] = []
        self.busy: set[UpstreamConn] = set()
        # Requests waiting for a connection, served first come first served whichever connection opens
        # or frees up first: held writes released together reach the node in the order they arrived.
        self.waiters: deque[UpstreamListener] = deque()
        # Requests assigned to this node and not finished (the balancer's load): written by `assign` and
        # `unassign` only.
        self.outstanding = 0
        self.connecting = 0
        self.connect_failures = 0
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (f"<NodePool node={self.node_id} [{len(self.busy)} active, {len(self.idle)} idle, "
                f"{self.connecting} connecting, {len(self.waiters)} waiting]>")

    def take_idle(self) -> UpstreamConn | None:
        """An idle connection, now marked busy, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self.busy.add(conn)
                return conn
        return None

    def assign(self, listener: UpstreamListener) -> UpstreamConn | None:
        """Count a request against this node's load (`outstanding`, until `unassign`) and give it an idle
        connection now, marked busy; or None: one is acquired for it (`listener.on_upstream_ready` later)."""
        self.outstanding += 1
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self.busy.add(conn)
                return conn
        self.acquire(listener)
        return None

    def unassign(self) -> None:
        """A request assigned to this node is over, or goes elsewhere: no longer part of its load."""
        self.outstanding -= 1

    def acquire(self, listener: UpstreamListener) -> None:
        """Give `listener` a connection: now if one is idle, else when one opens or frees up (or an error)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self.busy.add(conn)
                listener.on_upstream_ready(conn)
                return
        self.waiters.append(listener)
        if self.connecting < len(self.waiters):
            self.connecting += 1
            task = asyncio.get_running_loop().create_task(self._connect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConn(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError: a failed handshake too
            self.connecting -= 1
            self.connect_failures += 1
            reason = ("connect timeout" if isinstance(exc, TimeoutError)
                      else f"connect failed: {exc.strerror or exc}")
            waiter = self._next_waiter()
            if waiter is not None:
                waiter.on_upstream_error(reason, False)
            return
        self.connecting -= 1
        if self.closed:
            proto.close()
            return
        self._hand(proto)

    def _next_waiter(self) -> UpstreamListener | None:
        waiters = self.waiters
        while waiters:
            w = waiters.popleft()
            if not w.finished:
                return w
        return None

    def _hand(self, conn: UpstreamConn) -> None:
        """A connection is free: to the oldest waiter, else to the idle list."""
        waiter = self._next_waiter()
        if waiter is not None:
            self.busy.add(conn)
            waiter.on_upstream_ready(conn)
            return
        self.busy.discard(conn)
        if self.closed or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def release(self, conn: UpstreamConn) -> None:
        self.busy.discard(conn)
        if conn.closed:
            return
        if not self.waiters and not self.closed and len(self.idle) < self.max_idle:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
            return
        self._hand(conn)

    def _forget(self, conn: UpstreamConn) -> None:
        self.busy.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def cut_stalled(self, now: float, quiet: float, reason: str) -> None:
        """The node was marked down: its answers that have had nothing from it for `quiet` seconds are cut
        now rather than at their response timeout (a frozen node). Answers still flowing are left to finish,
        and so are answers paused for a slow client (the client's send timeout governs those)."""
        since = now - quiet + self.response_timeout  # a deadline at or before this: last read `quiet` ago
        for conn in [c for c in self.busy if c.head_received and c.deadline and c.deadline <= since]:
            conn._fail(f"{reason}: answer stalled for {now - conn.deadline + self.response_timeout:.1f}s",
                       timeout=True)

    def sweep(self, now: float) -> None:
        """Response timeouts on busy connections (to the head, then between reads of the answer); idle
        connections past their idle timeout."""
        for conn in [c for c in self.busy if c.deadline and c.deadline <= now]:
            if not (conn.stream and conn.head_received):  # (a stream's deadline only tells its last read)
                conn.timed_out()
        if self.idle and self.idle[0].idle_since + self.idle_timeout <= now:
            for conn in [c for c in self.idle if c.idle_since + self.idle_timeout <= now]:
                conn.close()

    def close(self) -> None:
        self.closed = True
        for conn in [*self.idle, *self.busy]:
            conn.close()
        for task in self._tasks:
            task.cancel()
        while (waiter := self._next_waiter()) is not None:
            waiter.on_upstream_error("node removed", False)
