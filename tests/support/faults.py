"""A fault-injecting TCP relay for tests: it sits between raftlb and a node's client or announce port.

    relay = await FaultRelay(node_port).start()      # 127.0.0.1:relay.port -> 127.0.0.1:node_port
    relay.delay = 0.2                                # every answer 200 ms late (latency on one node)
    relay.partition("blackhole")                     # accept, read, never forward: a silent network
    relay.heal()                                     # pass traffic again (poisoned connections are reset)
    async with relay.flapping(0.25, "reset"):        # partitioned / healed every 250 ms
        ...
    relay.writes_after(t)                            # write requests the node was sent after time t

Modes (`relay.mode`, switched with `partition(mode)` / `heal()`):

- "pass": forward both ways (with `delay`/`delay_up` latency, and the one-shot faults below);
- "blackhole": accept connections and read from them, forward nothing, never close: packets lost in a
  partition. Connections that lost bytes this way are reset on `heal()` (their streams are corrupt);
- "reset": reset (RST) every connection, open or new: a peer that rejects with tcp-reset;
- "refuse": close new connections at once (FIN), leave open ones alone; `refuse = True` is the same.

One-shot faults in "pass" mode: `drop_responses = n` (the next n connections forward the request, wait for
the node's answer and cut the client side without passing it on: an ambiguous failure) and `reset_after = n`
(a connection is reset after n bytes went from the node to the client: a reset mid-response).

The relay sniffs request lines going to the node (`requests`, with the monotonic time the relay read them),
so a test can tell which node was sent which write, and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "blackhole", "reset", "refuse"]
WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
_REQUEST_LINE = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS) (\S{1,2000}) HTTP/1\.[01]\r\n")
_SNIFF_TAIL = 2048  # bytes kept between chunks so a request line split across reads is still seen


def reset_connection(transport: asyncio.WriteTransport) -> None:
    """Abort with a TCP RST. A plain `abort()` sends a FIN when nothing is left unread, which the other side
    cannot tell from a clean close; SO_LINGER with a zero timeout makes the kernel reset instead."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """A request line on its way to the node, and when the relay read it (time.monotonic())."""

    time: float
    method: str
    target: str


@dataclass(eq=False)
class _Link:
    """One relayed connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    down_bytes: int = 0  # node -> client, forwarded
    poisoned: bool = False  # bytes were swallowed (blackhole): the stream can never be trusted again
    sniff_buf: bytearray = field(default_factory=bytearray)
    sniff_base: int = 0  # stream offset of sniff_buf[0]
    sniff_upto: int = 0  # stream offset up to which request lines were recorded

    def abort(self) -> None:
        """Reset both sides (RST)."""
        for w in (self.client, self.upstream):
            if w is not None and not w.transport.is_closing():
                reset_connection(w.transport)


