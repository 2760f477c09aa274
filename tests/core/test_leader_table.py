"""LeaderTable: scripted announcement sequences → write target, plus Hypothesis properties."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftlb.core.leader_table import ROLES, Announcement, LeaderChange, LeaderTable, NodeView

TIMEOUT = 1.0
NODES = ("n1", "n2", "n3", "n4")

Action = Callable[[LeaderTable, float], object]


def ann(node: str, term: int, role: str, leader: str | None = None, quorum: bool | None = None) -> Action:
    return lambda t, now: t.apply(Announcement(node, term, role, leader, has_quorum=quorum), now)


def down(node: str) -> Action:
    return lambda t, now: t.node_down(node, now)


def misdirect(node: str, hint: str | None, term: int | None = None) -> Action:
    return lambda t, now: t.misdirected(node, hint, term, now)


def remove(node: str) -> Action:
    return lambda t, now: t.remove_node(node, now)


def forget(node: str) -> Action:
    return lambda t, now: t.forget(node, now)


def rejected(action: Action) -> Action:
    """`action` is an announcement the table must refuse as going backwards, changing nothing."""

    def run(t: LeaderTable, now: float) -> None:
        with pytest.raises(ValueError, match="term went backwards"):
            action(t, now)

    return run


def expire() -> Action:
    return lambda t, now: t.expire(now)


def wait() -> Action:
    """Only time passes: leader(now) alone must notice lapsed deadlines."""
    return lambda t, now: None


def followers(term: int, leader: str | None, *nodes: str) -> list[Action]:
    return [ann(n, term, "follower", leader) for n in nodes]


# (time, action, expected write target after it)
Step = tuple[float, Action, str | None]

SCENARIOS: dict[str, list[Step]] = {
    "election": [
        (0.0, ann("n1", 1, "follower"), None),
        (0.0, ann("n2", 1, "follower"), None),
        (0.1, ann("n2", 2, "candidate"), None),
        (0.2, ann("n2", 2, "leader", "n2", True), "n2"),
        (0.3, ann("n1", 2, "follower", "n2"), "n2"),
        (0.3, ann("n3", 2, "follower", "n2"), "n2"),
    ],
    "leader_killed_then_reelection_at_higher_term": [
        (0.0, ann("n1", 3, "leader", "n1", True), "n1"),
        (0.0, ann("n2", 3, "follower", "n1"), "n1"),
        (0.0, ann("n3", 3, "follower", "n1"), "n1"),
        (0.1, down("n1"), None),
        # survivors still name n1 at term 3: the hint is ignored while n1 is down, and n1 spoke anyway
        (0.2, ann("n2", 3, "follower", "n1"), None),
        (0.5, ann("n3", 4, "candidate"), None),
        (0.6, ann("n3", 4, "leader", "n3", True), "n3"),
        # n1 comes back still believing it leads term 3: deposed, never chosen
        (0.7, ann("n1", 3, "leader", "n1", True), "n3"),
        (0.8, ann("n1", 4, "follower", "n3"), "n3"),
    ],
    "leader_silent_past_liveness": [
        (0.0, ann("n1", 1, "leader", "n1"), "n1"),
        (0.5, wait(), "n1"),
        (1.0, wait(), "n1"),  # heard within the timeout: inclusive
        (1.01, wait(), None),
        (1.5, expire(), None),
        (1.6, ann("n1", 1, "leader", "n1"), "n1"),
    ],
    "hint_used_before_leader_heard": [
        (0.0, ann("n2", 5, "follower", "n1"), "n1"),
        (0.1, ann("n3", 5, "follower", "n1"), "n1"),
        (0.2, ann("n1", 5, "leader", "n1", True), "n1"),
        # once n1 spoke at term 5, its own word governs: silent means gone, whatever the hints say
        (1.25, ann("n2", 5, "follower", "n1"), None),
    ],
    "hint_from_silent_follower_expires": [
        (0.0, ann("n2", 2, "follower", "n1"), "n1"),
        (0.9, wait(), "n1"),
        (1.1, wait(), None),
    ],
    "hint_ignored_when_hinted_node_down": [
        (0.0, down("n1"), None),
        (0.1, ann("n2", 2, "follower", "n1"), None),
        (0.2, ann("n1", 2, "leader", "n1"), "n1"),  # its announcement clears down
    ],
    "hint_ignored_when_hinted_node_deposed": [
        (0.0, ann("n1", 1, "leader", "n1"), "n1"),
        # one follower's term is one node's word: n1's live claim still governs until a majority (3 of 4)
        # is at term 2
        (0.1, ann("n2", 2, "follower", "n1"), "n1"),
        (0.1, ann("n3", 2, "follower", "n1"), "n1"),
        (0.1, ann("n4", 2, "follower", "n1"), None),
        (0.2, ann("n1", 2, "leader", "n1"), "n1"),
    ],
    "hint_ignored_when_hinted_node_spoke_as_follower": [
        (0.0, ann("n1", 2, "follower", "n3"), "n3"),
        (0.1, ann("n3", 2, "follower", None), None),
    ],
    "hint_naming_unknown_node_ignored": [
        (0.0, ann("n2", 2, "follower", "n9"), None),
    ],
    "deposed_leader_still_announcing_old_term": [
        (0.0, ann("n1", 6, "leader", "n1", True), "n1"),
        # a lone candidate's term is one node's word (Raft makes the leader step down if it is real)
        (0.1, ann("n2", 7, "candidate"), "n1"),
        (0.2, ann("n1", 6, "leader", "n1", True), "n1"),
        (0.4, ann("n2", 7, "leader", "n2", True), "n2"),  # a live claim at a higher term deposes at once
        (0.5, ann("n1", 6, "leader", "n1", True), "n2"),
        (0.6, ann("n3", 7, "follower", "n2"), "n2"),
        (0.6, ann("n4", 7, "follower", "n2"), "n2"),  # the floor is 7 now: n2's claim is corroborated
        (1.5, ann("n1", 6, "leader", "n1", True), None),  # n2 silent: n1 stays deposed below the floor
    ],
    "has_quorum_false_holds": [
        (0.0, ann("n1", 2, "leader", "n1", True), "n1"),
        (0.1, ann("n1", 2, "leader", "n1", False), None),
        (0.2, ann("n2", 2, "follower", "n1"), None),  # its own word beats the hint
        (0.3, ann("n1", 2, "leader", "n1", None), "n1"),  # not reported counts as fine
    ],
    "misdirected_with_hint_and_higher_term": [
        (0.0, ann("n1", 2, "leader", "n1", True), "n1"),
        (0.0, ann("n2", 2, "follower", "n1"), "n1"),
        (0.1, misdirect("n1", "n2", 3), "n2"),
        (0.2, ann("n2", 3, "leader", "n2", True), "n2"),
    ],
    "misdirected_without_term_or_hint": [
        (0.0, ann("n1", 2, "leader", "n1", True), "n1"),
        (0.1, misdirect("n1", None), None),
        (0.2, ann("n1", 2, "leader", "n1", True), "n1"),  # its next announcement governs again
    ],
    "misdirected_hint_to_node_that_spoke_as_follower": [
        (0.0, ann("n1", 2, "leader", "n1"), "n1"),
        (0.0, ann("n2", 2, "follower", "n1"), "n1"),
        (0.1, misdirect("n1", "n2", None), None),
    ],
    "misdirected_stale_term_ignored": [
        (0.0, ann("n1", 4, "leader", "n1"), "n1"),
        (0.1, misdirect("n1", "n2", 3), "n1"),
    ],
    "conflicting_claims_hold": [
        (0.0, ann("n1", 3, "leader", "n1"), "n1"),
        (0.1, ann("n2", 3, "leader", "n2"), None),
        (0.2, ann("n3", 3, "follower", "n1"), None),
        (0.3, down("n2"), "n1"),  # only live claims count
        (0.4, ann("n2", 3, "leader", "n2"), None),
        (0.5, ann("n3", 4, "leader", "n3"), "n3"),
    ],
    "conflicting_hints_hold_until_one_lapses": [
        (0.0, ann("n3", 3, "follower", "n1"), "n1"),
        (0.5, ann("n4", 3, "follower", "n2"), None),
        (1.01, wait(), "n2"),  # n3's hint lapsed; only n4's remains
        (1.6, wait(), None),
    ],
    "remove_leader": [
        (0.0, ann("n1", 2, "leader", "n1"), "n1"),
        (0.0, ann("n2", 2, "follower", "n1"), "n1"),
        (0.1, remove("n1"), None),
        (0.2, ann("n3", 2, "follower", "n1"), None),
    ],
}


# One node's word is not permanent (module doc, "Which term governs"): three nodes, n1 the honest leader at
# term 5, n3 the liar. (time, action, expected write target, expected governing term)
HUGE = 2**63
HONEST = [
    (0.0, ann("n1", 5, "leader", "n1", True), "n1", 5),
    (0.0, ann("n2", 5, "follower", "n1"), "n1", 5),
    (0.0, ann("n3", 5, "follower", "n1"), "n1", 5),
]
Row = tuple[float, Action, str | None, int]
EVIDENCE: dict[str, list[Row]] = {
    "a_follower_or_candidate_at_an_absurd_term_changes_nothing": [
        *HONEST,
        (0.1, ann("n3", HUGE, "follower", None), "n1", 5),
        (0.2, ann("n3", HUGE, "follower", "n3"), "n1", 5),
        (0.3, ann("n3", HUGE, "candidate"), "n1", 5),
        (0.4, ann("n3", HUGE, "learner", "n2"), "n1", 5),
        (0.5, ann("n3", 2**64 - 1, "follower", "n3"), "n1", 5),
    ],
    "a_421_at_an_absurd_term_moves_only_that_nodes_view": [
        *HONEST,
        (0.1, misdirect("n3", "n3", HUGE), "n1", 5),
        (0.2, misdirect("n2", "n2", 2**64), "n1", 5),  # out of range: taken as the table's term
    ],
    "a_leaders_claim_governs_only_while_its_node_is_live_and_claiming": [
        *HONEST,
        (0.1, ann("n3", HUGE, "leader", "n3", True), "n3", HUGE),
        (0.5, ann("n1", 5, "leader", "n1", True), "n3", HUGE),  # deposed while the liar claims live
        (0.5, ann("n2", 5, "follower", "n1"), "n3", HUGE),
        (1.1, wait(), "n3", HUGE),  # heard at 0.1: live through 1.1
        (1.11, wait(), "n1", 5),  # silent for one liveness timeout: the floor (5) governs again
        (1.2, ann("n1", 5, "leader", "n1", True), "n1", 5),
        (1.3, ann("n3", HUGE, "leader", "n3", False), None, HUGE),  # back, claiming: holds again
        (2.31, ann("n1", 5, "leader", "n1", True), "n1", 5),
    ],
    "a_liar_that_corrects_itself_is_believed_again_after_one_liveness_timeout": [
        *HONEST,
        (0.1, ann("n3", HUGE, "leader", "n3", True), "n3", HUGE),
        (0.2, rejected(ann("n3", 5, "follower", "n1")), "n3", HUGE),  # stale event? not yet known
        (0.5, ann("n1", 5, "leader", "n1", True), "n3", HUGE),
        (0.6, rejected(ann("n3", 5, "follower", "n1")), "n3", HUGE),
        (1.05, ann("n1", 5, "leader", "n1", True), "n3", HUGE),
        (1.1, rejected(ann("n3", 5, "follower", "n1")), "n3", HUGE),
        (1.11, ann("n3", 5, "follower", "n1"), "n1", 5),  # its bogus claim is a liveness timeout old
        (1.2, ann("n3", 5, "follower", "n1"), "n1", 5),
    ],
    "a_claim_a_majority_corroborates_keeps_governing": [
        *HONEST,
        (0.1, ann("n2", 6, "leader", "n2", True), "n2", 6),
        (0.2, ann("n3", 6, "follower", "n2"), "n2", 6),  # floor 6: n2 and n3 are a majority
        (1.2, ann("n1", 5, "leader", "n1", True), None, 6),  # n2 silent: n1 stays deposed
        (1.3, ann("n1", 6, "follower", "n2"), None, 6),
    ],
    "a_new_leader_that_dies_before_any_follower_reports_its_term": [
        # The corner case of the module doc: its term stops governing after one liveness timeout, and the
        # old leader, still claiming, gets writes again (Raft keeps it from committing them).
        *HONEST,
        (0.1, ann("n2", 6, "leader", "n2", True), "n2", 6),
        (0.5, ann("n1", 5, "leader", "n1", True), "n2", 6),
        (1.11, ann("n1", 5, "leader", "n1", True), "n1", 5),
    ],
    "a_lone_hint_at_a_higher_term_is_used_only_without_a_live_claim": [
        (0.0, ann("n2", 5, "follower", "n1"), "n1", 5),  # nothing else known yet
        (0.1, ann("n3", 6, "follower", "n2"), "n2", 6),  # the highest hint's term
        (0.2, ann("n1", 5, "leader", "n1", True), "n1", 5),  # a live claim beats any hint
        (0.3, ann("n2", 6, "leader", "n2", True), "n2", 6),
    ],
    "forget_resets_one_nodes_view_at_once": [
        *HONEST,
        (0.1, ann("n3", HUGE, "leader", "n3", True), "n3", HUGE),
        (0.2, forget("n3"), "n1", 5),
        (0.3, ann("n3", 5, "follower", "n1"), "n1", 5),  # taken as new: no "backwards"
    ],
    "forget_recomputes_a_floor_two_liars_raised": [
        *HONEST,
        (0.1, ann("n2", HUGE, "follower", None), "n1", 5),
        (0.1, ann("n3", HUGE, "follower", None), None, HUGE),  # a majority lies: the floor follows it
        (0.2, forget("n3"), "n1", 5),
    ],
}


@pytest.mark.parametrize("rows", list(EVIDENCE.values()), ids=list(EVIDENCE))
def test_governing_term_needs_a_live_claim_or_a_majority(rows: list[Row]) -> None:
    table = LeaderTable(["n1", "n2", "n3"], TIMEOUT)
    for i, (now, action, leader, term) in enumerate(rows):
        action(table, now)
        assert (table.leader(now), table.term) == (leader, term), f"row {i}"
        assert (table.leader(now), table.term) == reference(table, now), f"row {i}"


@pytest.mark.parametrize("steps", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_scripted_sequence_gives_expected_write_target(steps: list[Step]) -> None:
    table = LeaderTable(NODES, TIMEOUT)
    for i, (now, action, expected) in enumerate(steps):
        action(table, now)
        assert table.leader(now) == expected, f"step {i}"
        assert table.leader(now) == reference_leader(table, now), f"step {i}"


def run(table: LeaderTable, steps: list[tuple[float, Action]]) -> list[object]:
    return [action(table, now) for now, action in steps]


def test_changes_report_old_and_new_target_term_and_reason() -> None:
    table = LeaderTable(["n1", "n2", "n3"], TIMEOUT)
    changes = run(
        table,
        [
            (0.0, ann("n2", 1, "follower", "n1")),
            (0.0, ann("n1", 1, "leader", "n1")),
            (0.1, down("n1")),
            (0.2, ann("n2", 2, "leader", "n2")),
            (0.2, ann("n3", 2, "follower", "n2")),
            (0.3, ann("n2", 2, "leader", "n2", False)),
            (0.4, ann("n2", 2, "leader", "n2", True)),
            (0.5, ann("n2", 2, "follower", None)),
            (0.6, ann("n3", 3, "leader", "n3")),
            (0.7, ann("n1", 4, "candidate")),
            (0.7, ann("n2", 4, "follower", None)),
            (0.8, ann("n1", 4, "leader", "n1")),
            (0.9, misdirect("n1", None)),
            (1.0, ann("n1", 4, "leader", "n1")),
            (1.0, ann("n1", 5, "leader", "n1")),
            (2.5, expire()),
        ],
    )
    assert changes == [
        LeaderChange(None, "n1", 0, 1, "hint"),
        None,  # n1's own claim confirms the hint: same target, same term
        LeaderChange("n1", None, 1, 1, "down"),
        LeaderChange(None, "n2", 1, 2, "announced"),
        None,
        LeaderChange("n2", None, 2, 2, "no_quorum"),
        LeaderChange(None, "n2", 2, 2, "announced"),
        LeaderChange("n2", None, 2, 2, "stepped_down"),
        LeaderChange(None, "n3", 2, 3, "announced"),
        None,  # a lone candidate at 4 is one node's word
        LeaderChange("n3", None, 3, 4, "deposed"),  # a majority is at 4
        LeaderChange(None, "n1", 4, 4, "announced"),
        LeaderChange("n1", None, 4, 4, "misdirect"),
        LeaderChange(None, "n1", 4, 4, "announced"),
        LeaderChange("n1", "n1", 4, 5, "announced"),  # same id, new term: still a change
        LeaderChange("n1", None, 5, 4, "silent"),  # its claim at 5 lapsed: the floor (4) governs again
    ]
    assert str(changes[0]) == "leader None@0 -> n1@1 (hint)"


def test_version_counts_target_changes_even_when_first_seen_by_leader() -> None:
    table = LeaderTable(NODES, TIMEOUT)
    assert table.version == 0
    table.apply(Announcement("n1", 1, "leader"), 0.0)
    assert table.version == 1
    table.apply(Announcement("n1", 1, "leader"), 0.5)
    assert table.version == 1
    assert table.leader(2.0) is None
    assert table.version == 2
    # the lapse seen by leader() is still reported by the periodic expire (only n1 spoke of term 1: with
    # its claim lapsed, the quorum floor, 0, governs)
    assert table.expire(2.1) == LeaderChange("n1", None, 1, 0, "silent")
    assert table.expire(2.2) is None


def test_remove_node_of_leader_reports_removed_and_keeps_the_floor() -> None:
    table = LeaderTable(NODES, TIMEOUT)
    for node, role in (("n1", "leader"), ("n2", "follower"), ("n3", "follower")):
        table.apply(Announcement(node, 4, role, "n1"), 0.0)
    assert table.floor == 4
    assert table.remove_node("n1", 0.1) == LeaderChange("n1", None, 4, 4, "removed")
    assert table.term == table.floor == 4
    assert list(table.nodes) == ["n2", "n3", "n4"]
    with pytest.raises(ValueError, match="unknown node"):
        table.apply(Announcement("n1", 4, "leader"), 0.2)


def test_add_node_makes_hint_naming_it_usable() -> None:
    table = LeaderTable(["n1", "n2"], TIMEOUT)
    table.apply(Announcement("n1", 2, "follower", "n4"), 0.0)
    assert table.leader(0.0) is None
    table.add_node("n4")
    assert table.leader(0.1) == "n4"
    assert table.expire(0.2) == LeaderChange(None, "n4", 0, 2, "hint")  # (no evidence of term 2 before)
    with pytest.raises(ValueError, match="duplicate"):
        table.add_node("n4")


def test_lower_term_from_same_node_is_rejected_and_changes_nothing() -> None:
    table = LeaderTable(NODES, TIMEOUT)
    table.apply(Announcement("n1", 5, "leader", "n1", applied_index=10), 0.0)
    before = table.snapshot(0.5)
    with pytest.raises(ValueError, match="term went backwards"):
        table.apply(Announcement("n1", 4, "follower", "n2", applied_index=3), 0.5)
    assert table.snapshot(0.5) == before
    assert table.nodes["n1"].last_heard == 0.0
    # another node may still announce a lower term (it is behind, not going backwards)
    table.apply(Announcement("n2", 4, "follower"), 0.5)
    assert table.term == 5
    assert table.leader(0.5) == "n1"


def test_unknown_node_is_rejected() -> None:
    table = LeaderTable(NODES, TIMEOUT)
    for call in (
        lambda: table.apply(Announcement("zz", 1, "leader"), 0.0),
        lambda: table.node_down("zz", 0.0),
        lambda: table.misdirected("zz", None, None, 0.0),
        lambda: table.remove_node("zz", 0.0),
        lambda: table.is_deposed("zz"),
    ):
        with pytest.raises(ValueError, match="unknown node 'zz'"):
            call()


def test_liveness_and_index_queries() -> None:
    table = LeaderTable(NODES, TIMEOUT)
    table.apply(Announcement("n1", 1, "leader", applied_index=9), 0.0)
    table.apply(Announcement("n2", 1, "follower", "n1", applied_index=7), 0.5)
    table.apply(Announcement("n3", 1, "follower", "n1", applied_index=9), 0.5)
    table.node_down("n3", 0.6)
    assert table.live_nodes(0.7) == ["n1", "n2"]
    assert table.live_nodes(1.2) == ["n2"]
    assert table.applied_at_least(8, 0.7) == ["n1"]
    assert table.applied_at_least(7, 1.2) == ["n2"]
    assert NodeView("x", last_heard=1.0).is_live(2.0, 1.0)
    assert not NodeView("x", last_heard=1.0, down=True).is_live(1.0, 1.0)
    assert not NodeView("x").is_live(0.0, 1.0)


def test_snapshot_is_json_and_shows_live_age_and_deposed() -> None:
    table = LeaderTable(NODES, TIMEOUT)
    table.apply(Announcement("n1", 1, "leader", "n1", has_quorum=True), 0.0)
    table.apply(Announcement("n2", 2, "leader", "n2", commit_index=5, applied_index=4, seq=3), 0.25)
    snap = json.loads(json.dumps(table.snapshot(0.75)))
    assert snap["term"] == 2
    assert snap["leader"] == "n2"
    assert snap["leader_source"] == "announced"
    nodes = snap["nodes"]
    assert nodes["n1"]["deposed"] is True
    assert nodes["n2"] == {
        "id": "n2",
        "term": 2,
        "role": "leader",
        "leader_hint": "n2",
        "commit_index": 5,
        "applied_index": 4,
        "has_quorum": None,
        "seq": 3,
        "down": False,
        "live": True,
        "deposed": False,
        "age_s": 0.5,
    }
    assert nodes["n3"]["live"] is False and nodes["n3"]["age_s"] is None
    assert "leader=n2" in repr(table)


def test_table_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="liveness_timeout"):
        LeaderTable(NODES, 0)
    with pytest.raises(ValueError, match="duplicate"):
        LeaderTable(["n1", "n1"], TIMEOUT)
    table = LeaderTable(NODES, TIMEOUT)
    table.apply(Announcement("n1", 1, "leader"), 0.0)
    table.liveness_timeout = 5.0
    assert table.leader(3.0) == "n1"


# -- from_json ---------------------------------------------------------------------------------------

GOOD = {
    "node": "n1",
    "term": 7,
    "role": "leader",
    "leader": "n1",
    "commit_index": 1042,
    "applied_index": 1041,
    "has_quorum": True,
    "seq": 9313,
    "ts_ms": 1764150000123,
}


def test_from_json_accepts_full_event_and_round_trips() -> None:
    a = Announcement.from_json(dict(GOOD, sig="ab12"))
    assert a == Announcement("n1", 7, "leader", "n1", 1042, 1041, True, 9313, 1764150000123)
    assert a.to_json() == GOOD
    assert Announcement.from_json(a.to_json()) == a


def test_from_json_minimal_follower_and_empty_leader() -> None:
    a = Announcement.from_json({"node": "n2", "term": 0, "role": "follower", "leader": "", "seq": None})
    assert a == Announcement("n2", 0, "follower")
    assert a.to_json() == {"node": "n2", "term": 0, "role": "follower"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("node", None, "node: must be a non-empty string"),
        ("node", "", "node: must be a non-empty string"),
        ("node", 1, "node: must be a non-empty string"),
        ("term", -1, "term: must be a non-negative integer"),
        ("term", "7", "term: must be a non-negative integer"),
        ("term", 7.0, "term: must be a non-negative integer"),
        ("term", True, "term: must be a non-negative integer"),
        ("term", None, "term: must be a non-negative integer"),
        ("role", "boss", "role: must be one of"),
        ("role", None, "role: must be one of"),
        ("leader", 1, "leader: must be a string or null"),
        ("has_quorum", 1, "has_quorum: must be a boolean or null"),
        ("has_quorum", "true", "has_quorum: must be a boolean or null"),
        ("commit_index", -5, "commit_index: must be a non-negative integer"),
        ("applied_index", False, "applied_index: must be a non-negative integer"),
        ("applied_index", "1041", "applied_index: must be a non-negative integer"),
        ("seq", 1.5, "seq: must be a non-negative integer"),
        ("ts_ms", True, "ts_ms: must be a non-negative integer"),
        # uint64 at most: a 4299-digit term is valid JSON but no float (metrics) and no Raft term
        ("term", 2**64, "term: must be a non-negative integer below 2\\*\\*64"),
        ("term", 10**4298, "term: must be a non-negative integer below 2\\*\\*64"),
        ("commit_index", 2**64, "commit_index: must be a non-negative integer below 2\\*\\*64"),
        ("applied_index", 2**70, "applied_index: must be a non-negative integer below 2\\*\\*64"),
        ("seq", 2**64, "seq: must be a non-negative integer below 2\\*\\*64"),
        ("ts_ms", -1, "ts_ms: must be a non-negative integer below 2\\*\\*64"),
    ],
)
def test_from_json_rejects_bad_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Announcement.from_json(dict(GOOD, **{field: value}))


def test_from_json_accepts_the_largest_uint64_and_the_table_takes_it() -> None:
    top = 2**64 - 1
    a = Announcement.from_json(dict(GOOD, term=top, commit_index=top, applied_index=top, seq=top))
    assert a.term == a.commit_index == top
    table = LeaderTable(["n1"], TIMEOUT)
    table.apply(a, 0.0)
    assert (table.leader(0.0), table.term, float(table.term)) == ("n1", top, 2.0**64)
    with pytest.raises(ValueError, match="out of range"):
        table.apply(Announcement("n1", top + 1, "leader"), 0.1)


@pytest.mark.parametrize("field", ["node", "term", "role"])
def test_from_json_rejects_missing_required_field(field: str) -> None:
    doc = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(ValueError, match=f"^{field}: "):
        Announcement.from_json(doc)


@pytest.mark.parametrize("doc", [None, [], "x", 3])
def test_from_json_rejects_non_object(doc: object) -> None:
    with pytest.raises(ValueError, match="must be a JSON object"):
        Announcement.from_json(doc)


# -- properties --------------------------------------------------------------------------------------


def live(view: NodeView, now: float) -> bool:
    return not view.down and view.last_heard is not None and now <= view.last_heard + TIMEOUT


def quorum_term(table: LeaderTable) -> int:
    """The k-th highest of the nodes' known terms, k a majority of them."""
    terms = sorted((v.term for v in table.nodes.values()), reverse=True)
    return terms[len(terms) // 2]  # k = n // 2 + 1, counted from 1


def reference(table: LeaderTable, now: float) -> tuple[str | None, int]:
    """The rules written out plainly, from the table's node state and its floor, with no cache:
    (write target, governing term)."""
    floor, nodes = table.floor, table.nodes
    claims = [v for v in nodes.values() if live(v, now) and v.role == "leader" and v.term >= floor]
    if claims:
        term = max(v.term for v in claims)
        at_term = [v for v in claims if v.term == term]
        if len(at_term) == 1 and at_term[0].has_quorum is not False:
            return at_term[0].id, term
        return None, term
    hints = [v for v in nodes.values()
             if live(v, now) and v.role in ("follower", "candidate", "learner") and v.leader_hint
             and v.term >= floor]
    if not hints:
        return None, floor
    term = max(v.term for v in hints)
    named = {v.leader_hint for v in hints if v.term == term}
    if len(named) != 1:
        return None, floor
    hinted = named.pop()
    if hinted is None or hinted not in nodes:
        return None, floor
    target = nodes[hinted]
    deposed_or_claiming = target.role == "leader"
    spoke_since = target.role is not None and target.term >= term
    return (None, floor) if target.down or deposed_or_claiming or spoke_since else (hinted, term)


def reference_leader(table: LeaderTable, now: float) -> str | None:
    return reference(table, now)[0]


def ops(ids: list[str]) -> st.SearchStrategy[tuple[str, object]]:
    node = st.sampled_from(ids)
    hint = st.sampled_from([*ids, *ids, None, "", "ghost"])
    # Few terms and a bias towards leaders and followers, so that histories often have a target to lose.
    term = st.integers(0, 3)
    announce = st.builds(
        Announcement,
        node=node,
        term=term,
        role=st.sampled_from([*ROLES, "leader", "follower"]),
        leader=hint,
        has_quorum=st.sampled_from([None, True, True, False]),
    )
    return st.one_of(
        st.tuples(st.just("announce"), announce),
        st.tuples(st.just("announce"), announce),
        st.tuples(st.just("down"), node),
        st.tuples(st.just("misdirect"), st.tuples(node, hint, st.none() | term)),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 0.25, 0.5, 0.999, 1.0, 1.001, 3.0])),
        st.tuples(st.just("expire"), st.none()),
    )


