"""What following a node takes, however its announcements arrive: one base for the announce-stream follower
(stream.py) and the status poller (poll.py).

`NodeFollower` follows one node: it delivers each valid announcement (the node is up), judges the node by
the one liveness rule (raftlb.core.liveness; down once when not heard within cluster.liveness_timeout),
backs off while attempts fail (jittered exponential, cluster.reconnect_min..reconnect_max), pauses without
missing the liveness deadline, and counts and logs what it rejects (at most once per LOG_INTERVAL per node
and reason). Subclasses implement `follow`: how to get announcements.

`FollowerSet` holds one follower task per configured node of a cluster: start, hot-reload update, stop.

One clock, `time.monotonic` unless a test passes another, times everything here: the same clock the leader
table is fed with, so the follower and the table agree on who is live.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import httpx

from raftlb.burstlog import BurstLog
from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.client import make_client
from raftlb.core.announcement import Announcement
from raftlb.core.liveness import is_live, live_until
from raftlb.tasks import TaskSet

OnAnnouncement = Callable[[str, Announcement], None]
OnDown = Callable[[str, str], None]
Clock = Callable[[], float]


def describe(exc: BaseException) -> str:
    """An exception as `Type: message` (or `Type` alone), for `last_error` and logs."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class NodeFollower(ABC):
    """Follows one node until cancelled (module doc). `up` is None until the first announcement or the
    first liveness timeout, then True or False; `last_heard` is the clock time of the last announcement.

    `where` names the node's address in the down warning; `reject_message` says what a rejected input was.
    """

    reject_message = "rejected announcement"

    def __init__(
        self, node: NodeConfig, cluster: ClusterConfig, client: httpx.AsyncClient,
        on_announcement: OnAnnouncement, on_down: OnDown, *, logger: logging.Logger, where: str,
        totals: dict[str, int] | None = None, clock: Clock = time.monotonic,
    ) -> None:
        self.node = node
        self.cluster = cluster  # replaced on hot reload; timeouts are read from it when used
        self.where = where
        self.up: bool | None = None
        self.last_heard: float | None = None
        self.last_error = ""
        self.announcements = 0
        self.rejected: dict[str, int] = {}
        self.client = client
        self.clock = clock
        self.log = logger
        self._on_announcement = on_announcement
        self._on_down = on_down
        self._totals = totals  # the cluster-wide rejected counts, which outlive this follower
        self._since = clock()  # when last heard, or when following began: liveness counts from there
        self._failures = 0  # attempts failed in a row, for the backoff
        self._burst = BurstLog(logger)

    async def run(self) -> None:
        """Follow the node until cancelled."""
        self._since = self.clock()  # a node not heard within a liveness timeout from now is down
        await self.follow()

    @abstractmethod
    async def follow(self) -> None:
        """Get announcements from the node and `deliver` them, forever; `pause` between attempts."""

    @property
    def failures(self) -> int:
        """Attempts failed in a row since the node was last heard."""
        return self._failures

    def time_left(self) -> float:
        """Seconds the current attempt may take to deliver a valid announcement: until the liveness deadline
        while the node is up or not yet judged; once it is down, a full liveness timeout per attempt."""
        self.check_liveness()
        timeout = self.cluster.liveness_timeout
        if self.up is False:
            return timeout
        return max(0.0, live_until(self._since, timeout) - self.clock())

    def deliver(self, ann: Announcement) -> None:
        """A valid announcement from the node: it is live (up), and the callback gets it."""
        now = self.clock()
        self.last_heard = self._since = now
        self._failures = 0
        self.last_error = ""  # it is heard: an error from before is history, not its state
        self.announcements += 1
        if self.up is not True:
            self.up = True
            self.log.info("node %s: up (%s at term %d, %s)", self.node.id, ann.role, ann.term, self.via())
        try:
            self._on_announcement(self.node.id, ann)
        except Exception:
            self.warn("callback", "node %s: on_announcement failed%s", "", exc_info=True)

    def via(self) -> str:
        """How the node's announcements arrive, for the log."""
        return "followed"

    def check_liveness(self) -> None:
        """Report the node down, once, when it was not heard within the liveness timeout."""
        now = self.clock()
        if self.up is False or is_live(self._since, now, self.cluster.liveness_timeout):
            return
        silent = "never heard" if self.last_heard is None else f"silent for {now - self.last_heard:.2f}s"
        self.report_down(silent)

    def report_down(self, why: str) -> None:
        """The node is down (once, until it is heard again): log it and tell the callback."""
        if self.up is False:
            return
        self.up = False
        reason = f"{why}; {self.last_error}" if self.last_error else why
        self.log.warning("node %s: down (%s) at %s", self.node.id, reason, self.where)
        try:
            self._on_down(self.node.id, reason)
        except Exception:
            self.warn("callback", "node %s: on_down failed%s", "", exc_info=True)

    def backoff_delay(self) -> float:
        """The pause after one more failure: exponential in the failures in a row, capped, with the upper
        half jittered."""
        c = self.cluster
        base = min(c.reconnect_max, c.reconnect_min * 2.0 ** min(self._failures, 30))
        self._failures += 1
        return base / 2 + random.uniform(0, base / 2)

    async def pause(self, delay: float) -> None:
        """Sleep `delay` seconds, reporting the node down meanwhile if its liveness deadline passes."""
        end = self.clock() + max(0.0, delay)
        while True:
            self.check_liveness()
            now = self.clock()
            if now >= end:
                return
            deadline = live_until(self._since, self.cluster.liveness_timeout)
            wake = end if self.up is False else min(end, deadline)
            await asyncio.sleep(max(0.0, wake - now))

    def reject(self, reason: str, detail: str) -> None:
        """Input that is not a valid announcement from this node: dropped, counted by reason, logged."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._totals is not None:
            self._totals[reason] = self._totals.get(reason, 0) + 1
        self.warn(reason, f"node %s: {self.reject_message}: %s", detail)

    def warn(self, key: str, msg: str, detail: str, exc_info: bool = False) -> None:
        """Log `msg % (node id, detail)` at WARNING at most once per LOG_INTERVAL per key, saying how many
        were held back."""
        self._burst.warning(key, msg + "%s", self.node.id, detail, exc_info=exc_info)

    def state(self) -> str:
        """unknown, up or down, for reprs."""
        return {None: "unknown", True: "up", False: "down"}[self.up]


F = TypeVar("F", bound=NodeFollower)


class FollowerSet(ABC, Generic[F]):
    """The followers of one cluster: one task per node, spawned through `tasks`. Subclasses make the
    follower for each node (`make_follower`), on `clock`.

    `nodes` maps node id to its live follower; `rejected` counts dropped input per reason over the
    cluster's lifetime (monotonic, for metrics). With no `client`, one is made (`make_client()`) on start
    and closed on stop.
    """

    task_prefix = "follow"  # task names: {task_prefix}:{cluster}:{node}

    def __init__(self, cluster: ClusterConfig, on_announcement: OnAnnouncement, on_down: OnDown,
                 tasks: TaskSet, client: httpx.AsyncClient | None = None, *,
                 clock: Clock = time.monotonic) -> None:
        self.cluster = cluster
        self.clock = clock  # every follower's: the clock the leader table is fed with
        self.nodes: dict[str, F] = {}
        self.rejected: dict[str, int] = {}
        self.on_announcement = on_announcement
        self.on_down = on_down
        self._tasks = tasks
        self._client = client
        self._own_client = client is None
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._retiring: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        ups = [f.up for f in self.nodes.values()]
        counts = f"{ups.count(True)} up, {ups.count(False)} down, {ups.count(None)} unknown"
        return f"<{type(self).__name__} {self.cluster.name} [{len(ups)} nodes: {counts}{self.repr_detail()}]>"

    def repr_detail(self) -> str:
        """More for the repr, after the counts."""
        return ""

    @staticmethod
    def make_client(verify: ssl.SSLContext | None = None) -> httpx.AsyncClient:
        """The control plane's client (`raftlb.control.client.make_client`)."""
        return make_client(verify)

    @abstractmethod
    def make_follower(self, node: NodeConfig, client: httpx.AsyncClient) -> F:
        """The follower of `node`, counting its rejects into `self.rejected`."""

    def needs_restart(self, old: ClusterConfig, new: ClusterConfig) -> bool:
        """On reload: whether every follower must be made again (settings they were made with changed)."""
        return False

    def start(self) -> None:
        """Spawn a follower task for every configured node not yet followed."""
        if self._client is None:
            self._client = self.make_client()
        for node in self.cluster.nodes:
            if node.id not in self.nodes:
                follower = self.make_follower(node, self._client)
                self.nodes[node.id] = follower
                name = f"{self.task_prefix}:{self.cluster.name}:{node.id}"
                self._running[node.id] = self._tasks.spawn(follower.run(), name=name)

    def update(self, cluster: ClusterConfig) -> None:
        """Hot reload: follow new nodes, stop removed or re-addressed ones, keep the rest (new timeouts)."""
        restart = self.needs_restart(self.cluster, cluster)
        self.cluster = cluster
        wanted = {n.id: n for n in cluster.nodes}
        for node_id, follower in list(self.nodes.items()):
            if wanted.get(node_id) == follower.node and not restart:
                follower.cluster = cluster
            else:
                self._stop_node(node_id)
        if self._client is not None:  # started
            self.start()

    async def stop(self) -> None:
        """1. cancel every node task; 2. wait (bounded) so their connections close; 3. close our own
        client."""
        for node_id in list(self.nodes):
            self._stop_node(node_id)
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=5.0)
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _stop_node(self, node_id: str) -> None:
        del self.nodes[node_id]
        task = self._running.pop(node_id)
        task.cancel()
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
