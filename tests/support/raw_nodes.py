"""A node's client port that speaks whatever a test scripts (garbage, resets, endless headers), and a strict
client's reading of what the proxy sent back."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable

import h11

from raftlb.config.model import ClusterConfig, NodeConfig
from tests.support.fakes import FakeNode
from tests.support.faults import reset_connection

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawNode:
    """A node's client port answering each request head with a script; the announcements come from a FakeNode
    (`config()` pairs them). `sent` counts the bytes scripts report writing; `requests` the heads read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.port = 0
        self.requests = 0
        self.sent = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawNode:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if m:
                    await reader.readexactly(int(m.group(1)))
                await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # __aexit__ cancels; end quietly
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


def raw_config(raw: RawNode, announcer: FakeNode, **overrides: object) -> ClusterConfig:
    """A one-node cluster: client traffic to `raw`, announcements from `announcer`."""
    node = NodeConfig(id=announcer.id, url=f"http://127.0.0.1:{raw.port}", announce_url=announcer.url,
                      host="127.0.0.1", port=raw.port)
    return ClusterConfig(name="c1", kind="native", nodes=(node,), **overrides)  # type: ignore[arg-type]


def send(data: bytes, then: str = "stay") -> Script:
    """A script: write `data`, then "stay" (keep the connection), "close" (FIN) or "reset" (RST)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if then == "close":
            writer.close()
            raise ConnectionResetError  # ends the serve loop
        if then == "reset":
            await asyncio.sleep(0.05)  # let the proxy read what was sent before the RST
            reset_connection(writer.transport)
            raise ConnectionResetError

    return script


async def read_until_close(port: int, request: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send `request`, read until the proxy closes; (bytes, closed) where closed is False on a timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    chunks = []
    closed = False
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
            closed = True
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    writer.transport.abort()
    return b"".join(chunks), closed


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, complete) of the first response in `data`, as a strict client reads it:
    complete only if the body's framing says it ended (Content-Length reached, or the zero chunk)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")  # the connection closed
    status, headers, body, complete = 0, {}, bytearray(), False
    with contextlib.suppress(h11.RemoteProtocolError):
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                complete = True
                break
            elif event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
                break
    return status, headers, bytes(body), complete
