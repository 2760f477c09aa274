"""What the proxy counts and who is told about finished requests: the per-cluster counters the metrics
module reads, and the observer Protocol (metrics, access log)."""

from __future__ import annotations

from typing import Protocol

from raftlb.core.router import RouteDecision
from raftlb.http.server import Exchange


class ProxyStats:
    """Counters the metrics module reads; plain ints so the hot path pays nothing."""

    __slots__ = ("requests", "held", "released", "expired", "resends", "outcome_unknown", "misdirected",
                 "preempted", "responses_by_class", "rejected_announcements", "leader_changes",
                 "reads_leader", "reads_follower", "fence_waited", "fence_fallback", "fence_stale",
                 "follower_waited",
                 "session_parked",
                 "session_gaps", "h2_requests", "grpc_calls", "grpc_status")

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
        self.h2_requests = 0  # of `requests`: from HTTP/2 clients, not gRPC (the rest came over HTTP/1.1)
        self.grpc_calls = 0  # of `requests`: gRPC calls
        self.grpc_status: dict[int, int] = {}  # gRPC calls ended, by the status they ended with


class RequestObserver(Protocol):
    """Told about every finished request (metrics, access log); off the hot path when None."""

    def request_done(self, cluster: str, route: RouteDecision, node: str | None, ex: Exchange) -> None: ...
