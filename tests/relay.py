"""A small fault-injecting TCP relay for tests: sits between raftlb and a node's client port."""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target>. Faults a test can switch on:

    - `drop_responses = n`: for the next n connections that carry a request, forward the request, wait
      for the node's answer, then cut the client side without passing the answer on (an ambiguous failure:
      the node applied the write, the proxy never hears about it);
    - `refuse = True`: new connections are closed at once.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.drop_responses = 0
        self.dropped = 0
        self.refuse = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.refuse:
                return
            ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.target_port)
            try:
                first = await creader.read(65536)
                if not first:
                    return
                uwriter.write(first)
                if self.drop_responses > 0:
                    self.drop_responses -= 1
                    await ureader.read(65536)  # the node answered: the client never sees it
                    self.dropped += 1
                    return
                await asyncio.gather(self._pipe(creader, uwriter), self._pipe(ureader, cwriter))
            finally:
                uwriter.close()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            cwriter.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.write_eof()
