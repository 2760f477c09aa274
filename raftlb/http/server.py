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
from ssl import SSLContext
from typing import Any, Protocol, cast

import httptools

from raftlb.config.model import H2Config, LimitsConfig
from raftlb.errors import (
    BadRequest,
    ExpectationFailed,
    HeadersTooLarge,
    MethodNotAllowed,
    Overloaded,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    VersionNotSupported,
)
from raftlb.http.exchange import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_LENGTH,
    FRAMING_NONE,
    PAUSE_BODY,
    PAUSE_BROKEN,
    PAUSE_PIPELINE,
    Exchange,
    status_line,
)
from raftlb.http.h2server import PREFACE, H2ServerConnection

__all__ = [
    "FRAMING_CHUNKED", "FRAMING_CLOSE", "FRAMING_LENGTH", "FRAMING_NONE", "Exchange", "HttpConnection",
    "HttpServer", "RequestHandler", "status_line",
]

log = logging.getLogger("raftlb.http")

# Deadline kinds.
DL_NONE = 0
DL_IDLE = 1  # keep-alive, waiting for the next request
DL_HEADER = 2  # a request has started; its headers are not complete
DL_BODY = 3  # headers are complete; the body stalls
DL_LINGER = 4  # answered and half-closed; draining what the client still sends
DL_BODY_NEXT = 5  # (inside data_received only) DL_BODY from the end of this read: see on_headers_complete

LINGER_TIMEOUT = 2.0

class RequestHandler(Protocol):
    """What a listener serves: called once per request, when the request is at the head of its pipeline."""

    def on_request(self, ex: Exchange) -> None: ...


