"""Hot reload (SIGHUP or `POST /v1/reload`): read the config file again and apply it in place.

An invalid file (or a listener address that cannot be bound) is rejected as a whole: the error, with its
YAML path, is logged and returned, and the running config stays. A valid one is applied without dropping a
client connection or an in-flight request:

1. new clusters get a proxy; new or re-addressed listeners are bound (a bind failure rejects the reload
   before anything running has changed);
2. from here nothing fails: new clusters are subscribed, kept clusters take their new nodes, routes and
   timeouts (`ClusterProxy.reconfigure`, `ClusterSubscriptions.update`; the leader table keeps what it knows
   of kept nodes), kept listeners take their new cluster, connection limit and the new limits;
3. removed or re-addressed listeners drain in the background (as at shutdown, up to `drain_timeout`), then
   close; a removed cluster stops only after the listeners that fronted it have drained.

The admin listener's address and TLS cannot change without a restart: a change is reported and the running
ones kept (a new `admin.token`, `admin.allowed_hosts` or `admin.max_connections` applies at once).

What changes is decided first, without touching anything (raftlb.ops.reload_plan.plan_reload); the
`Reloader` then carries the plan out on the server's `Runtime`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from raftlb.config.load import load_config
from raftlb.config.model import ClusterConfig, Config, ListenerConfig, shared_port_problem
from raftlb.control.kinds import Subscriptions
from raftlb.errors import ConfigError, os_reason
from raftlb.http.server import HttpServer
from raftlb.ops.logs import setup_logging
from raftlb.ops.metrics import Metrics
from raftlb.ops.reload_plan import ReloadPlan, plan_reload
from raftlb.ops.runtime import Runtime
from raftlb.proxy.cluster import ClusterProxy

log = logging.getLogger("raftlb.ops.reload")


@dataclass
class ReloadResult:
    """What a reload did: `applied`, the changes in words, or the `error` (and its YAML `path`)."""

    applied: bool
    changes: list[str] = field(default_factory=list)
    error: str | None = None  # a stable code: invalid_config | bind_failed | no_config_file
    detail: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"result": "applied" if self.applied else "rejected",
                                  "changes": self.changes}
        if self.error is not None:
            doc.update(error=self.error, detail=self.detail, path=self.path)
        return doc


class ClusterBuilder(Protocol):
    """What a reload asks of the server that composes the runtime (raftlb.server.Server): build and follow
    clusters, bind listeners, close the control-plane clients a reload replaced."""

    def new_proxy(self, cluster: ClusterConfig) -> ClusterProxy:
        """A proxy for `cluster`, not yet registered or subscribed."""
        ...

    def add_cluster(self, cluster: ClusterConfig, proxy: ClusterProxy) -> None:
        """Register `proxy` in the runtime and start following `cluster`'s nodes."""

    async def start_listener(self, lc: ListenerConfig, proxy: ClusterProxy) -> HttpServer:
        """Bind and serve one listener in front of `proxy` (OSError if it cannot bind)."""
        ...

    async def close_retired_clients(self, cluster: str | None = None) -> None:
        """Close the control-plane clients a reload replaced for `cluster` (all: None)."""


