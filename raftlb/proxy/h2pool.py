"""HTTP/2 to one node: multiplexed connections (h2c with prior knowledge, or TLS with ALPN `h2`), each an
asyncio.Protocol around h2's sans-IO client `H2Connection`, and the streams requests are sent on.

A request (raftlb.proxy.stream_request.StreamRequest) asks the node's `H2NodePool` for a stream (`open`);
the pool gives it one on a connection with a free slot (the node's SETTINGS_MAX_CONCURRENT_STREAMS, and not
shutting down after a GOAWAY), opens another connection (up to `max_connections`), or queues the request
until a slot frees. The request then sends on its `UpstreamStream` and hears of the answer through its
`StreamListener` callbacks, the last of which is always `on_stream_end` or `on_stream_error`.

What `on_stream_error`'s `written` says is what the re-send rule needs (raftlb.core.resend): False when the
node cannot have seen the request (no connection, REFUSED_STREAM, a GOAWAY whose last stream id is below the
stream's), True when it may have.

Flow control both ways: the request body is buffered beyond the node's windows and sent as they open
(`on_stream_pause` beyond `write_buffer_high`); answer DATA is given back to the node's window as the
listener takes it, not while the listener has paused reading (its client is slow).
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import time
from collections import deque
from typing import Protocol, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
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
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

log = logging.getLogger("raftlb.proxy.h2pool")


class StreamListener(Protocol):
    """What a stream's owner hears (see the module doc)."""

    def on_stream_ready(self, stream: UpstreamStream) -> None: ...
    def on_stream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def on_stream_data(self, data: bytes) -> None: ...
    def on_stream_trailers(self, headers: list[tuple[bytes, bytes]]) -> None: ...
    def on_stream_end(self) -> None: ...
    def on_stream_error(self, reason: str, written: bool, timeout: bool = False) -> None: ...
    def on_stream_pause(self) -> None: ...
    def on_stream_resume(self) -> None: ...


