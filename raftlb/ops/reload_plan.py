"""What a reload changes, decided before anything running is touched: a pure function of the running config
and the new one (`plan_reload`), executed by raftlb.ops.reload.

The rules (docs/operations.md, "Hot reload"):
- a cluster named in the new config only is added; one in both with other settings or nodes is changed in
  place (its leader table keeps what it knows of kept nodes); one in the old config only is removed, after
  the listeners that fronted it have drained. A cluster followed another way (another `kind`, `sidecar` or
  TLS settings) gets new subscriptions; otherwise its subscriptions take the new nodes;
- a listener named in the new config only, or at another address, is bound (before anything changes, so a
  bind failure rejects the whole reload); one removed or moved drains, then closes; a kept one takes its new
  cluster and connection limit. Its TLS settings stay those of its socket (a new certificate file is read
  by SIGHUP; new settings need a new address or a restart);
- the admin listener's address and TLS, and the number of workers, need a restart: the running ones are
  kept, and the change is reported. A new admin token, `allowed_hosts` or `max_connections` applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from raftlb.config.model import ClusterConfig, Config, ListenerConfig


@dataclass(frozen=True)
class ClusterPlan:
    """A kept cluster whose settings or nodes change."""

    config: ClusterConfig  # its new settings
    nodes_added: tuple[str, ...] = ()  # (new order)
    nodes_removed: tuple[str, ...] = ()  # (old order)
    resubscribe: str | None = None  # why it is followed anew: "kind" or "tls"; None: subscriptions updated

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class ListenerPlan:
    """A kept listener (same name, same address) whose settings change."""

    name: str
    cluster: str | None = None  # the cluster it fronts from now on; None: the same
    max_connections: int | None = None  # its new connection limit; None: the same
    tls_kept: bool = False  # new TLS settings, not applied: the socket keeps its own


@dataclass(frozen=True)
class ReloadPlan:
    """What applying a new config does to a running one; `config` is what runs afterwards (the new one,
    with what needs a restart kept as it runs)."""

    config: Config
    add_clusters: tuple[ClusterConfig, ...] = ()
    change_clusters: tuple[ClusterPlan, ...] = ()
    remove_clusters: tuple[str, ...] = ()
    bind_listeners: tuple[ListenerConfig, ...] = ()  # new or moved (new order)
    change_listeners: tuple[ListenerPlan, ...] = ()
    retire_listeners: tuple[str, ...] = ()  # removed or moved: drained, then closed (old order)
    running_listeners: tuple[str, ...] = ()  # the listeners before the reload, in their order
    limits_changed: bool = False
    logging_changed: bool = False
    drain_timeout_changed: bool = False
    admin_token_changed: bool = False
    admin_access_changed: bool = False  # allowed_hosts or max_connections
    admin_kept: bool = False  # a new admin address or TLS, not applied
    workers_kept: int | None = None  # a new number of workers, not applied

    @property
    def restart_needed(self) -> tuple[str, ...]:
        """The changes the file asks for that only a restart applies: `admin`, `workers`,
        `listener NAME tls`."""
        return (*(["admin"] if self.admin_kept else []),
                *(f"listener {lp.name} tls" for lp in self.change_listeners if lp.tls_kept),
                *(["workers"] if self.workers_kept is not None else []))

    def changes(self, addresses: Mapping[str, str] | None = None) -> list[str]:
        """The plan in words, in the order it applies; `addresses` names where bound listeners listen
        (their configured `host:port` if not given, port 0 included)."""
        cfg = self.config
        out: list[str] = []
        if self.admin_token_changed:
            out.append("admin token changed")
        if self.admin_access_changed:
            out.append("admin allowed_hosts / max_connections changed")
        if self.admin_kept:
            out.append("admin: its address and TLS cannot change without a restart; kept "
                       f"{cfg.admin.host}:{cfg.admin.port}")
        added = {c.name for c in self.add_clusters}
        changed = {cp.name: cp for cp in self.change_clusters}
        for cluster in cfg.clusters:
            if cluster.name in added:
                out.append(f"cluster {cluster.name}: added ({len(cluster.nodes)} nodes)")
            elif (cp := changed.get(cluster.name)) is not None:
                if cp.resubscribe == "kind":
                    out.append(f"cluster {cp.name}: now followed as kind {cp.config.kind}")
                elif cp.resubscribe is not None:
                    out.append(f"cluster {cp.name}: new TLS settings")
                what = [f"node {n} added" for n in cp.nodes_added]
                what += [f"node {n} removed" for n in cp.nodes_removed]
                out.append(f"cluster {cp.name}: {', '.join(what) or 'settings changed'}")
        wanted = {lc.name for lc in cfg.listeners}
        steps = {lp.name: lp for lp in self.change_listeners}
        for name in self.running_listeners:
            if name in self.retire_listeners:
                out.append(f"listener {name}: " + ("moved" if name in wanted else "removed"))
            if (lp := steps.get(name)) is None:
                continue
            if lp.cluster is not None:
                out.append(f"listener {lp.name}: now fronts cluster {lp.cluster}")
            if lp.max_connections is not None:
                out.append(f"listener {lp.name}: max_connections {lp.max_connections}")
            if lp.tls_kept:
                out.append(f"listener {lp.name}: new TLS settings need a restart or a new address; "
                           "kept (SIGHUP re-reads the certificate files)")
        moved = set(self.retire_listeners)
        for lc in self.bind_listeners:
            if lc.name not in moved:
                address = (addresses or {}).get(lc.name, f"{lc.host}:{lc.port}")
                out.append(f"listener {lc.name}: added on {address}")
        if self.limits_changed:
            out.append("limits changed")
        if self.logging_changed:
            out.append("logging changed")
        if self.drain_timeout_changed:
            out.append(f"drain_timeout {cfg.drain_timeout:g}s")
        if self.workers_kept is not None:
            out.append(f"workers: {self.workers_kept} needs a restart; kept {cfg.workers}")
        out += [f"cluster {name}: removed" for name in self.remove_clusters]
        return out


def plan_reload(old: Config, new: Config, retiring: Mapping[str, ClusterConfig] | None = None) -> ReloadPlan:
    """The plan that turns the running config `old` into `new`. `retiring`: clusters an earlier reload
    removed whose proxies still drain; one the new config names again is kept (changed in place), not
    added a second time."""
    # The admin listener: its socket (address, TLS) stays; its access rules follow the file.
    running_admin = dataclasses.replace(old.admin, token=new.admin.token,
                                        allowed_hosts=new.admin.allowed_hosts,
                                        max_connections=new.admin.max_connections)
    admin_kept = new.admin != running_admin
    workers_kept = new.workers if new.workers != old.workers else None

    before = {**(retiring or {}), **{c.name: c for c in old.clusters}}
    buffer_changed = new.limits.write_buffer_high != old.limits.write_buffer_high
    add: list[ClusterConfig] = []
    change: list[ClusterPlan] = []
    for cluster in new.clusters:
        was = before.get(cluster.name)
        if was is None:
            add.append(cluster)
            continue
        if cluster == was and not buffer_changed:
            continue
        old_ids, new_ids = [n.id for n in was.nodes], [n.id for n in cluster.nodes]
        followed_alike = (cluster.kind, cluster.sidecar, cluster.tls) == (was.kind, was.sidecar, was.tls)
        resubscribe = None if followed_alike else "kind" if cluster.tls == was.tls else "tls"
        change.append(ClusterPlan(cluster, tuple(n for n in new_ids if n not in old_ids),
                                  tuple(n for n in old_ids if n not in new_ids), resubscribe))
    names = {c.name for c in new.clusters}
    remove = tuple(c.name for c in old.clusters if c.name not in names)

    running = {lc.name: lc for lc in old.listeners}
    wanted = {lc.name: lc for lc in new.listeners}
    bind = tuple(lc for lc in new.listeners  # new, or at another address
                 if lc.name not in running or _address(lc) != _address(running[lc.name]))
    rebound = {lc.name for lc in bind}
    retire = tuple(name for name in running if name not in wanted or name in rebound)
    kept: dict[str, ListenerConfig] = {}
    listener_changes: list[ListenerPlan] = []
    for name, was_lc in running.items():
        if name in retire:
            continue
        lc = wanted[name]
        tls_kept = lc.tls != was_lc.tls
        if tls_kept:  # the socket stays; so does its TLS context
            lc = dataclasses.replace(lc, tls=was_lc.tls)
        kept[name] = lc
        step = ListenerPlan(name, lc.cluster if lc.cluster != was_lc.cluster else None,
                            lc.max_connections if lc.max_connections != was_lc.max_connections else None,
                            tls_kept)
        if step != ListenerPlan(name):
            listener_changes.append(step)

    # The config tells the truth about what runs: kept listeners keep the TLS their socket has.
    running_config = dataclasses.replace(
        new, admin=running_admin if admin_kept else new.admin, workers=old.workers,
        listeners=tuple(kept.get(lc.name, lc) for lc in new.listeners))
    return ReloadPlan(
        config=running_config, add_clusters=tuple(add), change_clusters=tuple(change), remove_clusters=remove,
        bind_listeners=bind, change_listeners=tuple(listener_changes), retire_listeners=retire,
        running_listeners=tuple(running),
        limits_changed=new.limits != old.limits, logging_changed=new.logging != old.logging,
        drain_timeout_changed=new.drain_timeout != old.drain_timeout,
        admin_token_changed=new.admin.token != old.admin.token,
        admin_access_changed=(new.admin.allowed_hosts, new.admin.max_connections)
        != (old.admin.allowed_hosts, old.admin.max_connections),
        admin_kept=admin_kept, workers_kept=workers_kept)


def _address(lc: ListenerConfig) -> tuple[str, int]:
    return lc.host, lc.port