@st.composite
def scripts(draw: st.DrawFn) -> tuple[list[str], list[tuple[str, object]]]:
    ids = [f"n{i}" for i in range(1, draw(st.integers(3, 5)) + 1)]
    return ids, draw(st.lists(ops(ids), max_size=60))


@settings(max_examples=300, deadline=None)
@given(scripts())
def test_properties_hold_over_random_histories(script: tuple[list[str], list[tuple[str, object]]]) -> None:
    ids, steps = script
    table = LeaderTable(ids, TIMEOUT)
    now, floor, version = 0.0, 0, 0
    for op, arg in steps:
        if op == "announce":
            assert isinstance(arg, Announcement)
            before = table.snapshot(now)
            view = table.nodes[arg.node]
            fresh = view.term_heard is not None and now <= view.term_heard + TIMEOUT
            if arg.term < view.term and fresh:
                with pytest.raises(ValueError, match="term went backwards"):
                    table.apply(arg, now)
                assert table.snapshot(now) == before
            else:
                table.apply(arg, now)
                assert (view.term, view.role, view.last_heard) == (arg.term, arg.role, now)
        elif op == "down":
            assert isinstance(arg, str)
            table.node_down(arg, now)
        elif op == "misdirect":
            assert isinstance(arg, tuple)
            node_id, hint, at = arg
            table.misdirected(node_id, hint, at, now)
        elif op == "wait":
            assert isinstance(arg, float)
            now += arg
        else:
            table.expire(now)

        # the floor is the highest term a majority was ever seen at, and never decreases
        floor = max(floor, quorum_term(table))
        assert table.floor == floor
        leader = table.leader(now)
        # the cached answer is the naive recomputation, target and governing term
        assert (leader, table.term) == reference(table, now)
        assert table.term >= table.floor
        assert table.version >= version
        version = table.version
        if table.term > table.floor:
            # above the floor, only a live node's own word at that term governs
            assert any(live(v, now) and v.term == table.term for v in table.nodes.values())
        if leader is None:
            continue
        view = table.nodes[leader]
        assert not table.is_deposed(leader)
        assert not view.down
        if view.term == table.term and view.role is not None:
            # its own word at the current term governs: a live, quorate claim
            assert view.role == "leader" and view.has_quorum is not False and live(view, now)
        else:
            # a hint from a live non-leader at the current term
            assert any(
                live(v, now) and v.term == table.term and v.role != "leader" and v.leader_hint == leader
                for v in table.nodes.values()
            )


