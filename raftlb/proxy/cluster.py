"""The proxy: one `ClusterProxy` per cluster routes each request to a node and relays the answer.

It owns the cluster's leader table, a keep-alive pool per node, and the places a request can wait: the
hold queue (no leader yet), the fence wait list (no node at the client's index yet), the read-index broker
(linearizable reads) and the session order (writes of one session, in seq order). Everything is callbacks:
held requests wait in a deque, not in tasks. The per-request relay and the re-send rule live in
`raftlb.proxy.request`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from ssl import SSLContext
from typing import Protocol

from raftlb.burstlog import BurstLog
from raftlb.config.model import ClusterConfig, TlsConfig
from raftlb.core.dialects import dialect_for
from raftlb.core.leader_table import Announcement, LeaderChange, LeaderTable
from raftlb.core.readplace import leader_bias, place_read
from raftlb.core.router import IDEMPOTENT_METHODS, RouteDecision, Router
from raftlb.core.sessions import SessionOrder
from raftlb.errors import BadConsistency, BadMinIndex, BadRequest, HoldQueueFull, NoLeader, SessionGap
from raftlb.http.server import Exchange
from raftlb.proxy.pool import NodePool
from raftlb.proxy.reads import ReadIndexBroker, eligible_nodes
from raftlb.proxy.request import ProxyRequest
from raftlb.tls import client_context

log = logging.getLogger("raftlb.proxy.cluster")

# Request headers not forwarded: hop-by-hop (RFC 9110 §7.6.1), framing we redo, and what we set ourselves.
REQUEST_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
})

# Request headers the single pass over a request's headers stops at: the dropped ones and those raftlb reads.
REQUEST_WATCH = REQUEST_DROP | frozenset({
    b"x-raft-consistency", b"x-raft-min-index", b"cookie", b"x-raft-session", b"x-raft-seq",
    b"idempotency-key",
})


# Headers a client may not name in `Connection`: those raftlb acts on or that frame and address the request.
# RFC 9110 §7.6.1 has a proxy drop the headers a `Connection` header names, and forbids a sender to name one
# meant for every recipient. Honouring such a name would let the node see a different request from the one
# raftlb routed, framed and deduplicated (a session write re-sent without its session headers and applied
# twice; a request with no Host), and ignoring it would forward what the client declared hop-by-hop: such a
# request is refused, 400 bad_request.
CONNECTION_PROTECTED = frozenset({
    b"host", b"content-length", b"transfer-encoding", b"x-raft-consistency", b"x-raft-min-index", b"cookie",
    b"x-raft-session", b"x-raft-seq", b"idempotency-key",
})


def _drop_connection_tokens(parts: list[bytes], headers: list[tuple[bytes, bytes]]) -> list[bytes] | None:
    """The upstream head again without the headers that a `Connection` header names (RFC 9110 §7.6.1), or
    None when it names one of CONNECTION_PROTECTED."""
    named: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    if not named.isdisjoint(CONNECTION_PROTECTED):
        return None
    drop = REQUEST_DROP | named
    out = parts[:4]
    for k, v in headers:
        if k not in drop:
            out += (k, b": ", v, b"\r\n")
    return out


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
                 "follower_waited",
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
        self.follower_waited = 0  # reads that waited for a follower to catch up rather than load the leader
        self.session_parked = 0
        self.session_gaps = 0


class RequestObserver(Protocol):
    """Told about every finished request (metrics, access log); off the hot path when None."""

    def request_done(self, cluster: str, route: RouteDecision, node: str | None, ex: Exchange) -> None: ...


class ClusterProxy:
    """Routes requests for one cluster: the leader table, the node pools, the hold queue."""

    observer: RequestObserver | None = None

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
        self.node_hosts: dict[str, bytes] = {}  # node -> its `host:` line, for requests that came without one
        self.held: deque[ProxyRequest] = deque()
        self.held_bytes = 0
        self.inflight: set[ProxyRequest] = set()
        self.fence_waiting: list[ProxyRequest] = []
        self.follower_wait = cluster.follower_wait
        self.caught_up_at: dict[str, float] = {}  # node -> last time its applied index reached the commit
        self.sessions: SessionOrder[ProxyRequest] = SessionOrder(cluster.session_gap_wait,
                                                                 cluster.max_sessions)
        self.broker = ReadIndexBroker(self, cluster.read_index_path)
        self.stats = ProxyStats()
        self.on_change = on_change
        self._rejections = BurstLog(log)
        self._term_header = (-1, b"")
        self._configure_nodes(cluster)

    def __repr__(self) -> str:
        return (f"<ClusterProxy {self.cluster.name} term={self.table.term} "
                f"leader={self.table.leader(time.monotonic())} held={len(self.held)}>")

    def _configure_nodes(self, cluster: ClusterConfig, rebuild: bool = False) -> None:
        """Pools for the cluster's nodes: new ones for new or re-addressed nodes (all with `rebuild`)."""
        for node in cluster.nodes:
            self.node_headers[node.id] = b"x-raft-node: " + node.id.encode() + b"\r\n"
            self.node_hosts[node.id] = b"host: " + node.url.partition("://")[2].encode("idna") + b"\r\n"
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
        # One pass over the request headers: the upstream head is built and the headers raftlb acts on are
        # picked out on the way.
        parts = [ex.method_bytes, b" ", ex.target, b" HTTP/1.1\r\n"]
        picked: dict[bytes, bytes] = {}  # the first value of each header raftlb reads
        xff: bytes | None = None
        hop_tokens = False
        for k, v in ex.headers:
            if k in REQUEST_WATCH:
                if k in REQUEST_DROP:
                    if k == b"x-forwarded-for":
                        xff = v if xff is None else xff + b", " + v
                    elif k == b"connection" and v.lower() not in (b"close", b"keep-alive"):
                        hop_tokens = True
                    continue
                picked.setdefault(k, v)
            parts += (k, b": ", v, b"\r\n")
        consistency = token = cookie = sid = seq = None
        if picked:
            consistency, token = picked.get(b"x-raft-consistency"), picked.get(b"x-raft-min-index")
            cookie, sid, seq = picked.get(b"cookie"), picked.get(b"x-raft-session"), picked.get(b"x-raft-seq")
        refused: BadRequest | None = None
        if hop_tokens:
            # Headers named in Connection are hop-by-hop too (rare: a second pass drops them).
            dropped = _drop_connection_tokens(parts, ex.headers)
            if dropped is None:
                refused = BadRequest("Connection names a header raftlb needs (Host, framing, X-Raft-*, "
                                     "Cookie, Idempotency-Key)")
            else:
                parts = dropped
        target = ex.target
        q = target.find(b"?")
        path = (target[:q] if q >= 0 else target).decode("latin-1")
        try:
            route = self.router.classify(ex.method, path,
                                         consistency.decode("latin-1") if consistency is not None else None)
        except ValueError as exc:  # a read policy raftlb cannot give: say so (errors.BadConsistency)
            route = self.router.classify(ex.method, path)
            refused = refused or BadConsistency(str(exc))
        if token is not None and not (token.isdigit() and len(token) <= 20) and refused is None:
            refused = BadMinIndex(f"X-Raft-Min-Index must be a non-negative decimal integer, got "
                                  f"{token[:32].decode('latin-1')!r}")
        if sid is not None and seq is not None and not (seq.isdigit() and len(seq) <= 20) and refused is None:
            # Not a plain write in disguise: the client asked for at-most-once and would not get it.
            refused = BadRequest(f"X-Raft-Seq must be a non-negative decimal integer, got "
                                 f"{seq[:32].decode('latin-1')!r}")
        client = ex.conn.peer_bytes
        parts += (b"x-forwarded-for: ", xff + b", " + client if xff else client,
                  b"\r\nx-forwarded-proto: ", ex.conn.server.scheme, b"\r\n")
        if route.kind == "write" and self.dialect.write_headers:
            parts.append(self.dialect.write_headers)
        if ex.chunked:
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        elif ex.content_length is not None:
            parts.append(b"content-length: %d\r\n\r\n" % ex.content_length)
        else:
            parts.append(b"\r\n")
        # Safe to re-send after an ambiguous failure: idempotent by method or by route, marked by the client,
        # or a session write (X-Raft-Session + X-Raft-Seq) that a node with sessions applies at most once.
        safe = (ex.method in IDEMPOTENT_METHODS or route.idempotent or b"idempotency-key" in picked
                or (sid is not None and seq is not None))
        req = ProxyRequest(self, ex, route, b"".join(parts), safe)
        ex.on_abort = req.on_client_abort
        if refused is not None:
            ex.close_after = True
            req._fail(refused)
            return
        if not ex.http11 and ex.header(b"host") is None:
            # HTTP/1.0 without Host, forwarded as HTTP/1.1, which must have one (RFC 9112 §3.2): the node's
            # own authority, as if the client had addressed it directly (added per node: see request.start).
            req.add_host = True
        if ex.has_body or ex.expect_continue:
            ex.set_body_sink(req.on_client_body, req.on_client_body_end)
        else:
            req.body_done = True  # nothing to relay: the end of the (empty) body needs no callback
        if req.finished:
            return
        if (token is not None or route.cookie) and (route.policy != "any" or route.kind == "write"):
            # `any` promises nothing, so it ignores the token (and never waits or retries for it).
            if token is not None and token.isdigit():
                req.min_index = int(token)
            if route.cookie:
                req.min_index = max(req.min_index, cookie_index(cookie))
        if route.kind == "write" and sid is not None and seq is not None:
            req.session = (sid.decode("latin-1"), int(seq))
            if not self.sessions.admit(req, req.session[0], req.session[1], time.monotonic()):
                self.stats.session_parked += 1
                return
        if req.to_leader:
            # The common case, without the general dispatch: a leader and an idle connection to it.
            now = time.monotonic()
            leader = self.table.leader(now)
            if leader is not None:
                self._send(req, leader, now)
                return
        self.dispatch(req)

    def pick(self, req: ProxyRequest, now: float) -> str | None:
        """The node for this request now, or None (no leader, or no node eligible for the read)."""
        if req.to_leader:
            if req.retry_at > now:
                return None
            return self.table.leader(now)
        cands = eligible_nodes(self.table, req.route, req.floor, now, self.caught_up_at)
        if not cands:
            return None
        req.leader_only = False
        if len(cands) == 1 and req.route.prefer_followers and not req.leader_ok and self.follower_wait > 0 \
                and cands[0] == self.table.leader(now) and len(self.table.live_nodes(now)) > 1:
            # Only the leader has the index yet; followers usually apply it within a heartbeat. Wait a
            # little for one rather than load the leader with every read that follows a write.
            req.leader_only = True
            return None
        route = req.route
        at_index = cands
        if len(cands) > 1 and req.avoid is not None and req.avoid in cands:
            cands = [n for n in cands if n != req.avoid]
        pools = self.pools
        coming: list[str] = []
        patience = min(self.follower_wait, route.fence_wait / 4)
        if patience > 0 and req.floor > 0 and route.policy in ("fenced", "linearizable") \
                and len(at_index) < len(self.table.nodes):
            # Live nodes that will very likely reach the index within moments: caught up with the leader's
            # commit recently (not a node still replaying its log), and not one the read is steered from.
            leader = self.table.leader(now) if route.prefer_followers else None
            recent = now - self.table.liveness_timeout
            coming = [n for n in self.table.live_nodes(now)
                      if n not in at_index and n != leader and n != req.avoid
                      and self.caught_up_at.get(n, recent - 1) >= recent]
        return place_read(cands, coming, lambda n: pools[n].outstanding, now - req.ex.started_at, patience,
                          leader=self.table.leader(now), bias=leader_bias(route.prefer_followers,
                                                                          self.cluster.leader_read_margin))

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
        if req.leader_only:
            if not req.fence_deadline:
                req.fence_deadline = now + self.follower_wait
                self.stats.follower_waited += 1
            if now >= req.fence_deadline:
                req.leader_ok = True
                self.dispatch(req)
            else:
                self.fence_waiting.append(req)
            return
        if policy == "bounded":
            self._fall_back_to_leader(req)
            return
        # fenced / linearizable: wait for an announcement showing a node at the index, then the leader.
        if not req.fence_deadline:
            req.fence_deadline = now + req.route.fence_wait
            self.stats.fence_waited += 1
        if now >= req.fence_deadline:
            self._fall_back_to_leader(req)
            return
        self.fence_waiting.append(req)

    def _fall_back_to_leader(self, req: ProxyRequest) -> None:
        req.to_leader = True
        self.stats.fence_fallback += 1
        self.dispatch(req)

    def _send(self, req: ProxyRequest, node: str, now: float | None = None) -> None:
        req.node = node
        pool = self.pools[node]
        pool.outstanding += 1
        conn = pool.take_idle()
        if conn is not None:
            req.start(conn, time.monotonic() if now is None else now)
        else:
            pool.acquire(req)

    def learned_index(self, node: str, index: int) -> None:
        """A node answered from `index`: between announcements (which may come only once a heartbeat), reads
        waiting for that index may go to it now, and later ones are not kept from it."""
        if self.table.note_applied(node, index) and self.fence_waiting:
            self._recheck_fenced(time.monotonic())

    def term_header(self) -> bytes:
        """`x-raft-term: <the table's term>` as a header line, made once per term."""
        term = self.table.term
        cached = self._term_header
        if cached[0] != term:
            cached = self._term_header = (term, b"x-raft-term: %d\r\n" % term)
        return cached[1]

    def count_read(self, req: ProxyRequest, node: str) -> None:
        if req.to_leader or node == self.table.leader(time.monotonic()):
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
                req.fail_held(HoldQueueFull("too many requests are waiting for a leader",
                                            retry_after=self.cluster.retry_after))
                return
            req.held_at = time.monotonic()
            if not req.released:  # (a re-send held again is not another held request)
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
            # The hold timeout bounds the time spent holding, not the time spent waiting on nodes between
            # holds (the response timeout bounds that).
            req.held_for += now - req.held_at
            req.held_at = 0.0
            self._send(req, node)

    def node_released(self, node: str) -> None:
        """A request no longer counts against `node`'s load (which a reload may have removed meanwhile)."""
        pool = self.pools.get(node)
        if pool is not None:
            pool.outstanding -= 1

    def _forget(self, req: ProxyRequest) -> None:
        self.inflight.discard(req)
        if req.node is not None:
            pool = self.pools.get(req.node)  # (node_released, inlined: this is per request)
            if pool is not None:
                pool.outstanding -= 1
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
            # A node whose term goes backwards is lying or restored from an old disk: say so, once a burst.
            self._rejections.warning(node_id, "cluster %s: announcement from %s rejected: %s%s",
                                     self.cluster.name, node_id, exc)
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
        # Requests that are safe to repeat do not wait out the response timeout on a node gone silent
        # (a paused process, a partition): they go elsewhere now. The others keep waiting for their answer.
        for req in [r for r in self.inflight if r.node == node_id and r.safe_to_repeat]:
            req.preempt(f"node {node_id} down ({reason})")
        # Answers it was sending that have stopped (a frozen node) are cut now, not at the response timeout.
        pool = self.pools.get(node_id)
        if pool is not None:
            pool.cut_stalled(now, self.cluster.liveness_timeout / 2, f"node {node_id} down")

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

    def forget_node(self, node_id: str) -> None:
        """The operator's way back (admin API): the table drops what it knows of `node_id` (ValueError
        for an unknown node); its next announcement is taken as new."""
        now = time.monotonic()
        change = self.table.forget(node_id, now)
        log.warning("cluster %s: node %s forgotten by the operator; its next announcement is taken as new",
                    self.cluster.name, node_id)
        if change is not None:
            self._leader_changed(change, now)

    def _leader_changed(self, change: LeaderChange, now: float) -> None:
        self.stats.leader_changes += 1
        new = change.new_leader
        if new is not None:
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
            if any(r.finished or r.held_at + timeout <= now + r.held_for for r in self.held):
                keep: deque[ProxyRequest] = deque()
                for req in self.held:
                    if req.finished:
                        continue
                    if req.held_at + timeout <= now + req.held_for:
                        self.stats.expired += 1
                        req.fail_held(NoLeader(f"no leader for {self.cluster.name} within {timeout:g}s",
                                               retry_after=self.cluster.retry_after,
                                               cluster=self.cluster.name))
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
                # Placement depends on time too (a short wait for an idle node): look again first.
                node = self.pick(req, now)
                if node is not None:
                    self._send(req, node)
                elif req.fence_deadline > now:
                    self.fence_waiting.append(req)
                elif req.leader_only:
                    req.leader_ok = True  # no follower caught up in time: the leader serves it
                    self.dispatch(req)
                else:
                    self._fall_back_to_leader(req)
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
        self.follower_wait = cluster.follower_wait
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
