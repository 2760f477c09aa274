"""A deliberately small HTTP/1.1 client for `raftlb bench`: one keep-alive connection, one request at a time.

httpx managed ~130 requests/s here; asyncio streams on uvloop manage thousands. Responses are framed by
Content-Length, chunked encoding or the end of the connection; that is all raftlb and the demo node send.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Target:
    """One raftlb base URL, split for the raw client."""

    url: str
    host: str
    port: int
    base_path: str  # without the trailing slash; "" for http://host:port/

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ValueError(f"--url: bad port in {url!r}") from exc
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--url: expected http://HOST[:PORT][/PATH], got {url!r}")
        return cls(url, parts.hostname, port, parts.path.rstrip("/"))


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
    """The exchange failed below HTTP; `kind` names how (connection_refused, connection_closed, ...)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, opened lazily and again after any failure. One request at a time;
    bodies framed by Content-Length, chunked encoding or the end of the connection."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._host_header = f"Host: {target.host}:{target.port}\r\n".encode("latin-1")
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

    async def request(self, method: str, path: str, headers: Sequence[tuple[str, str]] = (),
                      body: bytes = b"") -> HttpResponse:
        """Send one request and read its response; TransportError when the exchange fails."""
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.target.host, self.target.port)
                self.connects += 1
            assert self._reader is not None
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
            raise TransportError(_transport_kind(exc)) from exc
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
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection_closed"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "connection_reset"
    if isinstance(exc, asyncio.LimitOverrunError | ValueError):
        return "bad_response"
    return "connection_error"
