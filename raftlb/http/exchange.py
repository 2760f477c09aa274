"""One request and its response on a downstream connection, and the wire constants both sides share.

The handler reads the request from an `Exchange` and answers through it; the exchange turns the answer
into bytes (framing, `Connection`, chunk encoding) and hands them to its connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol

from raftlb.errors import ProxyError

# How a response body is delimited on the wire.
FRAMING_NONE = 0  # no body at all (204, 304, or an empty body)
FRAMING_LENGTH = 1  # Content-Length
FRAMING_CHUNKED = 2  # Transfer-Encoding: chunked
FRAMING_CLOSE = 3  # until the connection closes (HTTP/1.0 clients, upstreams without framing)

# Reasons reading from the client is paused; reading resumes when none is left.
PAUSE_PIPELINE = 1  # a later pipelined request waits behind the active one
PAUSE_BODY = 2  # the body is arriving faster than it can be passed on
PAUSE_BROKEN = 4  # the stream cannot be parsed any further



class Connection(Protocol):
    """What an exchange needs of its downstream connection (`raftlb.http.server.HttpConnection` is the one
    there is): where the request came from, and where its answer's bytes go."""

    transport: asyncio.Transport | None
    peer_host: str
    peer_bytes: bytes
    scheme: bytes  # b"http" or b"https": what the client spoke (X-Forwarded-Proto)
    closing: bool
    closed: bool
    writing_paused: bool  # the client does not take what it is sent

    def write(self, data: bytes) -> None: ...
    def writelines(self, parts: Any) -> None: ...
    def pause_reading(self, reason: int) -> None: ...
    def resume_reading(self, reason: int) -> None: ...
    def response_done(self, ex: Exchange) -> None: ...
    def abort(self, reason: str) -> None: ...


REASONS: dict[int, bytes] = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}
REASONS[421] = b"Misdirected Request"

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))
    return line


STATUS_LINES: dict[int, bytes] = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason)
                                  for code, reason in REASONS.items()}

# `content-length: N` + the blank line, for keep-alive HTTP/1.1 answers: made once per length (answers of a
# service tend to repeat their sizes), up to a bound.
_LENGTH_ENDS: dict[int, bytes] = {}
_LENGTH_ENDS_MAX = 4096


def _length_end(length: int) -> bytes:
    line = _LENGTH_ENDS.get(length)
    if line is None:
        line = b"content-length: %d\r\n\r\n" % length
        if len(_LENGTH_ENDS) < _LENGTH_ENDS_MAX:
            _LENGTH_ENDS[length] = line
    return line


class Exchange:
    """One request and its response on a downstream connection.

    The handler reads `method`, `target`, `headers`, attaches a body sink with `set_body_sink` (even for
    requests without a body: `on_end` then fires at once), and answers with `send_head`/`send_body`/`end`,
    `respond_error`, or `abort`. Callbacks it may set: `on_abort(reason)` when the client goes away or the
    request fails mid-body; `on_pause_writing`/`on_resume_writing` for the client's flow control.
    """

    __slots__ = (
        "conn", "method", "method_bytes", "target", "headers", "http11", "keep_alive", "content_length",
        "chunked", "has_body", "expect_continue", "head_only", "error", "body_buf", "body_buffered",
        "body_received",
        "body_done", "on_body", "on_body_end", "on_abort", "on_pause_writing", "on_resume_writing",
        "response_started", "finished", "close_after", "_framing", "started_at", "status",
    )

    http2 = False  # an HTTP/2 stream's exchange (raftlb.http.h2server.H2Exchange)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.method = ""
        self.method_bytes = b""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http11 = True
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.has_body = False  # chunked, or a Content-Length above 0
        self.expect_continue = False
        self.head_only = False
        self.error: ProxyError | None = None
        self.body_buf: list[bytes] | None = None  # body that arrived before the handler attached its sink
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
        self.status = 0

    def __repr__(self) -> str:
        return f"<Exchange {self.method} {self.target!r} status={self.status} done={self.finished}>"

    @property
    def client_addr(self) -> str:
        return self.conn.peer_host

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def drop_callbacks(self) -> None:
        """The exchange is over: forget the handler's callbacks. They are bound methods of an object that
        refers back to this exchange, and without this each request would leave a reference cycle for the
        cyclic garbage collector (~10 objects, and GC pauses that grow with the load)."""
        self.on_body = self.on_body_end = self.on_abort = None
        self.on_pause_writing = self.on_resume_writing = None

    # -- request body -------------------------------------------------------------------------------------

    def set_body_sink(self, on_body: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        """Start receiving the body: buffered chunks are delivered now, the rest as it arrives."""
        self.on_body = on_body
        self.on_body_end = on_end
        if self.expect_continue and not (self.body_received or self.body_done or self.response_started):
            self.expect_continue = False
            self.conn.write(_CONTINUE)
        if self.body_buf:
            buf, self.body_buf, self.body_buffered = self.body_buf, None, 0
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

    def send_head(self, head: bytes, framing: int, length: int = 0, body: bytes = b"") -> None:
        """Write the status line and headers. `head` holds the status line and header lines (each ending in
        CRLF) but not the framing headers, `Connection`, or the blank line: those are added here. A whole
        Content-Length `body` given here goes out in the same write, so no one ever sees the head alone."""
        self.send_parts([head], framing, length, body)

    def send_parts(self, parts: list[bytes], framing: int, length: int = 0, body: bytes = b"") -> None:
        """`send_head` with the head still in pieces (which this extends): one join, one write."""
        if self.response_started or self.finished:
            return
        self.response_started = True
        conn = self.conn
        if framing == FRAMING_LENGTH and self.keep_alive and self.http11 and not self.close_after \
                and not conn.closing and self.error is None:
            # The common case: a keep-alive HTTP/1.1 answer with a Content-Length.
            parts.append(_LENGTH_ENDS.get(length) or _length_end(length))
            if body and not self.head_only:
                parts.append(body)
                self._framing = FRAMING_LENGTH
            else:
                self._framing = FRAMING_NONE if self.head_only else FRAMING_LENGTH
            conn.write(b"".join(parts))
            return
        if framing == FRAMING_CHUNKED and not self.http11:
            framing = FRAMING_CLOSE
        if not self.keep_alive or conn.closing or framing == FRAMING_CLOSE or self.error is not None:
            self.close_after = True
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
        elif body and framing == FRAMING_LENGTH:
            parts.append(body)
        self._framing = framing
        conn.write(b"".join(parts))

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
        self.conn.response_done(self)

    def respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                content_type: bytes = b"application/json") -> None:
        """A whole response at once (errors, small answers)."""
        self.status = status
        parts = [status_line(status), b"content-type: ", content_type, b"\r\n"]
        if headers:
            for k, v in headers:
                parts += (k, b": ", v, b"\r\n")
        self.send_parts(parts, FRAMING_LENGTH if body or status not in (204, 304) else FRAMING_NONE,
                        len(body), body)
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

