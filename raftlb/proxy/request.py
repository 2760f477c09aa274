"""One proxied request over HTTP/1.1: the adapter between a downstream `Exchange`, an upstream connection
and the protocol-independent request state (raftlb.core.lifecycle.RequestState).

`accept` reads a client's request (its upstream head, route, fence and session) into a `ProxyRequest`;
the cluster proxy admits and places it (raftlb.proxy.cluster), which knows no HTTP framing itself.

A `ProxyRequest` keeps what a re-send needs (the upstream head, the body up to `resend_body_limit`) and
relays the answer with flow control both ways. It decides nothing itself: after a failed attempt it asks
`raftlb.core.resend.resend_verdict` (421, connect failure, failure after the request was written,
preemption, timeouts, an answer below the client's index) and does what the verdict says; where the
request goes is the owner's (`RequestOwner`, the cluster proxy) and `raftlb.core.placement`'s.
"""

from __future__ import annotations

import logging
import time
from enum import Enum
from typing import Protocol

from raftlb.config.model import READ_POLICIES, ClusterConfig
from raftlb.core.dialects import BODY_INDEX_LIMIT, Dialect
from raftlb.core.leader_table import LeaderTable
from raftlb.core.placement import Target, below_fence, leader_moved
from raftlb.core.resend import Failure, safe_to_resend
from raftlb.core.router import RouteDecision, Router
from raftlb.errors import (
    BadConsistency,
    BadMinIndex,
    BadRequest,
    IndexNotReached,
    ProxyError,
)
from raftlb.http.exchange import STATUS_LINES
from raftlb.http.server import FRAMING_CHUNKED, FRAMING_LENGTH, FRAMING_NONE, Exchange, status_line
from raftlb.proxy.attempt import ProxiedRequest
from raftlb.proxy.pool import UpstreamConn
from raftlb.proxy.stats import ProxyStats, RequestObserver

log = logging.getLogger("raftlb.proxy.cluster")

# (The answer headers not relayed, and those read on the way, are raftlb.proxy.pool's RELAY_DROP and NOTED:
# the pool sorts them as it parses, in one pass.)
# On every read's answer: the policy that served it (the route's, or the client's X-Raft-Consistency).
POLICY_HEADERS = {p: b"x-raft-consistency: " + p.encode() + b"\r\n" for p in READ_POLICIES}

MAX_INDEX = 1 << 64  # Raft indexes are uint64: an X-Raft-Index at or above this is not one

# Answers with a Content-Length body up to this size are sent on in one write, head and body together.
SMALL_ANSWER = 16 * 1024

_LEADER = Target.LEADER


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


class Deferral(Enum):
    """Why an answer's head is held back until its body is in."""

    SMALL = "small"  # a small answer: head and body leave in one write
    INDEX_IN_BODY = "index_in_body"  # its index is in the body (etcd): read it, then judge the fence


_SMALL, _INDEX_IN_BODY = Deferral.SMALL, Deferral.INDEX_IN_BODY


class RequestOwner(Protocol):
    """What a request needs of the proxy that routes it (raftlb.proxy.cluster.ClusterProxy)."""

    cluster: ClusterConfig
    router: Router
    write_buffer_high: int
    table: LeaderTable
    dialect: Dialect
    stats: ProxyStats
    inflight: set[ProxyRequest]
    node_hosts: dict[str, bytes]
    node_headers: dict[str, bytes]
    observer: RequestObserver | None

    def dispatch(self, req: ProxyRequest, now: float) -> None:
        """Place the request now: send, hold or park it (raftlb.core.placement)."""

    def hold(self, req: ProxyRequest, now: float) -> None:
        """Park the request in the hold queue (a re-send's backoff)."""

    def forget(self, req: ProxyRequest) -> None:
        """The request is over (answered, failed, abandoned): release its node and its session turn."""

    def release_node(self, node: str) -> None:
        """The request no longer counts against `node`'s load."""

    def held_body_grew(self, req: ProxyRequest, n: int) -> None:
        """A held request's body grew by `n` bytes."""

    def learned_index(self, node: str, index: int) -> None:
        """`node` answered from `index`."""

    def term_header(self) -> bytes:
        """The `x-raft-term` header line for the table's term."""

    def count_read(self, req: ProxyRequest, node: str) -> None:
        """Count a read answered by `node`."""

    def on_misdirected(self, node_id: str, hint: str | None, term: int | None) -> None:
        """A node answered 421, with its leader hint and term."""

    def on_node_unreachable(self, node_id: str, reason: str) -> None:
        """The data path could not connect to a node."""