@settings(max_examples=300, deadline=None)
@given(scripts())
def test_reported_changes_track_the_write_target(script: tuple[list[str], list[tuple[str, object]]]) -> None:
    """Every change of (target, term-if-target) is reported exactly once, old matching the previous new."""
    ids, steps = script
    table = LeaderTable(ids, TIMEOUT)
    now = 0.0
    current: tuple[str | None, int] = (None, 0)
    for op, arg in steps:
        change: LeaderChange | None = None
        if op == "announce":
            assert isinstance(arg, Announcement)
            try:
                change = table.apply(arg, now)
            except ValueError:
                continue
        elif op == "down":
            assert isinstance(arg, str)
            change = table.node_down(arg, now)
        elif op == "misdirect":
            assert isinstance(arg, tuple)
            change = table.misdirected(arg[0], arg[1], arg[2], now)
        elif op == "wait":
            assert isinstance(arg, float)
            now += arg
            continue
        else:
            change = table.expire(now)
        target = table.leader(now)
        if change is not None:
            assert (change.old_leader, change.old_term) == current or change.old_leader is None
            assert change.old_leader == current[0]
            assert change.new_leader == target and change.new_term == table.term
            assert change.old_leader != change.new_leader or change.old_term != change.new_term
            current = (target, table.term)
        else:
            assert target == current[0]
            assert target is None or current[1] == table.term
            current = (target, table.term)


