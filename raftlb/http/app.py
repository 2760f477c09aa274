"""A small request/response application layer on the fast server, for code off the proxy's hot path.

The demo node and the admin listener are written as `async def handler(Request) -> Response | EventStream`.
Each request runs as one task (fine here: these are not the proxied data path). Bodies are collected up to
the listener's body limit before the handler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ssl import SSLContext
from urllib.parse import parse_qsl

from raftlb.config.model import LimitsConfig
from raftlb.http.server import (
    FRAMING_CHUNKED,
    FRAMING_LENGTH,
    FRAMING_NONE,
    Exchange,
    HttpServer,
    status_line,
)

log = logging.getLogger("raftlb.http.app")

STREAM_SNDBUF = 64 * 1024  # the kernel send buffer of a streamed response's socket (not autotuned)


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"


Send = Callable[[bytes], Awaitable[None]]


class EventStream:
    """A long-lived streamed response (SSE). The server sends the head (200, chunked, no-cache), then awaits
    `producer(send)`; `send(data)` waits for flow control and raises ConnectionError once the client left."""

    def __init__(self, producer: Callable[[Send], Awaitable[None]],
                 headers: list[tuple[str, str]] | None = None,
                 content_type: str = "text/event-stream") -> None:
        self.producer = producer
        self.headers = headers or []
        self.content_type = content_type


Handler = Callable[[Request], Awaitable[Response | EventStream]]


def json_response(obj: object, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    return Response(status, body, list(headers or ()))


def _head(status: int, content_type: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [status_line(status), b"content-type: " + content_type.encode("latin-1") + b"\r\n"]
    for k, v in headers:
        lines.append(f"{k}: {v}\r\n".encode("latin-1"))
    return b"".join(lines)


class _AppExchange:
    """Collects one request's body, runs the handler as a task, writes the answer."""

    __slots__ = ("app", "ex", "chunks", "gone", "writable")

    def __init__(self, app: AppHandler, ex: Exchange) -> None:
        self.app = app
        self.ex = ex
        self.chunks: list[bytes] = []
        self.gone = False
        self.writable: asyncio.Event | None = None
        ex.on_abort = self._on_abort
        ex.on_pause_writing = self._on_pause
        ex.on_resume_writing = self._on_resume
        ex.set_body_sink(self.chunks.append, self._on_end)

    def _on_abort(self, reason: str) -> None:
        self.gone = True
        if self.writable is not None:
            self.writable.set()

    def _on_pause(self) -> None:
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()

    def _on_resume(self) -> None:
        if self.writable is not None:
            self.writable.set()

    def _on_end(self) -> None:
        self.app.tasks.add(asyncio.get_running_loop().create_task(self._run()))

    async def _run(self) -> None:
        ex = self.ex
        target = ex.target.decode("latin-1")
        path, _, qs = target.partition("?")
        headers: dict[str, str] = {}
        for k, v in ex.headers:
            name = k.decode("latin-1")
            val = v.decode("latin-1")
            headers[name] = f"{headers[name]}, {val}" if name in headers else val
        req = Request(ex.method, target, path, dict(parse_qsl(qs, keep_blank_values=True)), headers,
                      b"".join(self.chunks), (ex.conn.peer_host, 0))
        try:
            result = await self.app.handler(req)
        except Exception:
            log.exception("handler failed for %s %s", req.method, req.target)
            result = json_response({"error": "internal_error"}, 500)
        if self.gone:
            return
        if isinstance(result, Response):
            ex.status = result.status
            framing = FRAMING_LENGTH if result.body or result.status not in (204, 304) else FRAMING_NONE
            ex.send_head(_head(result.status, result.content_type, result.headers), framing, len(result.body),
                         result.body)  # one write: a node killed mid-answer never leaves a head alone
            ex.end()
            return
        await self._stream(result)

    async def _stream(self, stream: EventStream) -> None:
        ex = self.ex
        ex.status = 200
        headers = [("cache-control", "no-cache"), *stream.headers]
        _bound_stream_buffers(ex)
        ex.send_head(_head(200, stream.content_type, headers), FRAMING_CHUNKED)

        async def send(data: bytes) -> None:
            if self.gone or ex.conn.closed:
                raise ConnectionError("client went away")
            ex.send_body(data)
            if self.writable is not None and not self.writable.is_set():
                await self.writable.wait()
                if self.gone:
                    raise ConnectionError("client went away")

        try:
            await stream.producer(send)
        except ConnectionError:
            return
        if not self.gone:
            ex.end()


def _bound_stream_buffers(ex: Exchange) -> None:
    """A stream never ends by itself, and its events come a few at a time: a client that never reads would
    only be found once `limits.write_buffer_high` had piled up in user space, on top of a kernel send buffer
    that autotunes to megabytes; with a trickle of events that never happens, and each such client keeps
    its buffers. So a stream gets a fixed, small kernel buffer and no user-space allowance: writing pauses
    as soon as the kernel takes no more, and the server's `send_timeout` cuts the client from then on."""
    transport = ex.conn.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=0)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)


class AppHandler:
    """Adapts an async `Handler` to the server's callback interface."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.tasks: set[asyncio.Task[None]] = _TaskSet()

    def on_request(self, ex: Exchange) -> None:
        _AppExchange(self, ex)


class _TaskSet(set[asyncio.Task[None]]):
    """Keeps request tasks referenced until they finish."""

    def add(self, task: asyncio.Task[None]) -> None:
        super().add(task)
        task.add_done_callback(self.discard)


async def serve(handler: Handler, host: str, port: int, limits: LimitsConfig | None = None,
                name: str = "app", ssl: SSLContext | None = None, max_connections: int = 10000) -> HttpServer:
    """Start serving `handler` on host:port (HTTPS with `ssl`), at most `max_connections` clients at once.
    The returned server's `.port` is the bound port."""
    server = HttpServer(AppHandler(handler), limits or LimitsConfig(), max_connections, name=name)
    await server.start(host, port, ssl=ssl)
    return server
