"""A raftlb Server that is never started: the test feeds its proxies announcements and calls its admin
routes directly (no sockets)."""

from __future__ import annotations

from raftlb.config.model import ClusterConfig, Config, NodeConfig
from raftlb.core.leader_table import Announcement
from raftlb.http.app import Request, Response
from raftlb.ops.admin import Admin
from raftlb.server import Server


def cluster_config(name: str = "c1", n: int = 3) -> ClusterConfig:
    """A native cluster of `n` nodes n1..nN on 127.0.0.1:9001.. (nothing listens there), no routes."""
    nodes = tuple(NodeConfig(f"n{i}", f"http://127.0.0.1:{9000 + i}", f"http://127.0.0.1:{9000 + i}",
                             "127.0.0.1", 9000 + i) for i in range(1, n + 1))
    return ClusterConfig(name=name, kind="native", nodes=nodes, routes=())


def offline_server(*clusters: ClusterConfig) -> Server:
    """A Server that is never started: its proxies are fed announcements by the test."""
    cfgs = clusters or (cluster_config(),)
    server = Server(Config(listeners=(), clusters=cfgs))
    for c in cfgs:
        server.proxies[c.name] = server.new_proxy(c)
        server.metrics.cluster_added(c.name)
    return server


def ann(node: str, term: int, role: str, leader: str | None = None, applied: int | None = None,
        commit: int | None = None) -> Announcement:
    """An announcement from `node`; the commit index defaults to the applied one."""
    return Announcement(node=node, term=term, role=role, leader=leader, applied_index=applied,
                        commit_index=commit if commit is not None else applied)


def request(path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Request:
    """An admin request for `path` (with its query string), no body."""
    target = path
    path, _, qs = target.partition("?")
    query = dict(p.split("=", 1) for p in qs.split("&") if "=" in p)
    return Request(method, target, path, query, headers or {}, b"")


async def get(admin: Admin, path: str, method: str = "GET",
              headers: dict[str, str] | None = None) -> Response:
    """`admin`'s answer to `method path`, called directly (no sockets)."""
    resp = await admin.handle(request(path, method, headers))
    assert isinstance(resp, Response)
    return resp
