"""The re-send rule (raftlb.core.resend) and the hold queue's rules (raftlb.core.hold), one row per rule of
docs/how-it-works.md's "What happens to a write" and of the read policies."""

from __future__ import annotations

import pytest

from raftlb.config.model import HoldConfig
from raftlb.core.hold import deadline_passed, held_outcome_unknown, hold_admits, hold_expired, hold_over_bytes
from raftlb.core.resend import (
    MAX_ROUNDS_PER_READ,
    Failure,
    Verdict,
    backoff,
    deposed_by,
    give_up_read_index,
    preempted_by_node_down,
    resend_verdict,
    safe_to_resend,
)

MAX = 3  # max_resends in these rows
F, V = Failure, Verdict


@pytest.mark.parametrize(("rule", "failure", "write", "safe", "kept", "attempts", "on_leader", "started",
                          "verdict"), [
    # -- what happens to a write ------------------------------------------------------------------------
    ("421: not applied, re-sent at once (the table learnt the hint)",
     F.MISDIRECTED, True, False, True, 0, True, False, V.RESEND_NOW),
    ("421 when the re-send budget is spent: the 421 goes to the client",
     F.MISDIRECTED, True, False, True, MAX, True, False, V.RELAY_ANSWER),
    ("421 when the body was not kept (too large to re-send): the 421 goes to the client",
     F.MISDIRECTED, True, False, False, 0, True, False, V.RELAY_ANSWER),
    ("connect failed: nothing written, re-sent to the leader after a backoff",
     F.CONNECT_FAILED, True, False, True, 0, True, False, V.RESEND_AFTER_BACKOFF),
    ("connect failed: the hold timeout bounds it, not max_resends",
     F.CONNECT_FAILED, True, False, True, MAX + 5, True, False, V.RESEND_AFTER_BACKOFF),
    ("written then failed, unsafe write: outcome unknown",
     F.FAILED_AFTER_SEND, True, False, True, 0, True, False, V.FAIL_OUTCOME_UNKNOWN),
    ("written then failed, safe write: re-sent to the leader after a backoff",
     F.FAILED_AFTER_SEND, True, True, True, 0, True, False, V.RESEND_AFTER_BACKOFF),
    ("written then failed, safe write, budget spent: outcome unknown",
     F.FAILED_AFTER_SEND, True, True, True, MAX, True, False, V.FAIL_OUTCOME_UNKNOWN),
    ("written then failed, safe write, body not kept: outcome unknown",
     F.FAILED_AFTER_SEND, True, True, False, 0, True, False, V.FAIL_OUTCOME_UNKNOWN),
    ("a higher term deposed the node: the same rule at once (unsafe write: outcome unknown)",
     F.PREEMPTED, True, False, True, 0, True, False, V.FAIL_OUTCOME_UNKNOWN),
    ("a higher term deposed the node: the same rule at once (safe write: re-sent)",
     F.PREEMPTED, True, True, True, 0, True, False, V.RESEND_AFTER_BACKOFF),
    ("response timeout, unsafe write: outcome unknown",
     F.TIMED_OUT, True, False, True, 0, True, False, V.FAIL_OUTCOME_UNKNOWN),
    ("response timeout, safe write: re-sent",
     F.TIMED_OUT, True, True, True, 0, True, False, V.RESEND_AFTER_BACKOFF),
    ("the answer had started when the node died: the client connection is cut",
     F.FAILED_AFTER_SEND, True, True, True, 0, True, True, V.CUT_CLIENT),
    ("the answer had started when it timed out: the client connection is cut",
     F.TIMED_OUT, False, True, True, 0, False, True, V.CUT_CLIENT),
    # -- reads ----------------------------------------------------------------------------------------------
    ("a read on a follower failed after it was sent: re-sent at once (elsewhere)",
     F.FAILED_AFTER_SEND, False, True, True, 0, False, False, V.RESEND_NOW),
    ("a leader read failed after it was sent: re-sent after a backoff",
     F.FAILED_AFTER_SEND, False, True, True, 0, True, False, V.RESEND_AFTER_BACKOFF),
    ("a read that failed with the budget spent: 502 upstream_failed",
     F.FAILED_AFTER_SEND, False, True, True, MAX, False, False, V.FAIL_UPSTREAM),
    ("a read that timed out with the budget spent: 504",
     F.TIMED_OUT, False, True, True, MAX, False, False, V.FAIL_TIMEOUT),
    ("an unsafe read (POST on a read route) that failed: 502 upstream_failed, never outcome_unknown",
     F.FAILED_AFTER_SEND, False, False, True, 0, False, False, V.FAIL_UPSTREAM),
    ("a read answered below the token by a follower: re-sent to the leader at once",
     F.STALE_INDEX, False, True, True, 0, False, False, V.RESEND_TO_LEADER_NOW),
    ("a read answered below the token by the leader: re-sent to it after a backoff",
     F.STALE_INDEX, False, True, True, 0, True, False, V.RESEND_TO_LEADER_AFTER_BACKOFF),
    ("a read answered below the token with the budget spent: 504 index_not_reached",
     F.STALE_INDEX, False, True, True, MAX, True, False, V.FAIL_INDEX_NOT_REACHED),
])
def test_resend_verdict(rule: str, failure: Failure, write: bool, safe: bool, kept: bool, attempts: int,
                        on_leader: bool, started: bool, verdict: Verdict) -> None:
    got = resend_verdict(failure, write=write, safe=safe, body_kept=kept, attempts=attempts,
                         max_resends=MAX, on_leader=on_leader, answer_started=started)
    assert got is verdict, rule


