"""What a reload changes, as a table: each row is a running config, the file read again, and the plan
`plan_reload` decides (docs/operations.md, "Hot reload"): clusters added, changed in place or removed;
listeners bound, changed, drained; what only a restart applies. No socket, no server: the plan is a pure
function of the two configs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from raftlb.config.model import (
    AdminConfig,
    ClusterConfig,
    Config,
    LimitsConfig,
    ListenerConfig,
    LoggingConfig,
    NodeConfig,
    TlsConfig,
)
from raftlb.ops.reload_plan import ReloadPlan, plan_reload


def node(node_id: str, port: int) -> NodeConfig:
    url = f"http://127.0.0.1:{port}"
    return NodeConfig(id=node_id, url=url, announce_url=url, host="127.0.0.1", port=port)


def cluster(name: str = "c1", nodes: tuple[str, ...] = ("n1", "n2", "n3"), **kw: object) -> ClusterConfig:
    base = 9000 if name == "c1" else 9100
    return ClusterConfig(name=name, kind=kw.pop("kind", "announce"),  # type: ignore[arg-type]
                         nodes=tuple(node(n, base + int(n[1:])) for n in nodes), routes=(),
                         **kw)  # type: ignore[arg-type]


def listener(name: str = "main", port: int = 8080, cluster_name: str = "c1", **kw: object) -> ListenerConfig:
    return ListenerConfig(name=name, host="127.0.0.1", port=port, cluster=cluster_name, **kw)  # type: ignore[arg-type]


BASE = Config(listeners=(listener(),), clusters=(cluster(),), source="raftlb.yaml")
TWO = replace(BASE, listeners=(listener(), listener("side", 8081, "c2")), clusters=(cluster(), cluster("c2")))
TLS = TlsConfig(cert="cert.pem", key="key.pem")


def summary(plan: ReloadPlan) -> dict[str, object]:
    """The plan's decisions, with the empty ones left out (so a row names only what changes)."""
    doc: dict[str, object] = {
        "add": [c.name for c in plan.add_clusters],
        "change": {cp.name: (cp.nodes_added, cp.nodes_removed, cp.resubscribe)
                   for cp in plan.change_clusters},
        "remove": list(plan.remove_clusters),
        "bind": [lc.name for lc in plan.bind_listeners],
        "listeners": {lp.name: (lp.cluster, lp.max_connections, lp.tls_kept) for lp in plan.change_listeners},
        "retire": list(plan.retire_listeners),
        "restart": list(plan.restart_needed),
        "flags": [f for f in ("limits_changed", "logging_changed", "drain_timeout_changed",
                              "admin_token_changed", "admin_access_changed") if getattr(plan, f)],
    }
    return {k: v for k, v in doc.items() if v}


@dataclass(frozen=True)
class Row:
    """One reload: the running config, the new file, what the plan decides and says."""

    name: str
    old: Config
    new: Config
    plan: dict[str, object]
    changes: list[str]
    retiring: tuple[ClusterConfig, ...] = ()
    addresses: dict[str, str] = field(default_factory=dict)