class ProxyRequest(ProxiedRequest):
    """One proxied HTTP/1.1 request: the retained body, the relay of the answer, the upstream callbacks."""

    __slots__ = (
        "proxy", "ex", "head", "chunks", "body_len", "retain", "body_done", "conn", "upstream_chunked",
        "sent_body", "deferred", "answer", "body", "add_host",
    )

    proxy: RequestOwner
    deferred: Deferral | None  # the answer's head is held back until its body is in (why)
    answer: tuple[int, list[bytes], bool, int]  # ... (status, head parts, has X-Raft-Term, index)
    body: list[bytes]  # ... and its body so far
    add_host: bool  # the client sent no Host (HTTP/1.0): `start` adds the node's

    def __init__(self, proxy: RequestOwner, ex: Exchange, route: RouteDecision, head: bytes) -> None:
        # (RequestState.__init__, inlined: this runs once per request)
        self.route = route
        self.target = _LEADER if route.needs_leader else Target.READ
        self.arrived_at = ex.started_at
        self.node = self.read_index = self.avoid = self.session = None
        self.finished = False
        self.min_index = self.floor = 0
        self.wait_until = 0.0
        self.proxy = proxy
        self.ex = ex
        self.head = head
        self.chunks: list[bytes] = []
        self.body_len = 0
        self.retain = True
        self.body_done = False
        self.conn: UpstreamConn | None = None
        self.upstream_chunked = ex.chunked
        self.sent_body = 0  # how many of `chunks` the current connection has been sent
        self.deferred = None
        self.add_host = False

    def __repr__(self) -> str:
        return f"<ProxyRequest {self.ex.method} {self.ex.target!r} node={self.node} attempts={self.attempts}>"

    @property
    def safe_to_repeat(self) -> bool:
        """May be re-sent after an ambiguous failure: an idempotent method or route, `Idempotency-Key`, or a
        session write (`X-Raft-Session` + `X-Raft-Seq`); see raftlb.core.resend.safe_to_resend."""
        ex = self.ex
        session = ex.header(b"x-raft-session") is not None and ex.header(b"x-raft-seq") is not None
        return safe_to_resend(ex.method, self.route.idempotent, ex.header(b"idempotency-key") is not None,
                              session)

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
        self.proxy.forget(self)

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
        if leader_moved(self.target, node, proxy.table.leader(now)):
            conn.pool.release(conn)
            proxy.release_node(node)
            self.node = None
            proxy.dispatch(self, now)
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

    def on_upstream_head(self, conn: UpstreamConn, status: int, noted: list[tuple[bytes, bytes]]) -> None:
        proxy = self.proxy
        proxy.inflight.discard(self)
        if status == 421 and self._misdirected(conn, noted):
            return
        # The client's head: the node's header lines as the pool sorted them (hop-by-hop ones and framing
        # dropped), X-Raft-Index/-Term read from the few it noted.
        parts = [STATUS_LINES.get(status) or status_line(status)]
        parts += conn.relay
        index = -1
        seen_index = has_term = False
        for k, v in noted:
            if k == b"x-raft-index":
                # The index decides whether the answer passes the client's fence: one that cannot be read
                # as one number (two headers, a list, not a uint64) is a malformed answer.
                v = v.strip()
                index = int(v) if not seen_index and len(v) <= 20 and v.isdigit() else MAX_INDEX
                if index >= MAX_INDEX:
                    what = "two X-Raft-Index headers" if seen_index else f"X-Raft-Index {v[:40]!r}"
                    conn.reject(f"malformed response from node: {what}")
                    return
                seen_index = True
            elif k == b"x-raft-term":
                has_term = True
        if index >= 0 and status < 500 and self.node is not None:
            proxy.learned_index(self.node, index)
        length = conn.resp_length
        if length is not None and not self.ex.head_only and status >= 200:
            if (index < 0 and proxy.dialect.index_from_body is not None and status == 200
                    and length <= BODY_INDEX_LIMIT):
                # The index is in the body (etcd): hold the small answer back until it is read.
                self.deferred = _INDEX_IN_BODY
                self.answer = (status, parts, has_term, index)
                self.body = []
                return
            if self.floor > index >= 0 and self._stale(conn, status, index):
                return
            if 0 < length <= SMALL_ANSWER and status not in (204, 304):
                # A small answer leaves in one write, head and body together, once its body is in.
                self.deferred = _SMALL
                self.answer = (status, parts, has_term, index)
                self.body = []
                return
        elif self.floor > index >= 0 and self._stale(conn, status, index):
            return
        self._answer_head(conn, status, parts, has_term, index)
        if self.ex.conn.writing_paused:
            conn.pause_reading()

    def _misdirected(self, conn: UpstreamConn, noted: list[tuple[bytes, bytes]]) -> bool:
        """A 421: the node did not apply the request. True: re-sent (the table learnt the hint); False: the
        421 goes to the client (the re-send rule says so)."""
        proxy = self.proxy
        verdict = self.verdict(Failure.MISDIRECTED)
        if not verdict.resend:
            return False
        hint: str | None = None
        term: int | None = None
        for k, v in noted:  # (the pool notes X-Raft-Leader and X-Raft-Term)
            if k == b"x-raft-leader":
                hint = v.decode("latin-1").strip() or None
            elif k == b"x-raft-term" and v.strip().isdigit():
                term = int(v)
        conn.abandon()
        self.conn = None
        proxy.stats.misdirected += 1
        proxy.on_misdirected(self.node or "", hint, term)
        self.resend("misdirected", verdict, time.monotonic())
        return True

    def _stale(self, conn: UpstreamConn | None, status: int, index: int) -> bool:
        """A read answered from state older than the client's token is never returned (True): it is
        re-sent, or fails, as the re-send rule says."""
        if not below_fence(self.route, status, index, self.floor):
            return False
        proxy = self.proxy
        if conn is not None:
            conn.abandon()
        self.conn = None
        proxy.stats.fence_stale += 1
        verdict = self.verdict(Failure.STALE_INDEX)
        if verdict.resend:
            self.resend("fence_stale", verdict, time.monotonic())
        else:
            self.fail(IndexNotReached(f"no node served index {self.floor} in time", index=self.floor))
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
            status, parts, has_term, index = self.answer
            body = b"".join(self.body)
            self.body = []
            if deferred is _INDEX_IN_BODY:
                dialect = self.proxy.dialect
                found = dialect.index_from_body(body) if dialect.index_from_body is not None else None
                if found is not None:
                    index = found
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
        self.conn = None
        self.proxy.inflight.discard(self)
        if self.finished:
            return
        failure = Failure.CONNECT_FAILED if not written else Failure.TIMED_OUT if timeout \
            else Failure.FAILED_AFTER_SEND
        self.attempt_failed(failure, reason)

    def preempt(self, reason: str) -> None:
        """The node this request waits on was deposed or went down: stop waiting for it and apply the
        re-send rule."""
        conn = self.conn
        if conn is None:
            return
        written = conn.written
        conn.abandon()
        self.proxy.stats.preempted += 1
        self.conn = None
        self.proxy.inflight.discard(self)
        if not self.finished:
            self.attempt_failed(Failure.PREEMPTED if written else Failure.CONNECT_FAILED, reason)

    # -- what the re-send rule's verdicts need of this adapter (raftlb.proxy.attempt) -----------------------

    @property
    def answer_started(self) -> bool:
        return self.ex.response_started

    def reset_attempt(self) -> None:
        self.sent_body = 0
        self.deferred = None  # an answer held back from the failed attempt is not this one's

    def cut(self, reason: str) -> None:
        log.warning("%s failed mid-response: cutting the client connection", reason)
        self.ex.abort(reason)
        self._finish()

    def send_again(self, now: float) -> None:
        self.proxy.dispatch(self, now)

    def hold_again(self, now: float) -> None:
        self.proxy.hold(self, now)

    # -- the outcome ----------------------------------------------------------------------------------------

    def fail(self, err: ProxyError) -> None:
        """Answer the client with `err`; the request is over."""
        ex = self.ex
        ex.close_after = ex.close_after or not self.body_done
        ex.respond_error(err)
        self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            proxy = self.proxy
            node = self.node  # before forget clears it
            proxy.forget(self)
            cls = self.ex.status // 100  # (not min(): a builtin with keyword parsing, per request)
            proxy.stats.responses_by_class[cls if cls < 5 else 5] += 1
            observer = proxy.observer
            if observer is not None:
                observer.request_done(proxy.cluster.name, self.route, node, self.ex)


