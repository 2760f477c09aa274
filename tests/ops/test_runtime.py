"""The ops modules run on a bare `Runtime`, without the server that composes it: the admin answers from it,
the metrics read it at scrape time, and a reload carries out its plan on it (no socket: the plan below
binds no listener)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from raftlb.config.load import load_config
from raftlb.config.model import ClusterConfig, ListenerConfig
from raftlb.http.app import Request, Response
from raftlb.http.server import HttpServer
from raftlb.ops.admin import Admin
from raftlb.ops.metrics import Metrics
from raftlb.ops.reload import Reloader, ReloadResult
from raftlb.ops.runtime import Runtime
from raftlb.proxy.cluster import ClusterProxy

YAML = """\
listeners:
  - {{name: main, address: '127.0.0.1:0', cluster: c1}}
admin: {{address: '127.0.0.1:0'}}
clusters:
  - name: c1
    nodes:
{nodes}"""


def write_config(path: Path, nodes: tuple[str, ...]) -> None:
    lines = "".join(f"      - {{id: {n}, url: 'http://127.0.0.1:{9000 + i}'}}\n" for i, n in enumerate(nodes))
    path.write_text(YAML.format(nodes=lines))


@dataclass
class Worker:
    """A worker slot that records what it tells the supervisor."""

    index: int = 1
    count: int = 2
    told: list[str] = field(default_factory=list)

    def reloaded(self, drain_timeout: float) -> None:
        self.told.append(f"drain {drain_timeout:g}")

    def reload_others(self) -> None:
        self.told.append("reload others")


@dataclass
class Host:
    """What the admin serves from: the runtime, its metrics, and a reload that records its triggers."""

    runtime: Runtime
    metrics: Metrics
    triggers: list[str] = field(default_factory=list)

    async def reload(self, trigger: str = "api") -> ReloadResult:
        self.triggers.append(trigger)
        return ReloadResult(True, ["nothing"])


class Subs:
    """Stands in for a cluster's subscriptions: records the settings it is updated with."""

    def __init__(self) -> None:
        self.updates: list[ClusterConfig] = []
        self.nodes: dict[str, object] = {}
        self.rejected: dict[str, int] = {}

    def update(self, cluster: ClusterConfig) -> None:
        self.updates.append(cluster)


class NoBuilder:
    """A plan that binds no listener and adds no cluster asks nothing of the server."""

    def new_proxy(self, cluster: ClusterConfig) -> ClusterProxy:
        raise AssertionError("no cluster is added")

    def add_cluster(self, cluster: ClusterConfig, proxy: ClusterProxy) -> None:
        raise AssertionError("no cluster is added")

    async def start_listener(self, lc: ListenerConfig, proxy: ClusterProxy) -> HttpServer:
        raise AssertionError("no listener is bound")

    async def close_retired_clients(self, cluster: str | None = None) -> None:
        raise AssertionError("no subscriptions are replaced")


def runtime_from(path: Path) -> Runtime:
    config = load_config(str(path))
    rt = Runtime(config, Worker())
    for cluster in config.clusters:
        rt.proxies[cluster.name] = ClusterProxy(cluster)
        rt.subscriptions[cluster.name] = Subs()  # type: ignore[assignment]
    return rt


def request(path: str, method: str = "GET") -> Request:
    return Request(method, path, path, {}, {}, b"")


async def answer(admin: Admin, path: str, method: str = "GET") -> tuple[int, dict[str, object]]:
    resp = await admin.handle(request(path, method))
    assert isinstance(resp, Response)
    doc = json.loads(resp.body)
    assert isinstance(doc, dict)
    return resp.status, doc


async def test_the_admin_answers_from_the_runtime(tmp_path: Path) -> None:
    write_config(tmp_path / "raftlb.yaml", ("n1", "n2"))
    rt = runtime_from(tmp_path / "raftlb.yaml")
    host = Host(rt, Metrics(rt, process=False))
    admin = Admin(host)
    status, doc = await answer(admin, "/v1/clusters")
    assert status == 200
    assert (doc["worker"], doc["reloads"], doc["draining"]) == ({"index": 1, "count": 2}, 0, False)
    assert list(doc["clusters"]) == ["c1"]  # type: ignore[call-overload]
    assert (await answer(admin, "/v1/reload", "POST"))[0] == 200
    assert host.triggers == ["api"]
    assert rt.worker is not None and rt.worker.told == ["reload others"]  # type: ignore[attr-defined]
    rt.draining = True
    assert await answer(admin, "/readyz") == (503, {"ready": False, "reason": "draining"})


async def test_the_metrics_read_the_runtime_at_scrape_time(tmp_path: Path) -> None:
    write_config(tmp_path / "raftlb.yaml", ("n1", "n2"))
    rt = runtime_from(tmp_path / "raftlb.yaml")
    metrics = Metrics(rt, process=False)
    assert b"raftlb_draining 0.0" in metrics.exposition()
    rt.draining = True
    text = metrics.exposition()
    assert b"raftlb_draining 1.0" in text and b'raftlb_cluster_has_leader{cluster="c1"} 0.0' in text


async def test_a_reload_carries_out_its_plan_on_the_runtime(tmp_path: Path) -> None:
    path = tmp_path / "raftlb.yaml"
    write_config(path, ("n1", "n2", "n3"))
    rt = runtime_from(path)
    metrics = Metrics(rt, process=False)
    events = rt.events.subscribe()
    write_config(path, ("n1", "n2"))
    result = await Reloader(rt, metrics, NoBuilder()).reload("test")
    assert (result.applied, result.changes) == (True, ["cluster c1: node n3 removed"])
    proxy, subs = rt.proxies["c1"], rt.subscriptions["c1"]
    assert [n.id for n in proxy.cluster.nodes] == ["n1", "n2"]  # the proxy reconfigured in place
    assert isinstance(subs, Subs) and subs.updates == [proxy.cluster]  # the subscriptions follow
    assert rt.config.clusters == (proxy.cluster,) and rt.reloads == 1
    published = await events.next(1.0)
    assert published is not None and [e.type for e in published] == ["config_reload"]
    assert b'raftlb_config_reloads_total{result="applied"} 1.0' in metrics.exposition()


async def test_a_runtime_not_loaded_from_a_file_cannot_reload(tmp_path: Path) -> None:
    write_config(tmp_path / "raftlb.yaml", ("n1",))
    rt = runtime_from(tmp_path / "raftlb.yaml")
    rt.config = replace(rt.config, source=None)
    result = await Reloader(rt, Metrics(rt, process=False), NoBuilder()).reload()
    assert (result.applied, result.error, rt.reloads) == (False, "no_config_file", 1)
