"""One proxied request over HTTP/2 to a node: the adapter between a client's HTTP/2 stream (`H2Exchange`), a
stream on the node's multiplexed connection (raftlb.proxy.h2pool) and the protocol-independent request state
(raftlb.core.lifecycle.RequestState).

Two kinds of request take this path:
- **gRPC calls** (content-type `application/grpc*`, always): routed by their method path and, where a route
  reads a field of it, their first request message (`Router.classify_call`); raftlb's own errors end the
  call with a gRPC status (Trailers-Only, or trailers when the answer has started); `grpc-timeout` bounds
  holds and fence waits and is passed on with the time left; a node's "not the leader, nothing applied"
  answer (etcd's "no leader" to a `hasleader` call, a native node's UNAVAILABLE with `x-raft-leader`) is
  re-sent; the answer's index is read from its headers (`x-raft-index`) or, for etcd, from the revision in
  its first message's ResponseHeader, and added as `x-raft-index` / `x-raft-node` metadata;
- **other HTTP/2 requests** to a cluster whose nodes speak HTTP/2 (`upstream_protocol: http2`).

It decides nothing itself: the re-send verdict is raftlb.core.resend's, where the request goes is the
owner's (raftlb.proxy.cluster) and raftlb.core.placement's, the status an error ends a call with
raftlb.core.grpc's.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from h2.errors import ErrorCodes

from raftlb.config.model import ClusterConfig
from raftlb.core import grpc
from raftlb.core.dialects import BODY_INDEX_LIMIT, Dialect
from raftlb.core.etcdpb import refused_for_no_leader
from raftlb.core.leader_table import LeaderTable
from raftlb.core.placement import Target, below_fence, leader_moved
from raftlb.core.protowire import ProtoError
from raftlb.core.resend import Failure, safe_to_resend
from raftlb.core.router import RouteDecision, Router
from raftlb.errors import (
    BadConsistency,
    BadMinIndex,
    IndexNotReached,
    ProxyError,
    RequestTimeout,
    UpstreamFailed,
)
from raftlb.http.h2server import H2Exchange
from raftlb.proxy.attempt import ProxiedRequest
from raftlb.proxy.h2pool import UpstreamStream
from raftlb.proxy.stats import ProxyStats, RequestObserver

log = logging.getLogger("raftlb.proxy.cluster")

_LEADER = Target.LEADER
MAX_INDEX = 1 << 64

# Request headers not passed on to the node: hop-by-hop ones (RFC 9113 §8.2.2), `host` (it is :authority in
# HTTP/2) and those raftlb redoes.
REQUEST_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade", b"host",
    b"proxy-authorization", b"x-forwarded-for", b"x-forwarded-proto", b"grpc-timeout", b"hasleader",
})
# Answer headers not passed on to the client: hop-by-hop ones, and the metadata raftlb sets itself.
ANSWER_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te",
    b"x-raft-node",
})

# Why an answer's head is held back: until its first gRPC message (its index is in it), or its whole body
# (an etcd JSON answer: the index is in the body).
_FIRST_MESSAGE, _BODY = 1, 2


class StreamOwner(Protocol):
    """What a stream request needs of the proxy that routes it (raftlb.proxy.cluster.ClusterProxy)."""

    cluster: ClusterConfig
    router: Router
    table: LeaderTable
    dialect: Dialect
    stats: ProxyStats
    observer: RequestObserver | None
    streams: set[StreamRequest]

    def dispatch(self, req: StreamRequest, now: float) -> None: ...
    def hold(self, req: StreamRequest, now: float) -> None: ...
    def forget(self, req: StreamRequest) -> None: ...
    def release_node(self, node: str) -> None: ...
    def learned_index(self, node: str, index: int) -> None: ...
    def term_value(self) -> bytes: ...
    def count_read(self, req: StreamRequest, node: str) -> None: ...
    def on_misdirected(self, node_id: str, hint: str | None, term: int | None) -> None: ...
    def on_node_unreachable(self, node_id: str, reason: str) -> None: ...
    def node_authority(self, node: str) -> tuple[bytes, bytes]: ...
    def admit(self, req: StreamRequest) -> None: ...
    def cancel_stream(self, node: str, req: StreamRequest) -> None: ...


class StreamRequest(ProxiedRequest):
    """One request from an HTTP/2 client to a node over HTTP/2 (a gRPC call or a plain request)."""

    proxy: StreamOwner

    def __init__(self, owner: StreamOwner, ex: H2Exchange, route: RouteDecision, call: grpc.CallHead | None,
                 headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(route, ex.started_at)
        self.proxy = owner
        self.ex = ex
        self.call = call  # None: not a gRPC call
        self.headers = headers  # the request headers for the node, without pseudo-headers
        self.deadline = ex.started_at + call.timeout if call is not None and call.timeout is not None else 0.0
        self.chunks: list[bytes] = []  # the request body so far (kept for a re-send while `retain`)
        self.body_len = 0
        self.retain = True
        self.body_done = False
        self.stream: UpstreamStream | None = None
        self.waiting_stream = False  # queued in the node's pool for a stream
        self.reader: grpc.MessageReader | None = None  # the first request message, for a `proto_flag` route
        self.classified = True
        self.head_status = 0
        self.head: list[tuple[bytes, bytes]] = []  # the node's answer headers, held back (`deferred`)
        self.deferred = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.answer_reader: grpc.MessageReader | None = None
        self.sent_hasleader = False
        self.answered = False  # the answer's head has gone to the client
        self.grpc_status = -1  # the gRPC status the call ended with (-1: not known yet)

    def __repr__(self) -> str:
        return f"<StreamRequest {self.ex.target!r} node={self.node} attempts={self.attempts}>"

    @property
    def is_grpc(self) -> bool:
        return self.call is not None

    @property
    def safe_to_repeat(self) -> bool:
        ex = self.ex
        session = self.session is not None
        return safe_to_resend(ex.method, self.route.idempotent, ex.header(b"idempotency-key") is not None,
                              session)

    @property
    def hold_size(self) -> int:
        return max(self.body_len, self.ex.content_length or 0)

    # -- client side --------------------------------------------------------------------------------------

    def attach_body(self) -> None:
        """Start taking the request body (what is buffered comes now): an unclassified call is placed as
        soon as its first message is in."""
        self.ex.set_body_sink(self.on_client_body, self.on_client_body_end)

    def on_client_body(self, data: bytes) -> None:
        self.body_len += len(data)
        limit = self.proxy.cluster.resend_body_limit
        stream = self.stream
        if self.retain and self.body_len > limit and self.classified:
            self.retain = False  # (too much to re-send: what is kept for that is let go)
            if stream is not None:
                self.chunks.clear()
        if stream is not None:
            stream.send_data(data)
            if self.retain:
                self.chunks.append(data)
            return
        self.chunks.append(data)
        reader = self.reader
        if reader is not None:
            try:
                messages = reader.feed(data)
            except grpc.MalformedMessage as exc:
                self.end_call(exc.status, f"raftlb bad_request: {exc}")
                return
            if messages:
                self._classify(messages[0])
                return
        if not self.retain or self.body_len > limit:
            self.ex.pause_body()  # (nothing to send it on yet, and more than a re-send keeps: wait)

    def on_client_body_end(self) -> None:
        self.body_done = True
        if self.stream is not None:
            self.stream.end()
        elif not self.classified:
            self._classify(None)

    def on_client_abort(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._drop_upstream()
        self.proxy.forget(self)

    def on_client_pause(self) -> None:
        if self.stream is not None:
            self.stream.pause_reading()

    def on_client_resume(self) -> None:
        if self.stream is not None:
            self.stream.resume_reading()

    def _classify(self, message: grpc.Message | None) -> None:
        """The first request message is in (None: the call had none): the call's route, then its place."""
        owner = self.proxy
        self.reader = None
        self.classified = True
        call = self.call
        assert call is not None
        try:
            body = grpc.payload(message, self.ex.header(b"grpc-encoding")) if message is not None else None
            self.route = owner.router.classify_call(call.path, body, call.consistency)
        except grpc.MalformedMessage as exc:
            self.end_call(exc.status, f"raftlb bad_request: {exc}")
            return
        except ProtoError as exc:
            self.end_call(grpc.Status.INTERNAL, f"raftlb bad_request: malformed request message: {exc}")
            return
        except ValueError as exc:
            self.fail(BadConsistency(str(exc)))
            return
        self.target = _LEADER if self.route.needs_leader else Target.READ
        self.take_token()
        owner.admit(self)

    def take_token(self) -> None:
        """A classified call's fence: the client's `x-raft-min-index`, on a route that keeps it."""
        call = self.call
        if call is not None and call.min_index is not None and self.route.keeps_token:
            self.fence(call.min_index, None)

    # -- upstream side ------------------------------------------------------------------------------------

    def on_stream_ready(self, stream: UpstreamStream) -> None:
        """A stream on a connection to `self.node` is this request's: send the request on it."""
        self.waiting_stream = False
        owner = self.proxy
        node = self.node
        if self.finished or node is None:
            stream.reset(ErrorCodes.CANCEL)
            return
        now = time.monotonic()
        if leader_moved(self.target, node, owner.table.leader(now)):
            stream.reset(ErrorCodes.REFUSED_STREAM)
            owner.release_node(node)
            self.node = None
            owner.dispatch(self, now)
            return
        if self.deadline and self.deadline <= now:
            stream.reset(ErrorCodes.CANCEL)
            self.fail(RequestTimeout("the call's deadline passed before a node was free for it"))
            return
        self.stream = stream
        self.sent_term = owner.table.term
        ex = self.ex
        scheme, authority = owner.node_authority(node)
        host = ex.header(b"host")
        head = [(b":method", ex.method_bytes), (b":scheme", scheme), (b":authority", host or authority),
                (b":path", ex.target)]
        head += self.headers
        call = self.call
        if call is not None:
            head.append((b"te", b"trailers"))
            if self.deadline:
                head.append((b"grpc-timeout", grpc.format_timeout(self.deadline - now).encode()))
            if self.route.kind == "write" and owner.dialect.leader_metadata:
                head += owner.dialect.leader_metadata
                self.sent_hasleader = True
        elif not self.route.stream:
            stream.deadline = now + owner.cluster.response_timeout
        if self.deadline:
            stream.deadline = self.deadline
        chunks = self.chunks
        stream.send_headers(head, self.body_done and not chunks)
        for i, chunk in enumerate(chunks):
            stream.send_data(chunk, self.body_done and i == len(chunks) - 1)
        if not self.retain:
            chunks.clear()
        self.ex.resume_body()

    def on_stream_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.finished or self.stream is None:
            return
        stream = self.stream
        if not self.route.stream or self.call is None:
            stream.deadline = self.deadline
        self.head_status = status
        index = -1
        seen = False
        grpc_status: bytes | None = None
        for k, v in headers:
            if k == b"x-raft-index":
                v = v.strip()
                index = int(v) if not seen and len(v) <= 20 and v.isdigit() else MAX_INDEX
                if index >= MAX_INDEX:
                    self._bad_answer(f"malformed x-raft-index {v[:40]!r}")
                    return
                seen = True
            elif k == b"grpc-status":
                grpc_status = v
        if status == 421 and self.call is None:
            hint = _header(headers, b"x-raft-leader")
            term = _header(headers, b"x-raft-term")
            if self._refused(hint.decode("latin-1").strip() or None if hint is not None else None,
                             int(term) if term is not None and term.strip().isdigit() else None):
                return
        if grpc_status is not None and self.call is not None:
            # A Trailers-Only answer: the call ends with this status and no message.
            if self._call_refused(headers):
                return
        self.head = headers
        if index >= 0 and status < 500 and self.node is not None:
            self.proxy.learned_index(self.node, index)
        owner = self.proxy
        if index < 0 and status == 200:
            if self.call is not None and grpc_status is None and owner.dialect.index_from_message is not None:
                self.deferred = _FIRST_MESSAGE
                self.answer_reader = grpc.MessageReader()
                return
            if self.call is None and owner.dialect.index_from_body is not None:
                length = _header(headers, b"content-length")
                if length is not None and length.isdigit() and int(length) <= BODY_INDEX_LIMIT:
                    self.deferred = _BODY
                    return
        if self.floor > index >= 0 and self._stale(status, index):
            return
        self._answer_head(index, grpc_status is not None and self.call is not None)

    def _call_refused(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """A node's Trailers-Only answer that proves the call was not applied (etcd's "no leader" to a call
        with `hasleader`, a native node's "not the leader"): re-sent as the re-send rule says (True)."""
        nl = grpc.not_leader(headers)
        if nl is not None:
            return self._refused(nl.leader, nl.term)
        status = grpc.read_status(headers, trailers_only_answer=True)
        if refused_for_no_leader(status.status, status.message, sent_hasleader=self.sent_hasleader):
            return self._refused(None, None, tell_table=False)
        return False

    def _refused(self, hint: str | None, term: int | None, tell_table: bool = True) -> bool:
        verdict = self.verdict(Failure.MISDIRECTED)
        if not verdict.resend:
            return False
        node = self.node or ""
        self._drop_upstream()
        self.proxy.stats.misdirected += 1
        if tell_table:
            self.proxy.on_misdirected(node, hint, term)
        self.resend("misdirected", verdict, time.monotonic())
        return True

    def _stale(self, status: int, index: int) -> bool:
        """An answer from state older than the client's token is never returned (True): re-sent or failed."""
        if not below_fence(self.route, status, index, self.floor):
            return False
        self._drop_upstream()
        self.proxy.stats.fence_stale += 1
        verdict = self.verdict(Failure.STALE_INDEX)
        if verdict.resend:
            self.resend("fence_stale", verdict, time.monotonic())
        else:
            self.fail(IndexNotReached(f"no node served index {self.floor} in time", index=self.floor))
        return True

    def _answer_head(self, index: int, end: bool) -> None:
        """The answer's head to the client, with raftlb's metadata; `end`: it is the whole answer."""
        owner = self.proxy
        node = self.node
        assert node is not None
        out = [(b":status", b"%d" % self.head_status)]
        for k, v in self.head:
            if k not in ANSWER_DROP:
                out.append((k, v))
        if index >= 0 and _header(self.head, b"x-raft-index") is None:
            out.append((b"x-raft-index", b"%d" % index))
        out.append((b"x-raft-node", node.encode("latin-1")))
        if _header(self.head, b"x-raft-term") is None:
            out.append((b"x-raft-term", owner.term_value()))
        route = self.route
        if route.kind == "read":
            out.append((b"x-raft-consistency", route.policy.encode()))
            owner.count_read(self, node)
        self.head = []
        self.answered = True
        ex = self.ex
        ex.response_started = True
        ex.status = self.head_status
        ex.on_pause_writing = self.on_client_pause
        ex.on_resume_writing = self.on_client_resume
        if end and self.call is not None:
            self.grpc_status = _status_of(self.head_status, out)
        ex.stream.send_head(out, end or ex.head_only)
        if end or ex.head_only:
            self._done()
            if ex.head_only and self.stream is not None:
                self._drop_upstream()

    def on_stream_data(self, data: bytes) -> None:
        if self.finished or self.stream is None:
            return
        deferred = self.deferred
        if not deferred:
            self.ex.stream.send_data(data)
            return
        self.body.append(data)
        self.body_size += len(data)
        if deferred == _FIRST_MESSAGE:
            reader = self.answer_reader
            assert reader is not None
            try:
                messages = reader.feed(data)
            except grpc.MalformedMessage as exc:
                if exc.status is grpc.Status.RESOURCE_EXHAUSTED:
                    self._release_body(-1)  # (a first message too big to hold: relayed without its index)
                else:
                    self._bad_answer(f"malformed gRPC answer: {exc}")
                return
            if messages:
                self._first_message(messages[0])
        elif self.body_size > BODY_INDEX_LIMIT:
            self._release_body(-1)

    def _first_message(self, message: grpc.Message) -> None:
        owner = self.proxy
        index = -1
        extract = owner.dialect.index_from_message
        if extract is not None:
            try:
                found = extract(grpc.payload(message, _header(self.head, b"grpc-encoding")))
            except (ValueError, grpc.MalformedMessage):
                found = None  # (an answer raftlb cannot read an index from still goes to the client)
            if found is not None:
                index = found
                if self.node is not None:
                    owner.learned_index(self.node, index)
        self._release_body(index)

    def _release_body(self, index: int) -> None:
        """The answer held back can go now: its head (with `index`), then what of its body is in."""
        if self.floor > index >= 0 and self._stale(self.head_status, index):
            return
        self.deferred = 0
        self.answer_reader = None
        body, self.body, self.body_size = self.body, [], 0
        self._answer_head(index, False)
        stream = self.ex.stream
        for part in body:
            stream.send_data(part)

    def on_stream_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self.finished or self.stream is None:
            return
        if not self.answered:
            # Trailers with no message before them (an error after the head): the whole answer is in.
            if self._call_refused(headers) if self.call is not None else False:
                return
            self._release_body(-1)
            if self.finished:
                return
        self.ex.stream.trailers = [(k, v) for k, v in headers if k not in ANSWER_DROP]
        if self.call is not None:
            self.grpc_status = _status_of(self.head_status, headers)

    def on_stream_end(self) -> None:
        if self.finished or self.stream is None:
            return
        self.stream = None
        if not self.answered:
            if self.deferred == _BODY:
                body = b"".join(self.body)
                extract = self.proxy.dialect.index_from_body
                found = extract(body) if extract is not None else None
                if found is not None and self.node is not None:
                    self.proxy.learned_index(self.node, found)
                self._release_body(found if found is not None else -1)
            else:
                self._release_body(-1)
            if self.finished:
                return
        self.ex.stream.finish()
        self._done()

    def on_stream_pause(self) -> None:
        self.ex.pause_body()

    def on_stream_resume(self) -> None:
        self.ex.resume_body()

    def on_stream_error(self, reason: str, written: bool, timeout: bool = False) -> None:
        self.stream = None
        self.waiting_stream = False
        if self.finished:
            return
        failure = Failure.CONNECT_FAILED if not written else Failure.TIMED_OUT if timeout \
            else Failure.FAILED_AFTER_SEND
        self.attempt_failed(failure, reason)

    def _bad_answer(self, why: str) -> None:
        node = self.node
        self._drop_upstream()
        self.fail(UpstreamFailed(f"malformed response from node {node}: {why}"))

    def _drop_upstream(self) -> None:
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.reset(ErrorCodes.CANCEL)
        if self.waiting_stream and self.node is not None:
            self.waiting_stream = False
            self.proxy.cancel_stream(self.node, self)
        self.deferred = 0
        self.body = []
        self.body_size = 0
        self.head = []

    def preempt(self, reason: str) -> None:
        """The node this request waits on (or streams from) was deposed or went down: a request still waiting
        for its answer follows the re-send rule; a call whose answer has started (a Watch, a keep-alive) is
        ended now, UNAVAILABLE, so that its client opens it again through raftlb to the right node."""
        if self.finished or (self.stream is None and not self.waiting_stream):
            return
        written = self.stream is not None and self.stream.written
        self._drop_upstream()
        self.proxy.stats.preempted += 1
        self.attempt_failed(Failure.PREEMPTED if written else Failure.CONNECT_FAILED, reason,
                             unreachable=False)

    # -- what the re-send rule's verdicts need of this adapter (raftlb.proxy.attempt) -----------------------

    @property
    def answer_started(self) -> bool:
        return self.answered

    def reset_attempt(self) -> None:
        self.deferred = 0  # (an answer held back from the failed attempt is not this one's)

    def send_again(self, now: float) -> None:
        self.proxy.dispatch(self, now)

    def hold_again(self, now: float) -> None:
        self.proxy.hold(self, now)

    def cut(self, reason: str) -> None:
        """The answer has started and its node is gone: a gRPC call ends with a status that says whether it
        may be repeated (UNAVAILABLE for reads and long-lived calls, which clients open again; UNKNOWN for a
        unary write, which may have been applied); a plain answer is reset."""
        self._drop_upstream()
        if self.call is not None:
            if self.route.kind == "read" or self.route.stream:
                status = grpc.Status.UNAVAILABLE
                message = f"raftlb upstream_failed: {reason}; open the call again"
            else:
                status = grpc.Status.UNKNOWN
                message = f"raftlb outcome_unknown: {reason}; the write may or may not have been applied"
            self.end_call(status, message)
            return
        log.warning("%s: the answer was under way, resetting the client's stream", reason)
        self.ex.abort(reason)
        self._done()

    # -- the outcome ----------------------------------------------------------------------------------------

    def fail(self, err: ProxyError) -> None:
        """End the request with one of raftlb's errors: a gRPC status for a call, an HTTP error otherwise."""
        if self.finished:
            return
        self._drop_upstream()
        ex = self.ex
        if self.call is not None:
            node = self.node
            metadata = ((b"x-raft-node", node.encode("latin-1")),) if node is not None else ()
            ex.error = err
            self.grpc_status = grpc.status_for(err)
            if self.answered:
                ex.stream.trailers = grpc.error_answer(err, metadata, headers_sent=True)
                ex.stream.finish()
            else:
                ex.response_started = True
                ex.status = 200
                ex.stream.send_head(grpc.error_answer(err, metadata), True)
        else:
            ex.respond_error(err)
        self._done()

    def end_call(self, status: grpc.Status, message: str) -> None:
        """End a gRPC call with `status` (not one of raftlb's errors: a malformed call, a cut stream)."""
        if self.finished:
            return
        self._drop_upstream()
        self.grpc_status = status
        stream = self.ex.stream
        if self.answered:
            stream.trailers = grpc.status_trailers(status, message)
            stream.finish()
        else:
            self.ex.response_started = True
            self.ex.status = 200
            stream.send_head(grpc.trailers_only(status, message), True)
        self._done()

    def _done(self) -> None:
        if self.finished:
            return
        self.finished = True
        ex = self.ex
        ex.finished = True
        ex.drop_callbacks()
        owner = self.proxy
        node = self.node
        owner.forget(self)
        cls = ex.status // 100
        stats = owner.stats
        stats.responses_by_class[cls if cls < 5 else 5] += 1
        if self.call is not None:
            code = self.grpc_status if self.grpc_status >= 0 else grpc.Status.CANCELLED
            stats.grpc_status[code] = stats.grpc_status.get(code, 0) + 1
            ex.grpc_status = code
        observer = owner.observer
        if observer is not None:
            observer.request_done(owner.cluster.name, self.route, node, ex)


def _status_of(http_status: int, headers: list[tuple[bytes, bytes]]) -> int:
    """The gRPC status a node ended a call with (its trailers, or Trailers-Only headers)."""
    return grpc.read_status(headers, trailers_only_answer=False, http_status=http_status).status


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def accept(owner: StreamOwner, ex: H2Exchange, is_call: bool) -> StreamRequest:
    """An HTTP/2 request from a client as a request to a node over HTTP/2. A gRPC call (`is_call`) refused
    here (a malformed `grpc-timeout` or X-Raft-* metadata) comes back finished, ended with its status."""
    headers: list[tuple[bytes, bytes]] = []
    xff: bytes | None = None
    for k, v in ex.headers:
        if k in REQUEST_DROP:
            if k == b"x-forwarded-for":
                xff = v if xff is None else xff + b", " + v
            continue
        headers.append((k, v))
    client = ex.conn.peer_bytes
    headers.append((b"x-forwarded-for", xff + b", " + client if xff else client))
    headers.append((b"x-forwarded-proto", ex.conn.scheme))
    call: grpc.CallHead | None = None
    refused: ProxyError | None = None
    router = owner.router
    if is_call:
        call = grpc.read_call_head([(b":path", ex.target), (b":method", ex.method_bytes), *ex.headers])
        refused = call.refused
        route = router.classify_call(call.path, None)
        if refused is None and call.consistency is not None and route.kind == "read":
            try:
                route = router.classify_call(call.path, None, call.consistency)
            except ValueError as exc:
                refused = BadConsistency(str(exc))
    else:
        target = ex.target
        q = target.find(b"?")
        path = (target[:q] if q >= 0 else target).decode("latin-1")
        consistency = ex.header(b"x-raft-consistency")
        try:
            route = router.classify(ex.method, path,
                                    consistency.decode("latin-1") if consistency is not None else None)
        except ValueError as exc:
            route = router.classify(ex.method, path)
            refused = BadConsistency(str(exc))
    req = StreamRequest(owner, ex, route, call, headers)
    ex.on_abort = req.on_client_abort
    if refused is not None:
        req.fail(refused)
        return req
    if call is not None:
        if call.session is not None and call.seq is not None:
            req.session = (call.session.decode("latin-1"), call.seq)
        if router.call_reads_message(call.path):
            req.classified = False
            req.reader = grpc.MessageReader()
        else:
            req.take_token()
    else:
        token = ex.header(b"x-raft-min-index")
        if token is not None and route.keeps_token:
            if not (token.isdigit() and len(token) <= 20):
                req.fail(BadMinIndex(f"X-Raft-Min-Index must be a non-negative decimal integer, got "
                                        f"{token[:32].decode('latin-1')!r}"))
                return req
            req.fence(int(token), None)
        sid, seq = ex.header(b"x-raft-session"), ex.header(b"x-raft-seq")
        if route.kind == "write" and sid is not None and seq is not None and seq.isdigit():
            req.session = (sid.decode("latin-1"), int(seq))
    return req
