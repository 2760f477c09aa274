"""A tiny raft-announce/1 announcer for the benchmark: one node that always leads.

    python bench/announcer.py --port 7101 [--node n1] [--term 1] [--interval 0.05]

Serves, on 127.0.0.1 (stdlib only, so it runs without the venv):
    GET /raft/announce   text/event-stream: an event at once, then one every `interval` seconds
    GET /raft/status     the same JSON object once
The node claims `role=leader` at a fixed term with `has_quorum=true`; indexes rise with each event, as a
real leader's would under a steady trickle of writes. Prints `ready <port>` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import time


class Announcer:
    """The state one node announces, and the HTTP handling around it."""

    def __init__(self, node: str, term: int, interval: float) -> None:
        self.node = node
        self.term = term
        self.interval = interval
        self._seq = itertools.count(1)
        self.index = 0

    def event(self) -> bytes:
        self.index += 1
        doc = {
            "node": self.node, "term": self.term, "role": "leader", "leader": self.node,
            "commit_index": self.index, "applied_index": self.index, "has_quorum": True,
            "seq": next(self._seq), "ts_ms": int(time.time() * 1000),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target = head.split(b" ", 2)[:2]
            path = target.split(b"?", 1)[0]
            if method != b"GET":
                await self._respond(writer, b"405 Method Not Allowed", b"{}")
            elif path == b"/raft/announce":
                await self._stream(writer)
            elif path == b"/raft/status":
                await self._respond(writer, b"200 OK", self.event())
            else:
                await self._respond(writer, b"404 Not Found", b'{"error":"not_found"}')
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, writer: asyncio.StreamWriter, status: bytes, body: bytes) -> None:
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        # No length and no chunking: the stream ends when the connection does.
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                     b"connection: close\r\n\r\n")
        while True:
            writer.write(b"data: " + self.event() + b"\n\n")
            await writer.drain()
            await asyncio.sleep(self.interval)


async def serve(port: int, announcer: Announcer) -> None:
    server = await asyncio.start_server(announcer.handle, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--node", default="n1", help="the node id announced")
    parser.add_argument("--term", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between events")
    args = parser.parse_args()
    asyncio.run(serve(args.port, Announcer(args.node, args.term, args.interval)))


if __name__ == "__main__":
    main()
