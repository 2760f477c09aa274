"""The many-connections phase: open N keep-alive connections, send one request on each, hold them all
open, then send one more request on each to prove every one of them was kept.

Requests go out in waves of `parallel` so the proxy needs only that many upstream connections; what is
measured is the cost of N client connections held open, not of N requests in flight at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

REQUEST = b"GET /hold HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@dataclass
class HoldResult:
    connections: int = 0  # opened and answered 200 on the first pass
    kept: int = 0  # answered 200 again on the second pass, after the hold
    errors: dict[str, int] = field(default_factory=dict)
    open_seconds: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One request on a kept-alive connection; the response's status, after reading its body."""
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


class Holder:
    """The client side of the phase; `open()`, then (while held) anything, then `recheck()` and `close()`."""

    def __init__(self, port: int, count: int, parallel: int = 256, timeout: float = 10.0) -> None:
        self.port = port
        self.count = count
        self.parallel = parallel
        self.timeout = timeout
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.result = HoldResult()

    async def _one(self, sem: asyncio.Semaphore) -> None:
        async with sem:
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    status = await _exchange(reader, writer)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                self.result.error(f"first:{type(exc).__name__}")
                return
            except TimeoutError:
                self.result.error("first:timeout")
                return
            self.conns.append((reader, writer))
            if status == 200:
                self.result.connections += 1
            else:
                self.result.error(f"first:status_{status}")

    async def open(self) -> None:
        sem = asyncio.Semaphore(self.parallel)
        start = time.monotonic()
        await asyncio.gather(*(self._one(sem) for _ in range(self.count)))
        self.result.open_seconds = time.monotonic() - start

    async def recheck(self) -> None:
        sem = asyncio.Semaphore(self.parallel)

        async def again(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async with sem:
                try:
                    async with asyncio.timeout(self.timeout):
                        status = await _exchange(reader, writer)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.result.error(f"second:{type(exc).__name__}")
                    return
                except TimeoutError:
                    self.result.error("second:timeout")
                    return
                if status == 200:
                    self.result.kept += 1
                else:
                    self.result.error(f"second:status_{status}")

        await asyncio.gather(*(again(r, w) for r, w in self.conns))

    async def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
        self.conns.clear()
        await asyncio.sleep(0.2)
