"""Configuration: YAML in, frozen dataclasses out, validated once.

Every validation error is a `ConfigError` naming the YAML path (`clusters[0].nodes[2].url`) and, where the
YAML parser knows it, the line. Durations are written `250ms`, `5s`, `1m`; sizes `64KiB`, `16MiB` or plain
bytes. `${NAME}` and `${NAME:-default}` are expanded from the environment before parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

ClusterKind = Literal["native", "etcd", "json"]
RouteKind = Literal["read", "write"]
ReadPolicy = Literal["leader", "any", "fenced", "bounded", "linearizable"]
READ_POLICIES: tuple[str, ...] = ("leader", "any", "fenced", "bounded", "linearizable")
# Policies the data path implements today; the others are rejected by validation with a clear message.
SUPPORTED_READ_POLICIES: tuple[str, ...] = ("leader", "any")


@dataclass(frozen=True)
class NodeConfig:
    """One Raft node: where client traffic goes (`url`) and where its announcements are read."""

    id: str
    url: str  # http://host:port, no path
    announce_url: str  # defaults to url
    host: str
    port: int


@dataclass(frozen=True)
class RouteConfig:
    """A request class: method set and path regex → read or write. First match wins; no match → write."""

    methods: frozenset[str] | None  # None: any method
    path: re.Pattern[str] | None  # None: any path; matched with .search() against the path (no query)
    kind: RouteKind
    policy: ReadPolicy  # only meaningful for reads
    idempotent: bool  # a write on this route may be re-sent after an ambiguous failure


@dataclass(frozen=True)
class HoldConfig:
    """Budget for writes held while the cluster has no live leader."""

    timeout: float = 5.0
    max_requests: int = 1000
    max_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class PoolConfig:
    max_idle_per_node: int = 128
    idle_timeout: float = 30.0


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    kind: ClusterKind
    nodes: tuple[NodeConfig, ...]
    routes: tuple[RouteConfig, ...]
    liveness_timeout: float = 1.0  # a node silent this long is down
    poll_interval: float = 0.1  # status polling, for nodes that do not stream
    reconnect_min: float = 0.05  # announce stream reconnect backoff, jittered
    reconnect_max: float = 2.0
    connect_timeout: float = 1.0
    response_timeout: float = 10.0
    resend_body_limit: int = 1024 * 1024  # request bodies up to this size are kept for re-sending
    max_resends: int = 3
    retry_after: int = 1  # seconds, on 503s the proxy produces
    hold: HoldConfig = field(default_factory=HoldConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    cluster: str  # name of the cluster it fronts
    max_connections: int = 10000


@dataclass(frozen=True)
class LimitsConfig:
    """Downstream limits, shared by every listener."""

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body_bytes: int = 64 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    write_buffer_high: int = 256 * 1024  # pause the other side above this many buffered bytes


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    enabled: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: Literal["text", "json"] = "text"
    access_log: bool = False


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    drain_timeout: float = 10.0
    source: str | None = None  # the file it came from

    def cluster(self, name: str) -> ClusterConfig:
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(name)
