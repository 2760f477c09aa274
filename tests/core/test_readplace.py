"""Read placement by load (`raftlb.core.readplace`): followers first, the leader's spare capacity too.

Each row: the nodes at the read's index (L leads), their outstanding requests, the leader's bias → the node
that serves the read. The patience rule (waiting for an idle node about to reach the index) has its own
table in tests/test_reads.py.
"""

from __future__ import annotations

from collections import Counter

import pytest

from raftlb.core.readplace import NEVER, leader_bias, place_read

FIRST, LAST = (lambda: 0.0), (lambda: 0.999)  # the rng's draw among equally weighted nodes
MARGIN = 16.0  # the default leader_read_margin


@pytest.mark.parametrize(("load", "bias", "rng", "expected"), [
    # Idle or lightly loaded followers serve every read, even with the leader idle.
    ({"L": 0, "a": 0, "b": 0}, MARGIN, FIRST, "a"),
    ({"L": 0, "a": 0, "b": 0}, MARGIN, LAST, "b"),
    ({"L": 0, "a": 3, "b": 5}, MARGIN, FIRST, "a"),
    ({"L": 0, "a": 15, "b": 19}, MARGIN, FIRST, "a"),  # one follower short of the margin: still a follower
    # Followers busier than the leader by the margin: the leader's spare capacity serves too ...
    ({"L": 0, "a": 17, "b": 20}, MARGIN, FIRST, "L"),
    ({"L": 2, "a": 19, "b": 19}, MARGIN, FIRST, "L"),
    # ... at exactly the margin the leader is one of the equals drawn from.
    ({"L": 0, "a": 16, "b": 16}, MARGIN, FIRST, "L"),
    ({"L": 0, "a": 16, "b": 16}, MARGIN, LAST, "b"),
    # The leader's writes count against it: a leader busy with writes leaves reads to followers.
    ({"L": 6, "a": 20, "b": 20}, MARGIN, FIRST, "a"),
    # A smaller margin hands reads to the leader sooner.
    ({"L": 0, "a": 9, "b": 12}, 8.0, FIRST, "L"),
    # Among followers: the least loaded.
    ({"L": 0, "a": 4, "b": 1}, MARGIN, FIRST, "b"),
    # No bias (prefer_followers: false): the least loaded node, the leader alike; ties drawn at random.
    ({"L": 0, "a": 1, "b": 1}, 0.0, FIRST, "L"),
    ({"L": 1, "a": 1, "b": 1}, 0.0, LAST, "b"),
    ({"L": 2, "a": 1, "b": 3}, 0.0, FIRST, "a"),
    # leader_read_margin: never: the leader serves no read a follower at the index could serve.
    ({"L": 0, "a": 500, "b": 900}, NEVER, FIRST, "a"),
    # The leader alone at the index serves it, whatever its bias.
    ({"L": 30}, MARGIN, FIRST, "L"),
    ({"L": 30}, NEVER, FIRST, "L"),
    # Followers only at the index (the leader is not): the least loaded of them.
    ({"a": 20, "b": 9}, MARGIN, FIRST, "b"),
])
def test_placement(load: dict[str, int], bias: float, rng: object, expected: str) -> None:
    assert place_read(list(load), [], load.__getitem__, 0.0, 0.0, rng,  # type: ignore[arg-type]
                      leader="L", bias=bias) == expected


@pytest.mark.parametrize(("prefer_followers", "margin", "bias"), [
    (False, 16, 0.0),  # no preference: every node alike, whatever the margin
    (False, None, 0.0),
    (True, 16, 16.0),
    (True, 1, 1.0),
    (True, None, NEVER),  # leader_read_margin: never
])
def test_leader_bias(prefer_followers: bool, margin: int | None, bias: float) -> None:
    assert leader_bias(prefer_followers, margin) == bias


def test_an_idle_leader_waits_for_an_idle_follower_about_to_reach_the_index() -> None:
    """Patience counts the leader's bias: an idle leader is not an idle node while followers are preferred."""
    load = {"L": 0, "a": 0}.__getitem__
    assert place_read(["L"], ["a"], load, 0.01, 0.05, leader="L", bias=MARGIN) is None
    assert place_read(["L"], ["a"], load, 0.05, 0.05, leader="L", bias=MARGIN) == "L"  # patience is short
    assert place_read(["L"], ["a"], load, 0.01, 0.05, leader="L", bias=0.0) == "L"  # no preference


@pytest.mark.parametrize(("follower_load", "leader_share"), [
    # Every draw of the rng, over the same loads: the leader's share of the reads.
    (0, 0.0), (15, 0.0), (16, 1 / 3), (17, 1.0),
])
def test_leader_share_over_every_draw(follower_load: int, leader_share: float) -> None:
    load = {"L": 0, "a": follower_load, "b": follower_load}
    draws = [i / 300 for i in range(300)]
    chosen = Counter(place_read(["L", "a", "b"], [], load.__getitem__, 0.0, 0.0, lambda d=d: d,  # type: ignore[misc]
                                leader="L", bias=MARGIN) for d in draws)
    assert chosen["L"] / len(draws) == pytest.approx(leader_share)
