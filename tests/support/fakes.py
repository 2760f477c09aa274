"""Fake Raft nodes for tests: loopback HTTP/1.1 servers whose term, role, leader and indexes a test sets.

A `FakeNode` speaks the raft-announce/1 wire contract (docs/protocol.md) inside the test's event loop:

    GET /raft/announce   text/event-stream; one JSON event at once, on every `set()`, and every `tick` s
    GET /raft/status     the same JSON object once (hangs while the node is silenced)
    anything else        client traffic: recorded in `node.requests`, answered by `node.handler` or the
                         default behaviour (see `FakeNode.default_response`)

    async with FakeNode("n1", role="leader", term=3) as node:
        node.set(role="follower", leader="n2")      # pushed to open announce streams at once
        node.handler = fakes.delay(0.5)              # default answer, half a second late
        await node.wait_until(lambda: len(node.requests) >= 1)

`FakeCluster` starts several nodes and moves leadership between them (`elect`, `no_leader`);
`cluster_config()` turns nodes into the `ClusterConfig` the proxy and the subscriptions take.
Handlers are async callables `(FakeRequest) -> FakeResponse | None` (None: the default answer); the
module provides `echo`, `hang`, `close_after_read`, `reset_after_read`, `delay`, `respond`, `sequence`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from http import HTTPStatus
from typing import Any, Literal

import h11

from raftlb.config.model import ClusterConfig, NodeConfig, RouteConfig

log = logging.getLogger("tests.fakes")

ROLES = ("leader", "follower", "candidate", "learner")
WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
CHUNK = 64 * 1024


class _Unset(Enum):
    UNSET = 0


UNSET = _Unset.UNSET


def fake_bytes(n: int) -> bytes:
    """The `n` deterministic bytes `GET /bytes/{n}` answers with (compare a relayed body against it)."""
    pattern = bytes(range(256))
    return (pattern * (n // 256 + 1))[:n]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def sign(doc: dict[str, Any], key: bytes) -> str:
    """The `sig` of an announcement: HMAC-SHA256 hex over the event without `sig`, sorted keys, no spaces."""
    body = json.dumps({k: v for k, v in doc.items() if k != "sig"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


@dataclass
class FakeRequest:
    """One client request as the node received it. Header names are lowercase, in arrival order."""

    method: str
    target: str  # as sent: path and query
    headers: list[tuple[str, str]]
    body: bytes
    time: float  # time.monotonic() when the request head arrived
    term: int  # the node's term and role at that moment
    role: str
    node: FakeNode = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return f"<FakeRequest {self.method} {self.target} {len(self.body)}B term={self.term} {self.role}>"

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class FakeResponse:
    """What the node answers. `body` may be an async iterable of chunks (sent chunked).

    action="close" closes the connection without answering (FIN), "reset" aborts it (RST);
    `truncate=n` sends the head and the first n body bytes, then aborts the connection.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterable[bytes] = b""
    chunked: bool = False
    action: Literal["respond", "close", "reset"] = "respond"
    truncate: int | None = None

    @classmethod
    def json(cls, doc: object, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> FakeResponse:
        return cls(status, [("content-type", "application/json"), *headers], json.dumps(doc).encode())


Handler = Callable[[FakeRequest], Awaitable[FakeResponse | None]]


# -- behaviours for node.handler -------------------------------------------------------------------------


async def echo(req: FakeRequest) -> FakeResponse:
    """200 with the request body and content-type, plus the node's X-Raft-Index/X-Raft-Term."""
    ctype = req.header("content-type") or "application/octet-stream"
    return FakeResponse(200, [("content-type", ctype), *req.node.raft_headers()], req.body)


async def hang(req: FakeRequest) -> FakeResponse:
    """Never answer (the connection stays open until the client or `node.stop()` closes it)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def close_after_read(req: FakeRequest) -> FakeResponse:
    """Read the whole request, then close the connection without answering."""
    return FakeResponse(action="close")


async def reset_after_read(req: FakeRequest) -> FakeResponse:
    """Read the whole request, then abort the connection (RST) without answering."""
    return FakeResponse(action="reset")


def delay(seconds: float, then: Handler | None = None) -> Handler:
    """Wait `seconds`, then answer like `then` (default: the node's default answer)."""

    async def handler(req: FakeRequest) -> FakeResponse | None:
        await asyncio.sleep(seconds)
        return await then(req) if then is not None else None

    return handler


def respond(status: int, body: bytes | object = b"", headers: Iterable[tuple[str, str]] = ()) -> Handler:
    """Always answer `status` with `body` (bytes as is; anything else as JSON)."""
    resp = (
        FakeResponse(status, list(headers), body)
        if isinstance(body, bytes)
        else FakeResponse.json(body, status, headers)
    )

    async def handler(req: FakeRequest) -> FakeResponse:
        return FakeResponse(resp.status, list(resp.headers), resp.body)

    return handler


def sequence(*handlers: Handler | None) -> Handler:
    """The i-th request is answered by handlers[i] (None: default); once they run out, the default."""
    queue = list(handlers)

    async def handler(req: FakeRequest) -> FakeResponse | None:
        h = queue.pop(0) if queue else None
        return await h(req) if h is not None else None

    return handler


# -- the node ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Stream:
    conn: h11.Connection
    writer: asyncio.StreamWriter
    seq: int = 0


class FakeNode:
    """A fake announcing Raft node on 127.0.0.1 (see the module doc). Set state with `set()`; `silence()`
    stops announcements (streams stay open, status polls hang) until `resume()`; `cut_streams()` aborts
    announce connections; `inject_raw()` / `inject_event()` write arbitrary events to them.

    Counters for assertions: `requests`, `stream_opens` (announce streams ever opened), `stream_count`
    (open now), `status_polls`. `stop()` then `start()` restarts it on the same port.
    """

    def __init__(
        self,
        node_id: str = "n1",
        *,
        term: int = 1,
        role: str = "follower",
        leader: str | None | _Unset = UNSET,
        commit_index: int = 0,
        applied_index: int = 0,
        has_quorum: bool = True,
        tick: float = 0.05,
        serve_stream: bool = True,
        port: int = 0,
        handler: Handler | None = None,
        key: bytes | None = None,
    ) -> None:
        self.id = node_id
        self._check_role(role)
        self.term, self.role = term, role
        self.leader = (node_id if role == "leader" else None) if leader is UNSET else leader
        self.commit_index, self.applied_index, self.has_quorum = commit_index, applied_index, has_quorum
        self.tick = tick
        self.serve_stream = serve_stream
        self.handler = handler
        self.key = key  # when set, every event carries `sig`
        self.ssl: Any = None  # an ssl.SSLContext before start(): serve HTTPS
        self.port = port
        self.announcing = True
        self.requests: list[FakeRequest] = []
        self.stream_opens = 0
        self.status_polls = 0
        self._seq = 0  # node-wide, for /raft/status
        self._streams: set[_Stream] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<FakeNode {self.id} :{self.port} {self.role} term={self.term} leader={self.leader} "
            f"applied={self.applied_index} [{len(self._streams)} streams, {len(self.requests)} requests]>"
        )

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def node_config(self) -> NodeConfig:
        return NodeConfig(id=self.id, url=self.url, announce_url=self.url, host="127.0.0.1", port=self.port)

    # -- lifecycle

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick_loop(), name=f"fake-node-{self.id}-tick")

    async def stop(self) -> None:
        """1. stop accepting; 2. stop ticking; 3. abort every connection; 4. wait for the handlers."""
        if self._server is None:
            return
        self._server.close()
        assert self._ticker is not None
        self._ticker.cancel()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = [self._ticker, *self._conn_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = self._ticker = None
        self._streams.clear()

    async def __aenter__(self) -> FakeNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- state a test sets

    def set(
        self,
        *,
        term: int | None = None,
        role: str | None = None,
        leader: str | None | _Unset = UNSET,
        applied_index: int | None = None,
        commit_index: int | None = None,
        has_quorum: bool | None = None,
    ) -> None:
        """Change state and push an event to every announce stream at once (unless silenced).

        Setting `role` without `leader` makes a new leader name itself and drops a self-reference otherwise.
        """
        if role is not None:
            self._check_role(role)
            self.role = role
            if leader is UNSET:
                leader = self.id if role == "leader" else (None if self.leader == self.id else self.leader)
        if leader is not UNSET:
            self.leader = leader
        if term is not None:
            self.term = term
        if applied_index is not None:
            self.applied_index = applied_index
            self.commit_index = max(self.commit_index, applied_index)
        if commit_index is not None:
            self.commit_index = commit_index
        if has_quorum is not None:
            self.has_quorum = has_quorum
        self._notify()
        if self.announcing:
            self._push_all()

    def silence(self) -> None:
        """Stop announcing: no events (streams stay open), and /raft/status hangs."""
        self.announcing = False
        self._resumed.clear()

    def resume(self) -> None:
        """Announce again, starting with an event at once."""
        self.announcing = True
        self._resumed.set()
        self._push_all()

    def cut_streams(self) -> None:
        """Abort every open announce connection (RST, no chunked terminator)."""
        for stream in list(self._streams):
            stream.writer.transport.abort()

    def drop_connections(self) -> None:
        """Abort every connection: announce streams and client keep-alive connections alike."""
        for writer in list(self._writers):
            writer.transport.abort()

    def inject_raw(self, data: bytes) -> None:
        """Write `data` as is into every open announce stream, e.g. b"data: {not json}\\n\\n"."""
        for stream in list(self._streams):
            self._write(stream, data)

    def inject_event(self, **fields: Any) -> None:
        """Push one event built from the current state with `fields` overridden (e.g. node="n9", seq=0).

        Without a `seq` override the stream's seq rises as usual; with one, the stream's counter is kept."""
        for stream in list(self._streams):
            self._push(stream, fields)

    def announcement(self) -> dict[str, Any]:
        """The current announcement without `seq`. `has_quorum` is only reported by a leader."""
        doc: dict[str, Any] = {
            "node": self.id, "term": self.term, "role": self.role, "leader": self.leader,
            "commit_index": self.commit_index, "applied_index": self.applied_index,
            "ts_ms": int(time.time() * 1000),
        }  # fmt: skip
        if self.role == "leader":
            doc["has_quorum"] = self.has_quorum
        return doc

    def raft_headers(self) -> list[tuple[str, str]]:
        return [("x-raft-index", str(self.applied_index)), ("x-raft-term", str(self.term))]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` holds, re-checking on every change of this node (request, stream, set)."""
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                if predicate():
                    return
                await changed.wait()

    # -- client traffic

    def default_response(self, req: FakeRequest) -> FakeResponse:
        """The default answer (handlers may call it too):

        - a write (POST/PUT/DELETE/PATCH) to a non-leader: 421 with X-Raft-Leader (empty when unknown);
        - GET/HEAD /bytes/{n}[?chunked=1]: `fake_bytes(n)`, chunked if asked;
        - otherwise 200 {"node", "method", "path", "target", "body_len"}; an accepted write raises
          applied_index (and commit_index) by one. X-Raft-Index and X-Raft-Term on every 200.
        """
        if req.method in WRITE_METHODS and self.role != "leader":
            doc = {"error": "not_leader", "node": self.id, "leader": self.leader}
            return FakeResponse.json(doc, 421, [("x-raft-leader", self.leader or ""), *self.raft_headers()])
        if req.method in ("GET", "HEAD") and req.path.startswith("/bytes/") and req.path[7:].isdigit():
            ctype = [("content-type", "application/octet-stream"), *self.raft_headers()]
            return FakeResponse(200, ctype, fake_bytes(int(req.path[7:])), chunked="chunked=1" in req.query)
        if req.method in WRITE_METHODS:
            self.applied_index += 1
            self.commit_index = max(self.commit_index, self.applied_index)
        doc = {"node": self.id, "method": req.method, "path": req.path, "target": req.target}
        return FakeResponse.json({**doc, "body_len": len(req.body)}, 200, self.raft_headers())

    # -- internals

    @staticmethod
    def _check_role(role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            if self.announcing:
                self._push_all()

    def _push_all(self) -> None:
        for stream in list(self._streams):
            self._push(stream, {})

    def _push(self, stream: _Stream, overrides: dict[str, Any]) -> None:
        doc = self.announcement()
        if "seq" not in overrides:
            stream.seq += 1
            doc["seq"] = stream.seq
        doc.update(overrides)
        if self.key is not None:
            doc["sig"] = sign(doc, self.key)
        self._write(stream, b"data: " + json.dumps(doc).encode() + b"\n\n")

    def _write(self, stream: _Stream, data: bytes) -> None:
        if stream.writer.is_closing():
            return
        try:
            stream.writer.write(stream.conn.send(h11.Data(data=data)) or b"")
        except (h11.LocalProtocolError, ConnectionError, RuntimeError):
            stream.writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests in a keep-alive loop until either side closes."""
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = await self._read_request(conn, reader, writer)
                if req is None or not await self._dispatch(conn, reader, writer, req):
                    break
                if h11.MUST_CLOSE in (conn.our_state, conn.their_state):
                    break
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                bad = FakeResponse(exc.error_status_hint, [("connection", "close")], str(exc).encode())
                await self._send(conn, writer, None, bad)
        except (ConnectionError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            # stop() cancels; end quietly (3.11's start_server callback calls exception() on the task).
            pass
        finally:
            self._writers.discard(writer)
            self._conn_tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(CHUNK))

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> FakeRequest | None:
        head = await self._next_event(conn, reader)
        if not isinstance(head, h11.Request):
            return None  # ConnectionClosed
        req = FakeRequest(
            method=head.method.decode(),
            target=head.target.decode(),
            headers=[(k.decode(), v.decode("latin-1")) for k, v in head.headers],
            body=b"",
            time=time.monotonic(),
            term=self.term,
            role=self.role,
            node=self,
        )
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        body = bytearray()
        while True:
            event = await self._next_event(conn, reader)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                req.body = bytes(body)
                return req
            else:
                return None  # closed mid-body

    async def _dispatch(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        req: FakeRequest,
    ) -> bool:
        """Answer one request; False when the connection must end."""
        if req.method == "GET" and req.path == "/raft/announce":
            await self._serve_announce(conn, reader, writer)
            return False
        if req.method == "GET" and req.path == "/raft/status":
            await self._resumed.wait()
            self.status_polls += 1
            self._seq += 1
            self._notify()
            doc = {**self.announcement(), "seq": self._seq}
            if self.key is not None:
                doc["sig"] = sign(doc, self.key)
            return await self._send(conn, writer, req, FakeResponse.json(doc))
        self.requests.append(req)
        self._notify()
        resp: FakeResponse | None = None
        if self.handler is not None:
            try:
                resp = await self.handler(req)
            except Exception as exc:
                log.exception("fake node %s: handler failed", self.id)
                resp = FakeResponse(500, [("content-type", "text/plain")], f"handler: {exc!r}".encode())
        return await self._send(conn, writer, req, resp or self.default_response(req))

    async def _serve_announce(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not self.serve_stream:
            doc = {"error": "not_found"}
            await self._send(conn, writer, None, FakeResponse.json(doc, 404, [("connection", "close")]))
            return
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
        stream = _Stream(conn, writer)
        self._streams.add(stream)
        self.stream_opens += 1
        self._notify()
        try:
            if self.announcing:
                self._push(stream, {})
            while await reader.read(CHUNK):  # until the subscriber hangs up or the stream is cut
                pass
        finally:
            self._streams.discard(stream)
            self._notify()

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, req: FakeRequest | None, resp: FakeResponse
    ) -> bool:
        """Write `resp`; False when the connection must end."""
        if resp.action == "close":
            return False
        if resp.action == "reset":
            writer.transport.abort()
            return False
        headers = list(resp.headers)
        names = {k.lower() for k, _ in headers}
        framed = names & {"content-length", "transfer-encoding"}
        if not framed:
            if isinstance(resp.body, bytes) and not resp.chunked:
                headers.append(("content-length", str(len(resp.body))))
            else:
                headers.append(("transfer-encoding", "chunked"))
        head = h11.Response(status_code=resp.status, headers=headers, reason=_reason(resp.status))
        writer.write(conn.send(head) or b"")
        if req is not None and req.method == "HEAD":
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            return True
        left = resp.truncate
        async for piece in self._pieces(resp.body):
            if left is not None:
                piece, left = piece[:left], left - min(left, len(piece))
            if piece:
                writer.write(conn.send(h11.Data(data=piece)) or b"")
                await writer.drain()
            if left == 0:
                break
        if resp.truncate is not None:
            await writer.drain()
            writer.transport.abort()
            return False
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        return True

    @staticmethod
    async def _pieces(body: bytes | AsyncIterable[bytes]) -> AsyncIterable[bytes]:
        if isinstance(body, bytes):
            for i in range(0, len(body), CHUNK):
                yield body[i : i + CHUNK]
        else:
            async for piece in body:
                yield piece


class FakeCluster:
    """Several FakeNodes ("n1".."nN" by default) with helpers that move leadership between them.

    async with FakeCluster(3) as fc:
        fc.elect("n2")                     # n2 leads at a new term; the others follow it
        config = fc.config(liveness_timeout=0.5)
    """

    def __init__(self, size: int = 3, *, prefix: str = "n", **node_kw: Any) -> None:
        self.nodes = [FakeNode(f"{prefix}{i + 1}", **node_kw) for i in range(size)]

    def __getitem__(self, node_id: str) -> FakeNode:
        return next(n for n in self.nodes if n.id == node_id)

    def __repr__(self) -> str:
        return f"<FakeCluster {' '.join(f'{n.id}:{n.role}@{n.term}' for n in self.nodes)}>"

    async def start(self) -> None:
        for node in self.nodes:
            await node.start()

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))

    async def __aenter__(self) -> FakeCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def term(self) -> int:
        return max(n.term for n in self.nodes)

    @property
    def leader(self) -> FakeNode | None:
        """The node claiming leadership at the highest term, if any."""
        return next((n for n in self.nodes if n.role == "leader" and n.term == self.term), None)

    def elect(self, node_id: str, term: int | None = None) -> int:
        """Make `node_id` leader at `term` (default: one above the highest); everyone else follows it."""
        term = self.term + 1 if term is None else term
        for node in self.nodes:
            role = "leader" if node.id == node_id else "follower"
            node.set(term=term, role=role, leader=node_id)
        return term

    def no_leader(self, term: int | None = None) -> int:
        """An election in progress at `term` (default: one above the highest): every node is a candidate."""
        term = self.term + 1 if term is None else term
        for node in self.nodes:
            node.set(term=term, role="candidate", leader=None)
        return term

    def config(self, name: str = "c1", **overrides: Any) -> ClusterConfig:
        return cluster_config(self.nodes, name, **overrides)


def cluster_config(
    nodes: Iterable[FakeNode], name: str = "c1", routes: Iterable[RouteConfig] = (), **overrides: Any
) -> ClusterConfig:
    """A native ClusterConfig over started `nodes`; `overrides` set its fields (liveness_timeout=...)."""
    node_configs = tuple(n.node_config() for n in nodes)
    return ClusterConfig(name=name, kind="native", nodes=node_configs, routes=tuple(routes), **overrides)
