"""Downstream HTTP/1.1: one `HttpConnection` (an asyncio.Protocol) per client connection, parsed by httptools.

The per-request path is callback-based: the parser's callbacks build an `Exchange`, the connection hands the
exchange at the head of its pipeline to a `RequestHandler`, and the handler answers through the exchange's
`send_head` / `send_body` / `end` (or `respond_error`). No task is created per request.

Pipelined requests are answered in order: only the head of the pipeline is active; later ones wait, with
their bodies buffered and reading paused. Limits (header bytes and count, body size) and timeouts (header,
body, idle) are enforced here, so every handler sees only well-formed, bounded requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from ssl import SSLContext
from typing import Any, Protocol, cast

import httptools

from raftlb.config import LimitsConfig
from raftlb.errors import (
    BadRequest,
    HeadersTooLarge,
    Overloaded,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
)

log = logging.getLogger("raftlb.http")

# How a response body is delimited on the wire.
FRAMING_NONE = 0  # no body at all (204, 304, or an empty body)
FRAMING_LENGTH = 1  # Content-Length
FRAMING_CHUNKED = 2  # Transfer-Encoding: chunked
FRAMING_CLOSE = 3  # until the connection closes (HTTP/1.0 clients, upstreams without framing)

# Reasons reading from the client is paused; reading resumes when none is left.
PAUSE_PIPELINE = 1  # a later pipelined request waits behind the active one
PAUSE_BODY = 2  # the body is arriving faster than it can be passed on
PAUSE_BROKEN = 4  # the stream cannot be parsed any further

# Deadline kinds.
DL_NONE = 0
DL_IDLE = 1  # keep-alive, waiting for the next request
DL_HEADER = 2  # a request has started; its headers are not complete
DL_BODY = 3  # headers are complete; the body stalls

REASONS: dict[int, bytes] = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}
REASONS[421] = b"Misdirected Request"

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))


class RequestHandler(Protocol):
    """What a listener serves: called once per request, when the request is at the head of its pipeline."""

    def on_request(self, ex: Exchange) -> None: ...


class Exchange:
    """One request and its response on a downstream connection.

    The handler reads `method`, `target`, `headers`, attaches a body sink with `set_body_sink` (even for
    requests without a body: `on_end` then fires at once), and answers with `send_head`/`send_body`/`end`,
    `respond_error`, or `abort`. Callbacks it may set: `on_abort(reason)` when the client goes away or the
    request fails mid-body; `on_pause_writing`/`on_resume_writing` for the client's flow control.
    """

    __slots__ = (
        "conn", "method", "target", "headers", "http11", "keep_alive", "content_length", "chunked",
        "expect_continue", "head_only", "error", "body_buf", "body_buffered", "body_received", "body_done",
        "on_body", "on_body_end", "on_abort", "on_pause_writing", "on_resume_writing", "response_started",
        "finished", "close_after", "_framing", "started_at", "ctx", "status",
    )

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.method = ""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http11 = True
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.head_only = False
        self.error: ProxyError | None = None
        self.body_buf: list[bytes] = []
        self.body_buffered = 0
        self.body_received = 0
        self.body_done = False
        self.on_body: Callable[[bytes], None] | None = None
        self.on_body_end: Callable[[], None] | None = None
        self.on_abort: Callable[[str], None] | None = None
        self.on_pause_writing: Callable[[], None] | None = None
        self.on_resume_writing: Callable[[], None] | None = None
        self.response_started = False
        self.finished = False
        self.close_after = False
        self._framing = FRAMING_NONE
        self.started_at = time.monotonic()
        self.ctx: Any = None
        self.status = 0

    def __repr__(self) -> str:
        return f"<Exchange {self.method} {self.target!r} status={self.status} done={self.finished}>"

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def client_addr(self) -> str:
        return self.conn.peer_host

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    # -- request body -------------------------------------------------------------------------------------

    def set_body_sink(self, on_body: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        """Start receiving the body: buffered chunks are delivered now, the rest as it arrives."""
        self.on_body = on_body
        self.on_body_end = on_end
        if self.expect_continue and not (self.body_received or self.body_done or self.response_started):
            self.expect_continue = False
            self.conn.write(_CONTINUE)
        if self.body_buf:
            buf, self.body_buf, self.body_buffered = self.body_buf, [], 0
            self.conn.resume_reading(PAUSE_BODY)
            for chunk in buf:
                on_body(chunk)
        if self.body_done:
            on_end()

    def pause_body(self) -> None:
        """Backpressure from whoever consumes the body."""
        self.conn.pause_reading(PAUSE_BODY)

    def resume_body(self) -> None:
        self.conn.resume_reading(PAUSE_BODY)

    # -- response -----------------------------------------------------------------------------------------

    def send_head(self, head: bytes, framing: int, length: int = 0) -> None:
        """Write the status line and headers. `head` holds the status line and header lines (each ending in
        CRLF) but not the framing headers, `Connection`, or the blank line: those are added here."""
        if self.response_started or self.finished:
            return
        self.response_started = True
        conn = self.conn
        if framing == FRAMING_CHUNKED and not self.http11:
            framing = FRAMING_CLOSE
        if not self.keep_alive or conn.closing or framing == FRAMING_CLOSE or self.error is not None:
            self.close_after = True
        parts = [head]
        if framing == FRAMING_LENGTH:
            parts.append(b"content-length: %d\r\n" % length)
        elif framing == FRAMING_CHUNKED:
            parts.append(b"transfer-encoding: chunked\r\n")
        if self.close_after:
            parts.append(b"connection: close\r\n\r\n")
        elif not self.http11:
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        if self.head_only:
            framing = FRAMING_NONE
        self._framing = framing
        conn.writelines(parts)

    def send_body(self, data: bytes) -> None:
        if self.finished or not data:
            return
        framing = self._framing
        if framing == FRAMING_CHUNKED:
            self.conn.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        elif framing != FRAMING_NONE:
            self.conn.write(data)

    def end(self) -> None:
        """The response is complete."""
        if self.finished:
            return
        if self._framing == FRAMING_CHUNKED:
            self.conn.write(b"0\r\n\r\n")
        self.finished = True
        self.conn._response_done(self)

    def respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                content_type: bytes = b"application/json") -> None:
        """A whole response at once (errors, small answers)."""
        self.status = status
        parts = [status_line(status), b"content-type: ", content_type, b"\r\n"]
        if headers:
            for k, v in headers:
                parts += (k, b": ", v, b"\r\n")
        self.send_head(b"".join(parts), FRAMING_LENGTH if body or status not in (204, 304) else FRAMING_NONE,
                       len(body))
        self.send_body(body)
        self.end()

    def respond_error(self, err: ProxyError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.response_started:
            self.abort(err.code)
            return
        hdrs = list(headers or ())
        if err.retry_after is not None:
            hdrs.append((b"retry-after", b"%d" % err.retry_after))
        self.respond(err.status, err.body(), hdrs)

    def abort(self, reason: str = "aborted") -> None:
        """The response cannot be completed: close the connection so the client sees it was cut short."""
        if self.finished:
            return
        self.finished = True
        self.conn.abort(reason)


class HttpConnection(asyncio.Protocol):
    """One client connection: parsing, pipelining, limits, timeouts and flow control."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer_host = ""
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.closing = False
        self.closed = False
        self._paused = 0
        self._writing_paused = False
        self._in_headers = False
        self._header_bytes = 0
        self._header_count = 0
        self._header_size = 0
        self._received_any = False
        self._url_parts: list[bytes] = []
        self.deadline = 0.0
        self.deadline_kind = DL_NONE

    def __repr__(self) -> str:
        return f"<HttpConnection {self.peer_host} queue={len(self.queue)} paused={self._paused}>"

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check here.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_host = peer[0] if isinstance(peer, tuple) else ""
        transport.set_write_buffer_limits(high=self.limits.write_buffer_high)
        server = self.server
        server.connections.add(self)
        self._set_deadline(DL_IDLE, self.limits.header_timeout)
        if len(server.connections) > server.max_connections:
            err = Overloaded("connection limit reached")
            transport.write(status_line(503) + b"content-type: application/json\r\nretry-after: 1\r\n"
                            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(err.body()) + err.body())
            server.rejected_connections += 1
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for ex in self.queue:
            if not ex.finished:
                ex.finished = True
                if ex.on_abort is not None:
                    ex.on_abort("client_closed")
        self.queue.clear()

    def eof_received(self) -> bool | None:
        # The client half-closed. Requests already received are still answered; then the connection closes.
        if not self.queue:
            return None
        self.closing = True
        return True

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.queue:
            cb = self.queue[0].on_pause_writing
            if cb is not None:
                cb()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.queue:
            cb = self.queue[0].on_resume_writing
            if cb is not None:
                cb()

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._received_any = True
        if self._in_headers or self.parsing is None:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # A request asked to switch protocols (h2c, websocket). We may ignore Upgrade (RFC 9110 §7.8):
            # it is answered as plain HTTP/1.1, without the hop-by-hop Upgrade header going upstream.
            # llhttp stops parsing after such a request, so the rest of the bytes go to a fresh parser.
            if self.parsing is not None:
                self._protocol_error(BadRequest("protocol upgrade with a request body is not supported"))
                return
            self.parser = httptools.HttpRequestParser(self)
            rest = data[exc.args[0]:] if exc.args and isinstance(exc.args[0], int) else b""
            if rest:
                self.data_received(rest)
            return
        except httptools.HttpParserError as exc:
            self._protocol_error(BadRequest(_parser_error_detail(exc)))
            return
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            self._protocol_error(HeadersTooLarge(f"request headers exceed {limit} bytes"))

    # -- parser callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.parsing = Exchange(self)
        self._in_headers = True
        self._header_count = 0
        self._header_size = 0
        self._url_parts = []
        self._set_deadline(DL_HEADER, self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url_parts.append(url)
        self._header_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        self._header_count += 1
        self._header_size += len(name) + len(value) + 4
        if self._header_count > self.limits.max_headers:
            if ex.error is None:
                ex.error = HeadersTooLarge(f"more than {self.limits.max_headers} request headers")
            return
        if self._header_size > self.limits.max_header_bytes:
            if ex.error is None:
                ex.error = HeadersTooLarge(f"request headers exceed {self.limits.max_header_bytes} bytes")
            return
        ex.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self._in_headers = False
        self._header_bytes = 0
        parser = self.parser
        ex.target = b"".join(self._url_parts)
        ex.method = parser.get_method().decode("ascii")
        ex.http11 = parser.get_http_version() == "1.1"
        ex.keep_alive = parser.should_keep_alive()
        ex.head_only = ex.method == "HEAD"
        if ex.error is None:
            _inspect_framing(ex, self.limits)
        self.queue.append(ex)
        if len(self.queue) == 1:
            self._activate(ex)
        else:
            self.pause_reading(PAUSE_PIPELINE)
        if ex.has_body and not ex.finished:
            self._set_deadline(DL_BODY, self.limits.body_timeout)
        else:
            self.deadline_kind = DL_NONE

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.finished:
            return
        ex.body_received += len(body)
        if ex.body_received > self.limits.max_body_bytes:
            self._fail_body(ex, PayloadTooLarge(f"request body exceeds {self.limits.max_body_bytes} bytes"))
            return
        if self.deadline_kind == DL_BODY:
            self.deadline = time.monotonic() + self.limits.body_timeout
        if ex.on_body is not None:
            ex.on_body(body)
        else:
            ex.body_buf.append(body)
            ex.body_buffered += len(body)
            if ex.body_buffered > self.limits.write_buffer_high:
                self.pause_reading(PAUSE_BODY)

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        ex.body_done = True
        if self.deadline_kind == DL_BODY:
            self.deadline_kind = DL_NONE
        if ex.on_body_end is not None and not ex.finished:
            ex.on_body_end()

    # -- pipeline -----------------------------------------------------------------------------------------

    def _activate(self, ex: Exchange) -> None:
        if ex.error is not None:
            ex.close_after = True
            ex.respond_error(ex.error)
            return
        self.server.requests += 1
        self.server.handler.on_request(ex)

    def _response_done(self, ex: Exchange) -> None:
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        if ex.close_after or not ex.body_done or self.closing:
            self._close()
            return
        if queue:
            asyncio.get_running_loop().call_soon(self._activate_next)
        else:
            self.resume_reading(PAUSE_PIPELINE)
            if self.parsing is None:
                self._set_deadline(DL_IDLE, self.limits.idle_timeout)

    def _activate_next(self) -> None:
        if self.closed or not self.queue:
            return
        if len(self.queue) == 1:
            self.resume_reading(PAUSE_PIPELINE)
        self._activate(self.queue[0])

    # -- errors -------------------------------------------------------------------------------------------

    def _protocol_error(self, err: ProxyError) -> None:
        """The byte stream is unusable from here on: answer in order, then close."""
        self.pause_reading(PAUSE_BROKEN)
        self._in_headers = False
        ex = self.parsing
        self.parsing = None
        if ex is not None and ex in self.queue:
            # Inside the body of a request already queued: the active one fails now, a later one in turn.
            if ex is self.queue[0]:
                self._fail_active(ex, err)
            else:
                ex.error = err
            return
        # Inside a request's head, or between requests.
        bad = ex if ex is not None else Exchange(self)
        bad.error = err
        bad.keep_alive = False
        self.queue.append(bad)
        if len(self.queue) == 1:
            self._activate(bad)

    def _fail_body(self, ex: Exchange, err: ProxyError) -> None:
        self.pause_reading(PAUSE_BROKEN)
        self.parsing = None
        if self.queue and ex is self.queue[0]:
            self._fail_active(ex, err)
        else:
            ex.error = err

    def _fail_active(self, ex: Exchange, err: ProxyError) -> None:
        if ex.on_abort is not None:
            cb, ex.on_abort = ex.on_abort, None
            cb(err.code)
        ex.close_after = True
        if ex.finished:
            self._close()
        else:
            ex.respond_error(err)

    def on_deadline(self, now: float) -> None:
        kind = self.deadline_kind
        self.deadline_kind = DL_NONE
        if kind == DL_IDLE:
            self._close()
        elif kind == DL_HEADER:
            self._protocol_error(RequestTimeout("request headers not received in time"))
        elif kind == DL_BODY:
            ex = self.parsing
            if ex is not None:
                self._fail_body(ex, RequestTimeout("request body not received in time"))
            else:
                self._close()

    def _set_deadline(self, kind: int, timeout: float) -> None:
        self.deadline_kind = kind
        self.deadline = time.monotonic() + timeout

    # -- transport helpers --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def writelines(self, parts: Any) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(parts)

    def pause_reading(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.server.connections.discard(self)

    def abort(self, reason: str) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
            self.server.connections.discard(self)

    def drain(self) -> None:
        """Server shutdown: close now if idle, else after the current response."""
        self.closing = True
        if not self.queue and self.parsing is None:
            self._close()

    @property
    def idle(self) -> bool:
        return not self.queue and self.parsing is None


def _parser_error_detail(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"malformed request: {text}"


def _inspect_framing(ex: Exchange, limits: LimitsConfig) -> None:
    """Body framing and the request-level checks that llhttp leaves to us (RFC 9112 §6)."""
    cl: bytes | None = None
    te_seen = False
    host_count = 0
    for name, value in ex.headers:
        if name == b"content-length":
            if cl is not None and cl != value.strip():
                ex.error = BadRequest("conflicting Content-Length headers")
                return
            cl = value.strip()
        elif name == b"transfer-encoding":
            te_seen = True
            if value.strip().lower() != b"chunked":
                ex.error = BadRequest("unsupported Transfer-Encoding (only 'chunked')")
                return
        elif name == b"expect":
            if value.strip().lower() == b"100-continue":
                ex.expect_continue = True
            else:
                ex.error = ProxyError("unsupported Expect")
                ex.error.status, ex.error.code = 417, "expectation_failed"
                return
        elif name == b"host":
            host_count += 1
    if te_seen and cl is not None:
        ex.error = BadRequest("both Content-Length and Transfer-Encoding")
        return
    if host_count > 1 or (ex.http11 and host_count == 0):
        ex.error = BadRequest("exactly one Host header is required")
        return
    if ex.method == "CONNECT":
        ex.error = ProxyError("CONNECT is not supported")
        ex.error.status, ex.error.code = 405, "method_not_allowed"
        return
    if te_seen:
        ex.chunked = True
    elif cl is not None:
        if not cl.isdigit():
            ex.error = BadRequest("invalid Content-Length")
            return
        ex.content_length = int(cl)
        if ex.content_length > limits.max_body_bytes:
            ex.error = PayloadTooLarge(f"request body exceeds {limits.max_body_bytes} bytes")


class HttpServer:
    """A listening socket and its connections. Lifecycle: `start()` → serve → `drain()` → `close()`."""

    def __init__(self, handler: RequestHandler, limits: LimitsConfig, max_connections: int = 10000,
                 name: str = "http") -> None:
        self.handler = handler
        self.limits = limits
        self.max_connections = max_connections
        self.name = name
        self.connections: set[HttpConnection] = set()
        self.requests = 0
        self.rejected_connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.host = ""
        self.port = 0
        self.ssl: SSLContext | None = None

    def __repr__(self) -> str:
        return f"<HttpServer {self.name} {self.host}:{self.port} [{len(self.connections)} connections]>"

    async def start(self, host: str, port: int, reuse_port: bool = False,
                    ssl: SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self), host, port, backlog=4096, reuse_port=reuse_port or None, ssl=ssl,
            ssl_handshake_timeout=self.limits.header_timeout if ssl is not None else None)
        self.ssl = ssl
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        lim = self.limits
        tick = min(lim.header_timeout, lim.body_timeout, lim.idle_timeout) / 4
        tick = max(0.05, min(tick, 0.5))
        self._sweeper = asyncio.get_running_loop().call_later(tick, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.connections if c.deadline_kind and c.deadline <= now]:
            conn.on_deadline(now)
        self._schedule_sweep()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, close idle connections, wait for in-flight ones. True if all finished in time."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn.drain()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.connections

    async def close(self) -> None:
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.abort("shutdown")
        if self._server is not None:
            await self._server.wait_closed()