class HttpConnection(asyncio.Protocol):
    """One client connection: parsing, pipelining, limits, timeouts and flow control."""

    __slots__ = (  # (10,000 idle connections cost ~3 KB each: no per-instance dict)
        "_activation_waits", "_header_bytes", "_header_size", "_in_headers", "_paused", "_ready",
        "_skipped_body", "closed", "closing", "deadline", "deadline_kind", "limits", "parser", "parsing",
        "peer_bytes", "peer_host", "queue", "scheme", "server", "stalled_since", "stopped", "transport",
        "writing_paused",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.scheme = server.scheme  # what the client speaks: sent on as X-Forwarded-Proto
        self.limits = server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer_host = ""
        self.peer_bytes = b""
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.closing = False
        self.closed = False
        self.stopped = False  # a request was refused or the stream broke: parse nothing more
        self._activation_waits = False  # the next pipelined request waits for the client to read
        self._paused = 0
        # The client does not take what it is sent (asyncio paused our writing), and since when (monotonic;
        # 0.0 while it keeps up). Plain attributes, not properties: the relay reads them per request.
        self.writing_paused = False
        self.stalled_since = 0.0
        self._in_headers = False
        self._header_bytes = 0
        self._header_size = 0
        self._ready: Exchange | None = None  # its head is complete: handed to the handler after this feed
        self._skipped_body: Exchange | None = None  # an ignored Upgrade: its body is framed by a new parser
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
        self.peer_bytes = self.peer_host.encode()
        transport.set_write_buffer_limits(high=self.limits.write_buffer_high)
        server = self.server
        if server.ssl is not None:  # (h2 chosen by ALPN: the listener's TLS context offered it)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                self._become_h2(b"")
                return
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
        self._fail_all("client_closed")

    def eof_received(self) -> bool | None:
        # The client half-closed. Requests already received are still answered; then the connection closes.
        if self.deadline_kind == DL_LINGER or not self.queue:
            return None  # (lingering: the answer is out, and the client is done sending)
        self.closing = True
        return True

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.stalled_since = time.monotonic()
        if self.queue:
            cb = self.queue[0].on_pause_writing
            if cb is not None:
                cb()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.stalled_since = 0.0
        if self._activation_waits:
            self._activation_waits = False
            self._activate_next()
        elif self.queue:
            cb = self.queue[0].on_resume_writing
            if cb is not None:
                cb()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.stopped:
            return
        if self._in_headers or self.parsing is None:
            self._header_bytes += len(data)
        while True:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                if self.stopped:  # (CONNECT, refused; or a refused request before it)
                    break
                data = data[exc.args[0]:] if exc.args and isinstance(exc.args[0], int) else b""
                self._ignore_upgrade()
                if data:
                    continue
            except httptools.HttpParserError as exc:
                if self._h2_preface(data, exc):
                    return
                if not self.stopped:  # after a refusal, what follows is not parsed, let alone answered
                    self._protocol_error(BadRequest(_parser_error_detail(exc)))
            else:
                if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
                    limit = self.limits.max_header_bytes
                    self._protocol_error(HeadersTooLarge(f"request headers exceed {limit} bytes"))
            break
        if self.deadline_kind == DL_BODY_NEXT:
            self.deadline_kind = DL_BODY
            self.deadline = time.monotonic() + self.limits.body_timeout
        ex = self._ready
        if ex is not None:
            # The handler sees a request only once llhttp has accepted everything it was given with it: llhttp
            # checks some framing (an invalid Transfer-Encoding, say) only after on_headers_complete, and a
            # request handed over from inside that callback could reach a node before it is refused.
            self._ready = None
            if not ex.finished and not self.closed and self.queue and self.queue[0] is ex:
                if ex.error is None:  # (`_activate`, inlined: this is per request)
                    self.server.requests += 1
                    self.server.handler.on_request(ex)
                else:
                    self._activate(ex)

    def _h2_preface(self, data: bytes, exc: Exception) -> bool:
        """llhttp stops at HTTP/2's client preface (`PRI * HTTP/2.0`, "Pause on PRI/Upgrade"): a client
        that speaks HTTP/2 with prior knowledge (h2c). At the start of the connection, it is handed over to
        an `H2ServerConnection` with what it has sent (True). (Only here, where llhttp raises: nothing is
        added to the per-request path.)"""
        ex = self.parsing
        if self.queue or ex is None or ex.target != b"*" or "PRI" not in str(exc):
            return False
        if not self.server.h2.enabled:
            return False
        # All the bytes of the connection so far (no request came before): the preface, then frames.
        extra = self._header_bytes - len(PREFACE)
        if extra < 0 or extra > len(data):
            return False
        tail = data[:len(data) - extra]  # (the end of the preface that came in this read)
        if not PREFACE.endswith(tail):
            return False
        self._become_h2(PREFACE + data[len(data) - extra:])
        return True

    def _become_h2(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self.closed = self.stopped = True  # (this object is done: the transport has a new protocol)
        self.deadline_kind = DL_NONE
        self.server.connections.discard(self)
        H2ServerConnection(self.server).adopt(transport, self.peer_host, data)

    def _ignore_upgrade(self) -> None:
        """llhttp stopped after a request that asked to switch protocols (`Connection: upgrade` + `Upgrade`,
        e.g. curl's h2c). We may ignore Upgrade (RFC 9110 §7.8) and do: the request is served as plain
        HTTP/1.1, and the Upgrade header is hop-by-hop, so it never goes upstream. But llhttp treats the
        bytes after such a head as the new protocol's: it reports no body, whatever Content-Length or
        Transfer-Encoding say. Parsing them as HTTP again from there would read a body as a request of its
        own (request smuggling), so the body is framed as RFC 9112 §6 says: a new parser is put in the body
        state with a head of the same framing (no callbacks of its reach the request), and the request's
        body and whatever follows it are parsed from there."""
        self.parser = parser = httptools.HttpRequestParser(self)
        ex = self._skipped_body
        if ex is None:
            return  # no body: the next request starts right after the head
        self.parsing = None  # (the head below is not a request: on_message_begin ignores it)
        if ex.chunked:
            parser.feed_data(b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
        else:
            parser.feed_data(b"PUT / HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % (ex.content_length or 0))

    # -- parser callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._skipped_body is not None:
            return  # the framing head of an ignored Upgrade's body (see _ignore_upgrade)
        if self.stopped:
            # A request before this one was refused: the connection closes after answering it, and
            # nothing behind it in the stream may reach a handler (or a node).
            self.parsing = None
            return
        ex = self.parsing = Exchange(self)
        self._in_headers = True
        self._header_size = 0
        self.deadline_kind = DL_HEADER
        self.deadline = ex.started_at + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.target += url  # (llhttp may hand the target over in pieces; usually one, and `b"" + url` is url)
        self._header_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        size = self._header_size = self._header_size + len(name) + len(value) + 4
        headers = ex.headers
        limits = self.limits
        # (The headers kept are those under both limits: their count is the count so far.)
        if len(headers) >= limits.max_headers or size > limits.max_header_bytes:
            if ex.error is None:
                ex.error = HeadersTooLarge(
                    f"more than {limits.max_headers} request headers" if len(headers) >= limits.max_headers
                    else f"request headers exceed {limits.max_header_bytes} bytes")
            return
        headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            ex = self._skipped_body
            if ex is not None:
                # The framing head of an ignored Upgrade's body: its body callbacks are the request's.
                self._skipped_body = None
                self.parsing = ex
            return
        self._in_headers = False
        self._header_bytes = 0
        parser = self.parser
        target = ex.target
        method = ex.method_bytes = parser.get_method()
        ex.method = METHODS.get(method) or method.decode("ascii")
        version = parser.get_http_version()
        http11 = ex.http11 = version == "1.1"
        if target[:1] != b"/" and target != b"*" and method != b"CONNECT":  # (CONNECT is refused below)
            _absolute_form(ex, target)
        if not http11 and version != "1.0" and ex.error is None:
            ex.error = VersionNotSupported(f"HTTP/{version} is not spoken here (HTTP/1.1 and 1.0 are)")
        keep_alive = ex.keep_alive = parser.should_keep_alive()
        if keep_alive and not http11 and _says_close(ex.headers):
            ex.keep_alive = False  # HTTP/1.0 with both keep-alive and close: close wins (RFC 9112 §9.3)
        if method == b"HEAD":
            ex.head_only = True
        if ex.error is None:
            _inspect_framing(ex, self.limits)
        has_body = ex.has_body
        if ex.error is not None:
            self.stopped = True
            ex.keep_alive = False
            self.pause_reading(PAUSE_BROKEN)
        elif has_body and parser.should_upgrade():
            self._skipped_body = ex  # llhttp will skip this body: see _ignore_upgrade
        queue = self.queue
        queue.append(ex)
        if len(queue) == 1:
            self._ready = ex  # handed over once the data it came in is parsed (see data_received)
        else:
            self.pause_reading(PAUSE_PIPELINE)
        if self.deadline_kind == DL_LINGER:
            pass  # refused and answered at once: the connection is already closing
        elif has_body and not ex.finished:
            # The body deadline starts once this read is parsed (data_received): a body that comes with its
            # head needs none.
            self.deadline_kind = DL_BODY_NEXT
        else:
            self.deadline_kind = DL_NONE

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.finished or ex.error is not None:
            return
        limits = self.limits
        received = ex.body_received = ex.body_received + len(body)
        if received > limits.max_body_bytes:
            self._fail_body(ex, PayloadTooLarge(f"request body exceeds {limits.max_body_bytes} bytes"))
            return
        if self.deadline_kind == DL_BODY:
            self.deadline = time.monotonic() + limits.body_timeout
        sink = ex.on_body
        if sink is not None:
            sink(body)
            return
        buf = ex.body_buf
        if buf is None:
            ex.body_buf = [body]
        else:
            buf.append(body)
        buffered = ex.body_buffered = ex.body_buffered + len(body)
        if buffered > limits.write_buffer_high:
            self.pause_reading(PAUSE_BODY)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None or ex is self._skipped_body:
            return  # (an ignored Upgrade: llhttp ends the message early; its body is still to come)
        self.parsing = None
        ex.body_done = True
        if self.deadline_kind == DL_BODY or self.deadline_kind == DL_BODY_NEXT:
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

    def response_done(self, ex: Exchange) -> None:
        """`ex` has been answered in full (`Exchange.end`): the next request's turn, or close."""
        # The exchange is over: its callbacks go (see Exchange.drop_callbacks; inlined, this is per request).
        ex.on_body = ex.on_body_end = ex.on_abort = ex.on_pause_writing = ex.on_resume_writing = None
        queue = self.queue
        if queue and queue[0] is ex:
            queue.popleft()
        if not ex.body_done and not self.closed:
            self._linger()
            return
        if ex.close_after or self.closing:
            self._close()
            return
        if queue:
            asyncio.get_running_loop().call_soon(self._activate_next)
        else:
            if self._paused & PAUSE_PIPELINE:
                self.resume_reading(PAUSE_PIPELINE)
            if self.parsing is None:
                self.deadline_kind = DL_IDLE
                self.deadline = time.monotonic() + self.limits.idle_timeout

    def _activate_next(self) -> None:
        if self.closed or not self.queue:
            return
        if self.writing_paused:
            # A client that pipelines but does not read: its next request waits until it reads what it
            # has been sent, so each connection costs one bounded buffer, however much it asks for.
            self._activation_waits = True
            return
        if len(self.queue) == 1:
            self.resume_reading(PAUSE_PIPELINE)
        self._activate(self.queue[0])

    # -- errors -------------------------------------------------------------------------------------------

    def _protocol_error(self, err: ProxyError) -> None:
        """The byte stream is unusable from here on: answer in order, then close."""
        self.stopped = True
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
        self.stopped = True
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
        if kind in (DL_IDLE, DL_LINGER):
            self._close()
        elif kind == DL_HEADER:
            self._protocol_error(RequestTimeout("request headers not received in time"))
        elif kind == DL_BODY:
            ex = self.parsing
            if ex is not None:
                self._fail_body(ex, RequestTimeout("request body not received in time"))
            else:
                self._close()

    def on_send_timeout(self) -> None:
        """The client has taken nothing of what it is sent for `send_timeout`: cut it off, so a client that
        never reads does not keep a node connection (and buffers) forever."""
        self.server.send_timeouts += 1
        self._fail_all("send_timeout")
        self.abort("send_timeout")

    def _fail_all(self, reason: str) -> None:
        for ex in self.queue:
            if not ex.finished:
                ex.finished = True
                if ex.on_abort is not None:
                    ex.on_abort(reason)
            ex.drop_callbacks()
        self.queue.clear()

    def _linger(self) -> None:
        """Close while the client may still be sending its body (RFC 9112 §9.6): send FIN after the
        answer, read and drop what still comes for a moment, then close. Closing at once with unread
        bytes would make the kernel reset the connection, and the client might never see the answer
        (a 413 to an upload, say)."""
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            self._close()
            return
        self.stopped = True  # data_received drops everything from here on
        transport.write_eof()
        self._paused = 0
        transport.resume_reading()
        self._set_deadline(DL_LINGER, LINGER_TIMEOUT)

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


def _absolute_form(ex: Exchange, target: bytes) -> None:
    """`GET http://host/path HTTP/1.1` (RFC 9112 §3.2.2): the target becomes origin-form (`/path`), for
    routing and for the node, and its authority replaces the Host header the request carried. It must still
    carry exactly one (none is allowed in HTTP/1.0): RFC 9112 §3.2 asks for a 400 otherwise, whatever the
    form of the target."""
    hosts = sum(1 for k, _ in ex.headers if k == b"host")
    if hosts > 1 or (hosts == 0 and ex.http11):
        if ex.error is None:
            ex.error = BadRequest("exactly one Host header is required")
        return
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        if ex.error is None:
            ex.error = BadRequest("request target must be a path (or an absolute http URL)")
        return
    end = len(rest)
    for c in (b"/", b"?", b"#"):
        i = rest.find(c)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        if ex.error is None:
            ex.error = BadRequest("absolute request target without a usable authority")
        return
    ex.target = path if path.startswith(b"/") else b"/" + path
    ex.headers = [(k, v) for k, v in ex.headers if k != b"host"]
    ex.headers.append((b"host", authority))


# The methods' names as str, so a request's is not decoded each time (others are).
METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")}

# The request headers that `_inspect_framing` looks at.
_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"expect", b"host"})

# Content-Length values seen, and their numbers (clients repeat sizes; `int()` on bytes costs more than a
# lookup). Bounded: once full, new values are parsed each time.
_LENGTHS: dict[bytes, int] = {}
_LENGTHS_MAX = 4096


def _inspect_framing(ex: Exchange, limits: LimitsConfig) -> None:
    """Body framing and the request-level checks that llhttp leaves to us (RFC 9112 §6)."""
    cl: bytes | None = None
    te_seen = False
    host_count = 0
    for name, value in ex.headers:
        if name not in _FRAMING_HEADERS:
            continue
        if name == b"host":
            host_count += 1
        elif name == b"content-length":
            if cl is not None and cl != value.strip():
                ex.error = BadRequest("conflicting Content-Length headers")
                return
            cl = value.strip()
        elif name == b"transfer-encoding":
            te_seen = True
            if value.strip().lower() != b"chunked":
                ex.error = BadRequest("unsupported Transfer-Encoding (only 'chunked')")
                return
        elif value.strip().lower() == b"100-continue":  # (Expect)
            # An HTTP/1.0 client does not know 100 Continue: its expectation is ignored (RFC 9110 §10.1.1).
            ex.expect_continue = ex.http11
        else:
            ex.error = ExpectationFailed("unsupported Expect")
            return
    if te_seen and cl is not None:
        ex.error = BadRequest("both Content-Length and Transfer-Encoding")
        return
    if host_count != 1 and (host_count > 1 or ex.http11):
        ex.error = BadRequest("exactly one Host header is required")
        return
    if ex.method_bytes == b"CONNECT":
        ex.error = MethodNotAllowed("CONNECT is not supported")
        return
    if te_seen:
        ex.chunked = ex.has_body = True
        if not ex.http11:
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing: answer it, then
            # close the connection.
            ex.keep_alive = False
    elif cl is not None:
        length = _LENGTHS.get(cl)
        if length is None:
            if not cl.isdigit():
                ex.error = BadRequest("invalid Content-Length")
                return
            length = int(cl)
            if len(_LENGTHS) < _LENGTHS_MAX:
                _LENGTHS[cl] = length
        ex.content_length = length
        ex.has_body = length > 0
        if length > limits.max_body_bytes:
            ex.error = PayloadTooLarge(f"request body exceeds {limits.max_body_bytes} bytes")


def _says_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """A `Connection` header has the `close` option (llhttp lets an HTTP/1.0 `keep-alive` override it)."""
    return any(k == b"connection" and b"close" in (t.strip().lower() for t in v.split(b","))
               for k, v in headers)


def _parser_error_detail(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"malformed request: {text}"


class HttpServer:
    """A listening socket and its connections. Lifecycle: `start()` → serve → `drain()` → `close()`."""

    def __init__(self, handler: RequestHandler, limits: LimitsConfig, max_connections: int = 10000,
                 name: str = "http", h2: H2Config | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.h2 = h2 or H2Config()  # (HTTP/2 beside HTTP/1.1: see raftlb.http.h2server)
        self.max_connections = max_connections
        self.name = name
        self.connections: set[HttpConnection | H2ServerConnection] = set()
        self.requests = 0
        self.rejected_connections = 0
        self.send_timeouts = 0  # connections cut because the client stopped reading (limits.send_timeout)
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.host = ""
        self.port = 0
        self.ssl: SSLContext | None = None
        self.scheme = b"http"  # what the client spoke to this listener: sent on as X-Forwarded-Proto

    def __repr__(self) -> str:
        return f"<HttpServer {self.name} {self.host}:{self.port} [{len(self.connections)} connections]>"

    async def start(self, host: str, port: int, reuse_port: bool = False,
                    ssl: SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.scheme = b"https" if ssl is not None else b"http"  # (before the first connection is accepted)
        self._server = await loop.create_server(
            lambda: HttpConnection(self), host, port, backlog=4096, reuse_port=reuse_port or None, ssl=ssl,
            ssl_handshake_timeout=self.limits.header_timeout if ssl is not None else None)
        self.ssl = ssl
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        lim = self.limits
        tick = min(lim.header_timeout, lim.body_timeout, lim.idle_timeout, lim.send_timeout) / 4
        tick = max(0.05, min(tick, 0.5))
        self._sweeper = asyncio.get_running_loop().call_later(tick, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.connections if c.deadline_kind and c.deadline <= now]:
            conn.on_deadline(now)
        stalled = now - self.limits.send_timeout
        for conn in [c for c in self.connections if c.stalled_since and c.stalled_since <= stalled]:
            conn.on_send_timeout()
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
