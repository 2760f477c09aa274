"""The shared polling loop: one task per node asks the node's own status API and feeds the leader table.

For clusters whose nodes do not push raft-announce/1 (etcd, anything with a JSON status endpoint). A
`NodeAdapter` knows one kind of node: it makes one status request and turns the answer into an
`Announcement`. `NodePoller` runs it every `poll_interval` (start to start, on a kept-alive connection),
numbers the announcements (`seq`), and reports the node down once when no poll has succeeded for
`liveness_timeout`, or at once when the node refuses connections (nothing listens there: it is not
serving). `PollingSubscriptions` offers the interface of `ClusterSubscriptions` (start, update, stop,
`nodes`, `rejected`), so the server, admin, metrics and reload treat both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol

import httpx

from raftlb.burstlog import BurstLog
from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.stream import ClusterSubscriptions, OnAnnouncement, OnDown
from raftlb.core.leader_table import MAX_UINT64, Announcement
from raftlb.tasks import TaskSet

log = logging.getLogger("raftlb.control.kinds")

JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}


class PollFailed(Exception):
    """The status request failed (refused, timed out, not 200): the poller backs off and retries."""


class StatusError(Exception):
    """The node answered, but not with a usable status. `reason` names the counter (`rejected`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise StatusError("malformed_json", f"{type(exc).__name__}: {exc}") from None


def as_index(value: object, name: str) -> int:
    """A uint64 from JSON: a number, or a decimal string (etcd and Consul send 64-bit numbers as strings).
    StatusError names the field otherwise."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        value = int(value)  # (20 digits at most: int() refuses more than 4300, and uint64 has 20)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_UINT64:
        return value
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    raise StatusError("invalid_fields", f"{name}: must be a non-negative integer below 2**64, got {shown}")


class NodeAdapter(ABC):
    """Reads one node's status through its native API at `base_url` (the node's announce_url when raftlb
    polls, its client url when a sidecar beside it does)."""

    def __init__(self, node: NodeConfig, base_url: str) -> None:
        self.node = node
        self.base_url = base_url.rstrip("/")

    @abstractmethod
    async def poll(self, client: httpx.AsyncClient, timeout: httpx.Timeout) -> Announcement:
        """One status request. PollFailed (or an httpx error) when it failed, StatusError when the answer
        cannot be used. The announcement's seq and ts_ms are set by the poller."""

    def check(self, resp: httpx.Response) -> bytes:
        if resp.status_code != 200:
            raise PollFailed(f"answered HTTP {resp.status_code}")
        return resp.content


class NodeStatus(Protocol):
    """What admin and metrics read from a node's subscription, whichever kind follows it."""

    @property
    def mode(self) -> str: ...
    @property
    def up(self) -> bool | None: ...
    @property
    def last_error(self) -> str: ...
    @property
    def announcements(self) -> int: ...
    @property
    def connects(self) -> int: ...


class Subscriptions(Protocol):
    """The subscriptions of one cluster, as the server, admin, metrics and reload use them."""

    @property
    def nodes(self) -> Mapping[str, NodeStatus]: ...
    @property
    def rejected(self) -> Mapping[str, int]: ...
    def start(self) -> None: ...
    def update(self, cluster: ClusterConfig) -> None: ...
    async def stop(self) -> None: ...