def test_answers_raise_the_applied_index_and_the_next_announcement_governs() -> None:
    t = LeaderTable(["n1", "n2"], TIMEOUT)
    t.apply(Announcement("n2", 1, "follower", "n1", commit_index=10, applied_index=10), 0.0)
    assert t.note_applied("n2", 15) is True
    assert t.nodes["n2"].applied_index == 15
    assert t.note_applied("n2", 12) is False  # an older answer teaches nothing
    assert t.nodes["n2"].applied_index == 15
    assert t.note_applied("n1", 3) is True  # not heard yet: what its answer shows
    assert t.note_applied("n9", 3) is False  # not a node of this cluster
    # The node's own word wins again, even lower (a node restored from an old disk goes back).
    t.apply(Announcement("n2", 1, "follower", "n1", commit_index=11, applied_index=11), 0.1)
    assert t.nodes["n2"].applied_index == 11
    assert t.applied_at_least(12, 0.2) == []


LIE_TERMS = st.one_of(st.integers(0, 9), st.sampled_from([2**31, 2**53 + 1, 2**63, 2**64 - 1]))
LIES = st.one_of(
    st.builds(lambda term, role, hint, q: ("announce", Announcement("n3", term, role, hint, has_quorum=q)),
              LIE_TERMS, st.sampled_from(ROLES), st.sampled_from(["n1", "n2", "n3", None]),
              st.sampled_from([None, True, False])),
    st.builds(lambda term, hint: ("misdirect", (hint, term)), st.none() | LIE_TERMS,
              st.sampled_from(["n1", "n2", "n3", None])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.05, 0.3, 0.7]), LIES), min_size=1, max_size=30),
       st.booleans())
