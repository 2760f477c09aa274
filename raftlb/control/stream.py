"""Subscriptions: one task per node that follows its announcements and feeds the leader table.

Streams `GET /raft/announce` (docs/protocol.md), or polls `GET /raft/status` for nodes that answer
the stream with 404/405. Input that is not a valid announcement from this node (malformed JSON, bad fields,
another node's id, a `seq` that does not rise on one stream, a bad `sig`, an oversized event) is dropped,
counted by reason and logged at most once per LOG_INTERVAL per node and reason: nothing a node sends ends
its subscription. The data path never awaits anything here; it reads the table these callbacks feed.
Liveness, backoff, rejects and the per-node tasks are the follower base's (raftlb.control.follower);
checking a signed announcement is raftlb.core.announcement's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.follower import Clock, FollowerSet, NodeFollower, OnAnnouncement, OnDown, describe
from raftlb.core.announcement import Announcement, is_recent, verify
from raftlb.tasks import TaskSet

log = logging.getLogger("raftlb.control.stream")

STREAM_RETRY_INTERVAL = 30.0  # a polled node is offered the stream again this often
MAX_EVENT_BYTES = 64 * 1024  # no announcement is this long; a stream sending one is cut
ANNOUNCE_EVENT_TYPES = frozenset({"message", "announce"})  # other event types are ignored, not rejected
_EOL = re.compile(rb"\r\n|\r|\n")


class StreamError(Exception):
    """The announce stream or status answer cannot be used; the subscription backs off and retries."""


class EventTooLarge(StreamError):
    """A line or event longer than any announcement: the stream is cut."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str  # "message" unless the stream named it
    data: str
    id: str  # the last event id seen on the stream