class NodePoller:
    """Polls one node through its adapter until cancelled (see the module doc). `up` is None until the
    first successful poll or the first liveness timeout."""

    mode = "poll"
    connects = 0  # no streams here; kept for the admin's and the metrics' view of every node

    def __init__(self, adapter: NodeAdapter, cluster: ClusterConfig, client: httpx.AsyncClient,
                 on_announcement: OnAnnouncement, on_down: OnDown, *, totals: dict[str, int] | None = None,
                 ) -> None:
        self.adapter = adapter
        self.node = adapter.node
        self.cluster = cluster  # replaced on hot reload; intervals and timeouts are read when used
        self.up: bool | None = None
        self.last_heard: float | None = None
        self.last_error = ""
        self.announcements = 0
        self.polls = 0
        self.rejected: dict[str, int] = {}
        self._client = client
        self._on_announcement = on_announcement
        self._on_down = on_down
        self._totals = totals
        self._seq = 0
        self._deadline = 0.0
        self._failures = 0
        self._burst = BurstLog(log)

    def __repr__(self) -> str:
        state = {None: "unknown", True: "up", False: "down"}[self.up]
        return (f"<NodePoller {self.node.id} {type(self.adapter).__name__} {state} "
                f"polls={self.polls} announcements={self.announcements}>")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.cluster.liveness_timeout
        while True:
            started = loop.time()
            if await self.poll_once():
                delay = self.cluster.poll_interval - (loop.time() - started)
            else:
                delay = max(self._backoff_delay(), self.cluster.poll_interval)
            await self._pause(delay)

    async def poll_once(self) -> bool:
        """One poll, bounded by the liveness deadline; True when it delivered an announcement."""
        self.polls += 1
        c = self.cluster
        timeout = httpx.Timeout(c.connect_timeout, read=c.liveness_timeout)
        with self._attempt():
            async with asyncio.timeout_at(self._window()):
                ann = await self.adapter.poll(self._client, timeout)
            self._deliver(ann)
            return True
        return False

    @contextlib.contextmanager
    def _attempt(self) -> Iterator[None]:
        try:
            yield
        except TimeoutError:
            if not (self._failures and self.last_error):  # else: cut short by the deadline, same cause
                self.last_error = "status poll: no answer within the liveness timeout"
        except httpx.ConnectError as exc:
            self.last_error = f"status poll: {_describe(exc)}"
            self._report_down("refuses connections")
        except (httpx.HTTPError, PollFailed) as exc:
            self.last_error = f"status poll: {_describe(exc)}"
        except StatusError as exc:
            self.last_error = f"status poll: {exc.reason}: {exc}"
            self._reject(exc.reason, str(exc))
        except Exception as exc:  # a bug here must not end the node's polling
            self.last_error = f"status poll: {_describe(exc)}"
            self._warn("internal", "node %s: %s", self.last_error, exc_info=True)

    def _window(self) -> float:
        """The loop time by which this poll must succeed: the liveness deadline while the node is up or not
        yet judged; once it is down, a full liveness timeout per attempt."""
        self._check_liveness()
        if self.up is not False:
            return self._deadline
        return asyncio.get_running_loop().time() + self.cluster.liveness_timeout

    def _deliver(self, ann: Announcement) -> None:
        if ann.node != self.node.id:
            self._reject("wrong_node", f"announcement for node {ann.node!r}")
            return
        now = asyncio.get_running_loop().time()
        self._seq += 1
        ann = replace(ann, seq=self._seq, ts_ms=int(time.time() * 1000))
        self.last_heard = now
        self._deadline = now + self.cluster.liveness_timeout
        self._failures = 0
        self.last_error = ""
        self.announcements += 1
        if self.up is not True:
            self.up = True
            log.info("node %s: up (%s at term %d, polled)", self.node.id, ann.role, ann.term)
        try:
            self._on_announcement(self.node.id, ann)
        except Exception:
            self._warn("callback", "node %s: on_announcement failed%s", "", exc_info=True)

    def _check_liveness(self) -> None:
        if self.up is not False and asyncio.get_running_loop().time() >= self._deadline:
            now = asyncio.get_running_loop().time()
            silent = "never heard" if self.last_heard is None else f"silent for {now - self.last_heard:.2f}s"
            self._report_down(silent)

    def _report_down(self, why: str) -> None:
        if self.up is False:
            return
        self.up = False
        reason = f"{why}; {self.last_error}" if self.last_error else why
        log.warning("node %s: down (%s) at %s", self.node.id, reason, self.adapter.base_url)
        try:
            self._on_down(self.node.id, reason)
        except Exception:
            self._warn("callback", "node %s: on_down failed%s", "", exc_info=True)

    def _backoff_delay(self) -> float:
        c = self.cluster
        base = min(c.reconnect_max, c.reconnect_min * 2.0 ** min(self._failures, 30))
        self._failures += 1
        return base / 2 + random.uniform(0, base / 2)

    async def _pause(self, delay: float) -> None:
        """Sleep `delay` seconds, reporting the node down meanwhile if its deadline passes."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, delay)
        while True:
            self._check_liveness()
            now = loop.time()
            if now >= end:
                return
            await asyncio.sleep((end if self.up is False else min(end, self._deadline)) - now)

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._totals is not None:
            self._totals[reason] = self._totals.get(reason, 0) + 1
        self._warn(reason, "node %s: unusable status: %s", detail)

    def _warn(self, key: str, msg: str, detail: str, exc_info: bool = False) -> None:
        """Log at WARNING at most once per LOG_INTERVAL per key, saying how many were held back."""
        self._burst.warning(key, msg + "%s", self.node.id, detail, exc_info=exc_info)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class PollingSubscriptions(ABC):
    """The pollers of one cluster: one NodePoller task per node, spawned through `tasks`. Subclasses make
    the adapter for each node. Same interface as ClusterSubscriptions; with no `client`, one is made on
    start and closed on stop."""

    def __init__(self, cluster: ClusterConfig, on_announcement: OnAnnouncement, on_down: OnDown,
                 tasks: TaskSet, client: httpx.AsyncClient | None = None) -> None:
        self.cluster = cluster
        self.nodes: dict[str, NodePoller] = {}
        self.rejected: dict[str, int] = {}
        self._on_announcement = on_announcement
        self._on_down = on_down
        self._tasks = tasks
        self._client = client
        self._own_client = client is None
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._retiring: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        ups = [p.up for p in self.nodes.values()]
        counts = f"{ups.count(True)} up, {ups.count(False)} down, {ups.count(None)} unknown"
        return f"<{type(self).__name__} {self.cluster.name} [{len(ups)} nodes: {counts}]>"

    @abstractmethod
    def make_adapter(self, node: NodeConfig) -> NodeAdapter:
        """The adapter that reads `node`'s status at its announce_url."""

    def needs_restart(self, old: ClusterConfig, new: ClusterConfig) -> bool:
        """On reload: whether every poller must be made again (adapter settings changed)."""
        return False

    def start(self) -> None:
        """Spawn a poller task for every configured node not yet followed."""
        if self._client is None:
            self._client = ClusterSubscriptions.make_client()
        for node in self.cluster.nodes:
            if node.id not in self.nodes:
                poller = NodePoller(self.make_adapter(node), self.cluster, self._client,
                                    self._on_announcement, self._on_down, totals=self.rejected)
                self.nodes[node.id] = poller
                name = f"poll:{self.cluster.name}:{node.id}"
                self._running[node.id] = self._tasks.spawn(poller.run(), name=name)

    def update(self, cluster: ClusterConfig) -> None:
        """Hot reload: poll new nodes, stop removed or re-addressed ones, keep the rest (new timeouts)."""
        restart = self.needs_restart(self.cluster, cluster)
        self.cluster = cluster
        wanted = {n.id: n for n in cluster.nodes}
        for node_id, poller in list(self.nodes.items()):
            if wanted.get(node_id) == poller.node and not restart:
                poller.cluster = cluster
            else:
                self._stop_node(node_id)
        if self._client is not None:  # started
            self.start()

    async def stop(self) -> None:
        """1. cancel every poller; 2. wait (bounded) for them; 3. close our own client."""
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
