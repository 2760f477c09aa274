"""The liveness rule (raftlb.core.liveness), one row per case, and the three places that judge by it: the
leader table, the announce-stream follower and the status poller (their base, NodeFollower)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx
import pytest

from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.follower import NodeFollower
from raftlb.core.announcement import Announcement
from raftlb.core.leader_table import LeaderTable, NodeView
from raftlb.core.liveness import is_live, live_until


@dataclass(frozen=True)
class Row:
    name: str
    last_heard: float | None
    now: float
    timeout: float
    live: bool


RULE = [
    Row("never heard: not live", None, 0.0, 1.0, False),
    Row("never heard, however long the timeout", None, 100.0, 1e9, False),
    Row("heard this very moment", 10.0, 10.0, 1.0, True),
    Row("heard within the timeout", 10.0, 10.5, 1.0, True),
    Row("the last moment of the timeout still counts", 10.0, 11.0, 1.0, True),
    Row("just past the timeout: silent", 10.0, 11.001, 1.0, False),
    Row("long past the timeout", 10.0, 500.0, 1.0, False),
    Row("a short timeout lapses sooner", 10.0, 10.2, 0.1, False),
    Row("a long timeout lapses later", 10.0, 20.0, 30.0, True),
]


@pytest.mark.parametrize("row", RULE, ids=[r.name for r in RULE])
def test_a_node_is_live_while_heard_within_the_liveness_timeout(row: Row) -> None:
    assert is_live(row.last_heard, row.now, row.timeout) is row.live
    if row.last_heard is not None:
        # live_until is the last live moment: live up to it, and only up to it.
        assert (row.now <= live_until(row.last_heard, row.timeout)) is row.live


NODE = NodeConfig(id="n1", url="http://127.0.0.1:1", announce_url="http://127.0.0.1:1", host="127.0.0.1",
                  port=1)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class IdleFollower(NodeFollower):
    """A follower whose announcements the test delivers by hand."""

    async def follow(self) -> None:
        raise AssertionError("not run in these tests")


@pytest.mark.parametrize("row", [r for r in RULE if r.last_heard is not None],
                         ids=[r.name for r in RULE if r.last_heard is not None])
async def test_the_table_and_the_followers_judge_by_the_same_rule(row: Row) -> None:
    assert row.last_heard is not None
    ann = Announcement("n1", 1, "follower", "n2")
    # The leader table.
    assert NodeView("n1", last_heard=row.last_heard).is_live(row.now, row.timeout) is row.live
    table = LeaderTable(["n1", "n2", "n3"], row.timeout)
    table.apply(ann, row.last_heard)
    assert (table.live_nodes(row.now) == ["n1"]) is row.live
    # The follower base (the announce-stream follower and the status poller): heard at last_heard, then
    # judged at now.
    clock = ManualClock(row.last_heard)
    downs: list[str] = []
    cluster = ClusterConfig(name="c", kind="native", nodes=(NODE,), routes=(), liveness_timeout=row.timeout)
    async with httpx.AsyncClient() as client:
        follower = IdleFollower(NODE, cluster, client, lambda node, a: None,
                                lambda node, why: downs.append(why), logger=logging.getLogger("test"),
                                where=NODE.url, clock=clock)
        follower.deliver(ann)
        clock.now = row.now
        follower.check_liveness()
    assert follower.up is row.live
    assert len(downs) == (0 if row.live else 1)
