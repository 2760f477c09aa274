"""Downstream HTTP/2: one `H2ServerConnection` (an asyncio.Protocol around h2's sans-IO `H2Connection`) per
client connection that speaks HTTP/2, beside HTTP/1.1 on the same listener.

A connection becomes HTTP/2 in one of two ways, both decided by `raftlb.http.server.HttpConnection`, which
then hands its transport over (`adopt`): TLS with ALPN `h2`, or a cleartext connection that opens with the
client preface (`PRI * HTTP/2.0`, "prior knowledge", what gRPC clients and `etcdctl` send).

Each stream becomes an `H2Exchange`: the same `Exchange` the listener's `RequestHandler` serves for HTTP/1,
so a request over HTTP/2 goes through the same rules (routing, holds, fencing, re-sends, X-Raft-* headers).
The exchange's answer (a status line and header lines, body parts, the end) becomes HEADERS and DATA frames
here; the stream object (`H2Stream`) is the exchange's `Connection`: its flow control (the client's window
for the answer, ours for the request body) is what `writing_paused` and `pause_reading` mean for it.

Limits: concurrent streams, header list size (`limits.max_header_bytes`, `limits.max_headers`), body size,
idle timeout, the send timeout (per stream, for an answer the client's windows hold back); frames longer
than SETTINGS_MAX_FRAME_SIZE are refused as soon as their header arrives. Streams reset by the client, or
reset because of it, and frames that are work for nothing (SETTINGS, PING, PRIORITY, unknown types, empty
DATA) are rate bounded (the "rapid reset" and flood attacks end in GOAWAY ENHANCE_YOUR_CALM). After a
connection error the GOAWAY goes out before the close (see `_close_on_error`). Graceful drain sends GOAWAY
and finishes the streams already open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from raftlb.config.model import H2Config, LimitsConfig
from raftlb.core import grpc
from raftlb.errors import (
    BadRequest,
    HeadersTooLarge,
    MethodNotAllowed,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
)
from raftlb.http.exchange import FRAMING_LENGTH, FRAMING_NONE, PAUSE_BODY, Exchange

log = logging.getLogger("raftlb.http")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Deadline kinds (as HttpConnection's: the listener's sweep reads `deadline_kind` and `deadline`).
DL_NONE = 0
DL_IDLE = 1
DL_STREAMS = 2  # a stream's request body stalls, or its client's window stays shut: see `on_deadline`

# Response headers that are HTTP/1 connection framing: they have no place in HTTP/2 (RFC 9113 §8.2.2).
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                         b"te"})
# Request headers not passed on: the request is re-framed for the node (the proxy adds its own framing).
_REQUEST_DROP = frozenset({b"expect", b"te"})

RATE_WINDOW = 1.0  # seconds over which stream resets and control frames are counted
LINGER_TIMEOUT = 2.0  # after a connection error, what the client still sends is read and dropped this long


class StreamHandler(Protocol):
    """What serves the exchanges (`raftlb.http.server.RequestHandler`)."""

    def on_request(self, ex: Exchange) -> None: ...


class H2Host(Protocol):
    """What an HTTP/2 connection needs of its listener (`raftlb.http.server.HttpServer`)."""

    requests: int
    send_timeouts: int
    rejected_connections: int

    @property
    def handler(self) -> StreamHandler: ...
    @property
    def limits(self) -> LimitsConfig: ...
    @property
    def h2(self) -> H2Config: ...
    @property
    def scheme(self) -> bytes: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def connections(self) -> set[Any]: ...


class H2Exchange(Exchange):
    """An `Exchange` whose answer goes out as HTTP/2 frames on its stream instead of HTTP/1 bytes."""

    __slots__ = ("stream", "grpc_status")

    http2 = True

    def __init__(self, stream: H2Stream) -> None:
        super().__init__(stream)
        self.stream = stream
        self.grpc_status = -1  # a gRPC call's final status, once known (the access log's)

    def send_parts(self, parts: list[bytes], framing: int, length: int = 0, body: bytes = b"") -> None:
        if self.response_started or self.finished:
            return
        self.response_started = True
        status, headers = h2_head(b"".join(parts), framing, length)
        stream = self.stream
        if framing == FRAMING_NONE or self.head_only:
            stream.send_head(headers, True)  # (no body will follow: END_STREAM on the HEADERS frame)
        elif body and framing == FRAMING_LENGTH:
            stream.send_head(headers, False)
            stream.send_data(body, len(body) >= length)  # (the whole body: END_STREAM on its last frame)
        else:
            stream.send_head(headers, False)

    def send_body(self, data: bytes) -> None:
        if not self.finished and data:
            self.stream.send_data(data)

    def respond_error(self, err: ProxyError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """One of raftlb's errors: for a gRPC call, the gRPC status it maps to (Trailers-Only, or trailers
        when the answer has started), which is what a gRPC client reads; else the HTTP error."""
        if not grpc.is_grpc(self.header(b"content-type")):
            super().respond_error(err, headers)
            return
        if self.finished:
            return
        self.error = err
        self.status = self.status or 200
        self.grpc_status = grpc.status_for(err)
        stream = self.stream
        if self.response_started:
            stream.trailers = grpc.error_answer(err, headers_sent=True)
            self.end()
            return
        self.response_started = True
        self.finished = True
        stream.send_head(grpc.error_answer(err), True)
        stream.response_done(self)

    def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.stream.finish()
        self.stream.response_done(self)

    def abort(self, reason: str = "aborted") -> None:
        """The answer cannot be completed: reset this stream (the connection and its other streams go on)."""
        if self.finished:
            return
        self.finished = True
        self.stream.abort(reason)


def h2_head(head: bytes, framing: int, length: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """An HTTP/1 response head as an exchange writes it (status line, header lines, no framing headers) as
    the status and headers of an HTTP/2 HEADERS frame: names in lower case, hop-by-hop headers dropped, a
    Content-Length added for a length-framed answer."""
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    status = status_line[1] if len(status_line) > 1 else b"502"
    headers: list[tuple[bytes, bytes]] = [(b":status", status)]
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name in _HOP_BY_HOP or name == b"content-length":
            continue
        headers.append((name, value.strip()))
    if framing == FRAMING_LENGTH:
        headers.append((b"content-length", b"%d" % length))
    return status, headers


class H2Stream:
    """One HTTP/2 stream: the `Connection` its exchange writes to, and the flow control in both directions."""

    __slots__ = (
        "body_at", "closed", "closing", "conn", "ex", "head_sent", "paused", "peer_bytes", "peer_host",
        "pending", "pending_bytes", "pending_end", "scheme", "stalled_at", "stream_id", "trailers",
        "transport", "unacked", "writing_paused",
    )

    def __init__(self, conn: H2ServerConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.transport = conn.transport
        self.peer_host = conn.peer_host
        self.peer_bytes = conn.peer_bytes
        self.scheme = conn.scheme
        self.closing = False
        self.closed = False
        self.writing_paused = False
        self.paused = 0  # PAUSE_* reasons: the request body's window is not given back while any is set
        self.unacked = 0  # request body bytes received and not yet given back to the client's window
        self.pending: list[bytes] = []  # answer bytes the client's window does not take yet
        self.pending_bytes = 0
        self.pending_end = False  # the answer is complete once `pending` is sent
        self.head_sent = False
        self.body_at = 0.0  # the request body's last progress (monotonic), while it is still coming
        self.stalled_at = 0.0  # since when the client's window has held the answer back (0.0: it has not)
        self.trailers: list[tuple[bytes, bytes]] | None = None  # sent after the answer's body, to end it
        self.ex = H2Exchange(self)

    def __repr__(self) -> str:
        return f"<H2Stream {self.stream_id} pending={self.pending_bytes}>"

    # -- Connection (what the exchange calls) --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """HTTP/1 bytes (only `100 Continue`, which HTTP/2 requests here never ask for): nothing to send."""

    def writelines(self, parts: Any) -> None:
        """(As `write`.)"""

    def pause_reading(self, reason: int) -> None:
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.conn.acknowledge(self.stream_id, unacked)

    def response_done(self, ex: Exchange) -> None:
        ex.drop_callbacks()

    def abort(self, reason: str) -> None:
        self.pending = []
        self.pending_bytes = 0
        self.closed = True
        self.conn.reset(self, ErrorCodes.INTERNAL_ERROR)

    # -- the answer -----------------------------------------------------------------------------------------

    def send_head(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.closed:
            return
        self.head_sent = True
        self.conn.send_headers(self, headers, end)

    def send_data(self, data: bytes, end: bool = False) -> None:
        if self.closed or self.pending_end:
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.pending_end = end
        self.conn.pump(self)

    def finish(self) -> None:
        if self.closed or self.pending_end:
            return
        self.pending_end = True
        self.conn.pump(self)


class H2ServerConnection(asyncio.Protocol):
    """One client connection speaking HTTP/2: its streams, limits, timeouts and flow control."""

    def __init__(self, server: H2Host) -> None:
        self.server = server
        self.limits = server.limits
        self.settings = server.h2
        self.scheme = server.scheme
        self.transport: asyncio.Transport | None = None
        self.peer_host = ""
        self.peer_bytes = b""
        # What clients send is checked by h2 (pseudo-headers, names, connection-specific fields); what raftlb
        # sends is made well-formed by raftlb (names in lower case, hop-by-hop fields dropped: `h2_head`, the
        # HTTP/2 adapter's ANSWER_DROP), so h2's second pass over it is skipped: ~15% of h2's cost per answer.
        config = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True,
                                 validate_outbound_headers=False, normalize_outbound_headers=False)
        self.h2 = H2Connection(config=config)
        self.streams: dict[int, H2Stream] = {}
        self.closing = False  # draining: GOAWAY sent, streams above `last_stream` are refused
        self.closed = False
        self.last_stream = 0
        self.writing_paused = False
        self.stalled_since = 0.0
        self.deadline = 0.0
        self.deadline_kind = DL_NONE
        self._flush_scheduled = False
        self._linger: asyncio.TimerHandle | None = None
        self._window_start = 0.0
        self._resets = 0
        self._controls = 0
        self._frame_left = len(PREFACE)  # bytes of the preface, then of the current frame, still to come
        self._frame_head = b""  # a frame header received in pieces
        self.requests = 0

    def __repr__(self) -> str:
        return f"<H2ServerConnection {self.peer_host} streams={len(self.streams)}>"

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def adopt(self, transport: asyncio.Transport, peer_host: str, data: bytes = b"") -> None:
        """Take over a transport from the HTTP/1 connection that saw it start as HTTP/2 (`data`: what it has
        read so far, the preface included)."""
        self.peer_host = peer_host
        self.peer_bytes = peer_host.encode()
        transport.set_protocol(self)
        self.connection_made(transport)
        if data:
            self.data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if not self.peer_host:
            peer = transport.get_extra_info("peername")
            self.peer_host = peer[0] if isinstance(peer, tuple) else ""
            self.peer_bytes = self.peer_host.encode()
        server = self.server
        server.connections.add(self)
        limits, settings, h2 = self.limits, self.settings, self.h2
        # The limits are in force from the first frame (as initial values, not as a change that waits for
        # the client's acknowledgement); initiate_connection announces them.
        h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
            SettingCodes.ENABLE_PUSH: 0,
        })
        h2.decoder.max_header_list_size = limits.max_header_bytes
        h2.initiate_connection()
        if len(server.connections) > server.max_connections:
            # (HTTP/1's 503 for this, in HTTP/2's terms: no stream will be served, come back later)
            server.rejected_connections += 1
            h2.close_connection(ErrorCodes.REFUSED_STREAM)
            self._flush()
            self._close()
            return
        # The connection's window (65,535 to begin with) shared by the streams' request bodies.
        extra = 4 * settings.initial_window_size - 65535
        if extra > 0:
            h2.increment_flow_control_window(extra)
        self._set_idle()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
        self.server.connections.discard(self)
        for stream in list(self.streams.values()):
            self._client_gone(stream, "client_closed")
        self.streams.clear()

    def pause_writing(self) -> None:
        # The client does not read: stop reading from it too (no more requests, PINGs or SETTINGS to
        # answer into a buffer that does not drain), and pause every stream's upstream.
        self.writing_paused = True
        self.stalled_since = time.monotonic()
        if self.transport is not None and not self.closed:  # (closed: lingering, the input is drained)
            self.transport.pause_reading()
        for stream in list(self.streams.values()):
            self._update_paused(stream)

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.stalled_since = 0.0
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        for stream in list(self.streams.values()):
            self._update_paused(stream)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._frame_sizes_ok(data):
            log.debug("HTTP/2 client %s: frame larger than SETTINGS_MAX_FRAME_SIZE", self.peer_host)
            self.h2.close_connection(ErrorCodes.FRAME_SIZE_ERROR)
            self._close_on_error()
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.debug("HTTP/2 protocol error from %s: %s", self.peer_host, exc)
            self._close_on_error()  # (h2 has queued a GOAWAY)
            return
        request_priority: PriorityUpdated | None = None
        for event in events:
            if isinstance(event, DataReceived):
                if not event.flow_controlled_length and event.stream_ended is None:
                    self._count_control()  # (an empty DATA frame that ends nothing: no work but ours)
                self._on_data(event)
            elif isinstance(event, RequestReceived):
                request_priority = event.priority_updated
                self._on_request(event)
            elif isinstance(event, StreamEnded):
                self._on_stream_ended(event.stream_id)
            elif isinstance(event, WindowUpdated):
                self._on_window(event.stream_id)
            elif isinstance(event, StreamReset):
                self._on_reset(event)
            elif isinstance(event, (PingReceived, RemoteSettingsChanged, UnknownFrameReceived)):
                self._count_control()
            elif isinstance(event, PriorityUpdated):
                # A PRIORITY frame of its own (not a request's HEADERS' priority): legal on any stream, even
                # idle ones, and work for nothing; counted with the control frames, or a flood is free.
                if event is not request_priority:
                    self._count_control()
            elif isinstance(event, TrailersReceived):
                # Request trailers cannot be passed on to an HTTP/1 node: the body ends here.
                self._on_stream_ended(event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                self._close()
                return
            if self.closed:
                return
        self._flush()

    def _frame_sizes_ok(self, data: bytes) -> bool:
        """Whether each frame header in `data` announces a length within SETTINGS_MAX_FRAME_SIZE. (h2 checks
        a frame's length only once it has buffered the whole frame: a header announcing 16 MB would have it
        buffer 16 MB first.)"""
        i, size, limit = 0, len(data), self.h2.max_inbound_frame_size
        while i < size:
            if self._frame_left:
                step = min(self._frame_left, size - i)
                self._frame_left -= step
                i += step
                continue
            head = self._frame_head + data[i:i + 9 - len(self._frame_head)]
            i += len(head) - len(self._frame_head)
            if len(head) < 9:
                self._frame_head = head
                break
            self._frame_head = b""
            self._frame_left = int.from_bytes(head[:3], "big")
            if self._frame_left > limit:
                return False
        return True

    # -- events ---------------------------------------------------------------------------------------------

    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if event.headers is None:
            return
        if self.closing and stream_id > self.last_stream:
            self._refuse(stream_id)
            return
        if self.deadline_kind == DL_IDLE:
            self.deadline_kind = DL_NONE
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        ex = stream.ex
        err = _read_request(ex, event.headers, self.limits)
        if event.stream_ended:
            ex.body_done = True
            if ex.content_length is None and ex.method_bytes in (b"POST", b"PUT", b"PATCH"):
                ex.content_length = 0  # (as an HTTP/1 client says of an empty body)
        else:
            if ex.content_length is None:
                ex.chunked = ex.has_body = True  # a body of unknown length: chunked to the node
            stream.body_at = time.monotonic()
            self._arm(stream.body_at + self.limits.body_timeout)
        if err is not None:
            ex.error = err
            ex.respond_error(err)
            return
        self.server.requests += 1
        self.requests += 1
        self.server.handler.on_request(ex)

    def _on_data(self, event: DataReceived) -> None:
        stream_id = event.stream_id
        size = event.flow_controlled_length or 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.ex.finished and not stream.ex.on_body:
            self.acknowledge(stream_id, size)  # (a stream already answered: its body is dropped)
            return
        ex = stream.ex
        data = event.data or b""
        limits = self.limits
        received = ex.body_received = ex.body_received + len(data)
        if received > limits.max_body_bytes:
            self.acknowledge(stream_id, size)
            self._fail_stream(stream, PayloadTooLarge(f"request body exceeds {limits.max_body_bytes} bytes"))
            return
        stream.body_at = time.monotonic()
        if stream.paused:
            stream.unacked += size
        else:
            self.acknowledge(stream_id, size)
        sink = ex.on_body
        if sink is not None:
            if data:
                sink(data)
            return
        if ex.finished:
            return
        if ex.body_buf is None:
            ex.body_buf = [data]
        else:
            ex.body_buf.append(data)
        ex.body_buffered += len(data)
        if ex.body_buffered > limits.write_buffer_high:
            stream.pause_reading(PAUSE_BODY)

    def _on_stream_ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        ex = stream.ex
        ex.body_done = True
        stream.body_at = 0.0
        if ex.on_body_end is not None and not ex.finished:
            ex.on_body_end()

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        # Resets the client makes h2 send (a frame the stream's state forbids, such as DATA after its
        # END_STREAM: RFC 9113 §5.1) count as its own: they cost a request each just the same ("MadeYouReset",
        # the rapid reset with resets the server is made to send).
        self._count_reset()
        if stream is not None:
            # Like a client that disconnects mid-request on HTTP/1: the request is aborted.
            self._client_gone(stream, "client_closed")
            self._stream_closed()

    def _on_window(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self.pump(stream)
        else:
            for stream in list(self.streams.values()):
                if stream.pending_bytes or stream.pending_end:
                    self.pump(stream)

    def _client_gone(self, stream: H2Stream, reason: str) -> None:
        stream.closed = True
        ex = stream.ex
        if not ex.finished:
            ex.finished = True
            if ex.on_abort is not None:
                ex.on_abort(reason)
        ex.drop_callbacks()

    def _fail_stream(self, stream: H2Stream, err: ProxyError) -> None:
        ex = stream.ex
        if ex.on_abort is not None:
            cb, ex.on_abort = ex.on_abort, None
            cb(err.code)
        if ex.finished:
            return
        ex.respond_error(err)  # (resets the stream when the answer has started)

    # -- rate limits --------------------------------------------------------------------------------

    def _rate_window(self) -> None:
        now = time.monotonic()
        if now - self._window_start > RATE_WINDOW:
            self._window_start = now
            self._resets = self._controls = 0

    def _count_reset(self) -> None:
        self._rate_window()
        self._resets += 1
        if self._resets > self.settings.max_resets_per_second:
            self._calm("too many streams reset")

    def _count_control(self) -> None:
        self._rate_window()
        self._controls += 1
        if self._controls > self.settings.max_control_frames_per_second:
            self._calm("too many SETTINGS/PING frames")

    def _calm(self, why: str) -> None:
        log.info("HTTP/2 client %s: %s, closing", self.peer_host, why)
        self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._close_on_error()

    # -- sending ------------------------------------------------------------------------------------

    def send_headers(self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.closed:
            return
        try:
            self.h2.send_headers(stream.stream_id, headers, end_stream=end)
        except ProtocolError:
            end = True  # (the stream was reset meanwhile)
        self._want_flush()
        if end:
            stream.closed = True
            self._retire(stream)

    def pump(self, stream: H2Stream) -> None:
        """Send what the client's windows take of the stream's answer (its end too, once all is out); the
        stream's upstream pauses while the rest waits."""
        if self.closed or stream.closed:
            return
        h2 = self.h2
        sid = stream.stream_id
        pending = stream.pending
        ended = sent = False
        try:
            while pending:
                window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = pending[0]
                if len(chunk) <= window:
                    pending.pop(0)
                else:
                    pending[0] = chunk[window:]
                    chunk = chunk[:window]
                stream.pending_bytes -= len(chunk)
                ended = not pending and stream.pending_end and stream.trailers is None
                h2.send_data(sid, chunk, end_stream=ended)
                sent = True
            if not pending and stream.pending_end and not ended:
                if not stream.head_sent:
                    h2.send_headers(sid, [(b":status", b"200")], end_stream=stream.trailers is None)
                if stream.trailers is not None:
                    h2.send_headers(sid, stream.trailers, end_stream=True)  # (gRPC's status)
                elif stream.head_sent:
                    h2.end_stream(sid)
                ended = True
        except ProtocolError:
            ended = True  # (the stream is gone: reset by the client meanwhile)
        self._want_flush()
        if ended:
            stream.closed = True
            self._retire(stream)
            return
        if not pending:
            stream.stalled_at = 0.0
        elif sent or not stream.stalled_at:
            # The client's windows hold the rest back: `send_timeout` without taking a byte and the stream
            # is reset (see _stream_deadlines), whatever the size of what waits (a small answer held in a
            # shut window would otherwise keep its stream, and the connection, forever).
            stream.stalled_at = time.monotonic()
            self._arm(stream.stalled_at + self.limits.send_timeout)
        self._update_paused(stream)

    def _retire(self, stream: H2Stream) -> None:
        """The stream's answer is all out: forget it. A request body still arriving is not wanted any more
        (RST_STREAM NO_ERROR, RFC 9113 §8.1)."""
        if self.streams.pop(stream.stream_id, None) is None:
            return
        ex = stream.ex
        # (Not when only the END_STREAM is still to come, as clients that send it in a frame of its own do:
        # a reset would cross it, and a strict client takes that for a protocol error.)
        if not ex.body_done and (ex.content_length is None or ex.body_received < ex.content_length) \
                and not self.closed:
            try:
                self.h2.reset_stream(stream.stream_id, ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
        self._stream_closed()

    def _update_paused(self, stream: H2Stream) -> None:
        paused = self.writing_paused or stream.pending_bytes > self.limits.write_buffer_high
        if paused == stream.writing_paused:
            return
        stream.writing_paused = paused
        ex = stream.ex
        cb = ex.on_pause_writing if paused else ex.on_resume_writing
        if cb is not None:
            cb()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Give `size` bytes of request body back to the client's windows (connection and stream)."""
        if size <= 0 or self.closed:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except (ProtocolError, KeyError):
            pass  # (the stream is gone: h2 still counts the connection window)
        self._want_flush()

    def reset(self, stream: H2Stream, code: ErrorCodes) -> None:
        self.streams.pop(stream.stream_id, None)
        ex = stream.ex
        ex.drop_callbacks()
        if not self.closed:
            try:
                self.h2.reset_stream(stream.stream_id, code)
            except ProtocolError:
                pass
            self._want_flush()
        self._stream_closed()

    def _refuse(self, stream_id: int) -> None:
        try:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        except ProtocolError:
            pass

    def _stream_closed(self) -> None:
        if self.streams:
            return
        if self.closing:
            self._want_flush()
            asyncio.get_running_loop().call_soon(self._close)
        else:
            self._set_idle()

    def _want_flush(self) -> None:
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def _set_idle(self) -> None:
        self.deadline_kind = DL_IDLE
        self.deadline = time.monotonic() + self.limits.idle_timeout

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.server.connections.discard(self)

    def _close_on_error(self) -> None:
        """A connection error, its GOAWAY queued by h2: send it, serve nothing more, half-close, and close
        once the client does or after LINGER_TIMEOUT, reading and dropping what it still sends meanwhile.
        (Closing with unread bytes, as a flood always leaves, makes the kernel reset the connection, and the
        reset can destroy the GOAWAY on its way: the client would never learn why, RFC 9113 §5.4.1.)"""
        self._flush()
        transport = self.transport
        if transport is None or self.closed or not transport.can_write_eof():
            self._close()
            return
        self.closed = True  # (nothing is read or sent any more: data_received drops what comes)
        for stream in list(self.streams.values()):
            self._client_gone(stream, "client_closed")
        self.streams.clear()
        transport.write_eof()
        transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(LINGER_TIMEOUT, transport.close)

    # -- what the listener calls --------------------------------------------------------------------

    def _arm(self, at: float) -> None:
        """A stream deadline at `at`: the connection's deadline is the earliest of them."""
        if self.deadline_kind != DL_STREAMS or at < self.deadline:
            self.deadline_kind = DL_STREAMS
            self.deadline = at

    def on_deadline(self, now: float) -> None:
        kind = self.deadline_kind
        self.deadline_kind = DL_NONE
        if self.closed:
            return
        if kind == DL_IDLE and not self.streams:
            self.h2.close_connection(ErrorCodes.NO_ERROR)
            self._flush()
            self._close()
        elif kind == DL_STREAMS:
            self._stream_deadlines(now)

    def _stream_deadlines(self, now: float) -> None:
        """Streams whose request body has stalled for `body_timeout` (while we were taking it) fail with
        408; streams whose client has kept its window shut for `send_timeout` are reset (HTTP/1's send
        timeout, per stream: the node's answer is not held forever). Then the next deadline is armed."""
        limits = self.limits
        for stream in list(self.streams.values()):
            if stream.body_at and not stream.paused and stream.body_at + limits.body_timeout <= now:
                stream.body_at = 0.0
                self._fail_stream(stream, RequestTimeout("request body not received in time"))
            elif stream.stalled_at and stream.stalled_at + limits.send_timeout <= now:
                self.server.send_timeouts += 1
                stream.stalled_at = 0.0
                self._client_gone(stream, "send_timeout")
                self.reset(stream, ErrorCodes.CANCEL)
        self._flush()
        for stream in self.streams.values():
            if stream.body_at:
                self._arm((now if stream.paused else stream.body_at) + limits.body_timeout)
            if stream.stalled_at:
                self._arm(stream.stalled_at + limits.send_timeout)
        if not self.streams and not self.closing:
            self._set_idle()

    def on_send_timeout(self) -> None:
        """The client has taken nothing for `send_timeout`: cut it off, with every stream."""
        self.server.send_timeouts += 1
        self.abort("send_timeout")

    def abort(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            self._client_gone(stream, reason)
        self.streams.clear()
        if self.transport is not None:
            self.transport.abort()
        self.closed = True
        self.server.connections.discard(self)

    def drain(self) -> None:
        """Server shutdown: GOAWAY (no new streams); the open ones finish, then the connection closes."""
        if self.closing or self.closed:
            return
        self.closing = True
        self.last_stream = self.h2.highest_inbound_stream_id
        # (h2's own close_connection would stop the streams still open from sending: the GOAWAY goes out
        # as a frame of our own, and the connection keeps serving what it has.)
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream
        frame.error_code = ErrorCodes.NO_ERROR
        self._flush()
        if self.transport is not None:
            self.transport.write(frame.serialize())
        if not self.streams:
            self._close()

    @property
    def idle(self) -> bool:
        return not self.streams


def _read_request(ex: Exchange, raw: list[tuple[bytes, bytes]], limits: LimitsConfig) -> ProxyError | None:
    """The request of a HEADERS frame (h2 has checked its pseudo-headers) into the exchange: method,
    target, headers (`:authority` as Host, cookie crumbs joined), Content-Length; an error to answer, or
    None."""
    method = path = authority = b""
    headers = ex.headers
    cookies: list[bytes] = []
    size = 0
    cl: bytes | None = None
    for name, value in raw:
        size += len(name) + len(value) + 32  # (RFC 9113 §6.5.2's measure)
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"content-length":
            cl = value
        if name in _REQUEST_DROP or (name == b"host" and authority):
            continue
        headers.append((name, value))
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if authority:
        headers[:] = [(k, v) for k, v in headers if k != b"host"]
        headers.append((b"host", authority))
    ex.method_bytes = method
    ex.method = method.decode("ascii", "replace")
    ex.target = path or b"/"
    ex.head_only = method == b"HEAD"
    if len(headers) > limits.max_headers:
        return HeadersTooLarge(f"more than {limits.max_headers} request headers")
    if size > limits.max_header_bytes:
        return HeadersTooLarge(f"request headers exceed {limits.max_header_bytes} bytes")
    if method == b"CONNECT":
        return MethodNotAllowed("CONNECT is not supported")
    if ex.target[:1] != b"/":
        return BadRequest("request target must be a path")
    if cl is not None:
        if not cl.isdigit():
            return BadRequest("invalid Content-Length")
        ex.content_length = int(cl)
        ex.has_body = ex.content_length > 0
        if ex.content_length > limits.max_body_bytes:
            return PayloadTooLarge(f"request body exceeds {limits.max_body_bytes} bytes")
    return None

