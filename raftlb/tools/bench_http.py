"""Deliberately small HTTP clients for `raftlb bench`: `HttpConnection` (HTTP/1.1, one keep-alive connection,
one request at a time) and `Http2Connection` (HTTP/2 on one connection, any number of concurrent streams).
Both are a `BenchConnection`: the load generator does not care which one it drives.

httpx managed ~130 requests/s here; asyncio streams on uvloop manage thousands. HTTP/1 responses are framed
by Content-Length, chunked encoding or the end of the connection; that is all raftlb and the demo node send.
HTTP/2 is h2's sans-IO state machine under one reader task per connection: cleartext with prior knowledge
(h2c) on http:// URLs, TLS with ALPN `h2` on https:// URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes, Settings
from hpack import NeverIndexedHeaderTuple

from raftlb.http.h2client import client_connection


@dataclass(frozen=True)
class Target:
    """One raftlb base URL, split for the raw clients."""

    url: str
    host: str
    port: int
    base_path: str  # without the trailing slash; "" for http://host:port/
    tls: bool = False  # https://

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ValueError(f"--url: bad port in {url!r}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url: expected http[s]://HOST[:PORT][/PATH], got {url!r}")
        return cls(url, parts.hostname, port, parts.path.rstrip("/"), parts.scheme == "https")

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


def client_tls(cafile: str | None, alpn: str) -> ssl.SSLContext:
    """The TLS context for https:// URLs: the system's trust store, or only `cafile`; ALPN offers `alpn`."""
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols([alpn])
    return context


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes

    def header_int(self, name: str) -> int | None:
        value = self.headers.get(name)
        return int(value) if value is not None and value.isdigit() else None

    def error_kind(self) -> str:
        """`503 no_leader` for raftlb's JSON errors, else the status."""
        if self.headers.get("content-type", "").startswith("application/json"):
            try:
                code = json.loads(self.body).get("error")
            except (ValueError, AttributeError):
                code = None
            if isinstance(code, str):
                return f"{self.status} {code}"
        return str(self.status)


