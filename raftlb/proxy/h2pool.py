"""Upstream HTTP/2: multiplexed connections to one node (`H2NodePool`), for nodes that speak HTTP/2 on their
client port (etcd serves gRPC there, over h2c).

An `H2NodePool` keeps up to `max_connections` connections to its node (cleartext with prior knowledge, or
TLS whose context offers ALPN `h2`), each an `H2UpstreamConn`: an asyncio.Protocol around h2's sans-IO
`H2Connection`, client side. A request asks the pool for a stream (`open`) and is told through its
`StreamListener`: `on_stream_ready` with an `UpstreamStream` once a connection has a free slot (the node's
SETTINGS_MAX_CONCURRENT_STREAMS), then the answer (head, data, trailers, end) or an error that says whether
the node can have seen the request (`written`), which is what decides whether the request may be sent again.

Flow control both ways: the node's answers come through a large window (`initial_window_size`, and four
times that for the connection) given back as the listener takes the data, except for a stream whose
listener has paused it (a slow client): that stream's window stays shut until it resumes, while the
connection's window is given back at once, so one slow client does not stall the other streams. A request
body the node's windows do not take yet is buffered on its stream, and its listener is paused above
`write_buffer_high`.

A GOAWAY from the node stops new streams on its connection: the streams it did not take (above its last
stream id) fail as never seen; the others finish (h2 alone would end them all, see raftlb.http.h2client),
and the connection closes once they have. A connection that is lost fails its streams as possibly seen.

The owner's periodic `sweep` enforces each stream's deadline (set by the owner: the stream fails with
`timeout` and is reset) and closes connections idle for `idle_timeout`; a connect, up to the node's first
SETTINGS frame, is bounded by `connect_timeout` on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from ssl import SSLContext
from typing import Protocol, cast

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import NoAvailableStreamIDError, ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes, Settings

from raftlb.http.h2client import client_connection
from raftlb.proxy.pool import MAX_RESPONSE_HEAD

log = logging.getLogger("raftlb.proxy.h2pool")

DEFAULT_WINDOW = 65535  # HTTP/2's initial windows (RFC 9113 §6.9.2)
CONNECTION_WINDOWS = 4  # the connection's receive window, in stream windows


class StreamListener(Protocol):
    """What a stream's owner (the request adapter) is told. After `on_stream_end` or `on_stream_error` (the
    last callback, exactly one of them) nothing more."""

    def on_stream_ready(self, stream: UpstreamStream) -> None: ...
    # A slot on a connected connection is the listener's: it now calls `stream.send_headers(...)`. (May be
    # called from within `H2NodePool.open`, when a connection is up with a free slot.)

    def on_stream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    # The response HEADERS: `status` is `:status`, `headers` the others. Informational 1xx are skipped. A
    # HEADERS frame that ends the stream (gRPC's "trailers-only" answer) is followed by `on_stream_end`.

    def on_stream_data(self, data: bytes) -> None: ...
    def on_stream_trailers(self, headers: list[tuple[bytes, bytes]]) -> None: ...
    def on_stream_end(self) -> None: ...
    # END_STREAM from the node (after the trailers, if any).

    def on_stream_error(self, reason: str, written: bool, timeout: bool = False) -> None: ...
    # `written` False: the node cannot have seen the request (connect failed, REFUSED_STREAM, a GOAWAY below
    # this stream, the connection gone before the HEADERS were sent): safe to send again, anywhere. True: it
    # may have. `timeout`: the stream's deadline passed, or its node was marked down while it was silent.

    def on_stream_pause(self) -> None: ...
    # The node does not take the request body (more than `write_buffer_high` bytes buffered, or the
    # connection's socket does not drain): pause the client's body until `on_stream_resume`.

    def on_stream_resume(self) -> None: ...


class UpstreamStream:
    """One request's stream on a connection to the node: what its listener sends, and its flow control."""

    __slots__ = (
        "closed", "conn", "deadline", "head_received", "last_read", "listener", "local_ended", "offset",
        "pending", "pending_bytes", "pending_end", "pool", "reading_paused", "stream_id", "unacked",
        "writing_paused", "written",
    )

    def __init__(self, conn: H2UpstreamConn, listener: StreamListener) -> None:
        self.conn = conn
        self.pool = conn.pool
        self.listener = listener
        self.stream_id = 0  # assigned when the HEADERS go out (h2 wants new ids in increasing order)
        self.written = False  # the HEADERS have been sent
        self.head_received = False
        self.deadline = 0.0  # monotonic; 0.0: none. Set by the owner, enforced by `H2NodePool.sweep`.
        self.last_read = 0.0  # when the node last sent something on this stream (or the HEADERS went out)
        self.closed = False  # over: no more callbacks
        self.local_ended = False  # END_STREAM sent
        self.pending: deque[bytes] = deque()  # request body the node's windows have not taken yet
        self.offset = 0  # ... of which the first `offset` bytes of pending[0] have been sent
        self.pending_bytes = 0
        self.pending_end = False  # the request ends once `pending` is sent
        self.writing_paused = False  # the listener has been told `on_stream_pause`
        self.reading_paused = False  # the listener's client is slow: the stream's window is not given back
        self.unacked = 0  # answer bytes taken while paused: given back to the node on `resume_reading`

    def __repr__(self) -> str:
        return f"<UpstreamStream node={self.pool.node_id} id={self.stream_id} pending={self.pending_bytes}>"

    def send_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """The request HEADERS: the pseudo-headers (`:method`, `:scheme`, `:authority`, `:path`) first."""
        if not self.closed and not self.written:
            self.conn.send_headers(self, headers, end_stream)

    def send_data(self, data: bytes, end_stream: bool = False) -> None:
        """Request body: sent as far as the node's windows allow, the rest as they open."""
        if self.closed or self.pending_end:
            return
        if data:
            self.pending.append(data)
            self.pending_bytes += len(data)
        self.pending_end = end_stream
        self.conn.pump(self)

    def end(self) -> None:
        """The request is complete: END_STREAM after what is buffered."""
        if self.closed or self.pending_end:
            return
        self.pending_end = True
        self.conn.pump(self)

    def pause_reading(self) -> None:
        """The client is slow: the node's window for this stream's answer is not given back for now."""
        self.reading_paused = True

    def resume_reading(self) -> None:
        if not self.reading_paused:
            return
        self.reading_paused = False
        if self.unacked and not self.closed:
            unacked, self.unacked = self.unacked, 0
            self.conn.open_window(self, unacked)

    def reset(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Abandon the stream: RST_STREAM to the node, no more callbacks, the slot freed."""
        if not self.closed:
            self.closed = True
            self.conn.drop(self, code)

    def fail(self, reason: str, written: bool, timeout: bool = False) -> None:
        """(The connection's: the stream is over with an error; its listener hears it.)"""
        if self.closed:
            return
        self.closed = True
        self.listener.on_stream_error(reason, written, timeout)


def _split_head(raw: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """`:status` and the other headers of a response HEADERS frame (h2 has checked its pseudo-headers)."""
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    for name, value in raw:
        if name[:1] == b":":
            if name == b":status" and value.isdigit():
                status = int(value)
            continue
        headers.append((name, value))
    return status, headers


def _headers(raw: object) -> list[tuple[bytes, bytes]]:
    """h2's header list: tuples of bytes (the configuration asks for no decoding)."""
    return cast(list[tuple[bytes, bytes]], raw) if raw is not None else []


class H2UpstreamConn(asyncio.Protocol):
    """One HTTP/2 connection to the node, carrying many streams."""

    def __init__(self, pool: H2NodePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.h2 = client_connection(H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, UpstreamStream] = {}  # streams whose HEADERS are sent, by id
        self.reserved: list[UpstreamStream] = []  # streams handed out, HEADERS not sent yet
        self.ready = False  # the node's SETTINGS have arrived: streams may open
        self.draining = False  # GOAWAY from the node (or stream ids used up): no new streams
        self.closed = False
        self.writing_paused = False  # the socket does not drain
        self.idle_since = 0.0
        self.credit = 0  # connection window to give back at the end of this read (paused streams' data)
        # The connect's outcome: "" once the node's SETTINGS are in, else why not.
        self.settled: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._flush_scheduled = False

    def __repr__(self) -> str:
        state = ("closed" if self.closed else "draining" if self.draining else "up" if self.ready
                 else "connecting")
        return f"<H2UpstreamConn node={self.pool.node_id} {state} streams={self.used}>"

    @property
    def used(self) -> int:
        """Slots taken: streams open and streams handed out."""
        return len(self.streams) + len(self.reserved)

    def has_slot(self) -> bool:
        return (self.ready and not self.draining and not self.closed
                and self.used < self.h2.remote_settings.max_concurrent_streams)

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport = transport
        if self.closed:  # (the pool closed while connecting)
            transport.close()
            return
        pool = self.pool
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn is not None and alpn != "h2":
            # (No ALPN at all is HTTP/2 with prior knowledge over TLS: tried. Another protocol is a refusal.)
            self.abort(f"node chose {alpn} over TLS, not HTTP/2 (ALPN)")
            return
        transport.set_write_buffer_limits(high=pool.write_buffer_high)
        h2 = self.h2
        # In force from the first frame (initial values, not a change awaiting the node's acknowledgement).
        h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: pool.initial_window_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_RESPONSE_HEAD,
        })
        h2.decoder.max_header_list_size = MAX_RESPONSE_HEAD
        h2.initiate_connection()
        # The connection's window (65,535 to begin with) is shared by every stream's answer: without this a
        # Watch or a large Range would get 64 KiB per round trip.
        extra = CONNECTION_WINDOWS * pool.initial_window_size - DEFAULT_WINDOW
        if extra > 0:
            h2.increment_flow_control_window(extra)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = not self.closed
        self.closed = True
        self.pool.forget(self)
        reason = "connection closed by node" if exc is None else f"connection lost: {exc}"
        if not self.settled.done():
            # (the connect fails: its task tells the waiters; no request was sent on it)
            self.settled.set_result(f"{reason} {NOT_H2_HINT}")
            return
        self.fail_all(reason)
        if was_open:
            self.pool.dispatch()

    def pause_writing(self) -> None:
        self.writing_paused = True
        for stream in self.all_streams():
            self._update_paused(stream)

    def resume_writing(self) -> None:
        self.writing_paused = False
        for stream in self.all_streams():
            self._update_paused(stream)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.debug("HTTP/2 protocol error from node %s: %s", self.pool.node_id, exc)
            self.abort(f"protocol error from node: {exc}")
            return
        for event in events:
            if isinstance(event, DataReceived):
                self._on_data(event)
            elif isinstance(event, ResponseReceived):
                self._on_head(event)
            elif isinstance(event, StreamEnded):
                self._on_ended(event.stream_id)
            elif isinstance(event, TrailersReceived):
                self._on_trailers(event)
            elif isinstance(event, WindowUpdated):
                self._on_window(event.stream_id)
            elif isinstance(event, StreamReset):
                self._on_reset(event)
            elif isinstance(event, InformationalResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.last_read = time.monotonic()
            elif isinstance(event, RemoteSettingsChanged):
                self._on_settings(event)
            elif isinstance(event, ConnectionTerminated):
                self._on_goaway(event)
            # (PINGs are answered by h2; SETTINGS acknowledgements and priorities need nothing.)
            if self.closed:
                return
        if self.credit:
            credit, self.credit = self.credit, 0
            self.h2.increment_flow_control_window(credit)
        self._flush()

    # -- events ----------------------------------------------------------------------------------------------

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        changed = event.changed_settings
        if not self.ready:
            # The node's first SETTINGS: its limits are known, streams may open.
            self.ready = True
            self.idle_since = time.monotonic()
            if not self.settled.done():
                self.settled.set_result("")
            self.pool.dispatch()
            return
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            for stream in list(self.streams.values()):
                if stream.pending or stream.pending_end:
                    self.pump(stream)
        if SettingCodes.MAX_CONCURRENT_STREAMS in changed:
            self.pool.dispatch()

    def _on_head(self, event: ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.closed:
            return
        stream.last_read = time.monotonic()
        stream.head_received = True
        status, headers = _split_head(_headers(event.headers))
        stream.listener.on_stream_head(status, headers)

    def _on_data(self, event: DataReceived) -> None:
        sid = event.stream_id
        size = event.flow_controlled_length or 0
        stream = self.streams.get(sid)
        if stream is not None and not stream.closed:
            stream.last_read = time.monotonic()
            if event.data:
                stream.listener.on_stream_data(event.data)
            if stream.reading_paused and not stream.closed:
                stream.unacked += size
                self.credit += size  # (the connection's share goes back at once: other streams go on)
                return
        if size:
            try:
                self.h2.acknowledge_received_data(size, sid)
            except ProtocolError:
                pass  # (h2 counts the connection's window even for a stream that is gone)

    def _on_trailers(self, event: TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.closed:
            return
        stream.last_read = time.monotonic()
        stream.listener.on_stream_trailers(_headers(event.headers))

    def _on_ended(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        if not stream.local_ended:
            # The answer is complete before the request (a gRPC server ending a call early): close our
            # side too, or the stream would hold its slot.
            stream.local_ended = True
            try:
                if stream.pending:
                    self.h2.reset_stream(sid, ErrorCodes.CANCEL)
                else:
                    self.h2.end_stream(sid)
            except ProtocolError:
                pass
            stream.pending.clear()
            stream.pending_bytes = 0
            self._want_flush()
        if not stream.closed:
            stream.closed = True
            stream.listener.on_stream_end()
        self._freed()

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if stream is None:
            return
        code = event.error_code
        name = code.name if isinstance(code, ErrorCodes) else str(code)
        # REFUSED_STREAM: the node did no processing of the stream (RFC 9113 §8.7), it may go elsewhere.
        stream.fail(f"stream reset by node ({name})", written=code != ErrorCodes.REFUSED_STREAM)
        self._freed()

    def _on_window(self, sid: int) -> None:
        if sid:
            stream = self.streams.get(sid)
            if stream is not None:
                self.pump(stream)
            return
        for stream in list(self.streams.values()):
            if stream.pending or (stream.pending_end and not stream.local_ended):
                self.pump(stream)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        """The node takes no new streams (it may send several GOAWAYs, the last stream id going down)."""
        if not self.ready:
            self.abort("node sent GOAWAY before its SETTINGS")
            return
        self.draining = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        code = event.error_code
        failed = ErrorCodes.NO_ERROR if code is None else code
        # Streams the node did not take, and those not sent yet: never seen by the node.
        gone = [s for s in self.streams.values() if s.stream_id > last]
        for stream in gone:
            del self.streams[stream.stream_id]
        reserved, self.reserved = self.reserved, []
        for stream in gone + reserved:
            stream.fail(f"node sent GOAWAY (last stream {last}): request not taken", written=False)
        if failed != ErrorCodes.NO_ERROR:
            # An error: the node is ending the connection, with what it had taken.
            name = failed.name if isinstance(failed, ErrorCodes) else str(failed)
            self.abort(f"node sent GOAWAY ({name})")
            return
        if not self.streams:
            self.close()
        self.pool.dispatch()  # (waiters need another connection)

    # -- streams ---------------------------------------------------------------------------------------------

    def start(self, listener: StreamListener) -> None:
        """A slot for `listener`: it is told at once."""
        stream = UpstreamStream(self, listener)
        self.reserved.append(stream)
        listener.on_stream_ready(stream)

    def send_headers(self, stream: UpstreamStream, headers: list[tuple[bytes, bytes]],
                     end_stream: bool) -> None:
        if self.closed or stream not in self.reserved:
            return
        self.reserved.remove(stream)
        h2 = self.h2
        try:
            sid = h2.get_next_available_stream_id()
            h2.send_headers(sid, headers, end_stream=end_stream)
        except NoAvailableStreamIDError:
            self.draining = True  # (stream ids are used up: a new connection takes over)
            stream.fail("connection out of stream ids", written=False)
            self._freed()
            return
        except TooManyStreamsError:
            stream.fail("node lowered its stream limit", written=False)  # (the node saw nothing)
            self._freed()
            return
        except ProtocolError as exc:
            # Headers h2 will not send (a missing pseudo-header...): h2 has opened the stream all the same
            # and would count it against the node's limit for good, so this connection takes no more.
            self.draining = True
            stream.fail(f"request headers not sent: {exc}", written=False)
            self._freed()
            return
        stream.stream_id = sid
        stream.written = True
        stream.last_read = time.monotonic()
        if end_stream:
            stream.local_ended = stream.pending_end = True
        self.streams[sid] = stream
        self._want_flush()
        if stream.pending or (stream.pending_end and not stream.local_ended):
            self.pump(stream)  # (body or end given before the HEADERS went out)

    def pump(self, stream: UpstreamStream) -> None:
        """Send what the node's windows take of the stream's request body, and its end once all is out."""
        if self.closed or stream.closed or not stream.stream_id or stream.local_ended:
            return
        h2 = self.h2
        sid = stream.stream_id
        pending = stream.pending
        try:
            while pending:
                window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = pending[0]
                start = stream.offset
                if len(chunk) - start <= window:
                    pending.popleft()
                    stream.offset = 0
                    part = chunk[start:] if start else chunk
                else:
                    stream.offset = start + window
                    part = chunk[start:start + window]
                stream.pending_bytes -= len(part)
                end = not pending and stream.pending_end
                h2.send_data(sid, part, end_stream=end)
                if end:
                    stream.local_ended = True
            if not pending and stream.pending_end and not stream.local_ended:
                h2.end_stream(sid)
                stream.local_ended = True
        except ProtocolError:
            pass  # (the stream is gone: the node's reset is among the events being read)
        self._want_flush()
        self._update_paused(stream)

    def _update_paused(self, stream: UpstreamStream) -> None:
        paused = self.writing_paused or stream.pending_bytes > self.pool.write_buffer_high
        if paused == stream.writing_paused or stream.closed:
            return
        stream.writing_paused = paused
        if paused:
            stream.listener.on_stream_pause()
        else:
            stream.listener.on_stream_resume()

    def open_window(self, stream: UpstreamStream, size: int) -> None:
        """Give `size` bytes of a resumed stream's window back to the node."""
        if self.closed or not stream.stream_id:
            return
        try:
            self.h2.increment_flow_control_window(size, stream_id=stream.stream_id)
        except (ProtocolError, KeyError):
            return  # (the stream has ended meanwhile)
        self._want_flush()

    def drop(self, stream: UpstreamStream, code: ErrorCodes) -> None:
        """The stream is abandoned (reset by its owner, or over its deadline): RST_STREAM, the slot freed."""
        if stream.stream_id:
            if self.streams.pop(stream.stream_id, None) is None:
                return
            if not self.closed:
                try:
                    self.h2.reset_stream(stream.stream_id, code)
                except ProtocolError:
                    pass
                self._want_flush()
        elif stream in self.reserved:
            self.reserved.remove(stream)
        else:
            return
        self._freed()

    def _freed(self) -> None:
        """A slot is free again: a draining connection closes once empty, an empty one starts its idle time,
        and the slot goes to a waiter."""
        if self.closed:
            return
        if not self.used:
            if self.draining:
                self.close()
            else:
                self.idle_since = time.monotonic()
        self.pool.dispatch()

    def all_streams(self) -> list[UpstreamStream]:
        return [*self.streams.values(), *self.reserved]

    def fail_all(self, reason: str) -> None:
        streams = self.all_streams()
        self.streams.clear()
        self.reserved.clear()
        for stream in streams:
            stream.fail(reason, stream.written)

    # -- sending and closing ---------------------------------------------------------------------------------

    def _want_flush(self) -> None:
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """What h2 has queued, in one write."""
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self, goaway: bool = True) -> None:
        """Close (GOAWAY first when up); streams still on it are the caller's to fail."""
        if self.closed:
            return
        if goaway and self.ready and self.transport is not None:
            try:
                self.h2.close_connection(ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
            self._flush()
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        """The connection cannot go on (a protocol error, an error GOAWAY): closed, its streams fail."""
        self._flush()  # (what h2 has queued: its own GOAWAY after a protocol error)
        self.close(goaway=False)
        if not self.settled.done():
            # (not up yet: the connect fails, its task tells the waiters)
            self.settled.set_result(f"{reason} {NOT_H2_HINT}")
            return
        self.fail_all(reason)
        self.pool.dispatch()


# Why a connection failed before the node's SETTINGS: a node that is up but closes the connection or
# answers with bytes that are not HTTP/2 is most likely a plain HTTP/1.1 server (a misconfiguration).
NOT_H2_HINT = "before its HTTP/2 SETTINGS (is it down, or does it not speak HTTP/2, h2c or ALPN h2?)"


class H2NodePool:
    """Multiplexed HTTP/2 connections to one node, shared by the requests sent to it."""

    def __init__(self, node_id: str, host: str, port: int, *, connect_timeout: float, idle_timeout: float,
                 write_buffer_high: int = 256 * 1024, ssl: SSLContext | None = None,
                 max_connections: int = 4, initial_window_size: int = 1 << 20) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.ssl = ssl  # TLS: the caller's context offers ALPN "h2"
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.write_buffer_high = write_buffer_high
        self.max_connections = max_connections
        self.initial_window_size = initial_window_size
        self.conns: list[H2UpstreamConn] = []  # connecting, up, and draining
        # Requests waiting for a slot, served first come first served (held writes released together reach
        # the node in the order they arrived).
        self.waiters: deque[StreamListener] = deque()
        self.connect_failures = 0
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (f"<H2NodePool node={self.node_id} [{self.active} active, {self.waiting} waiting, "
                f"{self.connections} connections]>")

    @property
    def active(self) -> int:
        """Streams open (or handed out and about to be)."""
        return sum(c.used for c in self.conns)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self.waiters)

    @property
    def connections(self) -> int:
        """Connections connecting, up or draining."""
        return len(self.conns)

    def open(self, listener: StreamListener) -> None:
        """A stream for `listener` (`on_stream_ready`): now if a connection has a free slot, else once one
        does (a new connection is opened, up to `max_connections`); or `on_stream_error` (written=False)."""
        if self.closed:
            listener.on_stream_error("node removed", False)
            return
        if not self.waiters:
            for conn in self.conns:
                if conn.has_slot():
                    conn.start(listener)
                    return
        self.waiters.append(listener)
        self.dispatch()

    def cancel(self, listener: StreamListener) -> None:
        """A queued listener no longer wants a stream."""
        try:
            self.waiters.remove(listener)
        except ValueError:
            pass

    def dispatch(self) -> None:
        """Free slots to the waiters, oldest first; a new connection if they are left waiting."""
        waiters = self.waiters
        while waiters and not self.closed:
            conn = next((c for c in self.conns if c.has_slot()), None)
            if conn is None:
                break
            conn.start(waiters.popleft())
        if not waiters or self.closed:
            return
        if any(not c.ready and not c.closed for c in self.conns):
            return  # (one connect at a time: the one under way takes the waiters it can)
        if sum(1 for c in self.conns if not c.draining) < self.max_connections:
            self._start_connect()

    def _start_connect(self) -> None:
        conn = H2UpstreamConn(self)
        self.conns.append(conn)
        task = asyncio.get_running_loop().create_task(self._connect(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: H2UpstreamConn) -> None:
        """Connect, and wait for the node's SETTINGS (its stream limit) within the connect timeout. The
        waiters are served by `dispatch` when they come; a failure fails every waiter (the node is not
        reachable: they may go elsewhere)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
                reason = await conn.settled
        except TimeoutError:
            reason = "connect timeout"
        except OSError as exc:  # ssl.SSLError is an OSError: a failed handshake too
            reason = f"connect failed: {exc.strerror or exc}"
        if not reason:
            return
        self.connect_failures += 1
        conn.close()
        self.forget(conn)
        if not conn.settled.done():
            conn.settled.set_result(reason)
        if self.closed:
            return
        waiters = list(self.waiters)
        self.waiters.clear()
        for waiter in waiters:
            waiter.on_stream_error(reason, False)

    def forget(self, conn: H2UpstreamConn) -> None:
        """(A connection's: it has closed.)"""
        try:
            self.conns.remove(conn)
        except ValueError:
            pass

    def sweep(self, now: float) -> None:
        """Streams past their deadline fail (timeout) and are reset; connections without a stream for
        `idle_timeout` close with GOAWAY. (Connects are bounded by their own timer.)"""
        for conn in list(self.conns):
            expired = [s for s in conn.all_streams() if s.deadline and s.deadline <= now]
            for stream in expired:
                conn.drop(stream, ErrorCodes.CANCEL)
                stream.fail("answer not complete in time" if stream.head_received else "no answer in time",
                            stream.written, timeout=True)
            if conn.ready and not conn.used and conn.idle_since + self.idle_timeout <= now:
                conn.close()

    def cut_stalled(self, now: float, quiet: float, reason: str) -> None:
        """The node was marked down: streams that have had nothing from it for `quiet` seconds are failed and
        reset now (a frozen node); streams still flowing, and those paused for a slow client, go on."""
        for conn in list(self.conns):
            stalled = [s for s in conn.streams.values()
                       if not s.reading_paused and s.last_read and s.last_read + quiet <= now]
            for stream in stalled:
                quiet_for = now - stream.last_read
                conn.drop(stream, ErrorCodes.CANCEL)
                stream.fail(f"{reason}: nothing from the node for {quiet_for:.1f}s", True, timeout=True)

    def close(self) -> None:
        """The node is gone from the configuration: every stream and waiter fails, connections close."""
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for conn in list(self.conns):
            conn.close()
            conn.fail_all("node removed")
        while self.waiters:
            self.waiters.popleft().on_stream_error("node removed", False)
