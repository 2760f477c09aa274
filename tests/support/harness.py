"""raftlb under test: a Config around one cluster, a Server running in the test's event loop, bounded waits,
raw-socket exchanges and real demo clusters. The fixtures built on these live in tests/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

from raftlb.config.model import (
    AdminConfig,
    ClusterConfig,
    Config,
    LimitsConfig,
    ListenerConfig,
    LoggingConfig,
    NodeConfig,
    RouteConfig,
)
from raftlb.demo.cluster import DemoCluster
from raftlb.server import Server


def make_config(cluster: ClusterConfig, *, limits: LimitsConfig | None = None, admin: bool = False,
                **overrides: Any) -> Config:
    """A Config with one listener on a free port fronting `cluster`."""
    return Config(
        listeners=(ListenerConfig(name="main", host="127.0.0.1", port=0, cluster=cluster.name),),
        clusters=(cluster,),
        admin=AdminConfig(host="127.0.0.1", port=0, enabled=admin),
        limits=limits or LimitsConfig(),
        logging=LoggingConfig(),
        **overrides,
    )


@contextlib.asynccontextmanager
async def running(cluster: ClusterConfig, **kw: Any) -> AsyncIterator[Server]:
    """Start a Server for `cluster`; `server.url` is its listener's base URL."""
    server = Server(make_config(cluster, **kw))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def url_of(server: Server) -> str:
    """The base URL of the server's first listener."""
    srv = server.listeners[0]
    return f"http://127.0.0.1:{srv.port}"


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.005) -> None:
    """Wait until predicate() is true; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 5.0,
                       half_close: bool = False) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if half_close:
        writer.write_eof()
    chunks = []
    try:
        async with asyncio.timeout(read_timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return b"".join(chunks)



@contextlib.contextmanager
def running_demo_cluster() -> Iterator[DemoCluster]:
    """A real 3-node demo cluster (PySyncObj Raft, one process per node) on free loopback ports."""
    cluster = DemoCluster(3, log_level="warning")
    cluster.start(timeout=30)
    try:
        yield cluster
    finally:
        cluster.stop()



def demo_cluster_config(cluster: DemoCluster, *, urls: dict[str, str] | None = None,
                        **overrides: Any) -> ClusterConfig:
    """raftlb's view of a DemoCluster; `urls` replaces a node's client URL (e.g. with a relay's)."""
    nodes = []
    for spec in cluster.nodes.values():
        url = (urls or {}).get(spec.id, spec.url)
        port = int(url.rsplit(":", 1)[1])
        nodes.append(NodeConfig(id=spec.id, url=url, announce_url=spec.url, host="127.0.0.1", port=port))
    reads = RouteConfig(methods=frozenset({"GET", "HEAD"}), path=re.compile("^/kv"), kind="read",
                        policy="leader", idempotent=False)
    kw: dict[str, Any] = {"liveness_timeout": 0.6, "routes": (reads,)}
    kw.update(overrides)
    return ClusterConfig(name="demo", kind="native", nodes=tuple(nodes), **kw)
