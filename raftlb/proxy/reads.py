"""Reads that need more than "any live node": the eligible-node rules, and the ReadIndex broker.

The rules of where a read goes are in `raftlb.core.placement` (`eligible_nodes`, re-exported here for the
callers that know it by this module) and `raftlb.core.readplace` (`place_read`);
this module does the I/O of reads:

- `ReadIndexBroker`: `linearizable` reads without loading the leader with reads (Raft dissertation §6.4):
  one round trip to the leader's read-index endpoint is shared by every read that arrived before the round
  started; each read is then served, fenced at that index, by any node that has applied it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Protocol

from raftlb.config.model import ClusterConfig
from raftlb.core.leader_table import LeaderTable
from raftlb.core.placement import eligible_nodes
from raftlb.core.resend import MAX_ROUNDS_PER_READ, give_up_read_index
from raftlb.errors import NoLeader
from raftlb.proxy.pool import NodePool, UpstreamConn
from raftlb.proxy.request import ProxyRequest
from raftlb.proxy.stream_request import StreamRequest

log = logging.getLogger("raftlb.proxy.reads")

Request = ProxyRequest | StreamRequest  # (HTTP/1 to the node, HTTP/2 to the node)

__all__ = ["ReadIndexBroker", "eligible_nodes"]


class BrokerOwner(Protocol):
    """What the broker needs of the proxy it serves (raftlb.proxy.cluster.ClusterProxy)."""

    cluster: ClusterConfig
    table: LeaderTable
    pools: dict[str, NodePool]

    def dispatch(self, req: Request, now: float) -> None:
        """Place a read that has its read index now."""


class _ReadIndexCall:
    """One round trip to the leader's read-index endpoint, as an upstream listener."""

    __slots__ = ("broker", "node", "members", "status", "body", "conn", "finished")

    def __init__(self, broker: ReadIndexBroker, node: str, members: list[Request]) -> None:
        self.broker = broker
        self.node = node
        self.members = members
        self.status = 0
        self.body = bytearray()
        self.conn: UpstreamConn | None = None
        self.finished = False

    def on_upstream_ready(self, conn: UpstreamConn) -> None:
        self.conn = conn
        conn.start(self, False)
        conn.write(b"GET " + self.broker.path + b" HTTP/1.1\r\nhost: raftlb\r\ncontent-length: 0\r\n\r\n")

    def on_upstream_head(self, conn: UpstreamConn, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status

    def on_upstream_body(self, data: bytes) -> None:
        if len(self.body) < 65536:
            self.body += data

    def on_upstream_done(self) -> None:
        index: int | None = None
        if self.status == 200:
            try:
                doc = json.loads(self.body)
                index = int(doc["read_index"])
            except (ValueError, KeyError, TypeError):
                index = None
        self.end(index, f"status {self.status}" if index is None else "")

    def on_upstream_error(self, reason: str, written: bool, timeout: bool = False) -> None:
        self.end(None, reason)

    def on_upstream_pause(self) -> None:
        pass

    def on_upstream_resume(self) -> None:
        pass

    def end(self, index: int | None, reason: str) -> None:
        """The round is over: with the read index, or None and why not."""
        if self.finished:
            return
        self.finished = True
        self.broker.round_done(self, index, reason, time.monotonic())


class ReadIndexBroker:
    """Batches `linearizable` reads into shared read-index rounds at the leader.

    A read whose round fails joins the next one, up to MAX_ROUNDS_PER_READ times
    (`raftlb.core.resend.give_up_read_index`); then 503 `no_leader`.
    These rounds have their own budget (`RequestState.failed_rounds`), not the request's re-sends
    (`attempts`, bounded by `max_resends`): a round fails before the read is sent anywhere, and a read that
    got its index after a failed round still has every re-send for the node that serves it.
    """

    MAX_ROUNDS_PER_READ = MAX_ROUNDS_PER_READ

    def __init__(self, proxy: BrokerOwner, path: str) -> None:
        self.proxy = proxy
        self.path = path.encode("latin-1")
        self.pending: list[Request] = []
        self.round: _ReadIndexCall | None = None
        self.rounds = 0
        self.reads = 0

    def __repr__(self) -> str:
        return f"<ReadIndexBroker rounds={self.rounds} reads={self.reads} pending={len(self.pending)}>"

    def submit(self, req: Request, now: float) -> None:
        """A read that needs a read index. It joins the next round: one that starts after it arrived."""
        self.pending.append(req)
        if self.round is None:
            self._start(now)

    def _start(self, now: float) -> None:
        proxy = self.proxy
        self.pending = [r for r in self.pending if not r.finished]
        if not self.pending:
            return
        leader = proxy.table.leader(now)
        if leader is None:
            return  # retried on the next leader change or sweep
        members, self.pending = self.pending, []
        self.round = call = _ReadIndexCall(self, leader, members)
        self.rounds += 1
        proxy.pools[leader].acquire(call)

    def round_done(self, call: _ReadIndexCall, index: int | None, reason: str, now: float) -> None:
        """A round ended: its reads go on with the read index, or join the next round (their own budget)."""
        self.round = None
        proxy = self.proxy
        if index is not None:
            self.reads += len(call.members)
            for req in call.members:
                if not req.finished:
                    req.fence(req.min_index, index)
                    proxy.dispatch(req, now)
        else:
            log.debug("read-index round at %s failed: %s", call.node, reason)
            for req in call.members:
                if req.finished:
                    continue
                req.failed_rounds += 1
                if give_up_read_index(req.failed_rounds):
                    req.fail(NoLeader(f"could not obtain a read index from the leader: {reason}",
                                       retry_after=proxy.cluster.retry_after))
                else:
                    self.pending.append(req)
        if self.pending:
            self._start(now)

    def kick(self, now: float) -> None:
        """A leader appeared (or the periodic sweep): start a round if reads wait for one."""
        if self.round is None and self.pending:
            self._start(now)
