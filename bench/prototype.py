"""The floor for this design: the bare relay measured in docs/benchmarks.md, with nothing of raftlb's logic.

    .venv/bin/python bench/prototype.py LISTEN_PORT BACKEND_PORT

asyncio.Protocol + httptools both ways on uvloop, a LIFO pool of keep-alive connections to one backend, no
routing, no leader table, no headers passed on, no limits, no error handling: GET requests only, answers
with a Content-Length body. For measuring what raftlb's data path costs over it (docs/benchmarks.md), never
for serving anything.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

IDLE: list[Upstream] = []


class Upstream(asyncio.Protocol):
    def __init__(self, backend: tuple[str, int]) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        body = b"".join(self.body)
        IDLE.append(self)
        if client is not None and client.transport is not None:
            client.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class Client(asyncio.Protocol):
    backend: tuple[str, int] = ("127.0.0.1", 0)

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        request = b"GET " + self.url + b" HTTP/1.1\r\nHost: backend\r\n\r\n"
        if IDLE:
            up = IDLE.pop()
            up.client = self
            assert up.transport is not None
            up.transport.write(request)
        else:
            asyncio.ensure_future(self._connect(request))

    async def _connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        transport, up = await loop.create_connection(lambda: Upstream(self.backend), *self.backend)
        up.client = self
        transport.write(request)


async def main(port: int, backend_port: int) -> None:
    Client.backend = ("127.0.0.1", backend_port)
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
