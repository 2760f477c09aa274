"""Session ordering (`SessionOrder`, docs/how-it-works.md): writes of one session go to the leader one at a
time, in seq order. Each row is a script of steps and what the rule answers at each:

- `admit(name, session, seq, now)` → True (send now) or False (parked until its turn or its gap timeout);
- `done(name, session)` → the name of the write that may go next, or None;
- `expired(now)` → the names of the parked writes whose gap timed out (to be failed).

The requests are plain strings: the rule only keeps them and hands them back. gap_wait is 1.0 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from raftlb.core.sessions import SessionOrder

GAP = 1.0


@dataclass(frozen=True)
class Admit:
    req: str
    session: str
    seq: int
    now: float
    sent: bool  # expected: True = goes now, False = parked


@dataclass(frozen=True)
class Done:
    req: str
    session: str
    next: str | None  # expected: the parked write that may go now


@dataclass(frozen=True)
class Expired:
    now: float
    failed: tuple[str, ...]  # expected, in any order


Step = Admit | Done | Expired

SCRIPTS: dict[str, list[Step]] = {
    # -- in order -------------------------------------------------------------------------------------------
    "the first write of a session starts its order, whatever its seq": [
        Admit("w7", "s", 7, 0.0, sent=True),
        Done("w7", "s", next=None),
        Admit("w8", "s", 8, 0.1, sent=True),
    ],
    "in order, one at a time: the next seq waits while the one before is in flight": [
        Admit("w1", "s", 1, 0.0, sent=True),
        Admit("w2", "s", 2, 0.0, sent=False),
        Done("w1", "s", next="w2"),
        Done("w2", "s", next=None),
        Admit("w3", "s", 3, 0.2, sent=True),
    ],
    "a waiting next seq is not failed by its gap timeout: its predecessor is on its way": [
        Admit("w1", "s", 1, 0.0, sent=True),
        Admit("w2", "s", 2, 0.0, sent=False),
        Expired(GAP + 5, failed=()),
        Done("w1", "s", next="w2"),
    ],
    # -- early seqs wait for the ones before them --------------------------------------------------------
    "an early seq waits for the gap to fill, then goes in seq order": [
        Admit("w1", "s", 1, 0.0, sent=True),
        Done("w1", "s", next=None),
        Admit("w3", "s", 3, 0.1, sent=False),
        Admit("w4", "s", 4, 0.1, sent=False),
        Admit("w2", "s", 2, 0.2, sent=True),
        Done("w2", "s", next="w3"),
        Done("w3", "s", next="w4"),
        Done("w4", "s", next=None),
    ],
    "an early seq arriving while its predecessor is in flight goes when that one is done": [
        Admit("w1", "s", 1, 0.0, sent=True),
        Admit("w3", "s", 3, 0.0, sent=False),
        Done("w1", "s", next=None),  # seq 2 has not come: 3 still waits
        Admit("w2", "s", 2, 0.1, sent=True),
        Done("w2", "s", next="w3"),
    ],
    # -- gap timeout ----------------------------------------------------------------------------------------
    "a gap that is not filled within gap_wait fails the early seqs behind it": [
        Admit("w1", "s", 1, 0.0, sent=True),
        Done("w1", "s", next=None),
        Admit("w3", "s", 3, 0.5, sent=False),
        Admit("w4", "s", 4, 0.9, sent=False),
        Expired(0.5 + GAP - 0.01, failed=()),
        Expired(0.5 + GAP, failed=("w3",)),
        Expired(0.9 + GAP, failed=("w4",)),
        Expired(10.0, failed=()),  # each is failed once
    ],
    "after a gap timeout the missing seq still goes when it finally arrives": [
        Admit("w1", "s", 1, 0.0, sent=True),
        Done("w1", "s", next=None),
        Admit("w3", "s", 3, 0.0, sent=False),
        Expired(GAP, failed=("w3",)),
        Admit("w2", "s", 2, 2.0, sent=True),
        Done("w2", "s", next=None),  # w3 was failed: nothing is left to release
    ],
    # -- re-sends -------------------------------------------------------------------------------------------
    "a re-send at or below the highest seq sent goes straight through (the node answers it from its cache)": [
        Admit("w1", "s", 1, 0.0, sent=True),
        Admit("w2", "s", 2, 0.0, sent=False),
        Done("w1", "s", next="w2"),
        Admit("w2-again", "s", 2, 0.1, sent=True),  # at the highest sent, while it is in flight
        Admit("w1-again", "s", 1, 0.1, sent=True),  # below it
        Done("w2-again", "s", next=None),  # a re-send is not the write in flight: releases nothing
        Done("w2", "s", next=None),
    ],
    "the same early seq twice while it waits: the second goes, the node sorts it out": [
        Admit("w1", "s", 1, 0.0, sent=True),
        Admit("w3", "s", 3, 0.0, sent=False),
        Admit("w3-again", "s", 3, 0.1, sent=True),
        Admit("w2", "s", 2, 0.2, sent=False),
        Done("w1", "s", next="w2"),
        Done("w2", "s", next="w3"),  # the first one parked is the one released
    ],
    # -- independent sessions -------------------------------------------------------------------------------
    "sessions are independent: one's gap or write in flight never holds another": [
        Admit("a1", "a", 1, 0.0, sent=True),
        Admit("b1", "b", 1, 0.0, sent=True),
        Admit("a3", "a", 3, 0.0, sent=False),
        Admit("b2", "b", 2, 0.0, sent=False),
        Done("b1", "b", next="b2"),
        Done("a1", "a", next=None),
        Expired(GAP, failed=("a3",)),
        Done("b2", "b", next=None),
    ],
    "done for another session's write, or for a write never admitted, releases nothing": [
        Admit("a1", "a", 1, 0.0, sent=True),
        Admit("a2", "a", 2, 0.0, sent=False),
        Done("a1", "b", next=None),
        Done("x", "a", next=None),
        Done("a1", "a", next="a2"),
    ],
}


@pytest.mark.parametrize("script", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_session_order(script: list[Step]) -> None:
    order: SessionOrder[str] = SessionOrder(gap_wait=GAP, max_sessions=100)
    for i, step in enumerate(script):
        if isinstance(step, Admit):
            assert order.admit(step.req, step.session, step.seq, step.now) is step.sent, (i, step)
        elif isinstance(step, Done):
            assert order.done(step.req, step.session) == step.next, (i, step)
        else:
            assert sorted(order.expired(step.now)) == sorted(step.failed), (i, step)


def test_idle_sessions_beyond_the_limit_are_forgotten_least_recently_used_first() -> None:
    order: SessionOrder[str] = SessionOrder(gap_wait=GAP, max_sessions=2)
    for sid, req in (("a", "a1"), ("b", "b1")):
        assert order.admit(req, sid, 1, 0.0)
        assert order.done(req, sid) is None
    assert order.admit("a1-again", "a", 1, 0.1)  # a re-send: a is now the most recently used
    assert order.admit("c1", "c", 1, 0.2)
    assert len(order) == 2
    # a was kept and still orders: seq 3 waits for 2 ...
    assert not order.admit("a3", "a", 3, 0.3)
    # ... b was forgotten: its next write starts its order afresh, whatever its seq.
    assert order.admit("b9", "b", 9, 0.3)


def test_a_session_with_a_write_in_flight_or_waiting_is_never_forgotten() -> None:
    # Over the limit with every older session busy, the new session used to be forgotten by its own
    # admission: b1 went, b was dropped, and b3 then started a fresh order and went before b2.
    order: SessionOrder[str] = SessionOrder(gap_wait=GAP, max_sessions=1)
    assert order.admit("a1", "a", 1, 0.0)  # in flight
    assert order.admit("b1", "b", 1, 0.0)
    assert not order.admit("b3", "b", 3, 0.0)  # waiting
    assert order.admit("c1", "c", 1, 0.0)
    assert len(order) == 3  # over the limit rather than lose an order
    assert order.done("a1", "a") is None
    assert order.done("b1", "b") is None  # b2 has not come: b3 still waits
    assert order.admit("b2", "b", 2, 0.1)
    assert order.done("b2", "b") == "b3"