class FaultRelay:
    """Forwards 127.0.0.1:<port> to <target_host>:<target_port>, with faults a test switches on and off
    (see the module docstring)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.mode: Mode = "pass"
        self.delay = 0.0  # seconds added before each chunk from the node is passed on (response latency)
        self.delay_up = 0.0  # the same towards the node
        self.reset_after: int | None = None  # reset a connection after this many bytes node -> client
        self.drop_responses = 0
        self.dropped = 0
        self.accepted = 0  # connections ever accepted
        self.resets = 0  # connections reset by a fault
        self.requests: list[SeenRequest] = []
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (f"<FaultRelay :{self.port} -> :{self.target_port} {self.mode} delay={self.delay:g}s "
                f"[{len(self._links)} open, {self.accepted} accepted, {len(self.requests)} requests]>")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- compatibility with the first Relay (tests/support/relay.py)

    @property
    def refuse(self) -> bool:
        return self.mode == "refuse"

    @refuse.setter
    def refuse(self, value: bool) -> None:
        self.mode = "refuse" if value else "pass"

    # -- lifecycle

    async def start(self) -> FaultRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """1. stop accepting; 2. reset every connection; 3. wait (bounded) for their handlers."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def __aenter__(self) -> FaultRelay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- faults

    def partition(self, mode: Mode = "blackhole") -> None:
        """Switch the fault on: "blackhole" (silence), "reset" (RST everything, open connections too) or
        "refuse" (close new connections)."""
        self.mode = mode
        if mode == "reset":
            self.cut()

    def heal(self) -> None:
        """Forward again. Connections that lost bytes to a blackhole are reset: their streams are corrupt."""
        self.mode = "pass"
        for link in [ln for ln in self._links if ln.poisoned]:
            self.resets += 1
            link.abort()

    def cut(self) -> None:
        """Reset every open connection now (new ones are unaffected unless the mode says otherwise)."""
        for link in list(self._links):
            self.resets += 1
            link.abort()

    @contextlib.asynccontextmanager
    async def flapping(self, period: float, mode: Mode = "reset", up: float | None = None
                       ) -> AsyncIterator[FaultRelay]:
        """Inside the block, alternate `period` seconds of `mode` and `up` (default: `period`) seconds of
        "pass"; healed on exit."""

        async def flap() -> None:
            while True:
                self.partition(mode)
                await asyncio.sleep(period)
                self.heal()
                await asyncio.sleep(period if up is None else up)

        task = asyncio.create_task(flap(), name=f"relay-flap:{self.port}")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.heal()

    # -- observations

    def writes_after(self, t: float) -> list[SeenRequest]:
        """Write requests (POST/PUT/DELETE/PATCH) the relay passed towards the node after monotonic time t."""
        return [r for r in self.requests if r.time > t and r.method in WRITE_METHODS]

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # -- internals

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _Link(cwriter)
        self._links.add(link)
        self.accepted += 1
        try:
            if self.mode == "refuse":
                return
            if self.mode == "reset":
                self.resets += 1
                link.abort()
                return
            if self.mode == "blackhole":
                link.poisoned = True
                while await creader.read(65536):
                    pass
                return
            try:
                ureader, uwriter = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                link.abort()  # the node is down behind the relay: the client sees a reset
                return
            link.upstream = uwriter
            if self.drop_responses > 0:
                await self._drop_one_response(creader, ureader, uwriter, link)
                return
            await asyncio.gather(self._pipe(creader, uwriter, link, True),
                                 self._pipe(ureader, cwriter, link, False))
        except (ConnectionError, OSError):
            link.abort()
        except asyncio.CancelledError:
            # stop() cancels; end quietly (3.11's start_server callback calls exception() on the task).
            link.abort()
        finally:
            self._links.discard(link)
            for w in (cwriter, link.upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _drop_one_response(self, creader: asyncio.StreamReader, ureader: asyncio.StreamReader,
                                 uwriter: asyncio.StreamWriter, link: _Link) -> None:
        first = await creader.read(65536)
        if not first:
            return
        self.drop_responses -= 1
        self._sniff(link, first)
        uwriter.write(first)
        await ureader.read(65536)  # the node answered: the client never sees it
        self.dropped += 1

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link,
                    up: bool) -> None:
        try:
            while data := await reader.read(65536):
                if up:
                    self._sniff(link, data)
                delay = self.delay_up if up else self.delay
                if delay:
                    await asyncio.sleep(delay)
                mode = self.mode
                if mode == "blackhole" or link.poisoned:
                    link.poisoned = True
                    continue
                if mode == "reset":
                    self.resets += 1
                    link.abort()
                    return
                if not up and self.reset_after is not None:
                    room = self.reset_after - link.down_bytes
                    if room < len(data):
                        writer.write(data[:max(room, 0)])
                        await writer.drain()
                        await asyncio.sleep(0.02)  # let the other side read them before the RST
                        self.resets += 1
                        link.abort()
                        return
                if not up:
                    link.down_bytes += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            link.abort()  # pass the reset on, so the other side sees it too
            return
        except (ConnectionError, OSError):
            link.abort()
            return
        if not link.poisoned:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                writer.write_eof()

    def _sniff(self, link: _Link, data: bytes) -> None:
        buf = link.sniff_buf
        buf += data
        now = time.monotonic()
        for m in _REQUEST_LINE.finditer(buf):
            start = link.sniff_base + m.start()
            if start < link.sniff_upto:
                continue
            link.sniff_upto = link.sniff_base + m.end()
            self.requests.append(SeenRequest(now, m.group(1).decode(), m.group(2).decode("latin-1")))
        drop = len(buf) - _SNIFF_TAIL
        if drop > 0:
            del buf[:drop]
            link.sniff_base += drop
