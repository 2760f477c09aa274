"""The event bus behind `GET /v1/events`: leader changes, node up/down, config reloads, draining.

Publishers call `publish()` synchronously from the event loop (leader-change listeners, subscription
callbacks, the reloader); each `EventSubscriber` (one per SSE client) gets every later event in order.
The bus keeps the last `history` events, so a client that reconnects with `Last-Event-ID` (EventSource does
it by itself) misses nothing, and a new status page can draw the recent timeline. A subscriber that falls
`max_queue` events behind is dropped (its stream ends; it reconnects and resumes from the history) rather
than letting one slow client hold memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from raftlb.core.leader_table import Announcement, LeaderChange

log = logging.getLogger("raftlb.ops.events")

OnAnnouncement = Callable[[str, Announcement], None]
OnDown = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Event:
    """One published event; `id` rises by one per event for the lifetime of the process."""

    id: int
    type: str  # leader_change | node_up | node_down | config_reload | draining
    ts_ms: int  # wall clock, for humans and timelines
    data: dict[str, object]

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "type": self.type, "ts_ms": self.ts_ms, **self.data}

    def sse(self) -> bytes:
        """The text/event-stream frame: `id`, `event` (the type) and one `data` line of JSON."""
        body = json.dumps(self.to_json(), separators=(",", ":"))
        return f"id: {self.id}\nevent: {self.type}\ndata: {body}\n\n".encode()


class EventSubscriber:
    """One consumer's queue. `next()` waits for the next event; None on timeout, or once `closed`."""

    def __init__(self, max_queue: int) -> None:
        self.queue: deque[Event] = deque()
        self.max_queue = max_queue
        self.closed = False
        self.overflowed = False
        self._ready = asyncio.Event()

    def __repr__(self) -> str:
        return f"<EventSubscriber queued={len(self.queue)} closed={self.closed}>"

    def put(self, event: Event) -> None:
        if self.closed:
            return
        if len(self.queue) >= self.max_queue:
            self.overflowed = True
            self.close()
            return
        self.queue.append(event)
        self._ready.set()

    def replay(self, events: list[Event]) -> None:
        """Queue retained events for a new subscriber (at most the history, which max_queue covers)."""
        self.queue.extend(events)
        if events:
            self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    def drain(self) -> list[Event]:
        """Every queued event, oldest first."""
        events = list(self.queue)
        self.queue.clear()
        if not self.closed:
            self._ready.clear()
        return events

    async def next(self, timeout: float) -> list[Event] | None:
        """The queued events (at least one), or None after `timeout` seconds without any or once closed."""
        if not self.queue and not self.closed:
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return None
        if self.closed:
            return None
        return self.drain()


class EventBus:
    """In-process publish/subscribe with a bounded history (see the module doc)."""

    def __init__(self, history: int = 512, max_queue: int = 1024) -> None:
        self.history: deque[Event] = deque(maxlen=history)
        self.subscribers: set[EventSubscriber] = set()
        self.max_queue = max(max_queue, history)  # a full replay must fit
        self.closed = False
        self._next_id = 1
        self._node_up: dict[tuple[str, str], bool] = {}

    def __repr__(self) -> str:
        return f"<EventBus next_id={self._next_id} [{len(self.subscribers)} subscribers]>"

    def publish(self, type_: str, **data: object) -> Event:
        event = Event(self._next_id, type_, int(time.time() * 1000), data)
        self._next_id += 1
        self.history.append(event)
        for sub in list(self.subscribers):
            sub.put(event)
            if sub.overflowed:
                self.subscribers.discard(sub)
                log.warning("event subscriber %d events behind: dropped (it may reconnect)", sub.max_queue)
        return event

    def subscribe(self, after: int | None = None) -> EventSubscriber:
        """A new subscriber; with `after`, the retained events with a higher id are queued for it first."""
        sub = EventSubscriber(self.max_queue)
        if self.closed:
            sub.close()
            return sub
        if after is not None:
            sub.replay([e for e in self.history if e.id > after])
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: EventSubscriber) -> None:
        self.subscribers.discard(sub)
        sub.close()

    def close(self) -> None:
        """Shutdown: every subscriber's `next()` returns None, so each stream ends."""
        self.closed = True
        for sub in list(self.subscribers):
            sub.close()
        self.subscribers.clear()

    def recent(self, after: int = 0, limit: int | None = None) -> list[Event]:
        events = [e for e in self.history if e.id > after]
        return events[-limit:] if limit else events

    # -- publishers -----------------------------------------------------------------------------------

    def leader_change(self, cluster: str, change: LeaderChange) -> None:
        """A server change listener: the write target of `cluster` changed."""
        self.publish("leader_change", cluster=cluster, old_leader=change.old_leader,
                     new_leader=change.new_leader, old_term=change.old_term, new_term=change.new_term,
                     reason=change.reason)

    def node_callbacks(self, cluster: str, on_announcement: OnAnnouncement,
                       on_down: OnDown) -> tuple[OnAnnouncement, OnDown]:
        """Wrap a cluster's subscription callbacks so that node up/down transitions are published."""
        up = self._node_up

        def announced(node_id: str, ann: Announcement) -> None:
            key = (cluster, node_id)
            if up.get(key) is not True:  # published first: a leader change this announcement causes follows
                up[key] = True
                self.publish("node_up", cluster=cluster, node=node_id, term=ann.term, role=ann.role)
            on_announcement(node_id, ann)

        def down(node_id: str, reason: str) -> None:
            on_down(node_id, reason)
            key = (cluster, node_id)
            if up.get(key) is not False:
                up[key] = False
                self.publish("node_down", cluster=cluster, node=node_id, reason=reason)

        return announced, down

    def forget_node(self, cluster: str, node_id: str) -> None:
        """A node removed by a reload: a later node with its id starts unknown again."""
        self._node_up.pop((cluster, node_id), None)
