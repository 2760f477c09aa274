"""The follower base (raftlb.control.follower) that the announce-stream follower and the status poller
share: backoff, rejects, up/down by the liveness rule, pauses, and the per-node tasks of a cluster. With a
manual clock and a follower whose announcements the test delivers by hand: no sockets, no waiting."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import httpx
import pytest

from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.follower import FollowerSet, NodeFollower
from raftlb.core.announcement import Announcement
from raftlb.tasks import TaskSet

LOG = logging.getLogger("test.follower")


def node(node_id: str, port: int = 1) -> NodeConfig:
    url = f"http://127.0.0.1:{port}"
    return NodeConfig(id=node_id, url=url, announce_url=url, host="127.0.0.1", port=port)


N1 = node("n1")
CLUSTER = ClusterConfig(name="c", kind="native", nodes=(N1,), routes=(), liveness_timeout=1.0,
                        reconnect_min=0.1, reconnect_max=1.0)
ANN = Announcement("n1", 3, "leader", "n1")


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class HandFed(NodeFollower):
    """A follower whose announcements the test delivers; `follow` waits until cancelled."""

    async def follow(self) -> None:
        await asyncio.Event().wait()


class Calls:
    """What the follower told its callbacks."""

    def __init__(self) -> None:
        self.announcements: list[tuple[str, Announcement]] = []
        self.downs: list[tuple[str, str]] = []

    def on_announcement(self, node_id: str, ann: Announcement) -> None:
        self.announcements.append((node_id, ann))

    def on_down(self, node_id: str, reason: str) -> None:
        self.downs.append((node_id, reason))


@asynccontextmanager
async def follower(clock: Callable[[], float] | None = None, cluster: ClusterConfig = CLUSTER,
                   totals: dict[str, int] | None = None) -> AsyncIterator[tuple[HandFed, Calls]]:
    calls = Calls()
    async with httpx.AsyncClient() as client:
        kw = {} if clock is None else {"clock": clock}
        yield HandFed(N1, cluster, client, calls.on_announcement, calls.on_down, logger=LOG, where=N1.url,
                      totals=totals, **kw), calls


# -- backoff ----------------------------------------------------------------------------------------------

# reconnect_min 0.1, reconnect_max 1.0: the base doubles per failure in a row up to the cap; the pause is
# the base's upper half jittered, so it lies between base/2 and base.
BACKOFF = [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (5, 1.0), (40, 1.0)]


@pytest.mark.parametrize(("failures", "base"), BACKOFF, ids=[f"after {f} failures" for f, _ in BACKOFF])
async def test_backoff_doubles_per_failure_in_a_row_up_to_reconnect_max_jittered(failures: int,
                                                                                  base: float) -> None:
    async with follower() as (f, _):
        for _ in range(failures):
            f.backoff_delay()
        assert f.failures == failures
        for _ in range(20):  # the jitter: always within the upper half
            g = HandFed(N1, CLUSTER, f.client, lambda n, a: None, lambda n, r: None, logger=LOG, where="")
            for _ in range(failures):
                g.backoff_delay()
            assert base / 2 <= g.backoff_delay() <= base
        assert f.backoff_delay() <= base and f.failures == failures + 1


async def test_an_announcement_resets_the_backoff_and_the_last_error() -> None:
    async with follower(ManualClock()) as (f, _):
        for _ in range(6):
            f.backoff_delay()
        f.last_error = "announce stream: ConnectError"
        f.deliver(ANN)
        assert f.failures == 0 and f.last_error == ""
        assert 0.05 <= f.backoff_delay() <= 0.1


# -- rejects -------------------------------------------------------------------------------------------------

async def test_rejects_are_counted_per_reason_here_and_cluster_wide_and_logged_once_a_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOG.name)
    totals = {"bad_signature": 4}  # the cluster's counts outlive one follower
    async with follower(totals=totals) as (f, calls):
        for _ in range(3):
            f.reject("bad_signature", "missing or wrong sig")
        f.reject("wrong_node", "announcement for node 'n2'")
    assert f.rejected == {"bad_signature": 3, "wrong_node": 1}
    assert totals == {"bad_signature": 7, "wrong_node": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "node n1: rejected announcement: missing or wrong sig",
        "node n1: rejected announcement: announcement for node 'n2'",
    ]
    assert f.up is None and calls.announcements == [] and calls.downs == []  # a reject changes nothing else


# -- up and down ---------------------------------------------------------------------------------------------

# (seconds after following began, what happens, up afterwards, downs so far, announcements so far).
# Liveness timeout 1.0.
LIFE: list[tuple[float, str, bool | None, int, int]] = [
    (0.0, "check", None, 0, 0),  # not yet judged
    (0.9, "check", None, 0, 0),
    (0.95, "deliver", True, 0, 1),  # up at the first announcement
    (1.5, "check", True, 0, 1),  # heard 0.55 s ago
    (1.95, "check", True, 0, 1),  # the last live moment
    (1.96, "check", False, 1, 1),  # silent past the timeout: down, once
    (5.0, "check", False, 1, 1),  # still down: not reported again
    (5.1, "deliver", True, 1, 2),  # heard again: up
    (5.2, "refused", False, 2, 2),  # a poller that finds nothing listening reports down at once
    (5.3, "refused", False, 2, 2),  # once
    (5.4, "deliver", True, 2, 3),
]


async def test_up_at_each_announcement_and_down_once_when_not_heard_within_the_liveness_timeout() -> None:
    clock = ManualClock(100.0)
    async with follower(clock) as (f, calls):
        await_run = asyncio.create_task(f.run())  # following begins now: liveness counts from here
        await asyncio.sleep(0)
        for at, what, up, downs, announcements in LIFE:
            clock.now = 100.0 + at
            if what == "deliver":
                f.deliver(ANN)
            elif what == "refused":
                f.report_down("refuses connections")
            else:
                f.check_liveness()
            seen = (f.up, len(calls.downs), len(calls.announcements))
            assert seen == (up, downs, announcements), (at, what)
        await_run.cancel()
        await asyncio.gather(await_run, return_exceptions=True)
    assert calls.downs[0] == ("n1", "silent for 1.01s")
    assert calls.downs[1] == ("n1", "refuses connections")
    assert calls.announcements[0] == ("n1", ANN)


async def test_never_heard_is_down_a_liveness_timeout_after_following_began_with_the_last_error() -> None:
    clock = ManualClock(100.0)
    async with follower(clock) as (f, calls):
        f.last_error = "announce stream: ConnectError: refused"
        clock.now = 100.5
        f.check_liveness()
        assert f.up is None
        clock.now = 101.5
        f.check_liveness()
    assert calls.downs == [("n1", "never heard; announce stream: ConnectError: refused")]


async def test_time_left_runs_to_the_liveness_deadline_and_is_a_full_timeout_once_down() -> None:
    clock = ManualClock(100.0)
    async with follower(clock) as (f, _):
        f.deliver(ANN)
        clock.now = 100.25
        assert f.time_left() == pytest.approx(0.75)
        clock.now = 101.0
        assert f.time_left() == 0.0  # the last live moment: nothing left
        clock.now = 101.5
        assert f.time_left() == 1.0 and f.up is False  # down: each attempt gets a full timeout
        cluster = replace(CLUSTER, liveness_timeout=3.0)  # a reload: read when used
        f.cluster = cluster
        assert f.time_left() == 3.0


async def test_a_failing_callback_is_logged_and_following_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOG.name)
    clock = ManualClock(100.0)

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    async with httpx.AsyncClient() as client:
        f = HandFed(N1, CLUSTER, client, boom, boom, logger=LOG, where=N1.url, clock=clock)
        f.deliver(ANN)
        clock.now = 102.0
        f.check_liveness()
    assert f.up is False and f.announcements == 1
    # (Both callbacks' failures are one burst: the second is held back, counted in the next warning.)
    assert [r.getMessage() for r in caplog.records] == ["node n1: on_announcement failed",
                                                        "node n1: down (silent for 2.00s) at http://127.0.0.1:1"]


async def test_a_pause_reports_the_node_down_when_its_deadline_passes_meanwhile() -> None:
    # The real clock, short timeouts: the order of events is asserted, not their timing.
    cluster = replace(CLUSTER, liveness_timeout=0.05)
    async with follower(cluster=cluster) as (f, calls):
        f.deliver(ANN)
        async with asyncio.timeout(10):
            await f.pause(0.2)
        assert f.up is False and len(calls.downs) == 1
        async with asyncio.timeout(10):
            await f.pause(-1.0)  # nothing to wait for
        assert len(calls.downs) == 1


# -- the followers of a cluster ------------------------------------------------------------------------------

class HandFedSet(FollowerSet[HandFed]):
    task_prefix = "hand"

    def make_follower(self, node: NodeConfig, client: httpx.AsyncClient) -> HandFed:
        return HandFed(node, self.cluster, client, self.on_announcement, self.on_down, logger=LOG,
                       where=node.url, totals=self.rejected, clock=self.clock)


async def test_a_follower_set_follows_each_node_keeps_them_across_a_reload_and_stops_them() -> None:
    n2, n3 = node("n2", 2), node("n3", 3)
    cluster = replace(CLUSTER, nodes=(N1, n2))
    tasks = TaskSet("test")
    calls = Calls()
    async with httpx.AsyncClient() as client:
        clock = ManualClock()
        subs = HandFedSet(cluster, calls.on_announcement, calls.on_down, tasks, client, clock=clock)
        subs.start()
        first = dict(subs.nodes)
        assert list(first) == ["n1", "n2"] and len(tasks) == 2
        assert all(f.clock is clock for f in first.values())  # one clock for all
        assert repr(subs) == "<HandFedSet c [2 nodes: 0 up, 0 down, 2 unknown]>"
        first["n1"].deliver(ANN)
        first["n2"].reject("malformed_json", "x")
        assert calls.announcements == [("n1", ANN)] and subs.rejected == {"malformed_json": 1}
        # Reload: n1 kept (new timeouts), n2 re-addressed (made again), n3 new.
        reloaded = replace(cluster, nodes=(N1, node("n2", 22), n3), liveness_timeout=2.0)
        subs.update(reloaded)
        assert list(subs.nodes) == ["n1", "n2", "n3"]
        assert subs.nodes["n1"] is first["n1"] and subs.nodes["n1"].cluster is reloaded
        assert subs.nodes["n2"] is not first["n2"] and subs.nodes["n2"].node.port == 22
        assert subs.rejected == {"malformed_json": 1}  # the cluster's counts outlive the follower
        await subs.stop()
        assert subs.nodes == {} and len(tasks) == 0
        assert not client.is_closed  # not ours to close
