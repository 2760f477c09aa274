"""Subscriptions: one task per node that follows its announcements and feeds the leader table.

Streams `GET /raft/announce` (docs/protocol.md), or polls `GET /raft/status` for nodes that answer
the stream with 404/405. Input that is not a valid announcement from this node (malformed JSON, bad fields,
another node's id, a `seq` that does not rise on one stream, a bad `sig`, an oversized event) is dropped,
counted by reason and logged at most once per LOG_INTERVAL per node and reason: nothing a node sends ends
its subscription. The data path never awaits anything here; it reads the table these callbacks feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from raftlb.burstlog import BurstLog
from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.client import make_client
from raftlb.core.leader_table import MAX_UINT64, Announcement
from raftlb.tasks import TaskSet

log = logging.getLogger("raftlb.control.stream")

OnAnnouncement = Callable[[str, Announcement], None]
OnDown = Callable[[str, str], None]

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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def signature(doc: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 (hex) over the event without `sig`, serialized with sorted keys and no spaces."""
    body = json.dumps({k: v for k, v in doc.items() if k != "sig"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


class NodeSubscription:
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
    ) -> None:
        self.node = node
        self.cluster = cluster  # replaced on hot reload; timeouts are read from it when used
        self.stream_retry_interval = stream_retry_interval
        self.mode = "stream"  # or "poll"
        self.up: bool | None = None
        self.last_heard: float | None = None  # loop time of the last valid announcement
        self.last_error = ""
        self.announcements = 0
        self.connects = 0  # announce streams opened
        self.rejected: dict[str, int] = {}
        self._client = client
        self._on_announcement = on_announcement
        self._on_down = on_down
        self._key = key
        self._totals = totals  # the cluster-wide rejected counts, which outlive this subscription
        self._deadline = 0.0  # loop time by which the next valid announcement must arrive
        self._failures = 0  # in a row, for the backoff
        self._last_seq: int | None = None  # on the current stream
        self._burst = BurstLog(log)

    def __repr__(self) -> str:
        state = {None: "unknown", True: "up", False: "down"}[self.up]
        rejected = sum(self.rejected.values())
        counts = f"announcements={self.announcements} connects={self.connects} rejected={rejected}"
        return f"<NodeSubscription {self.node.id} {self.mode} {state} {counts}>"

    async def run(self) -> None:
        """Follow the node until cancelled."""
        self._deadline = asyncio.get_running_loop().time() + self.cluster.liveness_timeout
        while True:
            if self.mode == "poll":
                await self._poll_for(self.stream_retry_interval)
            await self._stream_once()

    def _timeout(self) -> httpx.Timeout:
        # A read waiting longer than the liveness timeout means a silent node.
        return httpx.Timeout(self.cluster.connect_timeout, read=self.cluster.liveness_timeout)

    def _window(self) -> float:
        """The loop time by which the current attempt must deliver a valid announcement: the liveness
        deadline while the node is up or not yet judged; once it is down, a full window per attempt."""
        self._check_liveness()
        if self.up is not False:
            return self._deadline
        return asyncio.get_running_loop().time() + self.cluster.liveness_timeout

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
            self.last_error = f"{what}: {_describe(exc)}"
            if isinstance(exc, EventTooLarge):
                self._reject("oversized", self.last_error)
        except Exception as exc:  # a bug here must not end the node's subscription
            self.last_error = f"{what}: {_describe(exc)}"
            self._warn("internal", "node %s: %s", self.last_error, exc_info=True)

    async def _stream_once(self) -> None:
        """Open the announce stream and follow it until it fails or falls silent, then back off."""
        parser = SSEParser()
        self._last_seq = None
        headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
        url = self._url("/raft/announce")
        with self._attempt("announce stream"):
            async with (
                asyncio.timeout_at(self._window()) as scope,
                self._client.stream("GET", url, headers=headers, timeout=self._timeout()) as resp,
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
                            scope.reschedule(self._deadline)
                raise StreamError("ended")
        log.debug("node %s: %s", self.node.id, self.last_error)
        if self.mode == "stream":
            await self._pause(self._backoff_delay())

    async def _poll_for(self, duration: float) -> None:
        """Poll /raft/status every poll_interval (backing off while it fails) for `duration` seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + duration
        while loop.time() < until:
            ok = False
            with self._attempt("status poll"):
                async with asyncio.timeout_at(self._window()):
                    resp = await self._client.get(self._url("/raft/status"), timeout=self._timeout())
                if resp.status_code != 200:
                    raise StreamError(f"answered HTTP {resp.status_code}")
                ann = self._parse(resp.content)
                if ann is not None:
                    self._deliver(ann)
                    ok = True
            interval = self.cluster.poll_interval
            delay = interval if ok else max(self._backoff_delay(), interval)
            await self._pause(min(delay, max(0.0, until - loop.time())))

    def _on_event(self, event: SSEEvent) -> bool:
        """Handle one stream event; True when it was a valid announcement."""
        if event.event not in ANNOUNCE_EVENT_TYPES:
            return False
        ann = self._parse(event.data)
        if ann is None:
            return False
        if ann.seq is not None:
            if self._last_seq is not None and ann.seq <= self._last_seq:
                self._reject("seq_backwards", f"seq {ann.seq} after {self._last_seq}")
                return False
            self._last_seq = ann.seq
        self._deliver(ann)
        return True

    def _parse(self, data: str | bytes) -> Announcement | None:
        """Decode and check one announcement; None (counted, logged) when it is not acceptable."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            self._reject("malformed_json", _describe(exc))
            return None
        keys = self.cluster.announce_keys or ((self._key,) if self._key is not None else ())
        if keys:
            sig = doc.get("sig") if isinstance(doc, dict) else None
            # Any configured key verifies: during a rotation both the old and the new one are accepted.
            # compare_digest raises TypeError on a non-ASCII str: such a sig is simply wrong.
            if (not isinstance(sig, str) or not sig.isascii()
                    or not any(hmac.compare_digest(sig, signature(doc, k)) for k in keys)):
                self._reject("bad_signature", "missing or wrong sig")
                return None
            # Replay protection: seq must rise on a stream (checked by the caller), and a signed event must
            # be recent, so an old recording replayed on a new connection is refused.
            ts = doc.get("ts_ms")
            skew = self.cluster.announce_max_skew
            # (Range first: an int too large for a float would raise OverflowError in the subtraction.)
            if (not isinstance(ts, int) or not 0 <= ts <= MAX_UINT64
                    or abs(time.time() * 1000 - ts) > skew * 1000):
                self._reject("replayed", f"ts_ms {ts!r} is more than {skew:g}s from now")
                return None
        try:
            ann = Announcement.from_json(doc)
        except (ValueError, TypeError) as exc:
            self._reject("invalid_fields", _describe(exc))
            return None
        if ann.node != self.node.id:
            self._reject("wrong_node", f"announcement for node {ann.node!r}")
            return None
        return ann

    def _deliver(self, ann: Announcement) -> None:
        now = asyncio.get_running_loop().time()
        self.last_heard = now
        self._deadline = now + self.cluster.liveness_timeout
        self._failures = 0
        self.last_error = ""  # it is heard: an error from before is history, not its state (as in NodePoller)
        self.announcements += 1
        if self.up is not True:
            self.up = True
            log.info("node %s: up (%s at term %d, %s)", self.node.id, ann.role, ann.term, self.mode)
        try:
            self._on_announcement(self.node.id, ann)
        except Exception:
            self._warn("callback", "node %s: on_announcement failed%s", "", exc_info=True)

    def _check_liveness(self) -> None:
        """Report the node down, once, when its deadline has passed without a valid announcement."""
        now = asyncio.get_running_loop().time()
        if self.up is False or now < self._deadline:
            return
        self.up = False
        silent = "never heard" if self.last_heard is None else f"silent for {now - self.last_heard:.2f}s"
        reason = f"{silent}; {self.last_error}" if self.last_error else silent
        log.warning("node %s: down (%s) at %s", self.node.id, reason, self._url("/raft/announce"))
        try:
            self._on_down(self.node.id, reason)
        except Exception:
            self._warn("callback", "node %s: on_down failed%s", "", exc_info=True)

    def _backoff_delay(self) -> float:
        """Exponential in the failures in a row, capped, with the upper half jittered."""
        c = self.cluster
        base = min(c.reconnect_max, c.reconnect_min * 2.0 ** min(self._failures, 30))
        self._failures += 1
        return base / 2 + random.uniform(0, base / 2)

    async def _pause(self, delay: float) -> None:
        """Sleep `delay` seconds, reporting the node down meanwhile if its deadline passes."""
        loop = asyncio.get_running_loop()
        end = loop.time() + delay
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
        self._warn(reason, "node %s: rejected announcement: %s", detail)

    def _warn(self, key: str, msg: str, detail: str, exc_info: bool = False) -> None:
        """Log at WARNING at most once per LOG_INTERVAL per key, saying how many were held back."""
        self._burst.warning(key, msg + "%s", self.node.id, detail, exc_info=exc_info)


class ClusterSubscriptions:
    """The subscriptions of one cluster: one NodeSubscription task per node, spawned through `tasks`.

    `on_announcement(node_id, ann)` and `on_down(node_id, reason)` are called synchronously from the node's
    task. `rejected` counts dropped input per reason over the cluster's lifetime (monotonic, for metrics);
    `nodes` maps node id to its live NodeSubscription. With no `client`, one is made (`make_client()`) on
    start and closed on stop.
    """

    def __init__(
        self, cluster: ClusterConfig, on_announcement: OnAnnouncement, on_down: OnDown, tasks: TaskSet,
        client: httpx.AsyncClient | None = None, *, key: bytes | None = None,
        stream_retry_interval: float = STREAM_RETRY_INTERVAL,
    ) -> None:
        self.cluster = cluster
        self.nodes: dict[str, NodeSubscription] = {}
        self.rejected: dict[str, int] = {}
        self._on_announcement = on_announcement
        self._on_down = on_down
        self._tasks = tasks
        self._client = client
        self._own_client = client is None
        self._key = key
        self._stream_retry_interval = stream_retry_interval
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._retiring: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        ups = [s.up for s in self.nodes.values()]
        polling = sum(s.mode == "poll" for s in self.nodes.values())
        counts = f"{ups.count(True)} up, {ups.count(False)} down, {ups.count(None)} unknown"
        return f"<ClusterSubscriptions {self.cluster.name} [{len(ups)} nodes: {counts}; {polling} polling]>"

    @staticmethod
    def make_client(verify: ssl.SSLContext | None = None) -> httpx.AsyncClient:
        """The control plane's client (`raftlb.control.client.make_client`)."""
        return make_client(verify)

    def start(self) -> None:
        """Spawn a subscription task for every configured node not yet followed."""
        if self._client is None:
            self._client = self.make_client()
        for node in self.cluster.nodes:
            if node.id not in self.nodes:
                sub = NodeSubscription(
                    node, self.cluster, self._client, self._on_announcement, self._on_down, key=self._key,
                    totals=self.rejected, stream_retry_interval=self._stream_retry_interval,
                )  # fmt: skip
                self.nodes[node.id] = sub
                name = f"subscribe:{self.cluster.name}:{node.id}"
                self._running[node.id] = self._tasks.spawn(sub.run(), name=name)

    def update(self, cluster: ClusterConfig) -> None:
        """Hot reload: follow new nodes, stop removed or re-addressed ones, keep the rest (new timeouts)."""
        self.cluster = cluster
        wanted = {n.id: n for n in cluster.nodes}
        for node_id, sub in list(self.nodes.items()):
            if wanted.get(node_id) == sub.node:
                sub.cluster = cluster
            else:
                self._stop_node(node_id)
        if self._client is not None:  # started
            self.start()

    async def stop(self) -> None:
        """1. cancel every node task; 2. wait (bounded) so their streams close; 3. close our own client."""
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