class SSEParser:
    """Incremental text/event-stream decoder (HTML Living Standard, "Interpreting an event stream").

    Bytes in, events out. Lines end in CRLF, LF or a lone CR, also when split across chunks; `data:` lines
    are joined with LF; `:` lines are comments; a blank line dispatches; `retry:` and unknown fields are
    ignored. Raises EventTooLarge when a line or an event grows past `max_bytes`.
    """

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self.last_id = ""
        self._max = max_bytes
        self._buf = bytearray()
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._first_line = True
        self._data: list[str] = []
        self._size = 0
        self._event = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        if chunk:
            self._skip_lf = False
        self._buf += chunk
        events: list[SSEEvent] = []
        pos = 0
        for m in _EOL.finditer(self._buf):
            event = self._line(bytes(self._buf[pos : m.start()]))
            pos = m.end()
            if event is not None:
                events.append(event)
        if pos and pos == len(self._buf) and self._buf.endswith(b"\r"):
            self._skip_lf = True
        del self._buf[:pos]
        if len(self._buf) > self._max:
            raise EventTooLarge(f"line longer than {self._max} bytes")
        return events

    def _line(self, raw: bytes) -> SSEEvent | None:
        line = raw.decode("utf-8", "replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._size += len(value) + 1
            if self._size > self._max:
                raise EventTooLarge(f"event longer than {self._max} bytes")
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event or "message"
        self._data, self._size, self._event = [], 0, ""
        return SSEEvent(event, "\n".join(data), self.last_id) if data else None


class NodeSubscription(NodeFollower):
    """Follows one node: streams GET {announce_url}/raft/announce, reconnecting with jittered exponential
    backoff (cluster.reconnect_min..reconnect_max); polls GET {announce_url}/raft/status every
    cluster.poll_interval when the stream is answered with 404 or 405, offering the stream again every
    `stream_retry_interval`. A node without a valid announcement for cluster.liveness_timeout (a silent
    stream, failing polls, no connection) is reported via on_down once, and its stream is reconnected.

    `up` is None until the first announcement or the first liveness timeout, then True or False.
    With `key`, only events whose `sig` verifies are accepted.
    """

    def __init__(
        self, node: NodeConfig, cluster: ClusterConfig, client: httpx.AsyncClient,
        on_announcement: OnAnnouncement, on_down: OnDown, *, key: bytes | None = None,
        totals: dict[str, int] | None = None, stream_retry_interval: float = STREAM_RETRY_INTERVAL,
        clock: Clock = time.monotonic,
    ) -> None:
        announce_url = node.announce_url.rstrip("/") + "/raft/announce"
        super().__init__(node, cluster, client, on_announcement, on_down, logger=log, where=announce_url,
                         totals=totals, clock=clock)
        self.stream_retry_interval = stream_retry_interval
        self.mode = "stream"  # or "poll"
        self.connects = 0  # announce streams opened
        self._key = key
        self._last_seq: int | None = None  # on the current stream

    def __repr__(self) -> str:
        rejected = sum(self.rejected.values())
        counts = f"announcements={self.announcements} connects={self.connects} rejected={rejected}"
        return f"<NodeSubscription {self.node.id} {self.mode} {self.state()} {counts}>"

    async def follow(self) -> None:
        while True:
            if self.mode == "poll":
                await self._poll_for(self.stream_retry_interval)
            await self._stream_once()

    def via(self) -> str:
        return self.mode

    def _timeout(self) -> httpx.Timeout:
        # A read waiting longer than the liveness timeout means a silent node.
        return httpx.Timeout(self.cluster.connect_timeout, read=self.cluster.liveness_timeout)

    def _url(self, path: str) -> str:
        return self.node.announce_url.rstrip("/") + path

    @contextlib.contextmanager
    def _attempt(self, what: str) -> Iterator[None]:
        """Turn whatever ends a stream or a poll into `last_error`: the caller backs off and retries."""
        try:
            yield
        except TimeoutError:
            self.last_error = f"{what}: no announcement within the liveness timeout"
        except (httpx.HTTPError, StreamError) as exc:
            self.last_error = f"{what}: {describe(exc)}"
            if isinstance(exc, EventTooLarge):
                self.reject("oversized", self.last_error)
        except Exception as exc:  # a bug here must not end the node's subscription
            self.last_error = f"{what}: {describe(exc)}"
            self.warn("internal", "node %s: %s", self.last_error, exc_info=True)

    async def _stream_once(self) -> None:
        """Open the announce stream and follow it until it fails or falls silent, then back off."""
        loop = asyncio.get_running_loop()
        parser = SSEParser()
        self._last_seq = None
        headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
        with self._attempt("announce stream"):
            async with (
                asyncio.timeout(self.time_left()) as scope,
                self.client.stream("GET", self.where, headers=headers, timeout=self._timeout()) as resp,
            ):
                if resp.status_code in (404, 405):
                    if self.mode != "poll":
                        msg = "node %s: announce stream answered %d; polling /raft/status every %ss"
                        log.info(msg, self.node.id, resp.status_code, self.cluster.poll_interval)
                    self.mode = "poll"
                    return
                ctype = resp.headers.get("content-type", "")
                if resp.status_code != 200 or not ctype.startswith("text/event-stream"):
                    raise StreamError(f"answered HTTP {resp.status_code} {ctype}")
                if self.mode == "poll":
                    log.info("node %s: announce stream available, polling stops", self.node.id)
                self.mode = "stream"
                self.connects += 1
                async for chunk in resp.aiter_bytes():
                    for event in parser.feed(chunk):
                        if self._on_event(event):
                            # (the scope runs on the loop's clock; time_left is in seconds from now)
                            scope.reschedule(loop.time() + self.time_left())
                raise StreamError("ended")
        log.debug("node %s: %s", self.node.id, self.last_error)
        if self.mode == "stream":
            await self.pause(self.backoff_delay())

    async def _poll_for(self, duration: float) -> None:
        """Poll /raft/status every poll_interval (backing off while it fails) for `duration` seconds."""
        until = self.clock() + duration
        while self.clock() < until:
            ok = False
            with self._attempt("status poll"):
                async with asyncio.timeout(self.time_left()):
                    resp = await self.client.get(self._url("/raft/status"), timeout=self._timeout())
                if resp.status_code != 200:
                    raise StreamError(f"answered HTTP {resp.status_code}")
                ann = self._parse(resp.content)
                if ann is not None:
                    self.deliver(ann)
                    ok = True
            interval = self.cluster.poll_interval
            delay = interval if ok else max(self.backoff_delay(), interval)
            await self.pause(min(delay, max(0.0, until - self.clock())))

    def _on_event(self, event: SSEEvent) -> bool:
        """Handle one stream event; True when it was a valid announcement."""
        if event.event not in ANNOUNCE_EVENT_TYPES:
            return False
        ann = self._parse(event.data)
        if ann is None:
            return False
        if ann.seq is not None:
            if self._last_seq is not None and ann.seq <= self._last_seq:
                self.reject("seq_backwards", f"seq {ann.seq} after {self._last_seq}")
                return False
            self._last_seq = ann.seq
        self.deliver(ann)
        return True

    def _parse(self, data: str | bytes) -> Announcement | None:
        """Decode and check one announcement; None (counted, logged) when it is not acceptable."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            self.reject("malformed_json", describe(exc))
            return None
        keys = self.cluster.announce_keys or ((self._key,) if self._key is not None else ())
        if keys:
            if not verify(doc, keys):
                self.reject("bad_signature", "missing or wrong sig")
                return None
            # Replay protection: seq must rise on a stream (checked by the caller), and a signed event must
            # be recent, so an old recording replayed on a new connection is refused.
            ts, skew = doc.get("ts_ms"), self.cluster.announce_max_skew
            if not is_recent(ts, time.time() * 1000, skew):
                self.reject("replayed", f"ts_ms {ts!r} is more than {skew:g}s from now")
                return None
        try:
            ann = Announcement.from_json(doc)
        except (ValueError, TypeError) as exc:
            self.reject("invalid_fields", describe(exc))
            return None
        if ann.node != self.node.id:
            self.reject("wrong_node", f"announcement for node {ann.node!r}")
            return None
        return ann


class ClusterSubscriptions(FollowerSet[NodeSubscription]):
    """The subscriptions of one cluster: one NodeSubscription task per node, spawned through `tasks`.

    `on_announcement(node_id, ann)` and `on_down(node_id, reason)` are called synchronously from the node's
    task. `rejected` counts dropped input per reason over the cluster's lifetime (monotonic, for metrics);
    `nodes` maps node id to its live NodeSubscription. With no `client`, one is made (`make_client()`) on
    start and closed on stop.
    """

    task_prefix = "subscribe"

    def __init__(
        self, cluster: ClusterConfig, on_announcement: OnAnnouncement, on_down: OnDown, tasks: TaskSet,
        client: httpx.AsyncClient | None = None, *, key: bytes | None = None,
        stream_retry_interval: float = STREAM_RETRY_INTERVAL, clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(cluster, on_announcement, on_down, tasks, client, clock=clock)
        self._key = key
        self._stream_retry_interval = stream_retry_interval

    def repr_detail(self) -> str:
        return f"; {sum(s.mode == 'poll' for s in self.nodes.values())} polling"

    def make_follower(self, node: NodeConfig, client: httpx.AsyncClient) -> NodeSubscription:
        return NodeSubscription(
            node, self.cluster, client, self.on_announcement, self.on_down, key=self._key,
            totals=self.rejected, stream_retry_interval=self._stream_retry_interval, clock=self.clock,
        )  # fmt: skip
