"""What a running raftlb process is serving, as the admin API, the metrics and reload see it.

The composition root (raftlb/server.py) builds one `Runtime` and keeps it current; the ops modules read it
(and reload replaces its config, proxies, subscriptions and listeners) without knowing the server that
builds them. That keeps the dependencies one way: server → ops → proxy, control, http → core (see
docs/design.md), so nothing in ops imports the server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from raftlb.config.model import Config
from raftlb.control.kinds import Subscriptions
from raftlb.http.server import HttpServer
from raftlb.ops.events import EventBus
from raftlb.proxy.cluster import ClusterProxy
from raftlb.tasks import TaskSet


class WorkerSlot(Protocol):
    """This process's place among `workers: N` (raftlb.workers.WorkerInfo): what ops reads and tells."""

    @property
    def index(self) -> int: ...

    @property
    def count(self) -> int: ...

    def reloaded(self, drain_timeout: float) -> None:
        """Tell the supervisor the drain timeout a reload set (its kill deadline follows it)."""

    def reload_others(self) -> None:
        """Ask the supervisor to send the other workers SIGHUP (after a reload through the admin API)."""


@dataclass(eq=False)
class Runtime:
    """The running state of one server: its config, proxies, subscriptions and listeners (in config
    order), the admin listener, and whether it drains. Mutable: reload and shutdown change it in place."""

    config: Config
    worker: WorkerSlot | None = None  # one of `workers: N` processes, or None: the only one
    tasks: TaskSet = field(default_factory=lambda: TaskSet("raftlb"))
    events: EventBus = field(default_factory=EventBus)
    proxies: dict[str, ClusterProxy] = field(default_factory=dict)
    subscriptions: dict[str, Subscriptions] = field(default_factory=dict)
    listeners: list[HttpServer] = field(default_factory=list)
    admin: HttpServer | None = None
    draining: bool = False
    started_at: float = field(default_factory=time.time)
    reloads: int = 0  # reloads tried (applied or rejected)

    def __repr__(self) -> str:
        return (f"<Runtime clusters={list(self.proxies)} listeners={len(self.listeners)} "
                f"draining={self.draining}>")

    def served_listeners(self) -> list[HttpServer]:
        """The listeners whose counters are reported: the proxy listeners, then the admin one."""
        return [*self.listeners, *([self.admin] if self.admin is not None else [])]
