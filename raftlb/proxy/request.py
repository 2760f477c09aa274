"""One proxied request: the glue between a downstream `Exchange` and an upstream connection.

A `ProxyRequest` keeps what a re-send needs (the upstream head, the body up to `resend_body_limit`),
relays the answer with flow control both ways, and applies the re-send rule in one place
(`on_upstream_error`):

- nothing was written to the node (connect failed)         → re-send to the current leader (after a backoff)
- written, but the node answered 421 Misdirected Request   → not applied: update the table and re-send
- written, then the connection died or timed out, or a higher term deposed the node meanwhile
      → re-send only if the method is idempotent, the request has `Idempotency-Key` or a Raft session
        (`X-Raft-Session` + `X-Raft-Seq`, deduplicated by the node), or the route says so;
        otherwise `502 outcome_unknown`
- the response has started towards the client              → the client connection is cut, never a truncated
                                                              answer presented as complete
- a read answered from an index below the client's token   → discarded, retried on the leader
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from raftlb.config.model import READ_POLICIES
from raftlb.core.dialects import BODY_INDEX_LIMIT
from raftlb.core.router import RouteDecision
from raftlb.errors import (
    IndexNotReached,
    OutcomeUnknown,
    ProxyError,
    UpstreamFailed,
    UpstreamTimeout,
)
from raftlb.http.exchange import STATUS_LINES
from raftlb.http.server import FRAMING_CHUNKED, FRAMING_LENGTH, FRAMING_NONE, Exchange, status_line
from raftlb.proxy.pool import UpstreamConn

if TYPE_CHECKING:
    from raftlb.proxy.cluster import ClusterProxy

log = logging.getLogger("raftlb.proxy.cluster")

RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authenticate", b"content-length", b"x-raft-node", b"x-raft-consistency",
})
# On every read's answer: the policy that served it (the route's, or the client's X-Raft-Consistency).
POLICY_HEADERS = {p: b"x-raft-consistency: " + p.encode() + b"\r\n" for p in READ_POLICIES}
RESPONSE_WATCH = RESPONSE_DROP | {b"x-raft-index", b"x-raft-term"}

MAX_INDEX = 1 << 64  # Raft indexes are uint64: an X-Raft-Index at or above this is not one

# Answers with a Content-Length body up to this size are sent on in one write, head and body together.
SMALL_ANSWER = 16 * 1024


class ProxyRequest:
    """One proxied request: routing state, retained body, and the upstream callbacks."""

    __slots__ = (
        "proxy", "ex", "route", "head", "chunks", "body_len", "retain", "body_done", "node", "conn",
        "attempts", "held_at", "retry_at", "safe_to_repeat", "upstream_chunked", "sent_body", "finished",
        "avoid", "sent_term", "released", "to_leader", "min_index", "read_index", "fence_deadline", "session",
        "deferred", "body", "leader_only", "leader_ok", "held_for", "maybe_applied", "add_host",
        "failed_rounds",
    )

    def __init__(self, proxy: ClusterProxy, ex: Exchange, route: RouteDecision, head: bytes,
                 safe_to_repeat: bool) -> None:
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
        self.attempts = 0  # re-sends so far, bounded by `max_resends` (read-index rounds have their own)
        self.held_at = 0.0  # when the current hold began (0.0: not held now)
        self.held_for = 0.0  # time spent in earlier holds: the hold timeout bounds the sum
        self.maybe_applied: str | None = None  # a node this write reached, then failed, before a re-send
        self.retry_at = 0.0
        self.safe_to_repeat = safe_to_repeat  # may be re-sent after an ambiguous failure (see the module doc)
        self.upstream_chunked = ex.chunked
        self.sent_body = 0  # how many of `chunks` the current connection has been sent
        self.finished = False
        self.avoid: str | None = None
        self.sent_term = 0  # the table's term when the request was bound to its node
        self.released = False
        self.to_leader = route.needs_leader  # writes, leader reads, and reads that fell back to the leader
        self.min_index = 0  # the client's token (X-Raft-Min-Index / raftlb-index cookie)
        self.read_index: int | None = None  # linearizable reads: the index the leader handed out
        self.failed_rounds = 0  # ... and read-index rounds that failed before it did (ReadIndexBroker)
        self.fence_deadline = 0.0  # fenced reads waiting for a node to reach their index
        self.session: tuple[str, int] | None = None  # (X-Raft-Session, X-Raft-Seq) of a session write
        self.leader_only = False  # only the leader had the client's index when last picked
        self.leader_ok = False  # ... and waiting for a follower is over: the leader may serve it
        # An answer held back until its body is in: (status, head parts, has X-Raft-Term, index; -2 when
        # the index is to be read from the body), and the body so far.
        self.deferred: tuple[int, list[bytes], bool, int] | None = None
        self.body: list[bytes] = []
        self.add_host = False  # the client sent no Host (HTTP/1.0): `start` adds the node's

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
        if conn is not None:
            if self.upstream_chunked:
                conn.write(b"0\r\n\r\n")
            conn.request_sent()

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
        """A connection opened or freed up for this request, which has been waiting for one."""
        proxy = self.proxy
        node = self.node
        if self.finished or node is None:
            conn.pool.release(conn)
            return
        now = time.monotonic()
        if self.to_leader and proxy.table.leader(now) not in (node, None):
            # The leader moved while this connection was being opened.
            conn.pool.release(conn)
            conn.pool.outstanding -= 1
            self.node = None
            proxy.dispatch(self)
            return
        self.start(conn, now)

    def start(self, conn: UpstreamConn, now: float) -> None:
        """Send the request on `conn` (to `self.node`, picked just now)."""
        proxy = self.proxy
        self.conn = conn
        self.sent_term = proxy.table.term
        conn.start(self, self.ex.head_only, now, self.body_done, self.route.stream)
        proxy.inflight.add(self)
        head = self.head
        if self.add_host and self.node is not None:
            eol = head.index(b"\r\n") + 2  # after the request line
            head = head[:eol] + proxy.node_hosts[self.node] + head[eol:]
        if self.chunks:
            parts = [head]
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
            conn.writelines([head, b"0\r\n\r\n"])
        else:
            conn.write(head)

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
        # One pass over the node's headers: the client's head is built, X-Raft-Index/-Term noted on the way.
        parts = [STATUS_LINES.get(status) or status_line(status)]
        index = -1
        seen_index = has_term = False
        for k, v in headers:
            if k in RESPONSE_WATCH:
                if k == b"x-raft-index":
                    # The index decides whether the answer passes the client's fence: one that cannot be
                    # read as one number (two headers, a list, not a uint64) is a malformed answer.
                    v = v.strip()
                    index = int(v) if not seen_index and len(v) <= 20 and v.isdigit() else MAX_INDEX
                    if index >= MAX_INDEX:
                        what = "two X-Raft-Index headers" if seen_index else f"X-Raft-Index {v[:40]!r}"
                        conn.reject(f"malformed response from node: {what}")
                        return
                    seen_index = True
                elif k == b"x-raft-term":
                    has_term = True
                else:
                    continue  # hop-by-hop, or framing that is redone
            parts += (k, b": ", v, b"\r\n")
        if index >= 0 and status < 500 and self.node is not None:
            proxy.learned_index(self.node, index)
        length = conn.resp_length
        if length is not None and not self.ex.head_only and status >= 200:
            if (index < 0 and proxy.dialect.index_from_body is not None and status == 200
                    and length <= BODY_INDEX_LIMIT):
                # The index is in the body (etcd): hold the small answer back until it is read.
                self.deferred = (status, parts, has_term, -2)
                return
            if index >= 0 and self._stale(conn, status, index):
                return
            if 0 < length <= SMALL_ANSWER and status not in (204, 304):
                # A small answer leaves in one write, head and body together, once its body is in.
                self.deferred = (status, parts, has_term, index)
                return
        elif index >= 0 and self._stale(conn, status, index):
            return
        self._answer_head(conn, status, parts, has_term, index)
        if self.ex.conn.writing_paused:
            conn.pause_reading()

    def _stale(self, conn: UpstreamConn | None, status: int, index: int) -> bool:
        """A read answered from state older than the client's token is never returned: retry elsewhere."""
        if index < 0 or self.route.kind != "read" or status >= 500:
            return False
        floor = self.floor
        if index >= floor:
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

    def _answer_head(self, conn: UpstreamConn, status: int, parts: list[bytes], has_term: bool, index: int,
                     body: bytes | None = None) -> None:
        """Send the response head to the client (`conn` is only read for the body's framing), with the
        whole body when it is given."""
        proxy = self.proxy
        ex = self.ex
        ex.status = status
        node = self.node
        assert node is not None
        parts.append(proxy.node_headers[node])
        if not has_term:
            parts.append(proxy.term_header())
        route = self.route
        if route.cookie:
            token = index if index > self.min_index else self.min_index
            if token > 0:
                parts.append(b"set-cookie: raftlb-index=%d; Path=/; SameSite=Lax\r\n" % token)
        if route.kind == "read":
            parts.append(POLICY_HEADERS[route.policy])
            proxy.count_read(self, node)
        if body is not None:
            ex.send_parts(parts, FRAMING_LENGTH, len(body), body)
            return
        ex.on_pause_writing = self.on_client_pause
        ex.on_resume_writing = self.on_client_resume
        if status in (204, 304) or (status < 200):
            framing, length = FRAMING_NONE, 0
        elif conn.resp_chunked or conn.until_close:
            framing, length = FRAMING_CHUNKED, 0
        elif conn.resp_length is not None:
            framing, length = FRAMING_LENGTH, conn.resp_length
        else:
            framing, length = FRAMING_NONE, 0
        ex.send_parts(parts, framing, length)

    def on_upstream_body(self, data: bytes) -> None:
        if self.conn is not None:
            if self.deferred is not None:
                self.body.append(data)
            else:
                self.ex.send_body(data)

    def on_upstream_done(self) -> None:
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        deferred = self.deferred
        if deferred is not None:
            self.deferred = None
            status, parts, has_term, index = deferred
            body = b"".join(self.body)
            self.body = []
            if index == -2:
                dialect = self.proxy.dialect
                found = dialect.index_from_body(body) if dialect.index_from_body is not None else None
                index = -1 if found is None else found
                if found is not None:
                    parts += (b"x-raft-index: ", b"%d" % found, b"\r\n")
                    if self.node is not None:
                        self.proxy.learned_index(self.node, found)
                if self._stale(None, status, index):
                    return
            self._answer_head(conn, status, parts, has_term, index, body)
        self.ex.end()
        self._finish()

    def on_upstream_pause(self) -> None:
        self.ex.pause_body()

    def on_upstream_resume(self) -> None:
        self.ex.resume_body()

    def on_upstream_error(self, reason: str, written: bool, timeout: bool = False) -> None:
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
            if self.route.kind == "write":
                self.maybe_applied = self.node
            self.avoid = self.node
            self._resend("idempotent_retry", immediate=not self.to_leader)
            return
        if self.route.kind == "read":
            err: ProxyError = UpstreamTimeout(f"node {self.node}: {reason}") if timeout \
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
            proxy.node_released(self.node)
            self.node = None
        self.sent_body = 0
        self.deferred = None  # an answer held back from the failed attempt is not this one's
        self.body = []
        if immediate:
            proxy.dispatch(self)
        else:
            self.retry_at = time.monotonic() + min(0.025 * (2 ** self.attempts), 0.5)
            proxy.hold(self)

    def fail_held(self, err: ProxyError) -> None:
        """Give up on a held request with `err` (no leader in time, hold budget), unless it is a write that
        reached a node before: then the truth is that it may have been applied (502 outcome_unknown)."""
        node = self.maybe_applied
        if node is not None:
            self.proxy.stats.outcome_unknown += 1
            err = OutcomeUnknown(f"node {node} did not answer, then {err.detail}; the write may or may not "
                                 "have been applied", node=node)
        self._fail(err)

    def _fail(self, err: ProxyError) -> None:
        ex = self.ex
        ex.close_after = ex.close_after or not self.body_done
        ex.respond_error(err)
        self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            proxy = self.proxy
            node = self.node  # before _forget clears it
            proxy._forget(self)
            cls = self.ex.status // 100  # (not min(): a builtin with keyword parsing, per request)
            proxy.stats.responses_by_class[cls if cls < 5 else 5] += 1
            observer = proxy.observer
            if observer is not None:
                observer.request_done(proxy.cluster.name, self.route, node, self.ex)
