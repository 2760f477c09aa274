"""What both request adapters (HTTP/1 to the node: raftlb.proxy.request; HTTP/2: raftlb.proxy.stream_request)
do after a failed attempt: ask the re-send rule (raftlb.core.resend.resend_verdict) and carry out its verdict
— re-send now or after a backoff, fail with the error it names, or end an answer already under way — the
same way, whatever the wire.

An adapter supplies what differs: whether its answer has started (`answer_started`), whether it keeps its
body for a re-send (`retain`), how it forgets the failed attempt (`reset_attempt`), how it fails (`fail`)
and how it ends an answer cut short (`cut`).
"""

from __future__ import annotations

import time
from typing import Protocol

from raftlb.config.model import ClusterConfig
from raftlb.core.hold import held_outcome_unknown
from raftlb.core.lifecycle import RequestState
from raftlb.core.placement import Target
from raftlb.core.resend import Failure, Verdict, resend_verdict
from raftlb.errors import OutcomeUnknown, ProxyError, UpstreamFailed, UpstreamTimeout
from raftlb.proxy.stats import ProxyStats

_LEADER = Target.LEADER


class AttemptOwner(Protocol):
    """What carrying out a verdict needs of the proxy (raftlb.proxy.cluster.ClusterProxy)."""

    cluster: ClusterConfig
    stats: ProxyStats

    def release_node(self, node: str) -> None: ...
    def on_node_unreachable(self, node_id: str, reason: str) -> None: ...


class ProxiedRequest(RequestState):
    """A request with a wire adapter: the re-send rule's verdicts, carried out (see the module doc)."""

    __slots__ = ()

    proxy: AttemptOwner  # (each adapter's owner is a wider Protocol of the same ClusterProxy)
    retain: bool  # the request body is kept for a re-send

    @property
    def answer_started(self) -> bool:
        raise NotImplementedError

    def reset_attempt(self) -> None:
        """Forget what the failed attempt left (body sent on it, an answer held back from it)."""
        raise NotImplementedError

    def fail(self, err: ProxyError) -> None:
        raise NotImplementedError

    def cut(self, reason: str) -> None:
        """The node failed after the answer had started: end it as the client's protocol allows."""
        raise NotImplementedError

    def send_again(self, now: float) -> None:
        """Place the request again now (the owner's dispatch)."""
        raise NotImplementedError

    def hold_again(self, now: float) -> None:
        """Park the request until it may go (the owner's hold queue: a re-send's backoff, or no leader)."""
        raise NotImplementedError

    def verdict(self, failure: Failure) -> Verdict:
        """The re-send rule's verdict on this request after `failure`."""
        return resend_verdict(failure, write=self.route.kind == "write", safe=self.safe_to_repeat,
                              body_kept=self.retain, attempts=self.attempts,
                              max_resends=self.proxy.cluster.max_resends, on_leader=self.target is _LEADER,
                              answer_started=self.answer_started)

    def attempt_failed(self, failure: Failure, reason: str, unreachable: bool = True) -> None:
        """An attempt failed at the connection (before or after the request was written, or taken back by
        preemption: not `unreachable`): do what `resend_verdict` says."""
        owner = self.proxy
        verdict = self.verdict(failure)
        node = self.node
        if verdict is Verdict.CUT_CLIENT:
            self.cut(f"node {node}: {reason}")
            return
        if verdict.resend:
            self.avoid = node
            if failure is Failure.CONNECT_FAILED:
                # A node that refuses connections is down for routing now, not after its announcements go
                # quiet.
                if node is not None and unreachable:
                    owner.on_node_unreachable(node, reason)
                self.resend("connect_failed", verdict, time.monotonic())
            else:
                if self.route.kind == "write":
                    self.maybe_applied = node
                self.resend("idempotent_retry", verdict, time.monotonic())
            return
        if verdict is Verdict.FAIL_OUTCOME_UNKNOWN:
            owner.stats.outcome_unknown += 1
            self.fail(OutcomeUnknown(f"node {node}: {reason}; the write may or may not have been applied",
                                     node=node))
        elif verdict is Verdict.FAIL_TIMEOUT:
            self.fail(UpstreamTimeout(f"node {node}: {reason}"))
        else:
            self.fail(UpstreamFailed(f"node {node}: {reason}"))

    def resend(self, reason: str, verdict: Verdict, now: float) -> None:
        """Send the request again as `verdict` says (at once, or through the hold queue), counted by
        `reason`."""
        owner = self.proxy
        owner.stats.resends[reason] = owner.stats.resends.get(reason, 0) + 1
        if self.node is not None:
            owner.release_node(self.node)
        self.will_resend(verdict, now)
        self.reset_attempt()
        if verdict.immediate:
            self.send_again(now)
        else:
            self.hold_again(now)

    def fail_held(self, err: ProxyError) -> None:
        """Give up on a held request with `err` (no leader in time, hold budget), unless it is a write that
        reached a node before: then the truth is that it may have been applied (outcome_unknown)."""
        node = self.maybe_applied
        if held_outcome_unknown(node is not None):
            self.proxy.stats.outcome_unknown += 1
            err = OutcomeUnknown(f"node {node} did not answer, then {err.detail}; the write may or may not "
                                 "have been applied", node=node)
        self.fail(err)
