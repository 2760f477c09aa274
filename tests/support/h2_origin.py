"""A small real HTTP/2 origin for tests of raftlb's upstream HTTP/2 (`raftlb.proxy.h2pool`): an asyncio server
on 127.0.0.1 speaking h2c with prior knowledge (or TLS with ALPN `h2` when given a context), built on h2's
server side. What it answers is chosen by the request's path:

    /echo        200 with the request body, once the request has ended
    /trailers    200, body "hello", then trailers (grpc-status: 0, grpc-message: ok)
    /only        one HEADERS frame with END_STREAM (gRPC's "trailers-only" answer: grpc-status 14)
    /early       200 "early" at once, without waiting for the request body
    /info        a 103 informational response, then 200 "ok"
    /big/<n>     200 with n bytes, sent as the client's windows allow (`blocked` says when they do not)
    /hold        nothing until `release()`, then 200 "ok"
    /never       never answered
    /refuse      RST_STREAM REFUSED_STREAM
    /reset       RST_STREAM INTERNAL_ERROR
    /drop        200 and a little data, then the connection is closed (a node that dies mid-answer)
    /garbage     bytes that are not HTTP/2 frames (a protocol error on the connection)

`max_concurrent_streams` and `initial_window_size` are announced in its SETTINGS; with `hold_windows` it
keeps request bodies' windows shut until `open_windows()`. `goaway(last_stream_id)` sends a GOAWAY on every
connection and goes on answering the streams up to that id. What it saw (requests, resets, GOAWAYs,
connections) is recorded; `wait_for(predicate)` waits, bounded, until it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

WAIT = 10.0  # every wait is bounded by this

# A DATA frame on stream 0: a connection error (RFC 9113 §6.1).
GARBAGE = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"


@dataclass
class OriginRequest:
    """One request the origin received."""

    conn: OriginConn
    stream_id: int
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False  # END_STREAM received
    answered: bool = False  # the answer has started


class OriginConn(asyncio.Protocol):
    """One client connection to the origin."""

    def __init__(self, origin: H2Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.requests: dict[int, OriginRequest] = {}
        self.open_streams = 0
        self.pending: dict[int, list[bytes]] = {}  # answer bytes not yet sent, per stream
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.unacked: dict[int, int] = {}  # request body bytes whose window is held
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not asyncio.Transport subclasses)
        origin = self.origin
        origin.connections.append(self)
        values = {SettingCodes.INITIAL_WINDOW_SIZE: origin.initial_window_size}
        if origin.max_concurrent_streams is not None:
            values[SettingCodes.MAX_CONCURRENT_STREAMS] = origin.max_concurrent_streams
        self.h2.local_settings = Settings(client=False, initial_values=values)
        self.h2.initiate_connection()
        self.flush()
        origin.notify()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.origin.closed_connections += 1
        self.origin.notify()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.flush()
            self.close()
            return
        origin = self.origin
        for event in events:
            if isinstance(event, RequestReceived):
                self._on_request(event)
            elif isinstance(event, DataReceived):
                req = self.requests.get(event.stream_id)
                size = event.flow_controlled_length or 0
                if req is not None:
                    req.body += event.data or b""
                if origin.hold_windows:
                    self.unacked[event.stream_id] = self.unacked.get(event.stream_id, 0) + size
                elif size:
                    self.h2.acknowledge_received_data(size, event.stream_id)
            elif isinstance(event, StreamEnded):
                origin.ended.append(event.stream_id)
                req = self.requests.get(event.stream_id)
                if req is not None:
                    req.ended = True
                    if req.path == "/echo":
                        self.answer(req, 200, bytes(req.body))
            elif isinstance(event, WindowUpdated):
                for sid in [event.stream_id] if event.stream_id else list(self.pending):
                    self.pump(sid)
            elif isinstance(event, StreamReset):
                origin.resets.append((event.stream_id, event.error_code))
                self._stream_over(event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                origin.goaways_received += 1
            if self.closed:
                return
        self.flush()
        origin.notify()

    def _on_request(self, event: RequestReceived) -> None:
        headers = [(bytes(n), bytes(v)) for n, v in event.headers or []]
        path = dict(headers).get(b":path", b"/").decode()
        req = OriginRequest(self, event.stream_id, path, headers)
        self.requests[event.stream_id] = req
        self.open_streams += 1
        origin = self.origin
        origin.requests.append(req)
        origin.max_open = max(origin.max_open, self.open_streams)
        if event.stream_ended:
            req.ended = True
        sid = event.stream_id
        if path == "/echo" and req.ended:
            self.answer(req, 200, b"")
        elif path == "/trailers":
            self.answer(req, 200, b"hello", [(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
        elif path == "/only":
            # gRPC's "trailers-only" answer: one HEADERS frame that ends the stream.
            req.answered = True
            self.h2.send_headers(sid, [(b":status", b"200"), (b"grpc-status", b"14")], end_stream=True)
            self._stream_over(sid)
        elif path == "/early":
            self.answer(req, 200, b"early")  # (without waiting for the request body)
        elif path == "/info":
            self.h2.send_headers(sid, [(b":status", b"103"), (b"link", b"</a>")])
            self.answer(req, 200, b"ok")
        elif path.startswith("/big/"):
            self.answer(req, 200, b"x" * int(path.rsplit("/", 1)[1]))
        elif path == "/refuse":
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self._stream_over(sid)
        elif path == "/reset":
            self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            self._stream_over(sid)
        elif path == "/drop":
            req.answered = True
            self.h2.send_headers(sid, [(b":status", b"200")])
            self.h2.send_data(sid, b"partial")
            self.flush()
            self.close()
        elif path == "/garbage":
            self.flush()
            if self.transport is not None:
                self.transport.write(GARBAGE)

    def answer(self, req: OriginRequest, status: int, body: bytes,
               trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer `req`: the head now, the body as the windows allow, then its trailers or END_STREAM."""
        if req.answered or self.closed:
            return
        req.answered = True
        sid = req.stream_id
        self.h2.send_headers(sid, [(b":status", str(status).encode()), (b"content-type", b"text/plain")])
        self.pending[sid] = [body] if body else []
        if trailers:
            self.trailers[sid] = trailers
        self.pump(sid)
        self.flush()

    def pump(self, sid: int) -> None:
        parts = self.pending.get(sid)
        if parts is None:
            return
        h2 = self.h2
        try:
            while parts:
                window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                if window <= 0:
                    self.origin.blocked.add(sid)
                    return
                chunk = parts[0]
                if len(chunk) <= window:
                    parts.pop(0)
                else:
                    parts[0] = chunk[window:]
                    chunk = chunk[:window]
                h2.send_data(sid, chunk)
            del self.pending[sid]
            trailers = self.trailers.pop(sid, None)
            if trailers is not None:
                h2.send_headers(sid, trailers, end_stream=True)
            else:
                h2.end_stream(sid)
        except ProtocolError:
            self.pending.pop(sid, None)  # (reset by the client)
        self._stream_over(sid)

    def _stream_over(self, sid: int) -> None:
        if sid in self.requests and sid not in self.pending:
            del self.requests[sid]
            self.open_streams -= 1

    def send_goaway(self, last_stream_id: int, code: ErrorCodes) -> None:
        """A GOAWAY of our own making (h2 would stop answering the streams below it)."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = code
        self.flush()
        if self.transport is not None and not self.closed:
            self.transport.write(frame.serialize())

    def open_windows(self) -> None:
        for sid, size in self.unacked.items():
            with contextlib.suppress(ProtocolError, KeyError):
                self.h2.acknowledge_received_data(size, sid)
        self.unacked.clear()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class H2Origin:
    """The origin server: its settings, and what it has seen."""

    def __init__(self, *, max_concurrent_streams: int | None = None, initial_window_size: int = 65535,
                 hold_windows: bool = False, ssl: ssl_module.SSLContext | None = None) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size
        self.hold_windows = hold_windows
        self.ssl = ssl
        self.port = 0
        self.connections: list[OriginConn] = []
        self.closed_connections = 0
        self.requests: list[OriginRequest] = []
        self.resets: list[tuple[int, ErrorCodes | int]] = []  # RST_STREAM from the client: (stream, code)
        self.goaways_received = 0
        self.ended: list[int] = []  # streams whose request ended (END_STREAM from the client)
        self.blocked: set[int] = set()  # streams whose answer waited for the client's window
        self.max_open = 0  # the most streams open at once on a connection
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: OriginConn(self), "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            self._server.close()

    def notify(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until `predicate()` holds (checked whenever the origin has done something), at most WAIT s."""
        async with asyncio.timeout(WAIT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def release(self) -> None:
        """Answer every /hold request seen so far (200 "ok")."""
        for req in self.requests:
            if req.path == "/hold" and not req.answered and not req.conn.closed:
                req.conn.answer(req, 200, b"ok")
        self.notify()

    def goaway(self, last_stream_id: int, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """A GOAWAY on every open connection; the streams up to `last_stream_id` are still answered."""
        for conn in self.connections:
            if not conn.closed:
                conn.send_goaway(last_stream_id, code)

    def update_settings(self, settings: dict[SettingCodes | int, int]) -> None:
        """New SETTINGS on every open connection (e.g. a higher MAX_CONCURRENT_STREAMS)."""
        for conn in self.connections:
            if not conn.closed:
                conn.h2.update_settings(settings)
                conn.flush()

    def open_windows(self) -> None:
        """Give back the request bodies' windows held so far, and hold them no more."""
        self.hold_windows = False
        for conn in self.connections:
            if not conn.closed:
                conn.open_windows()
        self.notify()

    def drop_all(self) -> None:
        """Close every connection at once (the node was killed)."""
        for conn in self.connections:
            if conn.transport is not None and not conn.closed:
                conn.transport.abort()


@contextlib.asynccontextmanager
async def h2_origin(*, max_concurrent_streams: int | None = None, initial_window_size: int = 65535,
                    hold_windows: bool = False, ssl: ssl_module.SSLContext | None = None,
                    ) -> AsyncIterator[H2Origin]:
    """A started `H2Origin` (the arguments are its constructor's), closed on exit."""
    origin = H2Origin(max_concurrent_streams=max_concurrent_streams, initial_window_size=initial_window_size,
                      hold_windows=hold_windows, ssl=ssl)
    await origin.start()
    try:
        yield origin
    finally:
        origin.close()
