"""The proxy: one `ClusterProxy` per cluster routes each request to a node and relays the answer.

Per request, a `ProxyRequest` is the glue between the downstream `Exchange` and an upstream connection.
Everything is callbacks; held requests wait in a deque, not in tasks.

The re-send rule (one place: `ProxyRequest.on_upstream_error`):
- nothing was written to the node (connect failed)         → re-send to the current leader (after a backoff)
- written, but the node answered 421 Misdirected Request   → not applied: update the table and re-send
- written, then the connection died or timed out, or a higher term deposed the node meanwhile
      → re-send only if the method is idempotent, the request has `Idempotency-Key` or a Raft session
        (`X-Raft-Session` + `X-Raft-Seq`, deduplicated by the node), or the route says so;
        otherwise `502 outcome_unknown`
- the response has started towards the client              → the client connection is cut, never a truncated
                                                              answer presented as complete
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from ssl import SSLContext

from raftlb.config import ClusterConfig, TlsConfig
from raftlb.dialects import BODY_INDEX_LIMIT, dialect_for
from raftlb.errors import (
    HoldQueueFull,
    IndexNotReached,
    NoLeader,
    OutcomeUnknown,
    ProxyError,
    SessionGap,
    UpstreamFailed,
    UpstreamTimeout,
)
from raftlb.http.server import (
    FRAMING_CHUNKED,
    FRAMING_LENGTH,
    FRAMING_NONE,
    Exchange,
    status_line,
)
from raftlb.leader_table import Announcement, LeaderChange, LeaderTable
from raftlb.pool import NodePool, UpstreamConn
from raftlb.reads import ReadIndexBroker, eligible_nodes
from raftlb.router import IDEMPOTENT_METHODS, RouteDecision, Router, power_of_two
from raftlb.sessions import SessionOrder
from raftlb.tls import client_context

log = logging.getLogger("raftlb.proxy")

# Request headers not forwarded: hop-by-hop (RFC 9110 §7.6.1), framing we redo, and what we set ourselves.
REQUEST_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
})
RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"content-length", b"x-raft-node",
})


def cookie_index(header: bytes | None) -> int:
    """The raftlb-index token from a Cookie header (0 when absent or malformed)."""
    if not header or b"raftlb-index=" not in header:
        return 0
    for part in header.split(b";"):
        name, _, value = part.strip().partition(b"=")
        if name == b"raftlb-index" and value.isdigit():
            return int(value)
    return 0


class ProxyStats:
    """Counters the metrics module reads; plain ints so the hot path pays nothing."""

    __slots__ = ("requests", "held", "released", "expired", "resends", "outcome_unknown", "misdirected",
                 "preempted", "responses_by_class", "rejected_announcements", "leader_changes",
                 "reads_leader", "reads_follower", "fence_waited", "fence_fallback", "fence_stale",
                 "session_parked",
                 "session_gaps")

    def __init__(self) -> None:
        self.requests = 0
        self.held = 0
        self.released = 0
        self.expired = 0
        self.resends: dict[str, int] = {}
        self.outcome_unknown = 0
        self.misdirected = 0
        self.preempted = 0
        self.responses_by_class = [0] * 6
        self.rejected_announcements = 0
        self.leader_changes = 0
        self.reads_leader = 0
        self.reads_follower = 0
        self.fence_waited = 0  # fenced reads that found no node at their index and waited
        self.fence_fallback = 0  # reads sent to the leader because no follower qualified in time
        self.fence_stale = 0  # answers discarded because they reflected an index below the client's token
        self.session_parked = 0
        self.session_gaps = 0


class ProxyRequest:
    """One proxied request: routing state, retained body, and the upstream callbacks."""

    __slots__ = (
        "proxy", "ex", "route", "head", "chunks", "body_len", "retain", "body_done", "node", "conn",
        "attempts", "held_at", "retry_at", "safe_to_repeat", "upstream_chunked", "sent_body", "finished",
        "avoid", "sent_term", "released", "to_leader", "min_index", "read_index", "fence_deadline", "session",
        "waited", "deferred", "body",
    )

    def __init__(self, proxy: ClusterProxy, ex: Exchange, route: RouteDecision, head: bytes) -> None:
        self.proxy = proxy
        self.ex = ex
        self.route = route
        self.head = head
        self.chunks: list[bytes] = []
        self.body_len = 0
        self.retain = True
        self.body_done = False
        self.node: str | None = None
        self.conn: UpstreamConn | None = None
        self.attempts = 0
        self.held_at = 0.0
        self.retry_at = 0.0
        # Safe to re-send after an ambiguous failure: idempotent by method or by route, marked by the client,
        # or a session write (X-Raft-Session + X-Raft-Seq) that a node with sessions applies at most once.
        self.safe_to_repeat = (ex.method in IDEMPOTENT_METHODS or route.idempotent
                               or ex.header(b"idempotency-key") is not None
                               or (ex.header(b"x-raft-session") is not None
                                   and ex.header(b"x-raft-seq") is not None))
        self.upstream_chunked = ex.chunked
        self.sent_body = 0  # how many of `chunks` the current connection has been sent
        self.finished = False
        self.avoid: str | None = None
        self.sent_term = 0  # the table's term when the request was bound to its node
        self.released = False
        self.to_leader = route.needs_leader  # writes, leader reads, and reads that fell back to the leader
        self.min_index = 0  # the client's token (X-Raft-Min-Index / raftlb-index cookie)
        self.read_index: int | None = None  # linearizable reads: the index the leader handed out
        self.fence_deadline = 0.0  # fenced reads waiting for a node to reach their index
        self.session: tuple[str, int] | None = None  # (X-Raft-Session, X-Raft-Seq) of a session write
        self.waited = False
        self.deferred: tuple[int, list[tuple[bytes, bytes]]] | None = None  # an answer held to read its index
        self.body = bytearray()

    @property
    def floor(self) -> int:
        """The lowest index an answer may reflect."""
        ri = self.read_index
        return self.min_index if ri is None or ri < self.min_index else ri

    def __repr__(self) -> str:
        return f"<ProxyRequest {self.ex.method} {self.ex.target!r} node={self.node} attempts={self.attempts}>"

    @property
    def hold_size(self) -> int:
        """What this request counts against the hold budget: its declared or received body size."""
        return max(self.body_len, self.ex.content_length or 0)

    # -- client side --------------------------------------------------------------------------------------

    def on_client_body(self, data: bytes) -> None:
        self.body_len += len(data)
        if self.ex.chunked and self.node is None and self.held_at and not self.finished:
            self.proxy.held_body_grew(self, len(data))
            if self.finished:
                return
        conn = self.conn
        if self.retain and self.body_len > self.proxy.cluster.resend_body_limit:
            self.retain = False
            del self.chunks[:self.sent_body]
            self.sent_body = 0
        if conn is not None:
            self._write_chunk(conn, data)
            if self.retain:
                self.chunks.append(data)
                self.sent_body += 1
        else:
            self.chunks.append(data)
            if not self.retain and self.body_len > self.proxy.write_buffer_high:
                self.ex.pause_body()

    def on_client_body_end(self) -> None:
        self.body_done = True
        conn = self.conn
        if conn is not None and self.upstream_chunked:
            conn.write(b"0\r\n\r\n")

    def on_client_abort(self, reason: str) -> None:
        self.finished = True
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abandon()
        self.proxy._forget(self)

    def on_client_pause(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def on_client_resume(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    # -- upstream side ------------------------------------------------------------------------------------

    def on_upstream_ready(self, conn: UpstreamConn) -> None:
        proxy = self.proxy
        node = self.node
        if self.finished or node is None:
            conn.pool.release(conn)
            return
        if self.to_leader and proxy.table.leader(time.monotonic()) not in (node, None):
            # The leader moved while this connection was being opened.
            conn.pool.release(conn)
            proxy.pools[node].outstanding -= 1
            self.node = None
            proxy.dispatch(self)
            return
        self.conn = conn
        self.sent_term = proxy.table.term
        conn.start(self, self.ex.head_only)
        proxy.inflight.add(self)
        if self.chunks:
            parts = [self.head]
            if self.upstream_chunked:
                for c in self.chunks:
                    parts += (b"%x\r\n" % len(c), c, b"\r\n")
            else:
                parts += self.chunks
            if self.body_done and self.upstream_chunked:
                parts.append(b"0\r\n\r\n")
            conn.writelines(parts)
            if self.retain:
                self.sent_body = len(self.chunks)
            else:
                self.chunks.clear()
                self.ex.resume_body()
        elif self.body_done and self.upstream_chunked:
            conn.writelines([self.head, b"0\r\n\r\n"])
        else:
            conn.write(self.head)

    def _write_chunk(self, conn: UpstreamConn, data: bytes) -> None:
        if self.upstream_chunked:
            conn.writelines([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            conn.write(data)

    def on_upstream_head(self, conn: UpstreamConn, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        proxy = self.proxy
        proxy.inflight.discard(self)
        if status == 421 and self.retain and self.attempts < proxy.cluster.max_resends:
            # Not applied by that node: learn the hint, re-send. The rest of this response is discarded.
            hint: str | None = None
            term: int | None = None
            for k, v in headers:
                if k == b"x-raft-leader":
                    hint = v.decode("latin-1").strip() or None
                elif k == b"x-raft-term" and v.strip().isdigit():
                    term = int(v)
            conn.abandon()
            self.conn = None
            proxy.stats.misdirected += 1
            proxy.on_misdirected(self.node or "", hint, term)
            self._resend("misdirected", immediate=True)
            return
        index = -1
        for k, v in headers:
            if k == b"x-raft-index":
                index = int(v) if v.isdigit() else -1
                break
        if (index < 0 and proxy.dialect.index_from_body is not None and status == 200
                and conn.resp_length is not None and conn.resp_length <= BODY_INDEX_LIMIT
                and not self.ex.head_only):
            # The index is in the body (etcd): hold the small answer back until it is read.
            self.deferred = (status, headers)
            self.body = bytearray()
            return
        if self._stale(conn, status, index):
            return
        self._answer_head(conn, status, headers, index)
        if self.ex.conn.writing_paused:
            conn.pause_reading()

    def _stale(self, conn: UpstreamConn | None, status: int, index: int) -> bool:
        """A read answered from state older than the client's token is never returned: retry elsewhere."""
        floor = self.floor
        if not (0 <= index < floor and self.route.kind == "read" and status < 500):
            return False
        proxy = self.proxy
        if conn is not None:
            conn.abandon()
        self.conn = None
        proxy.stats.fence_stale += 1
        if self.attempts >= proxy.cluster.max_resends:
            self._fail(IndexNotReached(f"no node served index {floor} in time", index=floor))
            return True
        was_leader = self.to_leader
        self.to_leader = True
        self._resend("fence_stale", immediate=not was_leader)
        return True

    def _answer_head(self, conn: UpstreamConn, status: int, headers: list[tuple[bytes, bytes]],
                     index: int) -> None:
        """Send the response head to the client (`conn` is only read for the body's framing)."""
        proxy = self.proxy
        ex = self.ex
        ex.status = status
        ex.on_pause_writing = self.on_client_pause
        ex.on_resume_writing = self.on_client_resume
        parts = [status_line(status)]
        has_term = False
        for k, v in headers:
            if k in RESPONSE_DROP:
                continue
            if k == b"x-raft-term":
                has_term = True
            parts += (k, b": ", v, b"\r\n")
        node = self.node
        assert node is not None
        parts.append(proxy.node_headers[node])
        if not has_term:
            parts.append(b"x-raft-term: %d\r\n" % proxy.table.term)
        if self.route.cookie:
            token = index if index > self.min_index else self.min_index
            if token > 0:
                parts.append(b"set-cookie: raftlb-index=%d; Path=/; SameSite=Lax\r\n" % token)
        if self.route.kind == "read":
            proxy.count_read(self, node)
        if status in (204, 304) or (status < 200):
            framing, length = FRAMING_NONE, 0
        elif conn.resp_chunked or conn.until_close:
            framing, length = FRAMING_CHUNKED, 0
        elif conn.resp_length is not None:
            framing, length = FRAMING_LENGTH, conn.resp_length
        else:
            framing, length = FRAMING_NONE, 0
        ex.send_head(b"".join(parts), framing, length)

    def on_upstream_body(self, data: bytes) -> None:
        if self.conn is not None:
            if self.deferred is not None:
                self.body += data
            else:
                self.ex.send_body(data)

    def on_upstream_done(self) -> None:
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        if self.deferred is not None:
            status, headers = self.deferred
            self.deferred = None
            body = bytes(self.body)
            index = self.proxy.dialect.index_from_body(body) if self.proxy.dialect.index_from_body else None
            if index is not None:
                headers = [*headers, (b"x-raft-index", b"%d" % index)]
            if self._stale(None, status, -1 if index is None else index):
                return
            self._answer_head(conn, status, headers, -1 if index is None else index)
            self.ex.send_body(body)
        self.ex.end()
        self._finish()

    def on_upstream_pause(self) -> None:
        self.ex.pause_body()

    def on_upstream_resume(self) -> None:
        self.ex.resume_body()

    def on_upstream_error(self, reason: str, written: bool) -> None:
        proxy = self.proxy
        self.conn = None
        proxy.inflight.discard(self)
        if self.finished:
            return
        ex = self.ex
        if ex.response_started:
            log.warning("node %s failed mid-response (%s): cutting the client connection", self.node, reason)
            ex.abort(reason)
            self._finish()
            return
        if not written:
            # Nothing reached the node, so re-sending is always safe; the hold timeout bounds it. A node
            # that refuses connections is down for routing now, not after its announcements go quiet.
            self.avoid = self.node
            if self.node is not None:
                proxy.on_node_unreachable(self.node, reason)
            self._resend("connect_failed", immediate=False)
            return
        can_resend = self.retain and self.attempts < proxy.cluster.max_resends
        if can_resend and self.safe_to_repeat:
            self.avoid = self.node
            self._resend("idempotent_retry", immediate=not self.to_leader)
            return
        if self.route.kind == "read":
            err: ProxyError = UpstreamTimeout(f"node {self.node}: {reason}") if "no response" in reason \
                else UpstreamFailed(f"node {self.node}: {reason}")
            self._fail(err)
            return
        proxy.stats.outcome_unknown += 1
        self._fail(OutcomeUnknown(f"node {self.node}: {reason}; the write may or may not have been applied",
                                  node=self.node))

    def preempt(self, reason: str) -> None:
        """The node this request waits on was deposed: stop waiting for it and apply the re-send rule."""
        conn = self.conn
        if conn is None:
            return
        written = conn.written
        conn.abandon()
        self.proxy.stats.preempted += 1
        self.on_upstream_error(reason, written)

    # -- helpers ------------------------------------------------------------------------------------------

    def _resend(self, reason: str, immediate: bool) -> None:
        proxy = self.proxy
        self.attempts += 1
        proxy.stats.resends[reason] = proxy.stats.resends.get(reason, 0) + 1
        if self.node is not None:
            proxy.pools[self.node].outstanding -= 1
            self.node = None
        self.sent_body = 0
        if immediate:
            proxy.dispatch(self)
        else:
            self.retry_at = time.monotonic() + min(0.025 * (2 ** self.attempts), 0.5)
            proxy.hold(self)

    def _fail(self, err: ProxyError) -> None:
        ex = self.ex
        ex.close_after = ex.close_after or not self.body_done
        ex.respond_error(err)
        self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.proxy._forget(self)
            self.proxy.stats.responses_by_class[min(self.ex.status // 100, 5)] += 1


class ClusterProxy:
    """Routes requests for one cluster: the leader table, the node pools, the hold queue."""

    def __init__(self, cluster: ClusterConfig, write_buffer_high: int = 256 * 1024,
                 on_change: Callable[[LeaderChange], None] | None = None) -> None:
        self.cluster = cluster
        self.write_buffer_high = write_buffer_high
        self.table = LeaderTable([n.id for n in cluster.nodes], cluster.liveness_timeout)
        self.router = Router(cluster.routes, index_cookie=cluster.index_cookie, fence_wait=cluster.fence_wait)
        self.dialect = dialect_for(cluster.kind)
        self._ssl: tuple[TlsConfig | None, SSLContext] | None = None
        self.pools: dict[str, NodePool] = {}
        self.node_headers: dict[str, bytes] = {}
        self.held: deque[ProxyRequest] = deque()
        self.held_bytes = 0
        self.inflight: set[ProxyRequest] = set()
        self.fence_waiting: list[ProxyRequest] = []
        self.caught_up_at: dict[str, float] = {}  # node -> last time its applied index reached the commit
        self.sessions: SessionOrder[ProxyRequest] = SessionOrder(cluster.session_gap_wait,
                                                                 cluster.max_sessions)
        self.broker = ReadIndexBroker(self, cluster.read_index_path)
        self.stats = ProxyStats()
        self.on_change = on_change
        self.leaderless_since: float | None = time.monotonic()
        self._configure_nodes(cluster)

    def __repr__(self) -> str:
        return (f"<ClusterProxy {self.cluster.name} term={self.table.term} "
                f"leader={self.table.leader(time.monotonic())} held={len(self.held)}>")

    def _configure_nodes(self, cluster: ClusterConfig, rebuild: bool = False) -> None:
        """Pools for the cluster's nodes: new ones for new or re-addressed nodes (all with `rebuild`)."""
        for node in cluster.nodes:
            self.node_headers[node.id] = b"x-raft-node: " + node.id.encode() + b"\r\n"
            pool = self.pools.get(node.id)
            ssl_ctx = self._client_ssl(cluster) if node.url.startswith("https:") else None
            if rebuild or pool is None or (pool.host, pool.port, pool.ssl) != (node.host, node.port, ssl_ctx):
                if pool is not None:
                    pool.close()
                self.pools[node.id] = NodePool(
                    node.id, node.host, node.port, connect_timeout=cluster.connect_timeout,
                    response_timeout=cluster.response_timeout, max_idle=cluster.pool.max_idle_per_node,
                    idle_timeout=cluster.pool.idle_timeout, write_buffer_high=self.write_buffer_high,
                    ssl=ssl_ctx)
            else:
                pool.connect_timeout = cluster.connect_timeout
                pool.response_timeout = cluster.response_timeout
                pool.max_idle = cluster.pool.max_idle_per_node
                pool.idle_timeout = cluster.pool.idle_timeout

    def _client_ssl(self, cluster: ClusterConfig) -> SSLContext:
        if self._ssl is None or self._ssl[0] != cluster.tls:
            self._ssl = (cluster.tls, client_context(cluster.tls))
        return self._ssl[1]

    # -- the request path ---------------------------------------------------------------------------------

    def on_request(self, ex: Exchange) -> None:
        self.stats.requests += 1
        target = ex.target
        q = target.find(b"?")
        path = (target[:q] if q >= 0 else target).decode("latin-1")
        consistency = ex.header(b"x-raft-consistency")
        route = self.router.classify(ex.method, path,
                                     consistency.decode("latin-1") if consistency is not None else None)
        req = ProxyRequest(self, ex, route, self._upstream_head(ex, route))
        ex.on_abort = req.on_client_abort
        ex.set_body_sink(req.on_client_body, req.on_client_body_end)
        if req.finished:
            return
        token = ex.header(b"x-raft-min-index")
        if token is not None and token.isdigit():
            req.min_index = int(token)
        if route.cookie:
            req.min_index = max(req.min_index, cookie_index(ex.header(b"cookie")))
        if route.kind == "write":
            sid, seq = ex.header(b"x-raft-session"), ex.header(b"x-raft-seq")
            if sid is not None and seq is not None and seq.isdigit():
                req.session = (sid.decode("latin-1"), int(seq))
                if not self.sessions.admit(req, req.session[0], req.session[1], time.monotonic()):
                    self.stats.session_parked += 1
                    return
        self.dispatch(req)

    def _upstream_head(self, ex: Exchange, route: RouteDecision) -> bytes:
        parts = [ex.method.encode("ascii"), b" ", ex.target, b" HTTP/1.1\r\n"]
        xff: bytes | None = None
        drop = REQUEST_DROP
        for k, v in ex.headers:
            if k == b"connection" and v.lower() not in (b"close", b"keep-alive"):
                # Headers named in Connection are hop-by-hop too.
                drop = drop | frozenset(t.strip().lower() for t in v.split(b","))
        for k, v in ex.headers:
            if k in drop:
                if k == b"x-forwarded-for":
                    xff = v
                continue
            parts += (k, b": ", v, b"\r\n")
        client = ex.conn.peer_host.encode()
        xff = xff + b", " + client if xff else client
        parts += (b"x-forwarded-for: ", xff, b"\r\nx-forwarded-proto: http\r\n")
        if route.kind == "write" and self.dialect.write_headers:
            parts.append(self.dialect.write_headers)
        if ex.chunked:
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        elif ex.content_length is not None:
            parts.append(b"content-length: %d\r\n\r\n" % ex.content_length)
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def pick(self, req: ProxyRequest, now: float) -> str | None:
        """The node for this request now, or None (no leader, or no node eligible for the read)."""
        if req.to_leader:
            if req.retry_at > now:
                return None
            return self.table.leader(now)
        cands = eligible_nodes(self.table, req.route, req.floor, now, self.caught_up_at)
        if not cands:
            return None
        if len(cands) > 1:
            if req.route.prefer_followers:
                leader = self.table.leader(now)
                if leader in cands:
                    cands = [n for n in cands if n != leader]
            if req.avoid is not None and len(cands) > 1 and req.avoid in cands:
                cands = [n for n in cands if n != req.avoid]
        pools = self.pools
        return power_of_two(cands, lambda n: pools[n].outstanding)

    def dispatch(self, req: ProxyRequest) -> None:
        """Route a request now: to its node, the hold queue, the fence wait list or the read-index broker."""
        now = time.monotonic()
        if not req.to_leader and req.route.policy == "linearizable" and req.read_index is None:
            self.broker.submit(req)
            return
        node = self.pick(req, now)
        if node is not None:
            self._send(req, node)
            return
        policy = req.route.policy
        if req.to_leader or policy == "any":
            self.hold(req)
            return
        if policy == "bounded":
            self._fall_back_to_leader(req)
            return
        # fenced / linearizable: wait for an announcement showing a node at the index, then the leader.
        if not req.fence_deadline:
            req.fence_deadline = now + req.route.fence_wait
            req.waited = True
            self.stats.fence_waited += 1
        if now >= req.fence_deadline:
            self._fall_back_to_leader(req)
            return
        self.fence_waiting.append(req)

    def _fall_back_to_leader(self, req: ProxyRequest) -> None:
        req.to_leader = True
        self.stats.fence_fallback += 1
        self.dispatch(req)

    def _send(self, req: ProxyRequest, node: str) -> None:
        req.node = node
        pool = self.pools[node]
        pool.outstanding += 1
        pool.acquire(req)

    def count_read(self, req: ProxyRequest, node: str) -> None:
        if node == self.table.leader(time.monotonic()):
            self.stats.reads_leader += 1
        else:
            self.stats.reads_follower += 1

    def _recheck_fenced(self, now: float) -> None:
        """An announcement arrived: fenced reads waiting for an index may have a node now."""
        waiting, self.fence_waiting = self.fence_waiting, []
        for req in waiting:
            if req.finished:
                continue
            node = self.pick(req, now)
            if node is None:
                self.fence_waiting.append(req)
            else:
                self._send(req, node)

    def hold(self, req: ProxyRequest) -> None:
        """Park a request until a leader (for reads: any live node) is there; bounded in count and bytes."""
        hold = self.cluster.hold
        if not req.held_at:
            if len(self.held) >= hold.max_requests or self.held_bytes + req.hold_size > hold.max_bytes:
                req._fail(HoldQueueFull("too many requests are waiting for a leader",
                                        retry_after=self.cluster.retry_after))
                return
            req.held_at = time.monotonic()
            self.stats.held += 1
        self.held.append(req)
        self.held_bytes += req.hold_size

    def held_body_grew(self, req: ProxyRequest, n: int) -> None:
        """A held chunked request received more body: keep the byte budget honest."""
        if req not in self.held:
            return
        self.held_bytes += n
        if self.held_bytes > self.cluster.hold.max_bytes:
            self.held.remove(req)
            self.held_bytes -= req.hold_size
            req._fail(HoldQueueFull("held writes exceed the hold byte budget",
                                    retry_after=self.cluster.retry_after))

    def _release(self, now: float) -> None:
        """Dispatch held requests that can go now, in arrival order."""
        if not self.held:
            return
        waiting: deque[ProxyRequest] = deque()
        held, self.held = self.held, waiting
        self.held_bytes = 0
        while held:
            req = held.popleft()
            if req.finished:
                continue
            node = self.pick(req, now)
            if node is None:
                waiting.append(req)
                self.held_bytes += req.hold_size
                continue
            if not req.released:
                req.released = True
                self.stats.released += 1
            self._send(req, node)

    def _forget(self, req: ProxyRequest) -> None:
        self.inflight.discard(req)
        if req.node is not None:
            self.pools[req.node].outstanding -= 1
            req.node = None
        if req.session is not None:
            nxt = self.sessions.done(req, req.session[0])
            req.session = None
            if nxt is not None and not nxt.finished:
                self.dispatch(nxt)

    # -- the control plane --------------------------------------------------------------------------------

    def on_announcement(self, node_id: str, ann: Announcement) -> None:
        now = time.monotonic()
        try:
            change = self.table.apply(ann, now)
        except ValueError as exc:
            self.stats.rejected_announcements += 1
            log.debug("announcement from %s rejected: %s", node_id, exc)
            return
        if change is not None:
            self._leader_changed(change, now)
        elif self.held:
            self._release(now)
        leader = self.table.leader(now)
        if leader is not None:
            view = self.table.nodes[node_id]
            commit = self.table.nodes[leader].commit_index
            if node_id == leader or (commit is not None and (view.applied_index or 0) >= commit):
                self.caught_up_at[node_id] = now
        if self.fence_waiting:
            self._recheck_fenced(now)

    def on_node_down(self, node_id: str, reason: str) -> None:
        now = time.monotonic()
        change = self.table.node_down(node_id, now)
        if change is not None:
            self._leader_changed(change, now)

    def on_node_unreachable(self, node_id: str, reason: str) -> None:
        """The data path could not connect to a node: take it out of routing until it is heard again."""
        now = time.monotonic()
        view = self.table.nodes.get(node_id)
        if view is None or view.down:
            return
        log.warning("cluster %s: node %s unreachable (%s); routing around it until it announces again",
                    self.cluster.name, node_id, reason)
        change = self.table.node_down(node_id, now)
        if change is not None:
            self._leader_changed(change, now)

    def on_misdirected(self, node_id: str, hint: str | None, term: int | None) -> None:
        now = time.monotonic()
        try:
            change = self.table.misdirected(node_id, hint, term, now)
        except ValueError:
            return
        if change is not None:
            self._leader_changed(change, now)

    def _leader_changed(self, change: LeaderChange, now: float) -> None:
        self.stats.leader_changes += 1
        new = change.new_leader
        if new is None:
            if self.leaderless_since is None:
                self.leaderless_since = now
        else:
            self.leaderless_since = None
            if self.inflight:
                # A higher term with another leader: whatever still waits on a deposed node is not left
                # hanging until its own timeout.
                term = change.new_term
                for req in [r for r in self.inflight
                            if r.route.needs_leader and r.node != new and r.sent_term < term]:
                    req.preempt(f"node {req.node} deposed by term {change.new_term}")
            for req in self.held:
                req.retry_at = 0.0
            self._release(now)
            self.broker.kick()
        if self.on_change is not None:
            self.on_change(change)

    def sweep(self, now: float) -> None:
        """Periodic: leader liveness, hold timeouts and retries, upstream timeouts and idle connections."""
        change = self.table.expire(now)
        if change is not None:
            self._leader_changed(change, now)
        if self.held:
            timeout = self.cluster.hold.timeout
            if any(r.finished or r.held_at + timeout <= now for r in self.held):
                keep: deque[ProxyRequest] = deque()
                for req in self.held:
                    if req.finished:
                        continue
                    if req.held_at + timeout <= now:
                        self.stats.expired += 1
                        req._fail(NoLeader(f"no leader for {self.cluster.name} within {timeout:g}s",
                                           retry_after=self.cluster.retry_after, cluster=self.cluster.name))
                    else:
                        keep.append(req)
                self.held = keep
                self.held_bytes = sum(r.hold_size for r in keep)
            if self.held:
                self._release(now)
        if self.fence_waiting:
            waiting, self.fence_waiting = self.fence_waiting, []
            for req in waiting:
                if req.finished:
                    continue
                if req.fence_deadline <= now:
                    self._fall_back_to_leader(req)
                else:
                    self.fence_waiting.append(req)
        for req in self.sessions.expired(now):
            self.stats.session_gaps += 1
            req.session = None
            req._fail(SessionGap("an earlier X-Raft-Seq of this session did not arrive in time"))
        if self.broker.pending:
            timeout = self.cluster.hold.timeout
            for req in [r for r in self.broker.pending if r.ex.started_at + timeout <= now]:
                self.broker.pending.remove(req)
                req._fail(NoLeader("no leader to obtain a read index from",
                                   retry_after=self.cluster.retry_after))
            self.broker.kick()
        for pool in self.pools.values():
            pool.sweep(now)

    def reconfigure(self, cluster: ClusterConfig) -> None:
        """Hot reload: new routes, timeouts and nodes; the table keeps what it knows of kept nodes."""
        now = time.monotonic()
        old_ids = {n.id for n in self.cluster.nodes}
        new_ids = {n.id for n in cluster.nodes}
        tls_changed = cluster.tls != self.cluster.tls
        self.cluster = cluster
        self.router = Router(cluster.routes, index_cookie=cluster.index_cookie, fence_wait=cluster.fence_wait)
        self.sessions.gap_wait, self.sessions.max_sessions = cluster.session_gap_wait, cluster.max_sessions
        self.broker.path = cluster.read_index_path.encode("latin-1")
        self.table.liveness_timeout = cluster.liveness_timeout
        for nid in new_ids - old_ids:
            self.table.add_node(nid)
        self._configure_nodes(cluster, rebuild=tls_changed)
        for nid in old_ids - new_ids:
            change = self.table.remove_node(nid, now)
            pool = self.pools.pop(nid, None)
            if pool is not None:
                pool.close()
            if change is not None:
                self._leader_changed(change, now)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
