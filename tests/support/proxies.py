"""A ClusterProxy without sockets: a pool that records who asks for a connection, and raw requests fed
through an HttpConnection on a recording transport."""

from __future__ import annotations

from typing import Any

from raftlb.config.model import LimitsConfig
from raftlb.http.server import HttpConnection, HttpServer
from raftlb.proxy.cluster import ClusterProxy
from raftlb.proxy.request import ProxyRequest
from tests.support.transport import MockTransport


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


def send(proxy: ClusterProxy, raw: bytes) -> MockTransport:
    """Feed `raw` to `proxy` through a new downstream connection; its transport records the answers."""
    conn = HttpConnection(HttpServer(proxy, LimitsConfig()))
    t = MockTransport()
    conn.connection_made(t)
    conn.data_received(raw)
    return t
