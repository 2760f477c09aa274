"""One demo cluster node: the replicated KV store behind raftlb's native protocol ("raft-announce/1").

    python -m raftlb.demo.node --id n1 --http 127.0.0.1:7001 --raft 127.0.0.1:7101 \\
        --peer n2=127.0.0.1:7002/127.0.0.1:7102 --peer n3=127.0.0.1:7003/127.0.0.1:7103 --data-dir /tmp/n1

HTTP API: `PUT|GET|DELETE /kv/{key}`, `GET /kv?prefix=p`, `GET /raft/status`, `GET /raft/announce` (SSE),
`GET /raft/read_index`. Every response carries `X-Raft-Index`, `X-Raft-Term` and `X-Raft-Node`. Writes sent to
a follower get `421` with `X-Raft-Leader`; writes carrying `X-Raft-Session`/`X-Raft-Seq`, or an
`Idempotency-Key`, apply at most once (a repeat gets the first result, with `X-Raft-Duplicate: true`).

Test only, off by default: with `--debug-partition-control`, `GET|POST /debug/partition` reads or sets the
peers whose Raft messages this node drops (`{"isolate": ["n2", "n3"]}`; `[]` heals): a network partition
between Raft peers that leaves the client and announce port reachable. `"claim_quorum": true` makes a leader
announce `has_quorum: true` whatever it knows, like a leader without CheckQuorum (see tests/integration/
test_fault_injection.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from raftlb.demo.kv import (
    OP_DELETE,
    OP_NOOP,
    OP_PUT,
    ROLE_LEADER,
    Command,
    RaftKV,
    RaftSettings,
    RaftStatus,
    WriteRefused,
)
from raftlb.http.app import EventStream, Request, Response, Send, json_response, serve
from raftlb.tasks import TaskSet

log = logging.getLogger("raftlb.demo")

ANNOUNCE_INTERVAL = 0.05  # one announce event per heartbeat tick
EXIT_BIND_FAILED = 3
MAX_IDEMPOTENCY_KEY = 256  # characters


@dataclass(frozen=True)
class Peer:
    """Another member: its id, client (HTTP) address and Raft transport address."""

    id: str
    http: tuple[str, int]
    raft: str  # host:port, exactly as the peer itself was given it with --raft

    @property
    def url(self) -> str:
        return f"http://{self.http[0]}:{self.http[1]}"


@dataclass(frozen=True)
class NodeConfig:
    id: str
    http: tuple[str, int]
    raft: str
    peers: tuple[Peer, ...]
    data_dir: Path
    raft_settings: RaftSettings
    write_timeout: float = 3.0
    parent_pid: int | None = None
    pdeathsig: bool = False
    debug_partition_control: bool = False


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{what}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def _peer(text: str) -> Peer:
    node_id, sep, addrs = text.partition("=")
    http, slash, raft = addrs.partition("/")
    if not sep or not node_id or not slash:
        raise argparse.ArgumentTypeError(f"--peer: expected ID=HTTP_HOST:PORT/RAFT_HOST:PORT, got {text!r}")
    _host_port(raft, "--peer raft address")
    return Peer(node_id, _host_port(http, "--peer http address"), raft)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftlb demo-node", description="A node of the demo Raft KV cluster.")
    p.add_argument("--id", required=True, help="this node's id, e.g. n1")
    p.add_argument("--http", required=True, metavar="HOST:PORT", help="client API and announce listener")
    p.add_argument("--raft", required=True, metavar="HOST:PORT", help="Raft transport address (PySyncObj)")
    p.add_argument("--peer", action="append", default=[], type=_peer, metavar="ID=HTTP/RAFT",
                   help="another member, e.g. n2=127.0.0.1:7002/127.0.0.1:7102 (repeat per peer)")
    p.add_argument("--data-dir", required=True, type=Path, help="journal and snapshot directory (created)")
    p.add_argument("--election-timeout", default="0.3:0.6", metavar="MIN:MAX",
                   help="randomized election timeout in seconds (default 0.3:0.6)")
    p.add_argument("--heartbeat", type=float, default=0.05, help="append-entries period in seconds")
    p.add_argument("--leader-fallback", type=float, default=1.0,
                   help="a leader not heard back from a majority this long steps down (seconds)")
    p.add_argument("--write-timeout", type=float, default=3.0, help="503 timeout after this many seconds")
    p.add_argument("--session-ttl", type=float, default=600.0,
                   help="session and Idempotency-Key expiry (seconds of log time)")
    p.add_argument("--compaction-entries", type=int, default=100_000, help="snapshot the log after N entries")
    p.add_argument("--parent-pid", type=int, help="exit when this process dies (used by DemoCluster)")
    p.add_argument("--pdeathsig", action="store_true",
                   help="Linux: get SIGKILL when the parent thread dies, even if stopped (PR_SET_PDEATHSIG)")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="event loop (auto: uvloop when installed)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--debug-partition-control", action="store_true",
                   help="TESTS ONLY: serve /debug/partition, which makes this node drop its Raft messages "
                        "to and from chosen peers (a partition that raftlb can still see across)")
    return p


def parse_args(argv: list[str] | None) -> tuple[NodeConfig, str, str]:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        http = _host_port(ns.http, "--http")
        _host_port(ns.raft, "--raft")
        lo, _, hi = ns.election_timeout.partition(":")
        election = (float(lo), float(hi or lo))
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    ids = [ns.id, *(p.id for p in ns.peer)]
    if len(set(ids)) != len(ids):
        parser.error(f"--peer: node ids must be unique, got {ids}")
    if not 0 < election[0] <= election[1] or ns.heartbeat * 2 > election[0]:
        parser.error("--election-timeout: need 0 < MIN <= MAX and MIN >= 2 x --heartbeat")
    settings = RaftSettings(
        election_timeout=election, heartbeat=ns.heartbeat, leader_fallback=ns.leader_fallback,
        session_ttl=ns.session_ttl, compaction_entries=ns.compaction_entries)
    cfg = NodeConfig(ns.id, http, ns.raft, tuple(ns.peer), ns.data_dir, settings, ns.write_timeout,
                     ns.parent_pid, ns.pdeathsig, ns.debug_partition_control)
    return cfg, ns.log_level, ns.loop


class PartitionControl:
    """Test only (`--debug-partition-control`): drops this node's Raft messages to and from chosen peers.

    The node's PySyncObj transport is wrapped so that messages to an isolated peer vanish (sending "succeeds")
    and messages from it are ignored: to both sides it looks like a network partition that loses packets,
    while the TCP connections, the client port and the announce stream stay up. An isolated leader keeps
    announcing `role=leader` at its old term (with `has_quorum: false` once its followers fall silent) until
    its leader fallback timeout, exactly what raftlb must never send writes to once a higher term exists.
    """

    def __init__(self, raft: RaftKV, peers: tuple[Peer, ...]) -> None:
        self.claim_quorum = False  # announce has_quorum: true as a leader, whatever the node knows
        self._addr_of = {p.id: p.raft for p in peers}
        self._blocked: frozenset[str] = frozenset()  # raft addresses; swapped whole, read on the tick thread
        transport: Any = raft.raft_transport()  # (PySyncObj's, private to it: this hook exists for tests)
        send, deliver = transport.send, transport._onMessageReceivedCallback

        def filtered_send(node: Any, message: Any) -> bool:
            if getattr(node, "address", None) in self._blocked:
                return True  # lost on the way
            return bool(send(node, message))

        def filtered_deliver(node: Any, message: Any) -> None:
            if getattr(node, "address", None) not in self._blocked:
                deliver(node, message)

        transport.send = filtered_send
        transport._onMessageReceivedCallback = filtered_deliver

    @property
    def isolated(self) -> list[str]:
        return sorted(pid for pid, addr in self._addr_of.items() if addr in self._blocked)

    def isolate(self, peer_ids: list[str]) -> None:
        """Drop Raft traffic with exactly these peers from now on (an empty list heals)."""
        unknown = [p for p in peer_ids if p not in self._addr_of]
        if unknown:
            raise ValueError(f"unknown peers {unknown}; peers are {sorted(self._addr_of)}")
        self._blocked = frozenset(self._addr_of[p] for p in peer_ids)
        log.warning("node partition control: Raft traffic with %s is now dropped", self.isolated or "nobody")


class NodeApp:
    """The HTTP face of one node: KV API, status and announce stream."""

    def __init__(self, cfg: NodeConfig, raft: RaftKV, partition: PartitionControl | None = None) -> None:
        self.cfg = cfg
        self.raft = raft
        self.partition = partition
        self.urls = {p.id: p.url for p in cfg.peers}
        self.status_seq = 0
        self.closing = asyncio.Event()

    def close(self) -> None:
        """End every announce stream."""
        self.closing.set()

    async def handle(self, req: Request) -> Response | EventStream:
        path = req.path
        if path.startswith("/kv/"):
            return await self._kv(req, unquote(path[4:]))
        if path == "/kv":
            return self._only_get(req) or self._scan(req.query.get("prefix", ""))
        if path == "/raft/status":
            if (refused := self._only_get(req)) is not None:
                return refused
            self.status_seq += 1
            return json_response(self.event(self.raft.status, self.status_seq), headers=self._headers())
        if path == "/raft/announce":
            return self._only_get(req) or EventStream(self._announce, headers=self._headers())
        if path == "/raft/read_index":
            return self._only_get(req) or await self._read_index()
        if path == "/debug/partition" and self.partition is not None:
            return self._partition(req, self.partition)
        return json_response({"error": "not_found", "path": path}, 404, self._headers())

    def event(self, st: RaftStatus, seq: int) -> dict[str, object]:
        """One announcement (docs/protocol.md); `has_quorum` only from a leader."""
        doc: dict[str, object] = {
            "node": self.cfg.id, "term": st.term, "role": st.role, "leader": st.leader,
            "commit_index": st.commit_index, "applied_index": st.applied_index,
        }
        if st.role == ROLE_LEADER:
            doc["has_quorum"] = st.has_quorum or (self.partition is not None and self.partition.claim_quorum)
        doc["seq"] = seq
        doc["ts_ms"] = int(time.time() * 1000)
        return doc

    async def _announce(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        seq = 0
        next_tick = loop.time()
        while not self.closing.is_set():
            now = loop.time()
            if now >= next_tick:  # a tick (not a change) is due: schedule the next one, skipping missed ones
                next_tick = max(next_tick, now - ANNOUNCE_INTERVAL / 2) + ANNOUNCE_INTERVAL
            st = self.raft.status
            seq += 1
            await send(b"data: " + json.dumps(self.event(st, seq), separators=(",", ":")).encode() + b"\n\n")
            last = st.identity()
            # Sleep until the next tick, but wake at once when term, role or leader change.
            while (not self.closing.is_set() and loop.time() < next_tick
                   and self.raft.status.identity() == last):
                await self.raft.wait_change(next_tick - loop.time())

    async def _kv(self, req: Request, key: str) -> Response:
        if not key:
            return self._error(400, "bad_request", detail="empty key")
        if req.method in ("GET", "HEAD"):
            value, index = self.raft.kv.read(key)
            if value is None:
                return json_response({"error": "not_found", "key": key}, 404, self._headers(index))
            return Response(200, value, self._headers(index), "application/octet-stream")
        if req.method == "PUT":
            return await self._write(req, Command(OP_PUT, key, req.body))
        if req.method == "DELETE":
            return await self._write(req, Command(OP_DELETE, key))
        return self._error(405, "method_not_allowed", allow="GET, PUT, DELETE")

    def _scan(self, prefix: str) -> Response:
        items, index = self.raft.kv.scan(prefix)
        body = [{"key": k, "value": v.decode("utf-8", "replace")} for k, v in items]
        return json_response(body, headers=self._headers(index))

    async def _write(self, req: Request, cmd: Command) -> Response:
        session = req.headers.get("x-raft-session")
        if session is not None:
            seq = req.headers.get("x-raft-seq", "")
            if not seq.isdigit():
                return self._error(400, "bad_request", detail="X-Raft-Session needs an integer X-Raft-Seq")
            cmd = Command(cmd.op, cmd.key, cmd.value, session, int(seq))
        idempotency_key = req.headers.get("idempotency-key")
        if idempotency_key is not None:
            idempotency_key = idempotency_key.strip()
            if not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY or "," in idempotency_key:
                return self._error(400, "bad_request",
                                   detail=f"Idempotency-Key must be one value of 1 to {MAX_IDEMPOTENCY_KEY} "
                                          "characters")
            cmd = replace(cmd, idempotency_key=idempotency_key)
        try:
            result = await self.raft.submit(cmd, self.cfg.write_timeout)
        except WriteRefused as exc:
            return self._refused(exc)
        headers = self._headers(result.index)
        if result.duplicate:
            headers.append(("X-Raft-Duplicate", "true"))
        doc: dict[str, object] = {"index": result.index, "key": cmd.key}
        if result.error is not None:
            doc = {"error": result.error, **doc}
        elif cmd.op == OP_PUT:
            doc["created"] = not result.existed
        else:
            doc["deleted"] = True
        return json_response(doc, result.status, headers)

    async def _read_index(self) -> Response:
        try:
            result = await self.raft.submit(Command(OP_NOOP), self.cfg.write_timeout)
        except WriteRefused as exc:
            return self._refused(exc)
        term = self.raft.status.term
        return json_response({"read_index": result.index, "term": term}, headers=self._headers(result.index))

    def _partition(self, req: Request, control: PartitionControl) -> Response:
        if req.method == "POST":
            try:
                doc = json.loads(req.body or b"{}")
                peers = doc.get("isolate") if isinstance(doc, dict) else None
                claim = doc.get("claim_quorum", False) if isinstance(doc, dict) else None
                if (not isinstance(peers, list) or not all(isinstance(p, str) for p in peers)
                        or not isinstance(claim, bool)):
                    raise ValueError('expected {"isolate": ["<peer id>", ...], "claim_quorum": false}')
                control.isolate(peers)
                control.claim_quorum = claim
            except ValueError as exc:
                return self._error(400, "bad_request", detail=str(exc))
        elif req.method != "GET":
            return self._error(405, "method_not_allowed", allow="GET, POST")
        doc = {"node": self.cfg.id, "isolate": control.isolated, "claim_quorum": control.claim_quorum}
        return json_response(doc, headers=self._headers())

    def _refused(self, exc: WriteRefused) -> Response:
        if exc.status == 421:
            leader = exc.leader or ""
            headers = [("X-Raft-Leader", leader)]
            if leader in self.urls:
                headers.append(("X-Raft-Leader-Url", self.urls[leader]))
            return self._error(421, "not_leader", headers, leader=exc.leader)
        return self._error(exc.status, exc.code, [("Retry-After", "1")])

    def _only_get(self, req: Request) -> Response | None:
        if req.method in ("GET", "HEAD"):
            return None
        return self._error(405, "method_not_allowed", allow="GET")

    def _error(self, status: int, code: str, extra: list[tuple[str, str]] | None = None,
               **fields: object) -> Response:
        headers = self._headers()
        if "allow" in fields:
            headers.append(("Allow", str(fields["allow"])))
        headers.extend(extra or ())
        return json_response({"error": code, **fields}, status, headers)

    def _headers(self, index: int | None = None) -> list[tuple[str, str]]:
        st = self.raft.status
        return [("X-Raft-Index", str(st.applied_index if index is None else index)),
                ("X-Raft-Term", str(st.term)), ("X-Raft-Node", self.cfg.id)]


async def run(cfg: NodeConfig) -> int:
    """Lifecycle: start Raft → serve HTTP → wait for SIGTERM/SIGINT or the parent's death → shut down."""
    loop = asyncio.get_running_loop()
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    peers = {p.raft: p.id for p in cfg.peers}
    raft = RaftKV(cfg.id, cfg.raft, peers, cfg.data_dir, cfg.raft_settings, loop)
    if not await asyncio.to_thread(raft.wait_bound):
        log.error("node %s: cannot bind the Raft address %s", cfg.id, cfg.raft)
        raft.close()
        return EXIT_BIND_FAILED
    partition = PartitionControl(raft, cfg.peers) if cfg.debug_partition_control else None
    app = NodeApp(cfg, raft, partition)
    try:
        server = await serve(app.handle, cfg.http[0], cfg.http[1], name=f"demo-{cfg.id}")
    except OSError as exc:
        log.error("node %s: cannot listen on %s:%d: %s", cfg.id, *cfg.http, exc)
        raft.close()
        return EXIT_BIND_FAILED
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = TaskSet(f"demo-{cfg.id}")
    tasks.spawn(_watch_parent(cfg.parent_pid, stop), "parent-watch")
    log.info("node %s up: http=%s:%d raft=%s data=%s", cfg.id, *cfg.http, cfg.raft, cfg.data_dir)
    await stop.wait()
    # Shutdown: 1. end the announce streams and stop accepting; 2. let in-flight requests finish (bounded);
    # 3. close the rest; 4. stop Raft (flushes the journal).
    await tasks.close()
    app.close()
    await server.drain(1.0)
    await server.close()
    raft.close()
    log.info("node %s stopped", cfg.id)
    return 0


RESTART_HINT = ("--parent-pid and --pdeathsig are for the nodes `raftlb demo` starts itself: to start a "
                "stopped demo node again, type `restart ID` in the terminal of `raftlb demo --keep`")


async def _watch_parent(parent_pid: int | None, stop: asyncio.Event) -> None:
    if parent_pid is None:
        return
    if os.getppid() != parent_pid:  # never was: started by hand with a command line copied from ps
        log.error("parent %d is not this process's parent (%d); stopping. %s", parent_pid, os.getppid(),
                  RESTART_HINT)
        stop.set()
        return
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.2)
    log.warning("parent %d is gone; stopping", parent_pid)
    stop.set()


def _die_with_parent(parent_pid: int | None) -> None:
    """On Linux, ask the kernel for SIGKILL when the parent goes (works even while we are SIGSTOPped)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # gone before prctl took effect, or never was
        print(f"raftlb demo-node: parent {parent_pid} is gone or not this process's parent; {RESTART_HINT}",
              file=sys.stderr, flush=True)
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    cfg, level, loop = parse_args(argv)
    if cfg.pdeathsig:
        _die_with_parent(cfg.parent_pid)
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(run(cfg))
    return asyncio.run(run(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
