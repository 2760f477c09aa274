"""Where a request goes (raftlb.core.placement.place): one row per rule of docs/how-it-works.md.

Every row: a cluster (leader n1 unless said otherwise; each node's applied index; who is down or busy), a
request (target, policy, token, how long it has waited), and where it goes now — a node, or how it waits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from raftlb.core.leader_table import Announcement, LeaderTable
from raftlb.core.lifecycle import RequestState
from raftlb.core.placement import (
    Target,
    Wait,
    below_fence,
    eligible_nodes,
    is_caught_up,
    leader_moved,
    place,
)
from raftlb.core.resend import Verdict
from raftlb.core.router import RouteDecision, keeps_token

NOW = 100.0
FOLLOWER_WAIT = 0.05


@dataclass
class Req:
    """A request as `place` sees it."""

    route: RouteDecision
    target: Target = Target.READ
    floor: int = 0
    read_index: int | None = None
    avoid: str | None = None
    retry_at: float = 0.0
    wait_until: float = 0.0
    arrived_at: float = NOW


def cluster(applied: dict[str, int], leader: str | None = "n1", down: tuple[str, ...] = (),
            commit: int | None = None) -> LeaderTable:
    """Nodes n1..n3 announced at term 2 at `NOW`, with these applied indexes (leader commit: `commit`, or
    its applied index)."""
    table = LeaderTable(["n1", "n2", "n3"], liveness_timeout=1.0)
    for node, index in applied.items():
        role = "leader" if node == leader else "follower"
        table.apply(Announcement(node=node, term=2, role=role, leader=leader,
                                 commit_index=commit if commit is not None and role == "leader" else index,
                                 applied_index=index, has_quorum=True if role == "leader" else None), NOW)
    for node in down:
        table.node_down(node, NOW)
    return table


ALL_AT_10 = {"n1": 10, "n2": 10, "n3": 10}
WRITE = RouteDecision("write", "leader")
LEADER_READ = RouteDecision("read", "leader")
ANY = RouteDecision("read", "any")
FENCED = RouteDecision("read", "fenced", fence_wait=1.0)
FENCED_LEADER_TOO = RouteDecision("read", "fenced", fence_wait=1.0, prefer_followers=False)
LINEARIZABLE = RouteDecision("read", "linearizable", fence_wait=1.0)
BOUNDED = RouteDecision("read", "bounded", max_lag_entries=5)


def go(req: Req, table: LeaderTable, load: dict[str, int] | None = None,
       caught_up: dict[str, float] | None = None) -> str | Wait:
    busy = load or {}
    return place(req, table, NOW, follower_wait=FOLLOWER_WAIT,
                 caught_up_at=caught_up if caught_up is not None else dict.fromkeys(ALL_AT_10, NOW),
                 load=lambda n: busy.get(n, 0), rng=lambda: 0.0)


@pytest.mark.parametrize(("rule", "req", "table", "expected"), [
    # -- what happens to a write ------------------------------------------------------------------------
    ("a write goes to the live leader",
     Req(WRITE, Target.LEADER), cluster(ALL_AT_10), "n1"),
    ("a write with no live leader is held",
     Req(WRITE, Target.LEADER), cluster(ALL_AT_10, leader=None), Wait.HOLD),
    ("a write whose leader went down is held",
     Req(WRITE, Target.LEADER), cluster(ALL_AT_10, down=("n1",)), Wait.HOLD),
    ("a write re-sent after a failure waits out its backoff in the hold queue",
     Req(WRITE, Target.LEADER, retry_at=NOW + 0.05), cluster(ALL_AT_10), Wait.HOLD),
    ("a write whose backoff is over goes to the leader",
     Req(WRITE, Target.LEADER, retry_at=NOW), cluster(ALL_AT_10), "n1"),
    # -- policy leader ------------------------------------------------------------------------------------
    ("leader: a leader read goes to the leader",
     Req(LEADER_READ, Target.LEADER), cluster(ALL_AT_10), "n1"),
    ("leader: with no leader it is held",
     Req(LEADER_READ, Target.LEADER), cluster(ALL_AT_10, leader=None), Wait.HOLD),
    # -- policy any ---------------------------------------------------------------------------------------
    ("any: a follower serves it",
     Req(ANY), cluster(ALL_AT_10), "n2"),
    ("any: ignores the index, a follower far behind serves it",
     Req(ANY), cluster({"n1": 10, "n2": 1, "n3": 1}), "n2"),
    ("any: without a leader, any live node still serves it",
     Req(ANY), cluster(ALL_AT_10, leader=None), "n1"),
    ("any: with no live node it is held",
     Req(ANY), cluster({}), Wait.HOLD),
    # -- policy fenced ------------------------------------------------------------------------------------
    ("fenced: a follower at the index serves it",
     Req(FENCED, floor=10), cluster(ALL_AT_10), "n2"),
    ("fenced: a follower below the index does not",
     Req(FENCED, floor=10), cluster({"n1": 10, "n2": 9, "n3": 10}), "n3"),
    ("fenced: the node the last attempt failed on is avoided",
     Req(FENCED, floor=10, avoid="n2"), cluster(ALL_AT_10), "n3"),
    ("fenced: the leader serves it too when the route does not prefer followers",
     Req(FENCED_LEADER_TOO, floor=10), cluster(ALL_AT_10), "n1"),
    ("fenced: no node at the index yet: it waits for the fence",
     Req(FENCED, floor=11), cluster(ALL_AT_10), Wait.FENCE),
    ("fenced: no node at the index when the fence wait is over: the leader serves it",
     Req(FENCED, floor=11, wait_until=NOW), cluster(ALL_AT_10), Wait.FALL_BACK),
    ("fenced: only the leader at the index: it waits for a follower",
     Req(FENCED, floor=11), cluster({"n1": 11, "n2": 10, "n3": 10}), Wait.FOLLOWER),
    ("fenced: only the leader at the index and the wait is over: the leader serves it",
     Req(FENCED, floor=11, wait_until=NOW), cluster({"n1": 11, "n2": 10, "n3": 10}), "n1"),
    ("fenced: only the leader live: no follower to wait for",
     Req(FENCED, floor=11), cluster({"n1": 11, "n2": 10, "n3": 10}, down=("n2", "n3")), "n1"),
    ("fenced: a down node at the index does not serve it",
     Req(FENCED, floor=10), cluster(ALL_AT_10, down=("n2",)), "n3"),
    # -- policy linearizable ------------------------------------------------------------------------------
    ("linearizable: without a read index it asks the broker for one",
     Req(LINEARIZABLE), cluster(ALL_AT_10), Wait.READ_INDEX),
    ("linearizable: with its read index, a follower at it serves it",
     Req(LINEARIZABLE, floor=10, read_index=10), cluster(ALL_AT_10), "n2"),
    ("linearizable: no node at the read index yet: it waits for the fence",
     Req(LINEARIZABLE, floor=12, read_index=12), cluster(ALL_AT_10), Wait.FENCE),
    # -- policy bounded -----------------------------------------------------------------------------------
    ("bounded: a follower within max_lag_entries serves it",
     Req(BOUNDED), cluster({"n1": 20, "n2": 16, "n3": 2}), "n2"),
    ("bounded: no follower within max_lag_entries: the leader serves it",
     Req(BOUNDED), cluster({"n1": 20}), "n1"),
    ("bounded: no leader, no bound to measure against: to the leader (held there)",
     Req(BOUNDED), cluster(ALL_AT_10, leader=None), Wait.FALL_BACK),
])
def test_placement(rule: str, req: Req, table: LeaderTable, expected: str | Wait) -> None:
    assert go(req, table) == expected, rule


@pytest.mark.parametrize(("rule", "load", "arrived", "expected"), [
    ("the least loaded follower at the index serves the read", {"n2": 3, "n3": 1}, NOW, "n3"),
    ("a busy follower is passed over for a while when an idle one is coming", {"n2": 3}, NOW, Wait.FENCE),
    ("... only for a while", {"n2": 3}, NOW - 1, "n2"),
])
def test_placement_by_load(rule: str, load: dict[str, int], arrived: float, expected: str | Wait) -> None:
    table = cluster({"n1": 11, "n2": 11, "n3": 10})
    if expected == "n3":
        table = cluster({"n1": 11, "n2": 11, "n3": 11})
    assert go(Req(FENCED, floor=11, arrived_at=arrived), table, load) == expected, rule


def test_bounded_max_lag_ms_needs_a_recent_catch_up() -> None:
    route = RouteDecision("read", "bounded", max_lag_ms=100)
    table = cluster(ALL_AT_10)
    # n2 caught up 50 ms ago, n3 a second ago: only n2 qualifies (and the leader, always).
    assert eligible_nodes(table, route, 0, NOW, {"n2": NOW - 0.05, "n3": NOW - 1}) == ["n1", "n2"]


@pytest.mark.parametrize(("rule", "node", "applied", "commit", "expected"), [
    ("the leader is caught up with itself", "n1", None, 10, True),
    ("a follower that applied the leader's commit is caught up", "n2", 10, 10, True),
    ("a follower behind the leader's commit is not", "n2", 9, 10, False),
    ("nothing to catch up with while the leader's commit is unknown", "n2", 10, None, False),
])
def test_caught_up(rule: str, node: str, applied: int | None, commit: int | None, expected: bool) -> None:
    assert is_caught_up(node, "n1", applied, commit) == expected, rule


@pytest.mark.parametrize(("rule", "route", "expected"), [
    ("a write keeps the client's token (its answer sets the next one)", WRITE, True),
    ("fenced keeps the token", FENCED, True),
    ("linearizable keeps the token", LINEARIZABLE, True),
    ("bounded keeps the token", BOUNDED, True),
    ("leader keeps the token", LEADER_READ, True),
    ("any promises nothing: it ignores the token", ANY, False),
])
def test_token(rule: str, route: RouteDecision, expected: bool) -> None:
    assert keeps_token(route.kind, route.policy) == route.keeps_token == expected, rule


@pytest.mark.parametrize(("rule", "route", "status", "index", "floor", "stale"), [
    ("a read answered below the client's token is stale", FENCED, 200, 9, 10, True),
    ("a read answered at the token is not", FENCED, 200, 10, 10, False),
    ("an answer without an index is not judged", FENCED, 200, -1, 10, False),
    ("a 5xx answer is not judged (it says nothing of the node's state)", FENCED, 503, 9, 10, False),
    ("a 4xx answer below the token is stale (a 404 from the past)", FENCED, 404, 9, 10, True),
    ("a write's answer is never stale", WRITE, 200, 9, 10, False),
])
def test_fence(rule: str, route: RouteDecision, status: int, index: int, floor: int, stale: bool) -> None:
    assert below_fence(route, status, index, floor) == stale, rule


@pytest.mark.parametrize(("min_index", "read_index", "floor"), [
    (0, None, 0), (7, None, 7), (7, 5, 7), (7, 9, 9),
])
def test_the_floor_is_the_higher_of_the_token_and_the_read_index(min_index: int, read_index: int | None,
                                                                   floor: int) -> None:
    state = RequestState(FENCED, NOW)
    state.fence(min_index, read_index)
    assert state.floor == floor


@pytest.mark.parametrize(("rule", "target", "leader", "moved"), [
    ("a write whose connection opened while the leader moved is placed again", Target.LEADER, "n2", True),
    ("... not when the leader is still its node", Target.LEADER, "n1", False),
    ("... nor when there is no leader now (the re-send rule covers it)", Target.LEADER, None, False),
    ("a read is not bound to the leader", Target.READ, "n2", False),
])
def test_leader_moved(rule: str, target: Target, leader: str | None, moved: bool) -> None:
    assert leader_moved(target, "n1", leader) == moved, rule


def test_req_fixture_is_a_placeable() -> None:
    # (`place` takes any object with these attributes: the proxy's request is one)
    assert go(replace(Req(WRITE, Target.LEADER)), cluster(ALL_AT_10)) == "n1"


@pytest.mark.parametrize(("rule", "verdict", "target", "attempts", "retry_at"), [
    ("a re-send at once: one more attempt, no backoff", Verdict.RESEND_NOW, Target.READ, 1, 0.0),
    ("a re-send after a backoff waits 50 ms first", Verdict.RESEND_AFTER_BACKOFF, Target.READ, 1, NOW + 0.05),
    ("a stale read goes to the leader", Verdict.RESEND_TO_LEADER_NOW, Target.LEADER, 1, 0.0),
])
def test_a_resend_updates_the_request_state(rule: str, verdict: Verdict, target: Target, attempts: int,
                                            retry_at: float) -> None:
    state = RequestState(FENCED, NOW)
    state.will_resend(verdict, NOW)
    assert (state.target, state.attempts, state.retry_at) == (target, attempts, retry_at), rule
    assert state.node is None


def test_the_hold_time_adds_up_over_holds() -> None:
    state = RequestState(WRITE, NOW)
    state.hold_started(NOW)
    state.hold_ended(NOW + 1)
    state.hold_started(NOW + 5)
    state.hold_ended(NOW + 7)
    assert (state.held_for, state.held_at, state.released) == (3.0, 0.0, True)