class Reloader:
    """Serializes reloads of one runtime and owns the listeners it retires (see the module doc)."""

    def __init__(self, runtime: Runtime, metrics: Metrics, builder: ClusterBuilder) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.builder = builder
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Reloader reloads={self.reloads} retiring={len(self._retiring)}>"

    @property
    def reloads(self) -> int:
        """Reloads tried so far, applied or rejected."""
        return self.runtime.reloads

    async def reload(self, trigger: str = "api") -> ReloadResult:
        """Read the config file again and apply it (see the module doc); serialized with other reloads."""
        rt = self.runtime
        async with self._lock:
            source = rt.config.source
            if source is None:
                result = ReloadResult(False, error="no_config_file",
                                      detail="the running config was not loaded from a file")
            else:
                result = await self._reload(source)
            rt.reloads += 1
        self.metrics.config_reloaded(result.applied)
        rt.events.publish("config_reload", trigger=trigger, **result.to_json())
        if result.applied:
            log.info("config reloaded (%s): %s", trigger, "; ".join(result.changes) or "no changes")
        else:
            log.error("config reload (%s) rejected, the running config stays: %s", trigger, result.detail)
        return result

    async def _reload(self, source: str) -> ReloadResult:
        try:
            new = load_config(source)
        except ConfigError as exc:
            return ReloadResult(False, error="invalid_config", detail=str(exc), path=exc.path or None)
        rt = self.runtime
        old = rt.config
        if problem := shared_port_problem(new, old.workers):
            # (the running workers stay, whatever `workers` the file now says: their ports are shared)
            return ReloadResult(False, error="invalid_config", path="workers",
                                detail=f"{new.source}: {problem} (running {old.workers} workers)")
        retiring = {name: proxy.cluster for name, proxy in rt.proxies.items()
                    if name not in {c.name for c in old.clusters}}
        plan = plan_reload(old, new, retiring)
        # 1. everything that can fail, before anything running changes.
        added = {c.name: self.builder.new_proxy(c) for c in plan.add_clusters}
        for proxy in added.values():
            proxy.write_buffer_high = new.limits.write_buffer_high
        try:
            started = await self._bind(plan, added)
        except ConfigError as exc:
            for proxy in added.values():
                proxy.close()
            return ReloadResult(False, error="bind_failed", detail=str(exc), path=exc.path)
        # 2. apply: nothing fails from here.
        self._apply(plan, added, started)
        bound = {name: f"{srv.host}:{srv.port}" for name, srv in started.items()}
        return ReloadResult(True, plan.changes(bound))

    async def _bind(self, plan: ReloadPlan, added: dict[str, ClusterProxy]) -> dict[str, HttpServer]:
        """Start the listeners that are new or moved; ConfigError (with the YAML path) if one cannot bind."""
        started: dict[str, HttpServer] = {}
        index = {lc.name: i for i, lc in enumerate(plan.config.listeners)}
        for lc in plan.bind_listeners:
            proxy = added.get(lc.cluster) or self.runtime.proxies[lc.cluster]
            try:
                started[lc.name] = await self.builder.start_listener(lc, proxy)
            except OSError as exc:
                for srv in started.values():
                    await srv.close()
                raise ConfigError(f"listeners[{index[lc.name]}].address",
                                  f"cannot listen on {lc.host}:{lc.port}: {os_reason(exc)}",
                                  file=plan.config.source) from exc
        return started

    def _apply(self, plan: ReloadPlan, added: dict[str, ClusterProxy],
               started: dict[str, HttpServer]) -> None:
        rt = self.runtime
        new = plan.config
        for cluster in plan.add_clusters:
            self.builder.add_cluster(cluster, added[cluster.name])
        for step in plan.change_clusters:
            proxy = rt.proxies[step.name]
            proxy.write_buffer_high = new.limits.write_buffer_high
            proxy.reconfigure(step.config)
            if step.resubscribe is None:
                rt.subscriptions[step.name].update(step.config)
            else:  # followed another way now: new subscriptions; the old ones stop in the background
                retired_subs = rt.subscriptions[step.name]
                self.builder.add_cluster(step.config, proxy)
                self._spawn(self._unsubscribe(retired_subs, step.name), f"reload:unsubscribe:{step.name}")
            for node_id in step.nodes_removed:
                rt.events.forget_node(step.name, node_id)
        running = {listener.name: listener for listener in rt.listeners}
        retired = [running[name] for name in plan.retire_listeners]
        for lp in plan.change_listeners:
            listener = running[lp.name]
            if lp.cluster is not None:
                listener.handler = rt.proxies[lp.cluster]
            if lp.max_connections is not None:
                listener.max_connections = lp.max_connections
        kept = [listener for name, listener in running.items() if name not in plan.retire_listeners]
        kept += started.values()
        order = {lc.name: i for i, lc in enumerate(new.listeners)}
        rt.listeners = sorted(kept, key=lambda listener: order[listener.name])  # config order, as at start
        if plan.limits_changed:
            for listener in [*kept, *([rt.admin] if rt.admin else [])]:
                listener.limits = new.limits
                for conn in list(listener.connections):
                    conn.limits = new.limits
        for listener in kept:
            listener.h2 = new.http2  # (new connections; ALPN h2 on TLS listeners changes at a restart)
        if plan.logging_changed:
            _apply_logging(new)
        if rt.admin is not None:
            rt.admin.max_connections = new.admin.max_connections
        rt.config = new
        if retired or plan.remove_clusters:
            self._spawn(self._retire(retired, list(plan.remove_clusters), new.drain_timeout), "reload:retire")

    async def _unsubscribe(self, subs: Subscriptions, cluster: str) -> None:
        await subs.stop()
        await self.builder.close_retired_clients(cluster)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = self.runtime.tasks.spawn(coro, name=name)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, listeners: list[HttpServer], clusters: list[str], timeout: float) -> None:
        """Drain retired listeners like a shutdown does; then stop the clusters no listener fronts."""
        rt = self.runtime
        results = await asyncio.gather(*(listener.drain(timeout) for listener in listeners))
        for listener, drained in zip(listeners, results, strict=True):
            if not drained:
                log.warning("listener %s: drain timeout, cutting %d connections", listener.name,
                            len(listener.connections))
            await listener.close()
        for name in clusters:
            if name in {c.name for c in rt.config.clusters}:
                continue  # added back by a later reload meanwhile
            subs = rt.subscriptions.pop(name)
            await subs.stop()
            rt.proxies.pop(name).close()
            self.metrics.forget_cluster(name)

    async def close(self) -> None:
        """Shutdown: wait for listeners still retiring (each is bounded by the drain timeout)."""
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=self.runtime.config.drain_timeout + 1)


def _apply_logging(config: Config) -> None:
    root = logging.getLogger("raftlb")
    if not root.propagate:  # set up by `setup_logging` (raftlb run), not by a host program or a test
        setup_logging(config.logging)
    else:
        logging.getLogger("raftlb.access").disabled = not config.logging.access_log
