"""The hold queue's rules: requests wait there while the cluster has no leader (for `any` reads: no live
node) or while a re-send backs off. Pure: the queue itself lives in the proxy; these say who may join,
who must leave and with what answer (docs/how-it-works.md, "What happens to a write").
"""

from __future__ import annotations

from raftlb.config.model import HoldConfig


def hold_admits(held: int, held_bytes: int, size: int, budget: HoldConfig) -> bool:
    """A request joins the hold queue only within its budget: `max_requests` requests and `max_bytes` of
    body (declared or received so far) in all."""
    return held < budget.max_requests and held_bytes + size <= budget.max_bytes


def hold_over_bytes(held_bytes: int, budget: HoldConfig) -> bool:
    """A held chunked body kept growing past `max_bytes`: the request that grew it leaves the queue."""
    return held_bytes > budget.max_bytes


def hold_expired(held_at: float, held_for: float, timeout: float, now: float) -> bool:
    """`hold.timeout` bounds the time a request spends held, added up over its re-sends (`held_for`: the
    earlier holds; the time spent on nodes between holds is bounded by the response timeout)."""
    return held_at + timeout <= now + held_for


def held_outcome_unknown(reached_node: bool) -> bool:
    """A held request that runs out of time (or budget) is answered with its own error (503 no_leader,
    hold_queue_full), except a write an earlier attempt reached: it may have been applied, and the client
    is told so (502 outcome_unknown)."""
    return reached_node


def deadline_passed(deadline: float, now: float) -> bool:
    """A call with a deadline (gRPC's `grpc-timeout`, from its arrival; 0.0: none) that is still waiting
    (held, fenced, for a read index or a stream) at its deadline ends then: its client has given up."""
    return 0.0 < deadline <= now
