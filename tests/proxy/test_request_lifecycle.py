"""One request's life through the proxy, driven end to end without sockets: a client connection and node
connections on in-memory transports, the real ClusterProxy, ProxyRequest and NodePool. Each test is one
row of docs/how-it-works.md ("What happens to a write", fenced reads), seen from the client and the
nodes."""

from __future__ import annotations

import re
import time
from typing import Any

from raftlb.config.model import ClusterConfig, LimitsConfig, NodeConfig, RouteConfig
from raftlb.core.leader_table import Announcement
from raftlb.http.server import HttpConnection, HttpServer
from raftlb.proxy.cluster import ClusterProxy
from raftlb.proxy.pool import UpstreamConn
from tests.support.transport import MockTransport

READS = RouteConfig(methods=frozenset({"GET"}), path=re.compile("^/kv"), kind="read", policy="fenced",
                    idempotent=False)


def proxy_of_three(**cluster_kw: Any) -> ClusterProxy:
    """n1 leader at term 2, n2 and n3 followers, all at applied index 10."""
    nodes = tuple(NodeConfig(id=f"n{i}", url=f"http://127.0.0.1:{7000 + i}", announce_url="",
                             host="127.0.0.1", port=7000 + i) for i in (1, 2, 3))
    cluster_kw.setdefault("liveness_timeout", 30.0)  # the sweeps below move the clock: nobody goes silent
    proxy = ClusterProxy(ClusterConfig(name="c", kind="native", nodes=nodes, routes=(READS,), **cluster_kw))
    for node in ("n1", "n2", "n3"):
        announce(proxy, node, term=2, leader="n1", applied=10)
    return proxy


def announce(proxy: ClusterProxy, node: str, term: int, leader: str, applied: int = 10) -> None:
    role = "leader" if node == leader else "follower"
    proxy.on_announcement(node, Announcement(node=node, term=term, role=role, leader=leader,
                                             commit_index=applied, applied_index=applied,
                                             has_quorum=True if role == "leader" else None))


def node_conn(proxy: ClusterProxy, node: str) -> tuple[UpstreamConn, MockTransport]:
    """An open keep-alive connection to `node`, idle in its pool: the next request to it takes it."""
    pool = proxy.pools[node]
    conn = UpstreamConn(pool)
    wire = MockTransport()
    conn.connection_made(wire)
    pool.idle.append(conn)
    return conn, wire


def client(proxy: ClusterProxy, raw: bytes) -> MockTransport:
    conn = HttpConnection(HttpServer(proxy, LimitsConfig()))
    wire = MockTransport()
    conn.connection_made(wire)
    conn.data_received(raw)
    return wire


def answer(status: int, index: int | None = None, extra: bytes = b"", body: bytes = b"ok") -> bytes:
    head = b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n" % (status, len(body))
    if index is not None:
        head += b"x-raft-index: %d\r\n" % index
    return head + extra + b"\r\n" + body


def load(proxy: ClusterProxy) -> dict[str, int]:
    return {n: p.outstanding for n, p in proxy.pools.items()}


async def test_a_write_to_the_live_leader_is_relayed_and_leaves_no_load_behind() -> None:
    proxy = proxy_of_three()
    conn, node = node_conn(proxy, "n1")
    c = client(proxy, b"PUT /kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv")
    assert node.out.startswith(b"PUT /kv/a HTTP/1.1\r\n") and node.out.endswith(b"\r\n\r\nv")
    assert load(proxy) == {"n1": 1, "n2": 0, "n3": 0}
    conn.data_received(answer(200, index=11))
    assert c.out.startswith(b"HTTP/1.1 200 ") and b"x-raft-node: n1\r\n" in c.out
    assert b"x-raft-term: 2\r\n" in c.out
    assert load(proxy) == {"n1": 0, "n2": 0, "n3": 0} and not proxy.inflight


async def test_a_421_teaches_the_table_and_the_write_goes_to_the_hinted_leader() -> None:
    proxy = proxy_of_three()
    conn1, _ = node_conn(proxy, "n1")
    conn2, node2 = node_conn(proxy, "n2")
    c = client(proxy, b"POST /kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv")
    conn1.data_received(answer(421, extra=b"x-raft-leader: n2\r\nx-raft-term: 3\r\n"))
    assert node2.out.startswith(b"POST /kv/a ")  # re-sent at once, even though POST is not idempotent
    conn2.data_received(answer(200, index=12))
    assert c.out.startswith(b"HTTP/1.1 200 ") and b"x-raft-node: n2\r\n" in c.out
    assert proxy.stats.misdirected == 1 and proxy.stats.resends == {"misdirected": 1}
    assert load(proxy) == {"n1": 0, "n2": 0, "n3": 0}


