"""Fake native Raft nodes that serve their API over gRPC (docs/protocol.md, the gRPC form of the contract).

Each `GrpcNode` pairs a `FakeNode` (its announcements, on HTTP/1) with a grpcio server (its data port) that
answers every method by the node's role as the contract says:
- the leader applies the call: `/kv.KV/Put` stores nothing but answers OK with the request bytes echoed and
  `x-raft-index` metadata (the node's applied index, bumped by one per call); `/kv.KV/Stream` (server
  streaming) sends a message every `tick` seconds until the client goes;
- a node that is not the leader answers Trailers-Only UNAVAILABLE with `x-raft-leader` (the leader it knows,
  empty for none) and `x-raft-term`: "not the leader, nothing applied".

`calls` records (method, node) of every call a node received, for assertions. grpcio serves in its own
threads: the test's event loop is never blocked by it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

from raftlb.config.model import ClusterConfig, NodeConfig, RouteConfig
from tests.support.fakes import FakeNode

try:
    import grpc as _grpc
except ImportError:  # pragma: no cover (grpcio is in the test extra)
    _grpc = None

grpc: Any = _grpc


class GrpcNode:
    """A FakeNode's announcements plus a gRPC data port that answers by the node's role."""

    def __init__(self, node: FakeNode, calls: list[tuple[str, str]], tick: float = 0.05) -> None:
        self.node = node
        self.calls = calls
        self.tick = tick
        self.actual_leader: str | None = None  # overrides the announced leader for "not the leader" answers
        self.hint_term: int | None = None  # ... and the announced term
        self.lock = threading.Lock()
        self.server: Any = None
        self.port = 0
        self.streaming = threading.Event()  # a server stream is open on this node
        self.stream_padding = 0  # bytes added to each streamed message
        self.streamed = 0  # messages handed to grpcio by server streams (it blocks when the window is shut)

    @property
    def id(self) -> str:
        return self.node.id

    def leads(self) -> bool:
        if self.actual_leader is not None:
            return self.actual_leader == self.id
        return self.node.role == "leader"

    def start(self) -> None:
        me = self

        class Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
            def service(self, details: Any) -> Any:
                method = details.method
                if method == "/kv.KV/Stream":
                    return grpc.unary_stream_rpc_method_handler(me.stream)
                return grpc.unary_unary_rpc_method_handler(lambda req, ctx: me.unary(method, req, ctx))

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[Handler()])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None)
            self.server = None

    def _refuse_unless_leader(self, context: Any) -> bool:
        if self.leads():
            return False
        known = self.actual_leader if self.actual_leader is not None else self.node.leader
        term = self.hint_term if self.hint_term is not None else self.node.term
        context.set_trailing_metadata((("x-raft-leader", known or ""), ("x-raft-term", str(term))))
        context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader")
        return True  # (abort raises: not reached)

    def unary(self, method: str, request: bytes, context: Any) -> bytes:
        with self.lock:
            self.calls.append((method, self.id))
        self._refuse_unless_leader(context)
        with self.lock:
            self.node.applied_index += 1
            index = self.node.applied_index
        context.send_initial_metadata((("x-raft-index", str(index)),))
        return request

    def stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        with self.lock:
            self.calls.append(("/kv.KV/Stream", self.id))
        self._refuse_unless_leader(context)
        context.send_initial_metadata((("x-raft-index", str(self.node.applied_index)),))
        self.streaming.set()
        try:
            n = 0
            pad = b"p" * self.stream_padding
            while context.is_active():
                n += 1
                self.streamed += 1
                yield request + b"%d" % n + pad
                if self.tick:
                    time.sleep(self.tick)
        finally:
            self.streaming.clear()

    def node_config(self) -> NodeConfig:
        return NodeConfig(id=self.id, url=f"http://127.0.0.1:{self.port}", announce_url=self.node.url,
                          host="127.0.0.1", port=self.port)


def grpc_cluster_config(nodes: list[GrpcNode], routes: tuple[RouteConfig, ...] = (),
                        **overrides: Any) -> ClusterConfig:
    """A native cluster whose data ports are the gRPC servers and whose announcements are the FakeNodes'."""
    return ClusterConfig(name="c1", kind="native", nodes=tuple(n.node_config() for n in nodes), routes=routes,
                         **overrides)
