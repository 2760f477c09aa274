"""The shared polling loop: one task per node asks the node's own status API and feeds the leader table.

For clusters whose nodes do not push raft-announce/1 (etcd, anything with a JSON status endpoint). A
`NodeAdapter` knows one kind of node: it makes one status request and turns the answer into an
`Announcement`. `NodePoller` runs it every `poll_interval` (start to start, on a kept-alive connection),
numbers the announcements (`seq`), and reports the node down once when no poll has succeeded for
`liveness_timeout`, or at once when the node refuses connections (nothing listens there: it is not
serving). Liveness, backoff and rejects are the follower base's (raftlb.control.follower), shared with the
announce-stream follower; `PollingSubscriptions` is a `FollowerSet` like `ClusterSubscriptions` (start,
update, stop, `nodes`, `rejected`), so the server, admin, metrics and reload treat both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol

import httpx

from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.follower import Clock, FollowerSet, NodeFollower, OnAnnouncement, OnDown, describe
from raftlb.core.announcement import Announcement, is_uint64

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
    if is_uint64(value):
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


class NodePoller(NodeFollower):
    """Polls one node through its adapter until cancelled (see the module doc). `up` is None until the
    first successful poll or the first liveness timeout."""

    mode = "poll"
    connects = 0  # no streams here; kept for the admin's and the metrics' view of every node
    reject_message = "unusable status"

    def __init__(self, adapter: NodeAdapter, cluster: ClusterConfig, client: httpx.AsyncClient,
                 on_announcement: OnAnnouncement, on_down: OnDown, *, totals: dict[str, int] | None = None,
                 clock: Clock = time.monotonic) -> None:
        super().__init__(adapter.node, cluster, client, on_announcement, on_down, logger=log,
                         where=adapter.base_url, totals=totals, clock=clock)
        self.adapter = adapter
        self.polls = 0
        self._seq = 0

    def __repr__(self) -> str:
        return (f"<NodePoller {self.node.id} {type(self.adapter).__name__} {self.state()} "
                f"polls={self.polls} announcements={self.announcements}>")

    async def follow(self) -> None:
        while True:
            started = self.clock()
            if await self.poll_once():
                delay = self.cluster.poll_interval - (self.clock() - started)
            else:
                delay = max(self.backoff_delay(), self.cluster.poll_interval)
            await self.pause(delay)

    def via(self) -> str:
        return "polled"

    async def poll_once(self) -> bool:
        """One poll, bounded by the liveness deadline; True when it delivered an announcement."""
        self.polls += 1
        c = self.cluster
        timeout = httpx.Timeout(c.connect_timeout, read=c.liveness_timeout)
        with self._attempt():
            async with asyncio.timeout(self.time_left()):
                ann = await self.adapter.poll(self.client, timeout)
            self.deliver(ann)
            return True
        return False

    @contextlib.contextmanager
    def _attempt(self) -> Iterator[None]:
        try:
            yield
        except TimeoutError:
            if not (self.failures and self.last_error):  # else: cut short by the deadline, same cause
                self.last_error = "status poll: no answer within the liveness timeout"
        except httpx.ConnectError as exc:
            self.last_error = f"status poll: {describe(exc)}"
            self.report_down("refuses connections")
        except (httpx.HTTPError, PollFailed) as exc:
            self.last_error = f"status poll: {describe(exc)}"
        except StatusError as exc:
            self.last_error = f"status poll: {exc.reason}: {exc}"
            self.reject(exc.reason, str(exc))
        except Exception as exc:  # a bug here must not end the node's polling
            self.last_error = f"status poll: {describe(exc)}"
            self.warn("internal", "node %s: %s", self.last_error, exc_info=True)

    def deliver(self, ann: Announcement) -> None:
        """The adapter's announcement, numbered (`seq`) and stamped (`ts_ms`) here, if it is this node's."""
        if ann.node != self.node.id:
            self.reject("wrong_node", f"announcement for node {ann.node!r}")
            return
        self._seq += 1
        super().deliver(replace(ann, seq=self._seq, ts_ms=int(time.time() * 1000)))


class PollingSubscriptions(FollowerSet[NodePoller]):
    """The pollers of one cluster: one NodePoller task per node, spawned through `tasks`. Subclasses make
    the adapter for each node. Same interface as ClusterSubscriptions; with no `client`, one is made on
    start and closed on stop."""

    task_prefix = "poll"

    @abstractmethod
    def make_adapter(self, node: NodeConfig) -> NodeAdapter:
        """The adapter that reads `node`'s status at its announce_url."""

    def make_follower(self, node: NodeConfig, client: httpx.AsyncClient) -> NodePoller:
        return NodePoller(self.make_adapter(node), self.cluster, client, self.on_announcement, self.on_down,
                          totals=self.rejected, clock=self.clock)
