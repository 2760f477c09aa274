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
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raftlb.config.load import load_config
from raftlb.config.model import Config, ListenerConfig, shared_port_problem
from raftlb.errors import ConfigError, os_reason
from raftlb.http.server import HttpServer

if TYPE_CHECKING:
    from raftlb.control.kinds import Subscriptions
    from raftlb.proxy.cluster import ClusterProxy
    from raftlb.server import Server

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


def _same_socket(a: ListenerConfig, b: ListenerConfig) -> bool:
    return (a.host, a.port) == (b.host, b.port)


class Reloader:
    """Serializes reloads of one server and owns the listeners it retires (see the module doc)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.reloads = 0
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Reloader reloads={self.reloads} retiring={len(self._retiring)}>"

    async def reload(self, trigger: str = "api") -> ReloadResult:
        async with self._lock:
            source = self.server.config.source
            if source is None:
                result = ReloadResult(False, error="no_config_file",
                                      detail="the running config was not loaded from a file")
            else:
                result = await self._reload(source)
            self.reloads += 1
        srv = self.server
        srv.metrics.config_reloaded(result.applied)
        srv.events.publish("config_reload", trigger=trigger, **result.to_json())
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
        old = self.server.config
        if problem := shared_port_problem(new, old.workers):
            # (the running workers stay, whatever `workers` the file now says: their ports are shared)
            return ReloadResult(False, error="invalid_config", path="workers",
                                detail=f"{new.source}: {problem} (running {old.workers} workers)")
        changes: list[str] = []
        if new.admin.token != old.admin.token:
            changes.append("admin token changed")
        if (new.admin.allowed_hosts, new.admin.max_connections) != (old.admin.allowed_hosts,
                                                                    old.admin.max_connections):
            changes.append("admin allowed_hosts / max_connections changed")
        running_admin = dataclasses.replace(old.admin, token=new.admin.token,
                                            allowed_hosts=new.admin.allowed_hosts,
                                            max_connections=new.admin.max_connections)
        if new.admin != running_admin:
            changes.append("admin: its address and TLS cannot change without a restart; kept "
                           f"{old.admin.host}:{old.admin.port}")
            new = dataclasses.replace(new, admin=running_admin)
        # 1. everything that can fail, before anything running changes.
        added = {c.name: self.server.new_proxy(c) for c in new.clusters if c.name not in self.server.proxies}
        for proxy in added.values():
            proxy.write_buffer_high = new.limits.write_buffer_high
        try:
            started = await self._bind(new, added)
        except ConfigError as exc:
            for proxy in added.values():
                proxy.close()
            return ReloadResult(False, error="bind_failed", detail=str(exc), path=exc.path)
        # 2. apply.
        self._apply(old, new, added, started, changes)
        return ReloadResult(True, changes)

    async def _bind(self, new: Config, added: dict[str, ClusterProxy]) -> dict[str, HttpServer]:
        """Start the listeners that are new or moved; ConfigError (with the YAML path) if one cannot bind."""
        running = {srv.name: srv for srv in self.server.listeners}
        old = {lc.name: lc for lc in self.server.config.listeners}
        started: dict[str, HttpServer] = {}
        for i, lc in enumerate(new.listeners):
            if lc.name in running and lc.name in old and _same_socket(lc, old[lc.name]):
                continue
            proxy = added.get(lc.cluster) or self.server.proxies[lc.cluster]
            try:
                started[lc.name] = await self.server.start_listener(lc, proxy)
            except OSError as exc:
                for srv in started.values():
                    await srv.close()
                raise ConfigError(f"listeners[{i}].address", f"cannot listen on {lc.host}:{lc.port}: "
                                  f"{os_reason(exc)}", file=new.source) from exc
        return started

    def _apply(self, old: Config, new: Config, added: dict[str, ClusterProxy],
               started: dict[str, HttpServer], changes: list[str]) -> None:
        srv = self.server
        for cluster in new.clusters:
            if cluster.name in added:
                srv.add_cluster(cluster, added[cluster.name])
                changes.append(f"cluster {cluster.name}: added ({len(cluster.nodes)} nodes)")
                continue
            proxy = srv.proxies[cluster.name]
            before = proxy.cluster
            if cluster == before and proxy.write_buffer_high == new.limits.write_buffer_high:
                continue
            old_ids, new_ids = [n.id for n in before.nodes], [n.id for n in cluster.nodes]
            proxy.write_buffer_high = new.limits.write_buffer_high
            proxy.reconfigure(cluster)
            if (cluster.kind, cluster.sidecar, cluster.tls) == (before.kind, before.sidecar, before.tls):
                srv.subscriptions[cluster.name].update(cluster)
            else:  # followed another way now: new subscriptions; the old ones stop in the background
                retired_subs = srv.subscriptions[cluster.name]
                srv.add_cluster(cluster, proxy)
                self._spawn(self._unsubscribe(retired_subs, cluster.name),
                            f"reload:unsubscribe:{cluster.name}")
                changes.append(f"cluster {cluster.name}: now followed as kind {cluster.kind}"
                               if cluster.tls == before.tls else f"cluster {cluster.name}: new TLS settings")
            for node_id in set(old_ids) - set(new_ids):
                srv.events.forget_node(cluster.name, node_id)
            what = [f"node {n} added" for n in new_ids if n not in old_ids]
            what += [f"node {n} removed" for n in old_ids if n not in new_ids]
            changes.append(f"cluster {cluster.name}: {', '.join(what) or 'settings changed'}")
        kept: list[HttpServer] = []
        retired: list[HttpServer] = []
        wanted = {lc.name: lc for lc in new.listeners}
        running = {lc.name: lc for lc in old.listeners}
        kept_configs: dict[str, ListenerConfig] = {}
        for listener in srv.listeners:
            lc = wanted.get(listener.name)
            if lc is None or lc.name in started:
                retired.append(listener)
                changes.append(f"listener {listener.name}: " + ("moved" if lc else "removed"))
                continue
            proxy = srv.proxies[lc.cluster]
            if listener.handler is not proxy:
                listener.handler = proxy
                changes.append(f"listener {lc.name}: now fronts cluster {lc.cluster}")
            if listener.max_connections != lc.max_connections:
                listener.max_connections = lc.max_connections
                changes.append(f"listener {lc.name}: max_connections {lc.max_connections}")
            if lc.tls != running[lc.name].tls:  # the socket stays; so does its TLS context
                lc = dataclasses.replace(lc, tls=running[lc.name].tls)
                changes.append(f"listener {lc.name}: new TLS settings need a restart or a new address; "
                               "kept (SIGHUP re-reads the certificate files)")
            kept_configs[lc.name] = lc
            kept.append(listener)
        for name, listener in started.items():
            kept.append(listener)
            if name not in {lc.name for lc in old.listeners}:
                changes.append(f"listener {name}: added on {listener.host}:{listener.port}")
        order = {lc.name: i for i, lc in enumerate(new.listeners)}
        srv.listeners = sorted(kept, key=lambda listener: order[listener.name])  # config order, as at start
        # The config tells the truth about what runs: kept listeners keep the TLS their socket has.
        new = dataclasses.replace(new, listeners=tuple(kept_configs.get(lc.name, lc) for lc in new.listeners))
        if new.limits != old.limits:
            for listener in [*kept, *([srv.admin] if srv.admin else [])]:
                listener.limits = new.limits
                for conn in list(listener.connections):
                    conn.limits = new.limits
            changes.append("limits changed")
        if new.logging != old.logging:
            _apply_logging(new)
            changes.append("logging changed")
        if new.drain_timeout != old.drain_timeout:
            changes.append(f"drain_timeout {new.drain_timeout:g}s")
        if new.workers != old.workers:
            changes.append(f"workers: {new.workers} needs a restart; kept {old.workers}")
            new = dataclasses.replace(new, workers=old.workers)
        if srv.admin is not None:
            srv.admin.max_connections = new.admin.max_connections
        srv.config = new
        removed = [name for name in srv.proxies if name not in {c.name for c in new.clusters}]
        if retired or removed:
            self._spawn(self._retire(retired, removed, new.drain_timeout), "reload:retire")
            changes += [f"cluster {name}: removed" for name in removed]

    async def _unsubscribe(self, subs: Subscriptions, cluster: str) -> None:
        await subs.stop()
        await self.server.close_retired_clients(cluster)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = self.server.tasks.spawn(coro, name=name)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, listeners: list[HttpServer], clusters: list[str], timeout: float) -> None:
        """Drain retired listeners like a shutdown does; then stop the clusters no listener fronts."""
        srv = self.server
        results = await asyncio.gather(*(listener.drain(timeout) for listener in listeners))
        for listener, drained in zip(listeners, results, strict=True):
            if not drained:
                log.warning("listener %s: drain timeout, cutting %d connections", listener.name,
                            len(listener.connections))
            await listener.close()
        for name in clusters:
            if name in {c.name for c in srv.config.clusters}:
                continue  # added back by a later reload meanwhile
            subs = srv.subscriptions.pop(name)
            await subs.stop()
            srv.proxies.pop(name).close()
            srv.metrics.forget_cluster(name)

    async def close(self) -> None:
        """Shutdown: wait for listeners still retiring (each is bounded by the drain timeout)."""
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=self.server.config.drain_timeout + 1)


def _apply_logging(config: Config) -> None:
    root = logging.getLogger("raftlb")
    if not root.propagate:  # set up by `setup_logging` (raftlb run), not by a host program or a test
        from raftlb.ops.logs import setup_logging

        setup_logging(config.logging)
    else:
        logging.getLogger("raftlb.access").disabled = not config.logging.access_log