def accept(owner: RequestOwner, ex: Exchange) -> ProxyRequest:
    """An HTTP/1.1 request from a client as a proxied request: its upstream head (one pass over the headers,
    hop-by-hop ones dropped, X-Forwarded-* and framing redone), its route, its fence (the client's token) and
    its session. A request refused here (a malformed X-Raft-* header, a Connection header naming one raftlb
    needs) comes back finished, answered 400."""
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
        route = owner.router.classify(ex.method, path,
                                      consistency.decode("latin-1") if consistency is not None else None)
    except ValueError as exc:  # a read policy raftlb cannot give: say so (errors.BadConsistency)
        route = owner.router.classify(ex.method, path)
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
              b"\r\nx-forwarded-proto: ", ex.conn.scheme, b"\r\n")
    if route.kind == "write" and owner.dialect.write_headers:
        parts.append(owner.dialect.write_headers)
    if ex.chunked:
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    elif ex.content_length is not None:
        parts.append(b"content-length: %d\r\n\r\n" % ex.content_length)
    else:
        parts.append(b"\r\n")
    req = ProxyRequest(owner, ex, route, b"".join(parts))
    ex.on_abort = req.on_client_abort
    if refused is not None:
        ex.close_after = True
        req.fail(refused)
        return req
    if not ex.http11 and ex.header(b"host") is None:
        # HTTP/1.0 without Host, forwarded as HTTP/1.1, which must have one (RFC 9112 §3.2): the node's
        # own authority, as if the client had addressed it directly (added per node: see request.start).
        req.add_host = True
    if ex.has_body or ex.expect_continue:
        ex.set_body_sink(req.on_client_body, req.on_client_body_end)
    else:
        req.body_done = True  # nothing to relay: the end of the (empty) body needs no callback
    if req.finished:
        return req
    if (token is not None or route.cookie) and route.keeps_token:
        index = int(token) if token is not None and token.isdigit() else 0
        if route.cookie:
            index = max(index, cookie_index(cookie))
        req.fence(index, None)
    if route.kind == "write" and sid is not None and seq is not None:
        req.session = (sid.decode("latin-1"), int(seq))
    return req
