"""ClusterProxy decisions without sockets: hold order, hold budget, re-send rule, leader choice."""

from __future__ import annotations

import time
from typing import Any

from test_http_server import MockTransport

from raftlb.config.model import ClusterConfig, HoldConfig, LimitsConfig, NodeConfig
from raftlb.core.leader_table import Announcement
from raftlb.http.server import HttpConnection, HttpServer
from raftlb.proxy.cluster import ClusterProxy
from raftlb.proxy.request import ProxyRequest


class RecordingPool:
    """Stands in for a NodePool: records the order requests ask for connections."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.outstanding = 0
        self.acquired: list[ProxyRequest] = []

    def take_idle(self) -> None:
        return None  # never an idle connection: every request asks (and is recorded)

    def acquire(self, req: Any) -> None:
        self.acquired.append(req)

    def assign(self, req: Any) -> None:
        self.outstanding += 1
        self.acquired.append(req)

    def unassign(self) -> None:
        self.outstanding -= 1

    def sweep(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


def make_proxy(**cluster_kw: Any) -> tuple[ClusterProxy, dict[str, RecordingPool]]:
    nodes = tuple(NodeConfig(id=f"n{i}", url=f"http://127.0.0.1:{7000 + i}", announce_url="",
                             host="127.0.0.1", port=7000 + i) for i in (1, 2, 3))
    proxy = ClusterProxy(ClusterConfig(name="c", kind="native", nodes=nodes, routes=(), **cluster_kw))
    pools = {n.id: RecordingPool(n.id) for n in nodes}
    proxy.pools = pools  # type: ignore[assignment]
    return proxy, pools


def send(proxy: ClusterProxy, raw: bytes) -> MockTransport:
    conn = HttpConnection(HttpServer(proxy, LimitsConfig()))
    t = MockTransport()
    conn.connection_made(t)
    conn.data_received(raw)
    return t


def announce(proxy: ClusterProxy, node: str, term: int, role: str, leader: str | None) -> None:
    proxy.on_announcement(node, Announcement(node=node, term=term, role=role, leader=leader,
                                             has_quorum=True if role == "leader" else None))


async def test_held_writes_are_released_in_arrival_order() -> None:
    proxy, pools = make_proxy()
    for i in range(10):
        send(proxy, b"PUT /k%d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv" % i)
    assert len(proxy.held) == 10 and proxy.stats.held == 10
    announce(proxy, "n2", 5, "leader", "n2")
    assert [r.ex.target for r in pools["n2"].acquired] == [b"/k%d" % i for i in range(10)]
    assert not proxy.held and proxy.stats.released == 10


async def test_hold_budget_in_bytes() -> None:
    proxy, _ = make_proxy(hold=HoldConfig(timeout=5, max_requests=100, max_bytes=10))
    send(proxy, b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n12345678")
    t = send(proxy, b"PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n12345678")
    assert t.out.startswith(b"HTTP/1.1 503 ") and b"hold_queue_full" in t.out
    assert len(proxy.held) == 1


async def test_expired_holds_answer_503_with_retry_after() -> None:
    proxy, _ = make_proxy(hold=HoldConfig(timeout=1.0), retry_after=3)
    t = send(proxy, b"DELETE /a HTTP/1.1\r\nHost: x\r\n\r\n")
    proxy.sweep(time.monotonic() + 0.5)
    assert t.out == b""
    proxy.sweep(time.monotonic() + 1.5)
    assert t.out.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 3" in t.out and b'"error":"no_leader"' in t.out


async def test_writes_go_only_to_the_leader_and_a_deposed_one_gets_nothing() -> None:
    proxy, pools = make_proxy()
    announce(proxy, "n1", 3, "leader", "n1")
    send(proxy, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    announce(proxy, "n3", 4, "leader", "n3")
    announce(proxy, "n1", 3, "leader", "n1")  # the old leader keeps claiming its old term
    for _ in range(5):
        send(proxy, b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert len(pools["n1"].acquired) == 1
    assert len(pools["n3"].acquired) == 5


async def test_client_that_leaves_while_held_is_dropped_from_the_queue() -> None:
    proxy, pools = make_proxy()
    conn = HttpConnection(HttpServer(proxy, LimitsConfig()))
    conn.connection_made(MockTransport())
    conn.data_received(b"PUT /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    conn.connection_lost(None)
    announce(proxy, "n1", 2, "leader", "n1")
    assert pools["n1"].acquired == []


async def test_hold_budget_counts_chunked_bodies_as_they_arrive() -> None:
    proxy, _ = make_proxy(hold=HoldConfig(timeout=5, max_requests=100, max_bytes=10))
    conn = HttpConnection(HttpServer(proxy, LimitsConfig()))
    t = MockTransport()
    conn.connection_made(t)
    conn.data_received(b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n12345\r\n")
    assert len(proxy.held) == 1 and t.out == b""
    conn.data_received(b"8\r\n12345678\r\n")
    assert t.out.startswith(b"HTTP/1.1 503 ") and b"hold_queue_full" in t.out
    assert not proxy.held and proxy.held_bytes == 0
