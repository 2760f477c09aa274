"""A capacity-limited node for the read-scaling benchmark (bench/readscale.py): one process per node, as if
each ran on its own machine that can serve at most --rate reads per second.

    python bench/capnode.py --id n1 --listen 127.0.0.1:7001 --role leader --rate 500
    python bench/capnode.py --id n2 --listen 127.0.0.1:7002 --role follower --leader n1 \\
        --leader-url http://127.0.0.1:7001 --rate 500 --lag 5ms

It speaks raft-announce/1 (docs/protocol.md) at a fixed term 1 with a fixed leader:
  GET /raft/announce   SSE: one event per --tick (50 ms, as the demo node), with the applied index
  GET /raft/status     the same event once
  GET /kv/<key>        the value (decimal text) or 404, with X-Raft-Index = the applied index it reflects;
                       at most --rate per second through a token bucket (--burst), requests beyond it wait in
                       FIFO order (the node queues, like a saturated server; it never refuses)
  PUT /kv/<key>        leader: appends the write to its log and applies it at once (index + 1), answers
                       {"index": i} with X-Raft-Index: i; not rate-limited. Followers answer 421 with
                       X-Raft-Leader.
  GET /raft/replicate?from=N  leader: the log from index N on, then every new entry, as NDJSON lines
                       [index, key, value]; followers follow it and apply each entry --lag after receiving it,
                       so their applied index trails the leader's the way a Raft follower's does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from raftlb.http.app import EventStream, Request, Response, Send, json_response, serve  # noqa: E402

log = logging.getLogger("capnode")
TERM = 1


class Bucket:
    """A token bucket that queues: `take()` returns when the caller's slot comes (FIFO), at most `rate` slots
    per second, up to `burst` at once after an idle spell."""

    def __init__(self, rate: float, burst: int) -> None:
        self.interval = 1.0 / rate
        self.burst = max(1, burst)
        self.next = 0.0
        self.waiting = 0

    async def take(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(self.next, now - (self.burst - 1) * self.interval)
        self.next = slot + self.interval
        if slot > now:
            self.waiting += 1
            try:
                await asyncio.sleep(slot - now)
            finally:
                self.waiting -= 1


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        self.id: str = args.id
        self.leader_id: str = args.id if args.role == "leader" else args.leader
        self.is_leader = args.role == "leader"
        self.bucket = Bucket(args.rate, args.burst)
        self.tick: float = args.tick
        self.lag: float = args.lag
        self.announce_applied: float = args.announce_applied
        self.leader_url: str | None = args.leader_url
        self.kv: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []  # leader: entry i (1-based) is log[i - 1]
        self.applied = 0
        self.received = 0  # follower: the last index received from the leader (applied after --lag)
        self.served = 0
        self.status_seq = 0
        self._grown = asyncio.Event()
        self.closing = asyncio.Event()

    # -- state -----------------------------------------------------------------------------------------------

    def apply(self, index: int, key: str, value: str) -> None:
        if index != self.applied + 1:
            return  # a duplicate after a reconnect
        self.kv[key] = value.encode()
        self.applied = index

    def append(self, key: str, value: str) -> int:
        self.log.append((key, value))
        index = len(self.log)
        self.apply(index, key, value)
        self._grown.set()
        self._grown = asyncio.Event()
        return index

    def event(self, seq: int) -> dict[str, object]:
        doc: dict[str, object] = {
            "node": self.id, "term": TERM, "role": "leader" if self.is_leader else "follower",
            "leader": self.leader_id, "commit_index": self.applied if self.is_leader else self.received,
            "applied_index": self.applied,
        }
        if self.is_leader:
            doc["has_quorum"] = True
        doc["seq"] = seq
        doc["ts_ms"] = int(time.time() * 1000)
        return doc

    def headers(self, index: int | None = None) -> list[tuple[str, str]]:
        return [("X-Raft-Index", str(self.applied if index is None else index)), ("X-Raft-Term", str(TERM)),
                ("X-Raft-Node", self.id)]

    # -- HTTP ------------------------------------------------------------------------------------------------

    async def handle(self, req: Request) -> Response | EventStream:
        path = req.path
        if path.startswith("/kv/"):
            key = unquote(path[4:])
            if req.method in ("GET", "HEAD"):
                await self.bucket.take()
                self.served += 1
                value = self.kv.get(key)
                if value is None:
                    return json_response({"error": "not_found", "key": key}, 404, self.headers())
                return Response(200, value, self.headers(), "text/plain")
            if req.method == "PUT":
                if not self.is_leader:
                    return json_response({"error": "not_leader", "leader": self.leader_id}, 421,
                                         self.headers() + [("X-Raft-Leader", self.leader_id)])
                index = self.append(key, req.body.decode("utf-8", "replace"))
                return json_response({"index": index, "key": key}, 200, self.headers(index))
            return json_response({"error": "method_not_allowed"}, 405, self.headers())
        if path == "/raft/status":
            self.status_seq += 1
            return json_response(self.event(self.status_seq), 200, self.headers())
        if path == "/raft/announce":
            return EventStream(self._announce, self.headers())
        if path == "/raft/replicate" and self.is_leader:
            start = int(req.query.get("from", "1"))
            return EventStream(lambda send: self._replicate(send, start), content_type="application/x-ndjson")
        if path == "/stats":
            return json_response({"node": self.id, "served": self.served, "queued": self.bucket.waiting,
                                  "applied_index": self.applied})
        return json_response({"error": "not_found", "path": path}, 404, self.headers())

    async def _announce(self, send: Send) -> None:
        """One event per tick; with --announce-applied, also one as soon as the applied index moved (at most
        one per that period)."""
        loop = asyncio.get_running_loop()
        seq = 0
        while not self.closing.is_set():
            seq += 1
            await send(b"data: " + json.dumps(self.event(seq), separators=(",", ":")).encode() + b"\n\n")
            sent, next_tick = self.applied, loop.time() + self.tick
            if not self.announce_applied:
                await asyncio.sleep(self.tick)
                continue
            while loop.time() < next_tick:
                await asyncio.sleep(min(self.announce_applied, max(0.0, next_tick - loop.time())))
                if self.applied != sent:
                    break

    async def _replicate(self, send: Send, start: int) -> None:
        pos = max(1, start)
        while not self.closing.is_set():
            grown = self._grown
            if pos <= len(self.log):
                lines = [json.dumps([i, *self.log[i - 1]], separators=(",", ":")).encode() + b"\n"
                         for i in range(pos, len(self.log) + 1)]
                pos = len(self.log) + 1
                await send(b"".join(lines))
                continue
            await grown.wait()

    # -- follower: follow the leader's log -------------------------------------------------------------------

    async def follow(self) -> None:
        assert self.leader_url is not None
        parts = urlsplit(self.leader_url)
        loop = asyncio.get_running_loop()
        while not self.closing.is_set():
            try:
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                writer.write(f"GET /raft/replicate?from={self.received + 1} HTTP/1.1\r\nHost: x\r\n\r\n"
                             .encode())
                await reader.readuntil(b"\r\n\r\n")
                buf = b""
                while True:  # chunked transfer encoding
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        break
                    buf += (await reader.readexactly(size + 2))[:-2]
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        index, key, value = json.loads(line)
                        if index != self.received + 1:
                            continue
                        self.received = index
                        loop.call_later(self.lag, self.apply, index, key, value)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                log.warning("replication stream from %s ended: %r", self.leader_url, exc)
            finally:
                writer.close()
            await asyncio.sleep(0.1)


def _duration(text: str) -> float:
    text = text.strip()
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    return float(text.removesuffix("s"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--id", required=True)
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--role", choices=["leader", "follower"], required=True)
    p.add_argument("--leader", help="followers: the leader's id")
    p.add_argument("--leader-url", help="followers: the leader's URL (its replication stream)")
    p.add_argument("--rate", type=float, default=500.0, help="reads served per second at most (default 500)")
    p.add_argument("--burst", type=int, default=1, help="token bucket size (default 1: no bursts)")
    p.add_argument("--tick", type=_duration, default=0.05, help="announce period (default 50ms)")
    p.add_argument("--announce-applied", type=_duration, default=0.0, metavar="PERIOD",
                   help="also announce as soon as the applied index moves, at most once per PERIOD "
                        "(default 0: only on ticks)")
    p.add_argument("--lag", type=_duration, default=0.005,
                   help="followers: apply each entry this long after receiving it (default 5ms)")
    args = p.parse_args(argv)
    if args.role == "follower" and not (args.leader and args.leader_url):
        p.error("a follower needs --leader and --leader-url")
    return args


async def run(args: argparse.Namespace) -> int:
    node = Node(args)
    host, _, port = args.listen.rpartition(":")
    server = await serve(node.handle, host, int(port), name=f"capnode-{node.id}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    follower = asyncio.create_task(node.follow()) if not node.is_leader else None
    await stop.wait()
    node.closing.set()
    if follower is not None:
        follower.cancel()
    await server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        return uvloop.run(run(args))
    except ImportError:
        return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