class UpstreamStream:
    """One request's stream on a connection to the node."""

    __slots__ = ("conn", "listener", "stream_id", "written", "deadline", "head_received", "pending",
                 "pending_bytes", "pending_end", "end_sent", "paused", "unacked", "body_paused", "closed",
                 "last_at")

    def __init__(self, conn: H2UpstreamConnection, listener: StreamListener, stream_id: int) -> None:
        self.conn = conn
        self.listener = listener
        self.stream_id = stream_id
        self.written = False  # its HEADERS have been handed to the connection
        self.deadline = 0.0  # monotonic; the owner sets it (0.0: none): the sweep fails the stream past it
        self.head_received = False
        self.pending: list[bytes] = []  # request body the node's windows do not take yet
        self.pending_bytes = 0
        self.pending_end = False  # the request ends once `pending` is sent
        self.end_sent = False  # END_STREAM has gone to the node
        self.paused = False  # the listener's client is slow: answer DATA is not acknowledged
        self.unacked = 0
        self.body_paused = False  # the listener was told to pause its request body
        self.closed = False
        self.last_at = time.monotonic()  # the last frame from the node on this stream

    def __repr__(self) -> str:
        return f"<UpstreamStream {self.conn.pool.node_id}#{self.stream_id}>"

    @property
    def pool(self) -> H2NodePool:
        return self.conn.pool

    def send_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        if self.closed:
            return
        self.written = True
        self.pending_end = self.end_sent = end_stream
        self.conn.send_headers(self, headers, end_stream)

    def send_data(self, data: bytes, end_stream: bool = False) -> None:
        if self.closed or self.end_sent:
            return
        if data:
            self.pending.append(data)
            self.pending_bytes += len(data)
        self.pending_end = self.pending_end or end_stream
        self.conn.pump(self)

    def end(self) -> None:
        if self.closed or self.pending_end:
            return
        self.pending_end = True
        self.conn.pump(self)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.conn.acknowledge(self.stream_id, unacked)

    def reset(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Abandon the stream: RST_STREAM, and no more callbacks."""
        if self.closed:
            return
        self.conn.reset(self, code)


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to the node."""

    def __init__(self, pool: H2NodePool) -> None:
        self.pool = pool
        config = H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False)
        self.h2 = H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, UpstreamStream] = {}
        self.connected = False
        self.closed = False
        self.goaway = False  # the node said GOAWAY: no new streams
        self.settled = False  # the node's SETTINGS came: it speaks HTTP/2 (until then nothing it read counts)
        self.writing_paused = False
        self.idle_since = time.monotonic()
        self.opened_at = time.monotonic()
        self._flush_scheduled = False

    def __repr__(self) -> str:
        return f"<H2UpstreamConnection {self.pool.node_id} streams={len(self.streams)}>"

    @property
    def free_slots(self) -> int:
        if not self.connected or self.closed or self.goaway:
            return 0
        return self.h2.remote_settings.max_concurrent_streams - len(self.streams)

    # -- asyncio.Protocol -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        pool = self.pool
        h2 = self.h2
        # In force from the first frame (as initial values: `update` would only queue them, and
        # initiate_connection would announce the defaults).
        h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: pool.initial_window_size})
        h2.initiate_connection()
        extra = pool.initial_window_size * 4 - 65535
        if extra > 0:
            h2.increment_flow_control_window(extra)
        self._flush()
        self.connected = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        reason = f"connection to node {self.pool.node_id} lost" + (f": {exc}" if exc else "")
        if not self.settled:
            # (Still counted as written: a node may have read a request and died before its SETTINGS came.)
            log.warning("node %s closed the connection before its HTTP/2 SETTINGS: is it down, or does it "
                        "not speak HTTP/2 (h2c with prior knowledge)?", self.pool.node_id)
            reason += " before its HTTP/2 SETTINGS (does it speak HTTP/2?)"
        self.fail_all(reason)

    def pause_writing(self) -> None:
        self.writing_paused = True
        for stream in list(self.streams.values()):
            self._update_body_paused(stream)

    def resume_writing(self) -> None:
        self.writing_paused = False
        for stream in list(self.streams.values()):
            self._update_body_paused(stream)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            if not self.settled:
                # Not HTTP/2 at all (an HTTP/1-only server answers the preface with an error): the node
                # cannot have taken any request of this connection as one.
                log.warning("node %s does not speak HTTP/2 (h2c with prior knowledge): %s", self.pool.node_id,
                            exc)
                self.fail_all(f"node {self.pool.node_id} does not speak HTTP/2", written=False)
                return
            log.warning("node %s: HTTP/2 protocol error: %s", self.pool.node_id, exc)
            self._flush()
            self.fail_all(f"HTTP/2 protocol error from node {self.pool.node_id}: {exc}")
            return
        now = time.monotonic()
        for event in events:
            sid = getattr(event, "stream_id", 0)
            stream = self.streams.get(sid) if sid else None
            if stream is not None:
                stream.last_at = now
            if isinstance(event, DataReceived):
                size = event.flow_controlled_length or 0
                if stream is None:
                    self.acknowledge(sid, size)
                    continue
                if stream.paused:
                    stream.unacked += size
                else:
                    self.acknowledge(sid, size)
                if event.data:
                    stream.listener.on_stream_data(event.data)
            elif isinstance(event, ResponseReceived):
                if stream is not None:
                    stream.head_received = True
                    status, headers = _split_status(event.headers or [])
                    stream.listener.on_stream_head(status, headers)
            elif isinstance(event, TrailersReceived):
                if stream is not None:
                    stream.listener.on_stream_trailers(list(event.headers or []))
            elif isinstance(event, StreamEnded):
                if stream is not None:
                    self._retire(stream)
                    stream.listener.on_stream_end()
            elif isinstance(event, StreamReset):
                if stream is not None:
                    self._retire(stream)
                    refused = event.error_code == ErrorCodes.REFUSED_STREAM
                    stream.listener.on_stream_error(
                        f"node {self.pool.node_id} reset the stream ({_code_name(event.error_code)})",
                        written=stream.written and not refused)
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    if stream is not None:
                        self.pump(stream)
                else:
                    for s in list(self.streams.values()):
                        if s.pending:
                            self.pump(s)
            elif isinstance(event, ConnectionTerminated):
                self._on_goaway(event)
            elif isinstance(event, RemoteSettingsChanged):
                self.settled = True
            elif isinstance(event, InformationalResponseReceived):
                pass
            if self.closed:
                return
        self._flush()
        self.pool.slots_freed()

    # -- streams ---------------------------------------------------------------------------------------------

    def new_stream(self, listener: StreamListener) -> UpstreamStream:
        stream = UpstreamStream(self, listener, self.h2.get_next_available_stream_id())
        self.streams[stream.stream_id] = stream
        return stream

    def send_headers(self, stream: UpstreamStream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        try:
            self.h2.send_headers(stream.stream_id, headers, end_stream=end)
        except ProtocolError as exc:
            self._stream_failed(stream, f"could not send the request to node {self.pool.node_id}: {exc}",
                                written=False)
            return
        self._want_flush()

    def pump(self, stream: UpstreamStream) -> None:
        """Send what the node's windows take of the stream's request body (its end too, once all is out)."""
        if self.closed or stream.closed or not stream.written:
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
                if len(chunk) <= window:
                    pending.pop(0)
                else:
                    pending[0] = chunk[window:]
                    chunk = chunk[:window]
                stream.pending_bytes -= len(chunk)
                end = not pending and stream.pending_end
                h2.send_data(sid, chunk, end_stream=end)
                stream.end_sent = end
            if not pending and stream.pending_end and not stream.end_sent:
                stream.end_sent = True
                h2.end_stream(sid)
        except ProtocolError:
            pass  # (the node reset the stream meanwhile: its StreamReset event says so)
        self._want_flush()
        self._update_body_paused(stream)

    def _update_body_paused(self, stream: UpstreamStream) -> None:
        paused = self.writing_paused or stream.pending_bytes > self.pool.write_buffer_high
        if paused != stream.body_paused and not stream.closed:
            stream.body_paused = paused
            if paused:
                stream.listener.on_stream_pause()
            else:
                stream.listener.on_stream_resume()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size <= 0 or self.closed:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except (ProtocolError, KeyError):
            pass
        self._want_flush()

    def reset(self, stream: UpstreamStream, code: ErrorCodes) -> None:
        self._retire(stream)
        if not self.closed:
            try:
                self.h2.reset_stream(stream.stream_id, code)
            except ProtocolError:
                pass
            self._want_flush()
        self.pool.slots_freed()

    def _retire(self, stream: UpstreamStream) -> None:
        stream.closed = True
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.goaway:
                self.close()

    def _stream_failed(self, stream: UpstreamStream, reason: str, written: bool,
                       timeout: bool = False) -> None:
        if stream.closed:
            return
        self._retire(stream)
        stream.listener.on_stream_error(reason, written, timeout)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        """The node shuts the connection: streams above its last stream id were not processed (re-sendable);
        the others finish, unless the GOAWAY carries an error."""
        self.goaway = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        error = event.error_code not in (None, ErrorCodes.NO_ERROR)
        reason = f"node {self.pool.node_id} sent GOAWAY ({_code_name(event.error_code)})"
        for stream in [s for s in self.streams.values() if s.stream_id > last or error]:
            self._stream_failed(stream, reason, written=stream.written and stream.stream_id <= last)
        if not self.streams:
            self.close()

    def fail_all(self, reason: str, written: bool = True) -> None:
        """The connection is over: every stream on it fails (`written`: as far as each was sent)."""
        self.closed = True
        self.connected = False
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            if not stream.closed:
                stream.closed = True
                stream.listener.on_stream_error(reason, stream.written and written)
        if self.transport is not None:
            self.transport.abort()
        self.pool.connection_gone(self)

    def _want_flush(self) -> None:
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        """Close gracefully (GOAWAY) once no stream is left; the streams still open fail."""
        if self.closed:
            return
        if not self.connected or self.transport is None:
            self.fail_all(f"connection to node {self.pool.node_id} closed")
            return
        try:
            self.h2.close_connection()
        except ProtocolError:
            pass
        self._flush()
        self.fail_all(f"connection to node {self.pool.node_id} closed")


def _split_status(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    status = 0
    out: list[tuple[bytes, bytes]] = []
    for k, v in headers:
        if k[:1] == b":":
            if k == b":status" and v.isdigit():
                status = int(v)
            continue
        out.append((k, v))
    return status, out


def _code_name(code: object) -> str:
    return code.name if isinstance(code, ErrorCodes) else str(code)


class H2NodePool:
    """HTTP/2 connections to one node, and the requests waiting for a stream on one."""

    def __init__(self, node_id: str, host: str, port: int, *, connect_timeout: float, idle_timeout: float,
                 write_buffer_high: int = 256 * 1024, ssl: ssl_module.SSLContext | None = None,
                 max_connections: int = 4, initial_window_size: int = 1 << 20) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.write_buffer_high = write_buffer_high
        self.ssl = ssl
        self.max_connections = max_connections
        self.initial_window_size = initial_window_size
        self.conns: list[H2UpstreamConnection] = []
        self.connecting = 0
        self.waiting: deque[StreamListener] = deque()
        self.connect_failures = 0
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<H2NodePool {self.node_id} conns={len(self.conns)} waiting={len(self.waiting)}>"

    @property
    def active(self) -> int:
        return sum(len(c.streams) for c in self.conns)

    @property
    def connections(self) -> int:
        return len(self.conns)

    def open(self, listener: StreamListener) -> None:
        """A stream for `listener`: now, or once a connection has a free slot (see the module doc)."""
        for conn in self.conns:
            if conn.free_slots > 0:
                listener.on_stream_ready(conn.new_stream(listener))
                return
        self.waiting.append(listener)
        if self.connecting == 0 and len(self.conns) + self.connecting < self.max_connections:
            self._connect()

    def cancel(self, listener: StreamListener) -> None:
        try:
            self.waiting.remove(listener)
        except ValueError:
            pass

    def _connect(self) -> None:
        self.connecting += 1
        task = asyncio.get_running_loop().create_task(self._open_connection())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_connection(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: H2UpstreamConnection(self), self.host, self.port, ssl=self.ssl,
                                       server_hostname=self.host if self.ssl is not None else None),
                self.connect_timeout)
        except (TimeoutError, OSError, ssl_module.SSLError) as exc:
            self.connecting -= 1
            self.connect_failures += 1
            reason = "connect timeout" if isinstance(exc, TimeoutError) else f"connect failed: {exc}"
            waiting, self.waiting = self.waiting, deque()
            for listener in waiting:
                listener.on_stream_error(f"node {self.node_id}: {reason}", written=False)
            return
        self.connecting -= 1
        if self.closed:
            proto.close()
            return
        if self.ssl is not None and proto.transport is not None:
            ssl_obj = proto.transport.get_extra_info("ssl_object")
            if ssl_obj is None or ssl_obj.selected_alpn_protocol() != "h2":
                proto.fail_all(f"node {self.node_id} does not speak HTTP/2 over TLS (no ALPN h2)")
                return
        self.conns.append(proto)
        self.slots_freed()

    def slots_freed(self) -> None:
        """Streams ended, or a connection came up or raised its stream limit: give waiting requests streams;
        connect another connection if they still wait."""
        waiting = self.waiting
        while waiting:
            conn = next((c for c in self.conns if c.free_slots > 0), None)
            if conn is None:
                break
            listener = waiting.popleft()
            listener.on_stream_ready(conn.new_stream(listener))
        if waiting and self.connecting == 0 and len(self.conns) < self.max_connections:
            self._connect()

    def connection_gone(self, conn: H2UpstreamConnection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        if self.waiting and not self.closed:
            self.slots_freed()

    def sweep(self, now: float) -> None:
        """Streams past their deadline fail (timeout); connections idle for `idle_timeout` close."""
        for conn in list(self.conns):
            for stream in [s for s in conn.streams.values() if s.deadline and s.deadline <= now]:
                conn.reset(stream, ErrorCodes.CANCEL)
                stream.listener.on_stream_error(f"node {self.node_id} did not answer in time", stream.written,
                                                timeout=True)
            if not conn.streams and conn.idle_since + self.idle_timeout <= now:
                conn.close()

    def cut_stalled(self, now: float, quiet: float, reason: str) -> None:
        """The node is marked down: streams that have heard nothing from it for `quiet` seconds fail."""
        for conn in list(self.conns):
            for stream in [s for s in conn.streams.values() if s.last_at + quiet <= now]:
                conn.reset(stream, ErrorCodes.CANCEL)
                stream.listener.on_stream_error(reason, stream.written)

    def close(self) -> None:
        self.closed = True
        waiting, self.waiting = self.waiting, deque()
        for listener in waiting:
            listener.on_stream_error(f"node {self.node_id} removed", written=False)
        for conn in list(self.conns):
            conn.close()
        self.conns.clear()