@pytest.mark.parametrize(("rule", "method", "route_idempotent", "key", "session", "safe"), [
    ("GET is idempotent", "GET", False, False, False, True),
    ("PUT is idempotent", "PUT", False, False, False, True),
    ("DELETE is idempotent", "DELETE", False, False, False, True),
    ("POST is not", "POST", False, False, False, False),
    ("PATCH is not", "PATCH", False, False, False, False),
    ("a POST with Idempotency-Key is", "POST", False, True, False, True),
    ("a POST in a Raft session is (the node deduplicates it)", "POST", False, False, True, True),
    ("a POST on a route marked idempotent is", "POST", True, False, False, True),
])
def test_safe_to_resend(rule: str, method: str, route_idempotent: bool, key: bool, session: bool,
                        safe: bool) -> None:
    assert safe_to_resend(method, route_idempotent, key, session) == safe, rule


@pytest.mark.parametrize(("rule", "needs_leader", "node", "sent_term", "deposed"), [
    ("a write waiting on the old leader when a higher term elects another is preempted", True, "n1", 2, True),
    ("... not one already on the new leader", True, "n2", 2, False),
    ("... not one sent in the new term", True, "n1", 3, False),
    ("a follower read is not preempted by a leader change", False, "n1", 2, False),
])
def test_deposed_by(rule: str, needs_leader: bool, node: str, sent_term: int, deposed: bool) -> None:
    assert deposed_by(needs_leader, node, sent_term, "n2", 3) == deposed, rule


@pytest.mark.parametrize(("rule", "safe", "streaming", "preempted"), [
    ("a request safe to repeat waiting on a node marked down goes elsewhere now", True, False, True),
    ("... one that is not keeps waiting for its answer (it may still come)", False, False, False),
    ("a call streaming its answer from it (a Watch) ends, to be opened again", False, True, True),
    ("... a safe one too", True, True, True),
])
def test_a_node_marked_down_preempts_what_is_safe_to_repeat_and_open_streams(
        rule: str, safe: bool, streaming: bool, preempted: bool) -> None:
    assert preempted_by_node_down(safe, streaming) == preempted, rule


@pytest.mark.parametrize(("rule", "deadline", "now", "passed"), [
    ("a call without a deadline waits as long as the hold and fence rules let it", 0.0, 1e9, False),
    ("a call waiting before its deadline keeps waiting", 10.0, 9.99, False),
    ("a call still waiting at its deadline ends (its client has given up)", 10.0, 10.0, True),
    ("... and after it", 10.0, 11.0, True),
])
def test_deadline_passed(rule: str, deadline: float, now: float, passed: bool) -> None:
    assert deadline_passed(deadline, now) == passed, rule


def test_backoff_doubles_from_50ms_up_to_half_a_second() -> None:
    assert [backoff(a) for a in (1, 2, 3, 4, 5, 9)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]


def test_read_index_rounds_have_their_own_budget() -> None:
    assert [give_up_read_index(n) for n in range(MAX_ROUNDS_PER_READ + 2)] == \
        [False] * (MAX_ROUNDS_PER_READ + 1) + [True]


BUDGET = HoldConfig(timeout=5.0, max_requests=2, max_bytes=10)


@pytest.mark.parametrize(("rule", "held", "held_bytes", "size", "admitted"), [
    ("a request joins an empty hold queue", 0, 0, 4, True),
    ("... up to max_requests", 2, 0, 0, False),
    ("... and max_bytes of bodies in all", 1, 8, 3, False),
    ("... exactly max_bytes fits", 1, 6, 4, True),
])
def test_hold_admits(rule: str, held: int, held_bytes: int, size: int, admitted: bool) -> None:
    assert hold_admits(held, held_bytes, size, BUDGET) == admitted, rule


def test_a_held_chunked_body_past_max_bytes_leaves_the_queue() -> None:
    assert not hold_over_bytes(10, BUDGET) and hold_over_bytes(11, BUDGET)


@pytest.mark.parametrize(("rule", "held_at", "held_for", "now", "expired"), [
    ("held less than hold.timeout: still waiting", 100.0, 0.0, 104.9, False),
    ("held hold.timeout: 503 no_leader", 100.0, 0.0, 105.0, True),
    ("earlier holds of the same request count (re-sends held again)", 100.0, 2.0, 103.0, True),
])
def test_hold_expired(rule: str, held_at: float, held_for: float, now: float, expired: bool) -> None:
    assert hold_expired(held_at, held_for, BUDGET.timeout, now) == expired, rule


def test_a_held_write_an_earlier_attempt_reached_is_outcome_unknown() -> None:
    assert held_outcome_unknown(True) and not held_outcome_unknown(False)
