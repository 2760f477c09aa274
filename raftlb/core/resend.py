"""Whether a failed attempt is sent again, and how: the re-send rule (docs/how-it-works.md, "What happens to
a write"), in one function the data path asks after every failed attempt (the data path asks, the core
answers; Envoy's RetryState is the model).

Pure: no I/O, no clock. The verdicts are module-level enum members, so asking allocates nothing.

- `safe_to_resend`: may a request be re-sent after an ambiguous failure (it may have been applied)?
- `resend_verdict`: what to do after a failed attempt (421, connect failure, failure after the request was
  written, preemption by a higher term, a response timeout, an answer below the client's index).
- `backoff`: how long a re-send to the leader waits first.
- `deposed_by`: which in-flight requests a higher term with another leader preempts.
- `preempted_by_node_down`: which in-flight requests a node marked down preempts.
- `give_up_read_index`: the read-index rounds' own budget (not `max_resends`).
"""

from __future__ import annotations

from enum import Enum

from raftlb.core.router import IDEMPOTENT_METHODS

# A linearizable read whose read-index round fails joins the next one, this many times at most.
MAX_ROUNDS_PER_READ = 3


class Failure(Enum):
    """What went wrong with one attempt."""

    MISDIRECTED = "misdirected"  # the node answered 421: it did not apply the request
    CONNECT_FAILED = "connect_failed"  # nothing was written to the node
    FAILED_AFTER_SEND = "failed_after_send"  # written, then the connection died (or the node went down)
    PREEMPTED = "preempted"  # written, then a higher term with another leader deposed the node
    TIMED_OUT = "timed_out"  # written, and no answer within the response timeout
    STALE_INDEX = "stale_index"  # a read answered from an index below the client's token


class Verdict(Enum):
    """The answer to a failed attempt. `resend`: it is sent again; `immediate`: now, else after a backoff
    in the hold queue; `to_leader`: from now on only to the leader."""

    RESEND_NOW = ("resend_now", True, True, False)
    RESEND_AFTER_BACKOFF = ("resend_after_backoff", True, False, False)
    RESEND_TO_LEADER_NOW = ("resend_to_leader_now", True, True, True)
    RESEND_TO_LEADER_AFTER_BACKOFF = ("resend_to_leader_after_backoff", True, False, True)
    RELAY_ANSWER = ("relay_answer", False, False, False)  # the node's answer goes to the client as it is
    CUT_CLIENT = ("cut_client", False, False, False)  # the answer had started: cut the client connection
    FAIL_UPSTREAM = ("fail_upstream", False, False, False)  # 502 upstream_failed
    FAIL_TIMEOUT = ("fail_timeout", False, False, False)  # 504 upstream_timeout
    FAIL_OUTCOME_UNKNOWN = ("fail_outcome_unknown", False, False, False)  # 502 outcome_unknown
    FAIL_INDEX_NOT_REACHED = ("fail_index_not_reached", False, False, False)  # 504 index_not_reached

    def __init__(self, label: str, resend: bool, immediate: bool, to_leader: bool) -> None:
        self.label = label
        self.resend = resend
        self.immediate = immediate
        self.to_leader = to_leader


def safe_to_resend(method: str, route_idempotent: bool, idempotency_key: bool, session: bool) -> bool:
    """A request may be re-sent after an ambiguous failure when repeating it has no second effect: an
    idempotent method (RFC 9110 §9.2.2), a route marked idempotent, an `Idempotency-Key`, or a session write
    (`X-Raft-Session` + `X-Raft-Seq`) that a node with sessions applies at most once."""
    return method in IDEMPOTENT_METHODS or route_idempotent or idempotency_key or session


def resend_verdict(failure: Failure, *, write: bool, safe: bool, body_kept: bool, attempts: int,
                   max_resends: int, on_leader: bool, answer_started: bool = False) -> Verdict:
    """What happens after a failed attempt.

    - the answer has started towards the client: the client connection is cut (never a truncated answer
      presented as complete);
    - 421: not applied; re-sent at once while the budget (`max_resends`) lasts and the body is still kept,
      else the 421 itself is relayed;
    - nothing written (connect failed): always safe, re-sent after a backoff (the hold timeout bounds it);
    - an answer below the client's index: re-sent to the leader (at once, or after a backoff when it was the
      leader's), or 504 index_not_reached once the budget is spent;
    - written, then failed, preempted or timed out: re-sent only if safe (see `safe_to_resend`), the budget
      lasts and the body is kept (at once for a read, after a backoff for the leader); otherwise a read gets
      502 upstream_failed (504 on a timeout) and a write 502 outcome_unknown.
    """
    if answer_started:
        return Verdict.CUT_CLIENT
    if failure is Failure.CONNECT_FAILED:
        return Verdict.RESEND_AFTER_BACKOFF
    budget = attempts < max_resends
    if failure is Failure.MISDIRECTED:
        return Verdict.RESEND_NOW if body_kept and budget else Verdict.RELAY_ANSWER
    if failure is Failure.STALE_INDEX:
        if not budget:
            return Verdict.FAIL_INDEX_NOT_REACHED
        return Verdict.RESEND_TO_LEADER_AFTER_BACKOFF if on_leader else Verdict.RESEND_TO_LEADER_NOW
    if safe and body_kept and budget:
        return Verdict.RESEND_AFTER_BACKOFF if on_leader else Verdict.RESEND_NOW
    if write:
        return Verdict.FAIL_OUTCOME_UNKNOWN
    return Verdict.FAIL_TIMEOUT if failure is Failure.TIMED_OUT else Verdict.FAIL_UPSTREAM


def backoff(attempts: int) -> float:
    """Seconds a re-send waits (in the hold queue) before it goes to the leader again: doubling from 50 ms,
    at most 0.5 s."""
    return min(0.025 * float(2 ** attempts), 0.5)


def deposed_by(needs_leader: bool, node: str | None, sent_term: int, new_leader: str, new_term: int) -> bool:
    """A request bound for the leader that waits on another node, sent before `new_term` began: the
    re-send rule applies to it now rather than at its response timeout."""
    return needs_leader and node != new_leader and sent_term < new_term


def preempted_by_node_down(safe: bool, streaming: bool = False) -> bool:
    """When a node is marked down (paused, partitioned), requests that are safe to repeat stop waiting on it
    and go elsewhere now; the others keep waiting for their answer (it may still come). A call already
    streaming its answer from it (a gRPC Watch or keep-alive) is ended, whatever it is: it is not re-sent
    (its answer has started), its client opens it again through raftlb, to a live node."""
    return safe or streaming


def give_up_read_index(failed_rounds: int) -> bool:
    """A linearizable read gives up (503 no_leader) once more than MAX_ROUNDS_PER_READ of its read-index
    rounds failed. These rounds are not re-sends: they do not count against `max_resends`."""
    return failed_rounds > MAX_ROUNDS_PER_READ
