"""`raftlb announce`: a sidecar that gives a node without push announcements a raft-announce/1 stream.

It runs beside one node, polls that node's own status API every few milliseconds through an adapter (etcd,
json), and serves the wire contract of docs/protocol.md on its own port:

    GET /raft/announce   text/event-stream: one event per tick, and one at once when term, role or leader
                         change; `seq` rises by one per event on a stream
    GET /raft/status     the same object once

While the node does not answer (refused, silent past the liveness timeout), both answer 503 and open streams
end: a proxy stops hearing the node, exactly as it would from the node itself. Point the node's
`announce_url` at the sidecar and set `sidecar: true` on the cluster (docs/clusters.md).

    raftlb announce --kind etcd --node-id n1 --node-url http://127.0.0.1:2379 --listen 127.0.0.1:2479
    raftlb announce -c configs/etcd-sidecar.yaml --node n1        # listens on n1's announce_url
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from raftlb.config.load import load_config
from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.client import make_client
from raftlb.control.kinds import make_adapter
from raftlb.control.poll import NodePoller
from raftlb.core.announcement import Announcement, sign
from raftlb.errors import ConfigError
from raftlb.http.app import EventStream, Request, Response, Send, json_response, serve
from raftlb.tasks import TaskSet
from raftlb.tools.loop import run_async

log = logging.getLogger("raftlb.tools.announce")

EXIT_USAGE, EXIT_BIND_FAILED = 2, 3


@dataclass(frozen=True)
class AnnounceConfig:
    """One sidecar: the cluster as the adapter needs it (kind, nodes, timings), the node it speaks for, where
    it reads that node's status, where it listens, and how often it sends an unchanged event."""

    cluster: ClusterConfig
    node: NodeConfig
    status_url: str
    host: str
    port: int
    tick: float = 0.05
    key: bytes | None = None  # sign every event (`sig`, docs/protocol.md) with this announce_auth key


def _identity(ann: Announcement) -> tuple[int, str, str | None]:
    return ann.term, ann.role, ann.leader


class Announcer:
    """The latest announcement of one node, and the HTTP face that serves it (module doc)."""

    def __init__(self, node_id: str, tick: float, key: bytes | None = None) -> None:
        self.node_id = node_id
        self.tick = tick
        self.key = key
        self.current: Announcement | None = None
        self.down_reason = "not polled yet"
        self.status_seq = 0
        self.streams = 0  # open announce streams
        self._changed = asyncio.Event()  # replaced after each change: waiters hold the one they saw
        self._closing = False

    def on_announcement(self, node_id: str, ann: Announcement) -> None:
        prev, self.current = self.current, ann
        if prev is None or _identity(prev) != _identity(ann):
            self._wake()

    def on_down(self, node_id: str, reason: str) -> None:
        self.current, self.down_reason = None, reason
        self._wake()

    def close(self) -> None:
        """End every announce stream."""
        self._closing = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def event(self, ann: Announcement, seq: int) -> bytes:
        doc: dict[str, Any] = {**ann.to_json(), "seq": seq, "ts_ms": int(time.time() * 1000)}
        if self.key is not None:
            doc["sig"] = sign(doc, self.key)
        return json.dumps(doc, separators=(",", ":")).encode()

    async def handle(self, req: Request) -> Response | EventStream:
        if req.path not in ("/raft/status", "/raft/announce"):
            return json_response({"error": "not_found", "path": req.path}, 404)
        if req.method not in ("GET", "HEAD"):
            return json_response({"error": "method_not_allowed"}, 405, [("Allow", "GET")])
        ann = self.current
        if ann is None:
            return json_response({"error": "node_unreachable", "node": self.node_id,
                                  "detail": self.down_reason}, 503, [("Retry-After", "1")])
        if req.path == "/raft/status":
            self.status_seq += 1
            return Response(200, self.event(ann, self.status_seq) + b"\n")
        return EventStream(self._announce, [("x-accel-buffering", "no")])

    async def _announce(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        seq = 0
        next_tick = loop.time()
        self.streams += 1
        try:
            while not self._closing and (ann := self.current) is not None:
                now = loop.time()
                if now >= next_tick:  # a tick is due: schedule the next one, skipping missed ones
                    next_tick = max(next_tick, now - self.tick / 2) + self.tick
                seq += 1
                await send(b"data: " + self.event(ann, seq) + b"\n\n")
                # Sleep until the next tick, but wake at once when term, role or leader change.
                while not self._closing and loop.time() < next_tick:
                    changed = self._changed
                    cur = self.current
                    if cur is None or _identity(cur) != _identity(ann):
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(next_tick - loop.time()):
                            await changed.wait()
        finally:
            self.streams -= 1


async def run(cfg: AnnounceConfig) -> int:
    """Lifecycle: poll → serve → wait for SIGTERM/SIGINT → end streams, stop serving, stop polling."""
    loop = asyncio.get_running_loop()
    announcer = Announcer(cfg.node.id, cfg.tick, cfg.key)
    client = make_client()
    tasks = TaskSet(f"announce-{cfg.node.id}")
    poller = NodePoller(make_adapter(cfg.cluster, cfg.node, cfg.status_url), cfg.cluster, client,
                        announcer.on_announcement, announcer.on_down)
    try:
        server = await serve(announcer.handle, cfg.host, cfg.port, name=f"announce-{cfg.node.id}")
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, exc)
        await client.aclose()
        return EXIT_BIND_FAILED
    tasks.spawn(poller.run(), name="poll")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("announcing %s node %s (status %s every %gs) on %s:%d", cfg.cluster.kind, cfg.node.id,
             cfg.status_url, cfg.cluster.poll_interval, cfg.host, server.port)
    await stop.wait()
    # Shutdown: 1. end the streams; 2. stop serving (in-flight answers get a second); 3. stop polling.
    announcer.close()
    await server.drain(1.0)
    await server.close()
    await tasks.close()
    await client.aclose()
    return 0