async def test_an_unsafe_write_whose_node_dies_after_it_was_sent_is_outcome_unknown() -> None:
    proxy = proxy_of_three()
    conn, _ = node_conn(proxy, "n1")
    c = client(proxy, b"POST /kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv")
    conn.connection_lost(None)
    assert c.out.startswith(b"HTTP/1.1 502 ") and b"outcome_unknown" in c.out
    assert proxy.stats.outcome_unknown == 1 and load(proxy)["n1"] == 0


async def test_a_write_with_an_idempotency_key_whose_node_dies_is_re_sent_after_a_backoff() -> None:
    proxy = proxy_of_three()
    conn, _ = node_conn(proxy, "n1")
    c = client(proxy, b"POST /kv/a HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k1\r\nContent-Length: 1\r\n\r\nv")
    conn.connection_lost(None)
    assert c.out == b"" and len(proxy.held) == 1  # backing off in the hold queue
    assert proxy.stats.resends == {"idempotent_retry": 1}
    conn2, node = node_conn(proxy, "n1")
    proxy.sweep(time.monotonic() + 0.2)  # past the 50 ms backoff
    assert node.out.startswith(b"POST /kv/a ") and b"idempotency-key: k1\r\n" in node.out
    conn2.data_received(answer(200, index=11))
    assert c.out.startswith(b"HTTP/1.1 200 ")


async def test_a_higher_term_with_another_leader_preempts_a_write_waiting_on_the_old_one() -> None:
    proxy = proxy_of_three()
    node_conn(proxy, "n1")
    c = client(proxy, b"POST /kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv")
    announce(proxy, "n2", term=3, leader="n2")
    announce(proxy, "n3", term=3, leader="n2")
    # Unsafe to repeat: the client learns at once that it may have been applied.
    assert c.out.startswith(b"HTTP/1.1 502 ") and b"outcome_unknown" in c.out
    assert proxy.stats.preempted == 1


async def test_a_fenced_read_answered_below_the_token_is_discarded_and_re_sent_to_the_leader() -> None:
    proxy = proxy_of_three()
    follower = {n: node_conn(proxy, n) for n in ("n2", "n3")}
    leader_conn, leader = node_conn(proxy, "n1")
    c = client(proxy, b"GET /kv/a HTTP/1.1\r\nHost: x\r\nX-Raft-Min-Index: 10\r\n\r\n")
    sent_to = [n for n, (_, wire) in follower.items() if wire.out]
    assert len(sent_to) == 1 and not leader.out  # a follower at the index serves it
    follower[sent_to[0]][0].data_received(answer(200, index=9, body=b"old"))
    assert b"old" not in c.out and leader.out.startswith(b"GET /kv/a ")
    leader_conn.data_received(answer(200, index=10, body=b"new"))
    assert c.out.startswith(b"HTTP/1.1 200 ") and c.out.endswith(b"new")
    assert proxy.stats.fence_stale == 1 and proxy.stats.resends == {"fence_stale": 1}
    assert load(proxy) == {"n1": 0, "n2": 0, "n3": 0}


async def test_a_read_whose_token_no_node_reaches_waits_then_falls_back_to_the_leader() -> None:
    proxy = proxy_of_three(fence_wait=0.5)
    _, leader = node_conn(proxy, "n1")
    client(proxy, b"GET /kv/a HTTP/1.1\r\nHost: x\r\nX-Raft-Min-Index: 20\r\n\r\n")
    assert len(proxy.fence_waiting) == 1 and proxy.stats.fence_waited == 1
    proxy.sweep(time.monotonic() + 1.0)
    assert not proxy.fence_waiting and proxy.stats.fence_fallback == 1
    assert leader.out.startswith(b"GET /kv/a ")


async def test_the_common_paths_store_nothing_outside_the_request_slots() -> None:
    # The hot path's promise (docs/benchmarks.md): a write to the live leader and a fenced read at its index
    # touch only the slotted state; re-send, hold, wait and session state is made only when a rule sets it.
    proxy = proxy_of_three()
    conn, _ = node_conn(proxy, "n1")
    client(proxy, b"PUT /kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv")
    (write,) = proxy.inflight
    conn.data_received(answer(200, index=11))
    followers = {n: node_conn(proxy, n)[0] for n in ("n2", "n3")}
    client(proxy, b"GET /kv/a HTTP/1.1\r\nHost: x\r\nX-Raft-Min-Index: 10\r\n\r\n")
    (read,) = proxy.inflight
    assert read.node is not None
    followers[read.node].data_received(answer(200, index=10))
    assert write.finished and read.finished
    assert write.__dict__ == {} and read.__dict__ == {}
