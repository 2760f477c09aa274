"""The composition root: builds the proxies, subscriptions and listeners from a Config, and runs them.

Lifecycle: `start()` → serve until `request_stop()` (SIGTERM/SIGINT) → `stop()`:
  1. `/readyz` turns 503 so balancers in front stop sending;
  2. listeners stop accepting; idle client connections close;
  3. in-flight requests (and held writes) finish, up to `drain_timeout`;
  4. whatever is left is cut; subscriptions, pools and the admin listener close.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Callable

import httpx

from raftlb import __version__
from raftlb.config.model import ClusterConfig, Config, ListenerConfig, TlsConfig
from raftlb.control.kinds import Subscriptions, make_subscriptions
from raftlb.control.stream import ClusterSubscriptions
from raftlb.core.leader_table import LeaderChange
from raftlb.errors import ConfigError, os_reason
from raftlb.http.server import HttpServer
from raftlb.ops.admin import Admin
from raftlb.ops.events import EventBus
from raftlb.ops.metrics import Metrics
from raftlb.ops.reload import Reloader, ReloadResult
from raftlb.ops.runtime import Runtime
from raftlb.proxy.cluster import ClusterProxy
from raftlb.tasks import TaskSet
from raftlb.tls import client_context, reload_server_context, server_context
from raftlb.workers import WorkerInfo, stop_requested

log = logging.getLogger("raftlb.server")

SWEEP_INTERVAL = 0.02  # leader liveness, hold timeouts, upstream timeouts


class Server:
    """Everything one raftlb process runs. Its running state is one `Runtime`, which the admin API, the
    metrics and reload read (the properties below are views of it)."""

    def __init__(self, config: Config, worker: WorkerInfo | None = None) -> None:
        # `worker`: one of `workers: N` processes (listener ports shared), or None: the only one.
        self.worker = worker
        self.runtime = Runtime(config, worker)
        self.change_listeners: list[Callable[[str, LeaderChange], None]] = []
        self.metrics = Metrics(self.runtime)
        self.change_listeners += [self.metrics.on_leader_change, self.events.leader_change]
        self.reloader = Reloader(self.runtime, self.metrics, self)
        self._client: httpx.AsyncClient | None = None
        self._tls_clients: dict[str, tuple[TlsConfig, httpx.AsyncClient]] = {}  # cluster: (settings, client)
        self._retired_clients: dict[str, list[httpx.AsyncClient]] = {}  # cluster: replaced by a reload
        self._stop = asyncio.Event()
        self._sweeper: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return (f"<Server clusters={list(self.proxies)} listeners={len(self.listeners)} "
                f"draining={self.draining}>")

    # -- views of the runtime -------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.runtime.config

    @config.setter
    def config(self, config: Config) -> None:
        self.runtime.config = config

    @property
    def draining(self) -> bool:
        return self.runtime.draining

    @draining.setter
    def draining(self, draining: bool) -> None:
        self.runtime.draining = draining

    @property
    def tasks(self) -> TaskSet:
        return self.runtime.tasks

    @property
    def events(self) -> EventBus:
        return self.runtime.events

    @property
    def proxies(self) -> dict[str, ClusterProxy]:
        return self.runtime.proxies

    @property
    def subscriptions(self) -> dict[str, Subscriptions]:
        return self.runtime.subscriptions

    @property
    def listeners(self) -> list[HttpServer]:
        return self.runtime.listeners

    @property
    def admin(self) -> HttpServer | None:
        return self.runtime.admin

    @property
    def started_at(self) -> float:
        return self.runtime.started_at

    # -- start ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._client = ClusterSubscriptions.make_client()
        for cluster in cfg.clusters:
            self.add_cluster(cluster, self.new_proxy(cluster))
        for i, lc in enumerate(cfg.listeners):
            try:
                self.listeners.append(await self.start_listener(lc, self.proxies[lc.cluster]))
            except OSError as exc:
                raise ConfigError(f"listeners[{i}].address", f"cannot listen on {lc.host}:{lc.port}: "
                                  f"{os_reason(exc)}", file=cfg.source) from exc
        if cfg.admin.enabled:
            # Worker i of several serves the admin API on port + i (each worker is scraped on its own).
            port = cfg.admin.port + self.worker.index if self.worker and cfg.admin.port else cfg.admin.port
            try:
                admin = self.runtime.admin = await Admin(self).start(cfg.admin.host, port)
            except OSError as exc:
                raise ConfigError("admin.address", f"cannot listen on {cfg.admin.host}:{port}: "
                                  f"{os_reason(exc)}", file=cfg.source) from exc
            log.info("admin on %s:%d", admin.host, admin.port)
        self._schedule_sweep()

    def new_proxy(self, cluster: ClusterConfig) -> ClusterProxy:
        """A proxy for `cluster`, not yet registered or subscribed (no I/O until requests come)."""
        proxy = ClusterProxy(cluster, self.config.limits.write_buffer_high,
                             on_change=functools.partial(self._on_change, cluster.name))
        proxy.observer = self.metrics  # per-request counts, durations, failover time, access log
        return proxy

    def add_cluster(self, cluster: ClusterConfig, proxy: ClusterProxy) -> None:
        """Register `proxy` and start following `cluster`'s nodes (at start, and when a reload adds one)."""
        self.proxies[cluster.name] = proxy
        self.metrics.cluster_added(cluster.name)
        on_announcement, on_down = self.events.node_callbacks(cluster.name, proxy.on_announcement,
                                                              proxy.on_node_down)
        subs = make_subscriptions(cluster, on_announcement, on_down, self.tasks, self._client_for(cluster))
        self.subscriptions[cluster.name] = subs
        subs.start()

    def _client_for(self, cluster: ClusterConfig) -> httpx.AsyncClient | None:
        """The shared control-plane client, or one of the cluster's own when its nodes need TLS settings."""
        cached = self._tls_clients.get(cluster.name)
        if cached is not None and cached[0] == cluster.tls:
            return cached[1]
        if cached is not None:
            # A reload changed the cluster's TLS settings (a new CA, a new client certificate, or none): the
            # old client closes once the subscriptions that use it have stopped (close_retired_clients).
            del self._tls_clients[cluster.name]
            self._retired_clients.setdefault(cluster.name, []).append(cached[1])
        if cluster.tls is None:
            return self._client
        client = ClusterSubscriptions.make_client(client_context(cluster.tls))
        self._tls_clients[cluster.name] = (cluster.tls, client)
        return client

    async def close_retired_clients(self, cluster: str | None = None) -> None:
        """Close the control-plane clients a reload replaced for `cluster` (all: None), once the
        subscriptions that used them have stopped."""
        names = list(self._retired_clients) if cluster is None else [cluster]
        for name in names:
            for client in self._retired_clients.pop(name, []):
                await client.aclose()

    def reload_certificates(self) -> None:
        """Re-read every TLS listener's certificate and key (SIGHUP): new handshakes use them at once."""
        configs = {lc.name: lc for lc in self.config.listeners}  # (by name: reloads add and retire listeners)
        for srv in self.listeners:
            lc = configs.get(srv.name)
            if lc is not None and srv.ssl is not None and lc.tls is not None:
                try:
                    reload_server_context(srv.ssl, lc.tls)
                    log.info("listener %s: certificate reloaded from %s", lc.name, lc.tls.cert)
                except (OSError, ValueError) as exc:
                    log.error("listener %s: certificate reload failed, keeping the old one: %s", lc.name, exc)

    async def start_listener(self, lc: ListenerConfig, proxy: ClusterProxy) -> HttpServer:
        h2 = self.config.http2
        srv = HttpServer(proxy, self.config.limits, lc.max_connections, name=lc.name, h2=h2)
        await srv.start(lc.host, lc.port, reuse_port=self.worker is not None,
                        ssl=server_context(lc.tls, h2=h2.enabled) if lc.tls is not None else None)
        log.info("listener %s on %s:%d fronts cluster %s", lc.name, srv.host, srv.port, lc.cluster)
        return srv

    async def reload(self, trigger: str = "api") -> ReloadResult:
        """Load the config file again and apply it; an invalid one leaves the running config in place."""
        result = await self.reloader.reload(trigger)
        if result.applied and self.worker is not None:
            self.worker.reloaded(self.config.drain_timeout)  # (the supervisor's kill deadline follows it)
        return result

    def request_reload(self) -> None:
        """SIGHUP: certificates re-read from their files, then the config file."""
        self.reload_certificates()
        self.tasks.spawn(self.reload("SIGHUP"), name="reload")

    def _schedule_sweep(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for proxy in self.proxies.values():
            try:
                proxy.sweep(now)
            except Exception:
                log.exception("sweep of cluster %s failed", proxy.cluster.name)
        self._schedule_sweep()

    def _on_change(self, cluster: str, change: LeaderChange) -> None:
        stats = self.proxies[cluster].stats
        if change.new_leader is None:
            log.warning("cluster %s: no leader (was %s at term %d: %s); holding writes",
                        cluster, change.old_leader, change.old_term, change.reason)
        else:
            log.info("cluster %s: leader %s (term %d) -> %s (term %d) [%s]; writes held %d, released %d, "
                     "expired %d so far", cluster, change.old_leader, change.old_term, change.new_leader,
                     change.new_term, change.reason, stats.held, stats.released, stats.expired)
        for cb in self.change_listeners:
            cb(cluster, change)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        # 1. readiness turns red first, so whoever balances across raftlb replicas moves away.
        self.runtime.draining = True
        self.events.publish("draining", timeout_s=self.config.drain_timeout)
        # 2-3. stop accepting, close idle connections, let in-flight requests finish within the drain timeout.
        results = await asyncio.gather(*(srv.drain(self.config.drain_timeout) for srv in self.listeners))
        if not all(results):
            log.warning("drain timeout: cutting %d connections",
                        sum(len(s.connections) for s in self.listeners))
        # 4. cut the rest; stop the control plane.
        for srv in self.listeners:
            await srv.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for subs in self.subscriptions.values():
            await subs.stop()
        await self.reloader.close()
        for proxy in self.proxies.values():
            proxy.close()
        self.events.close()  # ends /v1/events streams, so the admin closes with nothing in flight
        if self.admin is not None:
            await self.admin.close()
        await self.tasks.close()
        if self._client is not None:
            await self._client.aclose()
        for _, client in self._tls_clients.values():
            await client.aclose()
        await self.close_retired_clients()

    def startup_line(self) -> str:
        """What a started raftlb serves, for its log: version, config file, listeners, admin, clusters."""
        cfg = self.config
        listeners = ", ".join(f"{lc.name} {srv.host}:{srv.port} -> {lc.cluster}"
                              for lc, srv in zip(cfg.listeners, self.listeners, strict=False))
        admin = f"{self.admin.host}:{self.admin.port}" if self.admin is not None else "disabled"
        clusters = "; ".join(f"{c.name} ({c.kind}: " + ", ".join(f"{n.id} {n.url}" for n in c.nodes) + ")"
                             for c in cfg.clusters)
        return (f"raftlb {__version__} started: config {cfg.source or '-'}; listeners {listeners}; "
                f"admin {admin}; clusters {clusters}")

    async def run(self) -> int:
        """For the CLI: start, serve until SIGTERM/SIGINT, drain, exit 0; 1 when a listener cannot bind."""
        try:
            await self.start()
        except ConfigError as exc:
            log.error("cannot start: %s", exc)
            await self.stop()
            return 1
        log.info("%s", self.startup_line())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        if self.worker is not None:
            self.worker.ready(self.config.drain_timeout)
            if stop_requested():  # SIGTERM/SIGINT while it was starting
                self.request_stop()
        await self._stop.wait()
        log.info("stopping: draining in-flight requests (up to %gs)", self.config.drain_timeout)
        await self.stop()
        log.info("stopped")
        return 0