# -- command line -----------------------------------------------------------------------------------------

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s)?")


def _duration(text: str) -> float:
    m = _DURATION.fullmatch(text.strip())
    if m is None or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 5ms or 1s, got {text!r}")
    return float(m[1]) / (1000 if m[2] == "ms" else 1)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _node(node_id: str, url: str) -> NodeConfig:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// URL with host and port, got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    base = f"{parts.scheme}://{parts.netloc}"
    return NodeConfig(id=node_id, url=base, announce_url=base, host=parts.hostname, port=port)


def _peer(text: str) -> NodeConfig:
    node_id, sep, url = text.partition("=")
    if not sep or not node_id:
        raise argparse.ArgumentTypeError(f"expected ID=URL, got {text!r}")
    return _node(node_id, url)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raftlb announce",
        description="Poll one node's own status API every few milliseconds and serve raft-announce/1 "
                    "(GET /raft/announce, GET /raft/status) for it, so raftlb subscribes instead of polling.",
        epilog="examples:\n"
               "  raftlb announce --kind etcd --node-id n1 --node-url http://127.0.0.1:2379 "
               "--listen 127.0.0.1:2479\n"
               "  raftlb announce -c cluster.yaml --node n1      # listens on n1's announce_url",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="raftlb config: the node's cluster gives kind, nodes and settings")
    p.add_argument("--node", help="with -c: the id of the node this sidecar speaks for")
    p.add_argument("--cluster", help="with -c: the cluster's name (default: the one holding --node)")
    p.add_argument("--kind", choices=["etcd"], help="without -c: the kind of node (json needs -c)")
    p.add_argument("--node-id", help="without -c: the id raftlb knows the node by")
    p.add_argument("--node-url", type=str, help="without -c: the node's own client URL (its status API)")
    p.add_argument("--peer", action="append", default=[], type=_peer, metavar="ID=URL",
                   help="without -c: another member, so its id can be named as leader (repeat)")
    p.add_argument("--listen", type=_host_port, metavar="HOST:PORT", help="where to serve the stream")
    p.add_argument("--interval", type=_duration, default=0.005, help="status poll period (default 5ms)")
    p.add_argument("--tick", type=_duration, default=0.05, help="event period while nothing changes "
                                                                "(default 50ms)")
    p.add_argument("--liveness-timeout", type=_duration,
                   help="the node is unreachable after this long without an answer (default: the "
                        "cluster's liveness_timeout, or 1s)")
    p.add_argument("--key-file", type=Path, help="sign events with the key in this file (announce_auth; "
                                                 "default with -c: the cluster's newest key)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse_args(argv: list[str] | None) -> tuple[AnnounceConfig, str]:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cluster, node = _from_config(ns) if ns.config else _from_flags(ns)
    except (ConfigError, ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    timing = {"poll_interval": ns.interval}
    if ns.liveness_timeout is not None:
        timing["liveness_timeout"] = ns.liveness_timeout
    cluster = replace(cluster, **timing)
    listen = ns.listen
    if listen is None:
        if node.announce_url == node.url:
            parser.error("--listen is required (or give the node an announce_url in the config)")
        listen = (urlsplit(node.announce_url).hostname or "", urlsplit(node.announce_url).port or 80)
    key = cluster.announce_keys[-1] if cluster.announce_keys else None
    if ns.key_file is not None:
        try:
            key = ns.key_file.read_bytes().strip()
        except OSError as exc:
            parser.error(f"--key-file: {exc.strerror or exc}")
        if len(key) < 16:
            parser.error("--key-file: an announcement key must be at least 16 bytes")
    return AnnounceConfig(cluster, node, node.url, listen[0], listen[1], ns.tick, key), ns.log_level


def _from_config(ns: argparse.Namespace) -> tuple[ClusterConfig, NodeConfig]:
    if not ns.node:
        raise ValueError("-c needs --node: the id of the node this sidecar speaks for")
    clusters = [c for c in load_config(ns.config).clusters if (ns.cluster or c.name) == c.name
                and any(n.id == ns.node for n in c.nodes)]
    if len(clusters) != 1:
        where = f"cluster {ns.cluster}" if ns.cluster else "exactly one cluster"
        raise ValueError(f"node {ns.node!r} is not in {where} of {ns.config}")
    cluster = clusters[0]
    if cluster.kind == "native":
        raise ValueError(f"cluster {cluster.name} is kind native: its nodes announce themselves")
    return cluster, next(n for n in cluster.nodes if n.id == ns.node)


def _from_flags(ns: argparse.Namespace) -> tuple[ClusterConfig, NodeConfig]:
    if not (ns.kind and ns.node_id and ns.node_url):
        raise ValueError("give -c FILE --node ID, or --kind, --node-id and --node-url")
    node = _node(ns.node_id, ns.node_url)
    nodes = (node, *(p for p in ns.peer if p.id != node.id))
    return ClusterConfig(name=f"{ns.kind}-{node.id}", kind=ns.kind, nodes=nodes, routes=()), node


def main(argv: list[str] | None = None) -> int:
    cfg, level = parse_args(argv)
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_async(lambda: run(cfg))