class TransportError(Exception):
    """The exchange failed below HTTP; `kind` names how (connection_refused, connection_closed, ...), the
    message says more when there is more to say (`not_http2`: what the server answered instead)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


class BenchConnection(Protocol):
    """What the load generator drives: one client's connection to one URL, (re)opened by `request`."""

    target: Target
    connects: int

    def is_open(self) -> bool: ...

    def close(self) -> None: ...

    async def connect(self) -> None: ...

    async def request(self, method: str, path: str, headers: Sequence[tuple[str, str]] = (),
                      body: bytes = b"") -> HttpResponse: ...


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, opened lazily and again after any failure. One request at a time;
    bodies framed by Content-Length, chunked encoding or the end of the connection."""

    def __init__(self, target: Target, tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self._tls = tls if tls is not None or not target.tls else client_tls(None, "http/1.1")
        self._host_header = f"Host: {target.authority}\r\n".encode("latin-1")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connects = 0

    def __repr__(self) -> str:
        state = "open" if self.is_open() else "closed"
        return f"<HttpConnection {self.target.host}:{self.target.port} {state}, {self.connects} connects>"

    def is_open(self) -> bool:
        return self._writer is not None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def connect(self) -> None:
        """Open the connection now (`request` does it when needed); TransportError when that fails."""
        if self._writer is not None:
            return
        try:
            self._reader, self._writer = await asyncio.open_connection(
                self.target.host, self.target.port, ssl=self._tls)
        except OSError as exc:
            raise TransportError(_transport_kind(exc), _os_detail(exc)) from exc
        self.connects += 1

    async def request(self, method: str, path: str, headers: Sequence[tuple[str, str]] = (),
                      body: bytes = b"") -> HttpResponse:
        """Send one request and read its response; TransportError when the exchange fails."""
        try:
            await self.connect()
            assert self._reader is not None and self._writer is not None
            request_line = f"{method} {self.target.base_path}{path} HTTP/1.1\r\n"
            lines = [request_line.encode("latin-1"), self._host_header]
            lines += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
            if body or method in ("PUT", "POST"):
                lines.append(b"Content-Length: %d\r\n" % len(body))
            lines.append(b"\r\n")
            self._writer.write(b"".join(lines) + body)
            await self._writer.drain()
            response, keep_alive = await _read_response(self._reader, method)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise TransportError(_transport_kind(exc), str(exc)) from exc
        except BaseException:  # cancelled or timed out mid-exchange: the connection's state is unknown
            self.close()
            raise
        if not keep_alive:
            self.close()
        return response


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[HttpResponse, bool]:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status = int(rest[:3])
        if not version.startswith("HTTP/1.") or not 100 <= status <= 599:
            raise ValueError(f"bad status line {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        if status >= 200 or status == 101:
            break  # 1xx interim responses are skipped
    keep_alive = headers.get("connection", "").lower() != "close" and version != "HTTP/1.0"
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            chunks.append((await reader.readexactly(size + 2))[:-2])
        body = b"".join(chunks)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body, keep_alive = await reader.read(), False
    return HttpResponse(status, headers, body), keep_alive


def _transport_kind(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "tls_error"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection_closed"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "connection_reset"
    if isinstance(exc, asyncio.LimitOverrunError | ValueError):
        return "bad_response"
    return "connection_error"


def _os_detail(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


# -- HTTP/2 -----------------------------------------------------------------------------------------------

_H2_READ = 65536
_NOT_H2_SNIFF = 5  # bytes enough to tell an HTTP/1 answer ("HTTP/") from HTTP/2 frames


class Http2Connection:
    """One client's HTTP/2 connection to one URL: h2c with prior knowledge on http://, TLS with ALPN `h2` on
    https://. Any number of `request` calls may run at once, each on its own stream. Opened lazily, and again
    after a failure or a GOAWAY (streams the server accepted before its GOAWAY still finish on the old
    connection; those it did not are failed with the transport error `goaway`). A server that does not speak
    HTTP/2 is the transport error `not_http2`."""

    def __init__(self, target: Target, tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self._tls = tls if tls is not None or not target.tls else client_tls(None, "h2")
        self._session: _H2Session | None = None
        self._sessions: set[_H2Session] = set()  # the current one and any still finishing after a GOAWAY
        self._opening = asyncio.Lock()  # concurrent streams of a closed connection wait for one new one
        self.connects = 0

    def __repr__(self) -> str:
        state = "open" if self.is_open() else "closed"
        return f"<Http2Connection {self.target.authority} {state}, {self.connects} connects>"

    def is_open(self) -> bool:
        return self._session is not None and self._session.usable

    def close(self) -> None:
        for session in self._sessions:
            session.close()
        self._sessions.clear()
        self._session = None

    async def connect(self) -> None:
        """Open the connection now, through the server's first SETTINGS (so `not_http2` shows here);
        `request` does it when needed. TransportError when that fails."""
        await self._current()

    async def _current(self) -> _H2Session:
        session = self._session
        if session is not None and session.usable:
            return session
        async with self._opening:
            session = self._session
            if session is not None and session.usable:
                return session
            self._sessions = {s for s in self._sessions if not s.closed}
            session = _H2Session(self.target, self._tls)
            self._sessions.add(session)
            try:
                await session.open()
            except BaseException:
                session.close()
                self._sessions.discard(session)
                raise
            self._session = session
            self.connects += 1
            return session

    async def request(self, method: str, path: str, headers: Sequence[tuple[str, str]] = (),
                      body: bytes = b"") -> HttpResponse:
        """Send one request on a stream of its own and read its response; TransportError when the exchange
        fails. Cancelling it resets the stream; the connection stays open for the others."""
        session = await self._current()
        return await session.request(method, self.target.base_path + path, headers, body)


class _H2Session:
    """One HTTP/2 connection: h2's state machine, the socket, the reader task and its waiting streams."""

    def __init__(self, target: Target, tls: ssl.SSLContext | None) -> None:
        self.target = target
        self.tls = tls
        # Our own request headers are built well-formed (lower-case names): h2 need not check them again.
        config = H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                 normalize_outbound_headers=False)
        self.h2 = client_connection(config)
        self.h2.local_settings = Settings(client=True, initial_values={SettingCodes.ENABLE_PUSH: 0})
        self._scheme = b"https" if target.tls else b"http"
        self._authority = target.authority.encode("latin-1")
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._streams: dict[int, _H2Response] = {}
        self._window = asyncio.Event()  # set by WINDOW_UPDATE: a request body waiting for credit goes on
        self._head = b""  # the first bytes the server sent, to recognise an HTTP/1 answer
        self.going_away = False
        self._goaway_code = ""
        self.closed = False

    @property
    def usable(self) -> bool:
        """New streams may be opened on it."""
        return not (self.closed or self.going_away)

    async def open(self) -> None:
        try:
            reader, self._writer = await asyncio.open_connection(self.target.host, self.target.port,
                                                                 ssl=self.tls)
        except OSError as exc:
            raise TransportError(_transport_kind(exc), _os_detail(exc)) from exc
        if self.tls is not None:
            tls_object = self._writer.get_extra_info("ssl_object")
            chosen = tls_object.selected_alpn_protocol() if tls_object is not None else None
            if chosen != "h2":
                raise TransportError("not_http2", f"the TLS server did not agree to h2 by ALPN (it chose "
                                                  f"{chosen or 'none'})")
        self.h2.initiate_connection()
        self._writer.write(self.h2.data_to_send())
        self._reader_task = asyncio.create_task(self._read(reader), name=f"bench-h2-{self.target.authority}")
        await self._ready
        if self.going_away:  # SETTINGS, then GOAWAY at once: a server refusing the connection
            raise TransportError("goaway", f"the server sent GOAWAY ({self._goaway_code}) right after its "
                                           "SETTINGS")

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._end(TransportError("connection_closed", "closed by the client"))

    async def request(self, method: str, path: str, headers: Sequence[tuple[str, str]],
                      body: bytes) -> HttpResponse:
        if not self.usable:
            raise TransportError("connection_closed", "the connection is closing")
        assert self._writer is not None
        # The path and the caller's headers (a token that rises with every write) change from request to
        # request: sent never-indexed, they stay out of HPACK's dynamic table, which the encoder searches
        # entry by entry for every header it sends.
        fields: list[tuple[bytes, bytes]] = [
            (b":method", method.encode("latin-1")), (b":scheme", self._scheme),
            (b":authority", self._authority),
            NeverIndexedHeaderTuple(b":path", path.encode("latin-1"))]
        fields += [NeverIndexedHeaderTuple(name.lower().encode("latin-1"), value.encode("latin-1"))
                   for name, value in headers]
        if body or method in ("PUT", "POST"):
            fields.append((b"content-length", b"%d" % len(body)))
        try:
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, fields, end_stream=not body)
        except TooManyStreamsError as exc:
            raise TransportError("too_many_streams", str(exc)) from exc
        except ProtocolError as exc:
            raise TransportError("bad_request", str(exc)) from exc
        response = self._streams[stream_id] = _H2Response()
        try:
            if body:
                try:
                    await self._send_body(stream_id, body)
                except ProtocolError as exc:  # the stream was reset or closed under the body
                    raise TransportError("bad_request", str(exc)) from exc
            self._flush()
            return await response.done
        except BaseException:  # failed, cancelled or timed out: end the stream, not the connection
            if self._streams.pop(stream_id, None) is not None and not self.closed:
                with contextlib.suppress(ProtocolError):
                    self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
                self._flush()
            raise

    async def _send_body(self, stream_id: int, body: bytes) -> None:
        view = memoryview(body)
        while view:
            credit = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if credit <= 0:  # the server's window is shut: wait for its WINDOW_UPDATE
                self._flush()
                self._window.clear()
                await self._window.wait()
                if self.closed or stream_id not in self._streams:
                    return  # the stream's future already holds its error
                continue
            chunk, view = view[:credit], view[credit:]
            self.h2.send_data(stream_id, bytes(chunk), end_stream=not view)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self._writer is not None and not self.closed:
            self._writer.write(data)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: TransportError
        try:
            while True:
                data = await reader.read(_H2_READ)
                if len(self._head) < _NOT_H2_SNIFF:
                    self._head += data[:_NOT_H2_SNIFF - len(self._head)]
                    if self._head.startswith(b"HTTP/"):
                        error = self._not_h2(data)
                        break
                if not data:
                    before = "" if self._ready.done() else " before its HTTP/2 SETTINGS"
                    error = TransportError("connection_closed", f"the server closed the connection{before}")
                    break
                for event in self.h2.receive_data(data):
                    self._on_event(event)
                self._flush()
                if self.going_away and not self._streams:
                    error = TransportError("goaway", "the server sent GOAWAY")
                    break
        except ProtocolError as exc:
            error = TransportError("bad_response", f"HTTP/2 protocol error: {exc}")
        except OSError as exc:
            error = TransportError(_transport_kind(exc), _os_detail(exc))
        self._end(error)

    def _not_h2(self, data: bytes) -> TransportError:
        first_line = (data if data.startswith(b"HTTP/") else self._head).split(b"\r\n", 1)[0][:80]
        return TransportError("not_http2", "the server answered the HTTP/2 connection preface with HTTP/1 "
                                           f"({first_line.decode('latin-1')!r}): it does not speak HTTP/2 "
                                           "with prior knowledge")

    def _on_event(self, event: object) -> None:
        if isinstance(event, DataReceived):
            if event.stream_id in self._streams:
                self._streams[event.stream_id].body.append(event.data)
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, ResponseReceived):
            if (response := self._streams.get(event.stream_id)) is not None:
                response.fields = event.headers
        elif isinstance(event, StreamEnded):
            if (response := self._streams.pop(event.stream_id, None)) is not None:
                response.finish()
        elif isinstance(event, StreamReset):
            if (response := self._streams.pop(event.stream_id, None)) is not None:
                code = event.error_code.name if isinstance(event.error_code, ErrorCodes) else event.error_code
                response.fail(TransportError("stream_reset", f"the server reset the stream ({code})"))
        elif isinstance(event, WindowUpdated):
            self._window.set()
        elif isinstance(event, RemoteSettingsChanged):
            if not self._ready.done():
                self._ready.set_result(None)
        elif isinstance(event, ConnectionTerminated):
            self._on_goaway(event)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        """Streams above the GOAWAY's last stream id were not processed; those below it still finish."""
        self.going_away = True
        code = event.error_code.name if isinstance(event.error_code, ErrorCodes) else str(event.error_code)
        self._goaway_code = code
        error = TransportError("goaway", f"the server sent GOAWAY ({code}) before processing the stream")
        self._fail_ready(TransportError("goaway", f"the server sent GOAWAY ({code}) instead of its SETTINGS"))
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream_id in [s for s in self._streams if s > last]:
            self._streams.pop(stream_id).fail(error)
        self._window.set()

    def _fail_ready(self, error: TransportError) -> None:
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: `open` may have stopped waiting (cancelled by a timeout)

    def _end(self, error: TransportError) -> None:
        """The connection is over: fail what still waits on it with `error`."""
        if self.closed:
            return
        self.closed = True
        self._fail_ready(error)
        for response in self._streams.values():
            response.fail(error)
        self._streams.clear()
        self._window.set()
        if self._writer is not None:
            self._writer.close()


class _H2Response:
    """A stream's response as it arrives."""

    __slots__ = ("done", "fields", "body")

    def __init__(self) -> None:
        self.done: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
        self.fields: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def finish(self) -> None:
        status, headers = 0, {}
        for name, value in self.fields:
            if name == b":status":
                status = int(value)
            elif not name.startswith(b":"):
                headers[name.decode("latin-1")] = value.decode("latin-1")
        if self.done.done():
            return
        if not 100 <= status <= 599:
            self.done.set_exception(TransportError("bad_response", "a stream ended without a response"))
        else:
            self.done.set_result(HttpResponse(status, headers, b"".join(self.body)))

    def fail(self, error: TransportError) -> None:
        if not self.done.done():
            self.done.set_exception(error)
