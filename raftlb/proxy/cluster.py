"""The proxy: one `ClusterProxy` per cluster routes each request to a node and relays the answer.

It owns the cluster's leader table, a keep-alive pool per node, and the places a request can wait: the
hold queue (no leader yet), the fence wait list (no node at the client's index yet), the read-index broker
(linearizable reads) and the session order (writes of one session, in seq order). Everything is callbacks:
held requests wait in a deque, not in tasks. It decides nothing itself: where a request goes is
`raftlb.core.placement.place`, the hold queue's budgets `raftlb.core.hold`, preemption and re-sends
`raftlb.core.resend`; this module feeds them the table, the load and `now`, and acts on the answer. The
per-request HTTP/1 relay is `raftlb.proxy.request`; requests that reach their node over HTTP/2 (gRPC
calls, and HTTP/2 clients' requests to a cluster with `upstream_protocol: http2`) are
`raftlb.proxy.stream_request`'s.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from ssl import SSLContext

from raftlb.burstlog import BurstLog
from raftlb.config.model import ClusterConfig, TlsConfig
from raftlb.core import grpc
from raftlb.core.dialects import dialect_for
from raftlb.core.hold import deadline_passed, hold_admits, hold_expired, hold_over_bytes
from raftlb.core.leader_table import Announcement, LeaderChange, LeaderTable
from raftlb.core.placement import Target, Wait, is_caught_up, place, wait_budget
from raftlb.core.resend import deposed_by, preempted_by_node_down
from raftlb.core.router import Router
from raftlb.core.sessions import SessionOrder
from raftlb.errors import HoldQueueFull, NoLeader, RequestTimeout, SessionGap
from raftlb.http.h2server import H2Exchange
from raftlb.http.server import Exchange
from raftlb.proxy import stream_request
from raftlb.proxy.h2pool import H2NodePool
from raftlb.proxy.pool import NodePool
from raftlb.proxy.reads import ReadIndexBroker, Request
from raftlb.proxy.request import ProxyRequest, accept
from raftlb.proxy.stats import ProxyStats, RequestObserver
from raftlb.proxy.stream_request import StreamRequest
from raftlb.tls import client_context

log = logging.getLogger("raftlb.proxy.cluster")

_LEADER = Target.LEADER
_WAITING = (Wait.FOLLOWER, Wait.FENCE)

__all__ = ["ClusterProxy", "ProxyStats", "RequestObserver"]


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
        self._h2_ssl: tuple[TlsConfig | None, SSLContext] | None = None
        self.pools: dict[str, NodePool] = {}
        self.h2pools: dict[str, H2NodePool] = {}  # HTTP/2 to the nodes (gRPC; `upstream_protocol: http2`)
        self.authorities: dict[str, tuple[bytes, bytes]] = {}  # node -> (:scheme, :authority) for HTTP/2
        self.node_headers: dict[str, bytes] = {}
        self.node_hosts: dict[str, bytes] = {}  # node -> its `host:` line, for requests that came without one
        self.held: deque[Request] = deque()
        self.held_bytes = 0
        self.inflight: set[ProxyRequest] = set()
        self.streams: set[StreamRequest] = set()  # requests bound to a node over HTTP/2 (answering or not)
        self.fence_waiting: list[Request] = []
        self.follower_wait = cluster.follower_wait
        self.caught_up_at: dict[str, float] = {}  # node -> last time its applied index reached the commit
        self.sessions: SessionOrder[Request] = SessionOrder(cluster.session_gap_wait,
                                                                 cluster.max_sessions)
        self.broker = ReadIndexBroker(self, cluster.read_index_path)
        # Each node's load for placement: the pools' outstanding requests (one closure, made once).
        self.load: Callable[[str], int] = lambda node: self.pools[node].outstanding
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
            authority = node.url.partition("://")[2].encode("idna")
            self.node_hosts[node.id] = b"host: " + authority + b"\r\n"
            https = node.url.startswith("https:")
            self.authorities[node.id] = (b"https" if https else b"http", authority)
            h2pool = self.h2pools.get(node.id)
            h2_ssl = self._client_h2_ssl(cluster) if https else None
            if rebuild or h2pool is None or \
                    (h2pool.host, h2pool.port, h2pool.ssl) != (node.host, node.port, h2_ssl):
                if h2pool is not None:
                    h2pool.close()
                self.h2pools[node.id] = H2NodePool(
                    node.id, node.host, node.port, connect_timeout=cluster.connect_timeout,
                    idle_timeout=cluster.pool.idle_timeout, write_buffer_high=self.write_buffer_high,
                    ssl=h2_ssl)
            else:
                h2pool.connect_timeout = cluster.connect_timeout
                h2pool.idle_timeout = cluster.pool.idle_timeout
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

    def _client_h2_ssl(self, cluster: ClusterConfig) -> SSLContext:
        """The client TLS context for HTTP/2 to nodes: the cluster's, offering ALPN `h2`."""
        if self._h2_ssl is None or self._h2_ssl[0] != cluster.tls:
            ctx = client_context(cluster.tls)
            ctx.set_alpn_protocols(["h2"])
            self._h2_ssl = (cluster.tls, ctx)
        return self._h2_ssl[1]

    # -- the request path ---------------------------------------------------------------------------------

    def on_request(self, ex: Exchange) -> None:
        """An HTTP/1.1 request from a client (the RequestHandler of raftlb.http.server): its adapter reads it
        (raftlb.proxy.request.accept), then it is admitted and placed."""
        self.stats.requests += 1
        if ex.http2:
            is_call = grpc.is_grpc(ex.header(b"content-type"))
            if is_call:
                self.stats.grpc_calls += 1
            else:
                self.stats.h2_requests += 1
            if is_call or self.cluster.upstream_protocol == "http2":
                self._on_stream(ex, is_call)
                return
        req = accept(self, ex)
        if req.finished:
            return
        now = time.monotonic()
        session = req.session
        if session is not None and not self.sessions.admit(req, session[0], session[1], now):
            self.stats.session_parked += 1
            return
        if req.target is _LEADER:
            # The common case, without the general dispatch: a leader (placement's first rule, and
            # `_send`, inlined).
            leader = self.table.leader(now)
            if leader is not None:
                req.node = leader
                conn = self.pools[leader].assign(req)
                if conn is not None:
                    req.start(conn, now)
                return
        # `dispatch` and `_send`, inlined: per request.
        where = place(req, self.table, now, self.follower_wait, self.caught_up_at, self.load,
                      self.cluster.leader_read_margin)
        if isinstance(where, str):
            req.node = where
            conn = self.pools[where].assign(req)
            if conn is not None:
                req.start(conn, now)
        else:
            self._wait(req, where, now)

    def _on_stream(self, ex: Exchange, is_call: bool) -> None:
        """A request from an HTTP/2 client for a node over HTTP/2 (raftlb.proxy.stream_request): read, then
        admitted and placed once it is classified (a call routed by its first message: when that is in)."""
        assert isinstance(ex, H2Exchange)
        req = stream_request.accept(self, ex, is_call)
        if req.finished:
            return
        classified = req.classified
        req.attach_body()
        if classified and not req.finished:
            self.admit(req)

    def admit(self, req: Request) -> None:
        """A request ready to be placed: its session's turn, then where it goes now."""
        now = time.monotonic()
        session = req.session
        if session is not None and not self.sessions.admit(req, session[0], session[1], now):
            self.stats.session_parked += 1
            return
        self.dispatch(req, now)

    def node_authority(self, node: str) -> tuple[bytes, bytes]:
        """(`:scheme`, `:authority`) of a node, for a request sent to it over HTTP/2 without a Host."""
        return self.authorities[node]

    def cancel_stream(self, node: str, req: StreamRequest) -> None:
        """`req` no longer waits for a stream to `node`."""
        pool = self.h2pools.get(node)
        if pool is not None:
            pool.cancel(req)

    def term_value(self) -> bytes:
        """The table's term as a header value."""
        return b"%d" % self.table.term

    def dispatch(self, req: Request, now: float) -> None:
        """Route a request now, as `raftlb.core.placement.place` says: to its node, the hold queue, the fence
        wait list or the read-index broker."""
        where = place(req, self.table, now, self.follower_wait, self.caught_up_at, self.load,
                      self.cluster.leader_read_margin)
        if isinstance(where, str):
            self._send(req, where, now)
        else:
            self._wait(req, where, now)

    def _wait(self, req: Request, wait: Wait, now: float) -> None:
        """No node for `req` now: where it waits."""
        if wait is Wait.HOLD:
            self.hold(req, now)
        elif wait is Wait.READ_INDEX:
            self.broker.submit(req, now)
        elif wait is Wait.FALL_BACK:
            req.fall_back_to_leader()
            self.stats.fence_fallback += 1
            self.dispatch(req, now)
        else:  # FOLLOWER, FENCE: on the fence wait list, until a node qualifies or its wait is over
            if not req.wait_until:
                req.wait_until = now + wait_budget(wait, req.route, self.follower_wait)
                if wait is Wait.FOLLOWER:
                    self.stats.follower_waited += 1
                else:
                    self.stats.fence_waited += 1
                if req.wait_until <= now:  # no wait at all (fence_wait 0): placed again at once
                    self.dispatch(req, now)
                    return
            self.fence_waiting.append(req)

    def _send(self, req: Request, node: str, now: float) -> None:
        req.node = node
        if isinstance(req, StreamRequest):
            self.pools[node].outstanding += 1  # (the node's load, whatever the protocol: see `forget`)
            req.waiting_stream = True
            self.streams.add(req)
            self.h2pools[node].open(req)
            return
        conn = self.pools[node].assign(req)
        if conn is not None:
            req.start(conn, now)

    def learned_index(self, node: str, index: int) -> None:
        """A node answered from `index`: between announcements (which may come only once a heartbeat), reads
        waiting for that index may go to it now, and later ones are not kept from it."""
        if self.table.note_applied(node, index) and self.fence_waiting:
            self._recheck_fenced(time.monotonic())  # (an event: the clock is read once, here)

    def term_header(self) -> bytes:
        """`x-raft-term: <the table's term>` as a header line, made once per term."""
        term = self.table.term
        cached = self._term_header
        if cached[0] != term:
            cached = self._term_header = (term, b"x-raft-term: %d\r\n" % term)
        return cached[1]

    def count_read(self, req: Request, node: str) -> None:
        """Count a read answered by `node`: by the leader, or by a follower."""
        if req.target is _LEADER or node == self.table.leader(time.monotonic()):
            self.stats.reads_leader += 1
        else:
            self.stats.reads_follower += 1

    def _recheck_fenced(self, now: float, settle: bool = False) -> None:
        """Place the reads on the fence wait list again: an announcement arrived (a node may be at their
        index now), or the sweep (`settle`: placement depends on time too — a short wait for an idle node,
        waits that are over — and the sweep also acts on the other answers: fall back, hold)."""
        waiting, self.fence_waiting = self.fence_waiting, []
        for req in waiting:
            if req.finished:
                continue
            where = place(req, self.table, now, self.follower_wait, self.caught_up_at, self.load,
                          self.cluster.leader_read_margin)
            if isinstance(where, str):
                self._send(req, where, now)
            elif not settle or where in _WAITING:
                self.fence_waiting.append(req)  # (without `settle`, the sweep ends waits that are over)
            else:
                self._wait(req, where, now)

    def hold(self, req: Request, now: float) -> None:
        """Park a request until a leader (for reads: any live node) is there; bounded in count and bytes."""
        if not req.held_at:
            if not hold_admits(len(self.held), self.held_bytes, req.hold_size, self.cluster.hold):
                req.fail_held(HoldQueueFull("too many requests are waiting for a leader",
                                            retry_after=self.cluster.retry_after))
                return
            req.hold_started(now)
            if not req.released:  # (a re-send held again is not another held request)
                self.stats.held += 1
        self.held.append(req)
        self.held_bytes += req.hold_size

    def held_body_grew(self, req: Request, n: int) -> None:
        """A held chunked request received more body: keep the byte budget honest."""
        if req not in self.held:
            return
        self.held_bytes += n
        if hold_over_bytes(self.held_bytes, self.cluster.hold):
            self.held.remove(req)
            self.held_bytes -= req.hold_size
            req.fail(HoldQueueFull("held writes exceed the hold byte budget",
                                   retry_after=self.cluster.retry_after))

    def _release(self, now: float) -> None:
        """Dispatch held requests that can go now, in arrival order."""
        if not self.held:
            return
        waiting: deque[Request] = deque()
        held, self.held = self.held, waiting
        self.held_bytes = 0
        while held:
            req = held.popleft()
            if req.finished:
                continue
            where = place(req, self.table, now, self.follower_wait, self.caught_up_at, self.load,
                          self.cluster.leader_read_margin)
            if not isinstance(where, str):
                waiting.append(req)
                self.held_bytes += req.hold_size
                continue
            if not req.released:
                self.stats.released += 1
            req.hold_ended(now)
            self._send(req, where, now)

    def release_node(self, node: str) -> None:
        """A request no longer counts against `node`'s load (which a reload may have removed meanwhile)."""
        pool = self.pools.get(node)
        if pool is not None:
            pool.unassign()

    def forget(self, req: Request) -> None:
        """`req` is over (answered, failed, abandoned): its node's load, and the next write of its session."""
        if isinstance(req, StreamRequest):
            self.streams.discard(req)
        else:
            self.inflight.discard(req)
        node = req.node
        if node is not None:
            pool = self.pools.get(node)
            if pool is not None:
                pool.unassign()
            req.node = None
        if req.session is not None:
            nxt = self.sessions.done(req, req.session[0])
            req.session = None
            if nxt is not None and not nxt.finished:
                self.dispatch(nxt, time.monotonic())  # (an event: the clock is read once, here)

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
        if leader is not None and is_caught_up(node_id, leader, self.table.nodes[node_id].applied_index,
                                               self.table.nodes[leader].commit_index):
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
        for req in [r for r in self.inflight
                    if r.node == node_id and preempted_by_node_down(r.safe_to_repeat)]:
            req.preempt(f"node {node_id} down ({reason})")
        # Calls streaming from it (a Watch, a keep-alive) end now, so that their clients open them again
        # through raftlb, to a live node.
        for sreq in [r for r in self.streams
                     if r.node == node_id and preempted_by_node_down(r.safe_to_repeat, r.answered)]:
            sreq.preempt(f"node {node_id} down ({reason})")
        # Answers it was sending that have stopped (a frozen node) are cut now, not at the response timeout.
        pool = self.pools.get(node_id)
        if pool is not None:
            pool.cut_stalled(now, self.cluster.liveness_timeout / 2, f"node {node_id} down")
        h2pool = self.h2pools.get(node_id)
        if h2pool is not None:
            h2pool.cut_stalled(now, self.cluster.liveness_timeout / 2, f"node {node_id} down")

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
                            if deposed_by(r.route.needs_leader, r.node, r.sent_term, new, term)]:
                    req.preempt(f"node {req.node} deposed by term {change.new_term}")
            if self.streams:
                term = change.new_term  # (a keep-alive stream on the old leader ends: re-opened on the new)
                for sreq in [r for r in self.streams
                             if deposed_by(r.route.needs_leader, r.node, r.sent_term, new, term)]:
                    sreq.preempt(f"node {sreq.node} deposed by term {change.new_term}")
            for held in self.held:
                held.leader_appeared()
            self._release(now)
            self.broker.kick(now)
        if self.on_change is not None:
            self.on_change(change)

    def sweep(self, now: float) -> None:
        """Periodic: leader liveness, hold timeouts and retries, upstream timeouts and idle connections."""
        change = self.table.expire(now)
        if change is not None:
            self._leader_changed(change, now)
        self._deadlines(now)
        if self.held:
            timeout = self.cluster.hold.timeout
            if any(r.finished or hold_expired(r.held_at, r.held_for, timeout, now) for r in self.held):
                keep: deque[Request] = deque()
                for req in self.held:
                    if req.finished:
                        continue
                    if hold_expired(req.held_at, req.held_for, timeout, now):
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
            self._recheck_fenced(now, settle=True)
        for req in self.sessions.expired(now):
            self.stats.session_gaps += 1
            req.session = None
            req.fail(SessionGap("an earlier X-Raft-Seq of this session did not arrive in time"))
        if self.broker.pending:
            timeout = self.cluster.hold.timeout
            # (reads waiting for a read index: the hold timeout bounds that wait too, from their arrival)
            for req in [r for r in self.broker.pending if hold_expired(r.arrived_at, 0.0, timeout, now)]:
                self.broker.pending.remove(req)
                req.fail(NoLeader("no leader to obtain a read index from",
                                  retry_after=self.cluster.retry_after))
            self.broker.kick(now)
        for pool in self.pools.values():
            pool.sweep(now)
        for h2pool in self.h2pools.values():
            h2pool.sweep(now)

    def _deadlines(self, now: float) -> None:
        """gRPC calls whose deadline (`grpc-timeout`) passed while they waited (held, fenced, for a read
        index, for a stream) end now, DEADLINE_EXCEEDED: their client has given up on them."""
        if not self.streams and not self.held and not self.fence_waiting and not self.broker.pending:
            return
        waiting = [r for r in (*self.held, *self.fence_waiting, *self.broker.pending, *self.streams)
                   if isinstance(r, StreamRequest) and r.stream is None and deadline_passed(r.deadline, now)]
        for req in waiting:
            if req in self.broker.pending:
                self.broker.pending.remove(req)
            req.fail(RequestTimeout("the call's deadline (grpc-timeout) passed before a node answered it"))

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
            h2pool = self.h2pools.pop(nid, None)
            if h2pool is not None:
                h2pool.close()
            if change is not None:
                self._leader_changed(change, now)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        for h2pool in self.h2pools.values():
            h2pool.close()