def test_one_liar_holds_writes_at_most_one_liveness_timeout_past_its_last_lie(
    lies: list[tuple[float, tuple[str, object]]], corrects: bool
) -> None:
    """Whatever n3 says (any term, role, hint, 421), writes go to the honest leader n1 at term 5 within one
    liveness timeout of n3's last lie, whether n3 then falls silent or announces the truth."""
    table = LeaderTable(["n1", "n2", "n3"], TIMEOUT)
    now = 0.0

    def heartbeat() -> None:
        table.apply(Announcement("n1", 5, "leader", "n1", has_quorum=True), now)
        table.apply(Announcement("n2", 5, "follower", "n1"), now)

    heartbeat()
    table.apply(Announcement("n3", 5, "follower", "n1"), now)
    for dt, (op, arg) in lies:
        now += dt
        heartbeat()
        if op == "announce":
            assert isinstance(arg, Announcement)
            with contextlib.suppress(ValueError):  # a lie going backwards is refused: fine too
                table.apply(arg, now)
        else:
            assert isinstance(arg, tuple)
            table.misdirected("n3", arg[0], arg[1], now)
    last_lie = now
    while now <= last_lie + TIMEOUT + 0.25:
        now = round(now + 0.05, 6)
        heartbeat()
        if corrects:
            with contextlib.suppress(ValueError):  # refused while its lie is fresh (a stale event?)
                table.apply(Announcement("n3", 5, "follower", "n1"), now)
        if now > last_lie + TIMEOUT:
            assert (table.leader(now), table.term) == ("n1", 5), f"{now - last_lie:.2f}s after the last lie"
    if corrects:
        assert table.nodes["n3"].term == 5 and table.live_nodes(now) == ["n1", "n2", "n3"]