ROWS = [
    Row("the same file: nothing to do", BASE, BASE, {}, []),
    Row("a cluster and a listener in front of it are added; the listener is bound before anything changes",
        BASE, TWO, {"add": ["c2"], "bind": ["side"]},
        ["cluster c2: added (3 nodes)", "listener side: added on 127.0.0.1:8081"]),
    Row("a listener added on port 0 is reported at the address it was bound to",
        BASE, replace(BASE, listeners=(listener(), listener("extra", 0))), {"bind": ["extra"]},
        ["listener extra: added on 127.0.0.1:40123"], addresses={"extra": "127.0.0.1:40123"}),
    Row("a cluster and its listener are removed: the listener drains, then the cluster stops",
        TWO, BASE, {"remove": ["c2"], "retire": ["side"]}, ["listener side: removed", "cluster c2: removed"]),
    Row("nodes added and removed: the cluster is changed in place, its subscriptions updated",
        BASE, replace(BASE, clusters=(cluster(nodes=("n1", "n2", "n4")),)),
        {"change": {"c1": (("n4",), ("n3",), None)}}, ["cluster c1: node n4 added, node n3 removed"]),
    Row("a node removed only", BASE, replace(BASE, clusters=(cluster(nodes=("n1", "n2")),)),
        {"change": {"c1": ((), ("n3",), None)}}, ["cluster c1: node n3 removed"]),
    Row("another setting of a cluster: changed in place, same subscriptions",
        BASE, replace(BASE, clusters=(cluster(liveness_timeout=2.0),)),
        {"change": {"c1": ((), (), None)}}, ["cluster c1: settings changed"]),
    Row("another kind: the cluster is followed anew (new subscriptions, the old ones stop)",
        BASE, replace(BASE, clusters=(cluster(kind="etcd"),)),
        {"change": {"c1": ((), (), "kind")}},
        ["cluster c1: now followed as kind etcd", "cluster c1: settings changed"]),
    Row("a sidecar in front of the nodes: followed anew (streamed instead of polled)",
        replace(BASE, clusters=(cluster(kind="etcd"),)),
        replace(BASE, clusters=(cluster(kind="etcd", sidecar=True),)),
        {"change": {"c1": ((), (), "kind")}},
        ["cluster c1: now followed as kind etcd", "cluster c1: settings changed"]),
    Row("new TLS settings for the nodes: followed anew with a new control-plane client",
        BASE, replace(BASE, clusters=(cluster(tls=TlsConfig(ca="ca.pem")),)),
        {"change": {"c1": ((), (), "tls")}},
        ["cluster c1: new TLS settings", "cluster c1: settings changed"]),
    Row("a new write buffer limit reaches every kept cluster's proxy",
        TWO, replace(TWO, limits=LimitsConfig(write_buffer_high=1024)),
        {"change": {"c1": ((), (), None), "c2": ((), (), None)}, "flags": ["limits_changed"]},
        ["cluster c1: settings changed", "cluster c2: settings changed", "limits changed"]),
    Row("other limits apply to the listeners and their connections only",
        BASE, replace(BASE, limits=LimitsConfig(idle_timeout=5.0)), {"flags": ["limits_changed"]},
        ["limits changed"]),
    Row("a listener at another address: the new socket is bound, the old one drains",
        BASE, replace(BASE, listeners=(listener(port=8090),)), {"bind": ["main"], "retire": ["main"]},
        ["listener main: moved"]),
    Row("a kept listener fronts another cluster from now on",
        TWO, replace(TWO, listeners=(listener(), listener("side", 8081, "c1"))),
        {"listeners": {"side": ("c1", None, False)}}, ["listener side: now fronts cluster c1"]),
    Row("a kept listener takes its new connection limit",
        BASE, replace(BASE, listeners=(listener(max_connections=5),)),
        {"listeners": {"main": (None, 5, False)}}, ["listener main: max_connections 5"]),
    Row("new TLS settings for a kept listener need a restart: the socket keeps its own",
        BASE, replace(BASE, listeners=(listener(tls=TLS),)),
        {"listeners": {"main": (None, None, True)}, "restart": ["listener main tls"]},
        ["listener main: new TLS settings need a restart or a new address; kept (SIGHUP re-reads the "
         "certificate files)"]),
    Row("a listener removed, another added: in the order the old and the new file list them",
        TWO, replace(TWO, listeners=(listener(), listener("other", 8082, "c2"))),
        {"bind": ["other"], "retire": ["side"]},
        ["listener side: removed", "listener other: added on 127.0.0.1:8082"]),
    Row("the admin's address needs a restart: the running one is kept",
        BASE, replace(BASE, admin=AdminConfig(port=9191)), {"restart": ["admin"]},
        ["admin: its address and TLS cannot change without a restart; kept 127.0.0.1:9090"]),
    Row("the admin's TLS needs a restart too", BASE, replace(BASE, admin=AdminConfig(tls=TLS)),
        {"restart": ["admin"]},
        ["admin: its address and TLS cannot change without a restart; kept 127.0.0.1:9090"]),
    Row("a new admin token and allowed hosts apply at once",
        BASE, replace(BASE, admin=AdminConfig(token="s3cret", allowed_hosts=("raftlb",))),
        {"flags": ["admin_token_changed", "admin_access_changed"]},
        ["admin token changed", "admin allowed_hosts / max_connections changed"]),
    Row("the admin's connection limit applies at once", BASE,
        replace(BASE, admin=AdminConfig(max_connections=3)), {"flags": ["admin_access_changed"]},
        ["admin allowed_hosts / max_connections changed"]),
    Row("another number of workers needs a restart: the running ones stay",
        BASE, replace(BASE, workers=4), {"restart": ["workers"]}, ["workers: 4 needs a restart; kept 1"]),
    Row("logging and the drain timeout apply at once",
        BASE, replace(BASE, logging=LoggingConfig(access_log=True), drain_timeout=2.5),
        {"flags": ["logging_changed", "drain_timeout_changed"]}, ["logging changed", "drain_timeout 2.5s"]),
    Row("a cluster removed by an earlier reload, still draining, named again: kept, not added twice",
        BASE, TWO, {"bind": ["side"]}, ["listener side: added on 127.0.0.1:8081"], retiring=(cluster("c2"),)),
    Row("... and not named again: left to the reload that removed it, not removed a second time",
        BASE, BASE, {}, [], retiring=(cluster("c2"),)),
    Row("... and named again with other nodes: changed in place",
        BASE, replace(TWO, clusters=(cluster(), cluster("c2", nodes=("n1",)))),
        {"change": {"c2": ((), ("n2", "n3"), None)}, "bind": ["side"]},
        ["cluster c2: node n2 removed, node n3 removed", "listener side: added on 127.0.0.1:8081"],
        retiring=(cluster("c2"),)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_reload_plan(row: Row) -> None:
    plan = plan_reload(row.old, row.new, {c.name: c for c in row.retiring})
    assert summary(plan) == row.plan
    assert plan.changes(row.addresses) == row.changes


def test_the_planned_config_is_what_runs_afterwards() -> None:
    # What a restart applies stays as it runs: the admin socket, the workers, a kept listener's TLS.
    new = replace(BASE, admin=AdminConfig(port=9191, token="t"), workers=3,
                  listeners=(listener(tls=TLS), listener("extra", 8085)), drain_timeout=1.0)
    cfg = plan_reload(BASE, new).config
    assert (cfg.admin.port, cfg.admin.token) == (9090, "t")
    assert cfg.workers == 1
    assert [(lc.name, lc.tls) for lc in cfg.listeners] == [("main", None), ("extra", None)]
    assert (cfg.drain_timeout, cfg.clusters, cfg.source) == (1.0, new.clusters, new.source)


def test_a_plan_with_nothing_kept_runs_the_new_config_as_it_is() -> None:
    assert plan_reload(BASE, TWO).config == TWO
