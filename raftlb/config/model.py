"""Configuration: frozen dataclasses, validated once (reading YAML into them is `raftlb.config.load`).

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
UPSTREAM_PROTOCOLS: tuple[str, ...] = ("http1", "http2")  # how HTTP/2 clients' requests reach the nodes
# The roles of raft-announce/1 (docs/protocol.md): what a node announces, what a `json` status maps to.
ROLES: tuple[str, ...] = ("leader", "follower", "candidate", "learner")


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
    max_lag_entries: int | None = None  # bounded reads: a node at most this many entries behind the leader
    max_lag_ms: int | None = None  # bounded reads: a node caught up with the leader at most this long ago
    prefer_followers: bool = True  # reads: followers first (the cluster's leader_read_margin); False: no bias
    cookie: bool | None = None  # set/honour the raftlb-index cookie; None: the cluster's index_cookie
    fence_wait: float | None = None  # fenced reads: how long to wait for a node to reach the index
    stream: bool = False  # answers are long-lived streams (watches): no response_timeout between their reads
    # gRPC calls only: the route matches a call whose (first) request message has this field number set to
    # a non-zero varint, a protobuf `bool` that is true (etcd's RangeRequest.serializable is 7). Such a
    # route never matches an HTTP/1 request.
    proto_flag: int | None = None


@dataclass(frozen=True)
class HoldConfig:
    """Budget for writes held while the cluster has no live leader."""

    timeout: float = 5.0
    max_requests: int = 1000
    max_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class PoolConfig:
    max_idle_per_node: int = 512  # at least the concurrency expected per node, or connections churn
    idle_timeout: float = 30.0


FieldPath = tuple[str, ...]  # a dotted path into a JSON document; () is the whole document


@dataclass(frozen=True)
class StatusConfig:
    """How the `json` adapter reads a node's status: the request, then where each announcement field sits
    in the JSON answer and how its values map (docs/clusters.md). Mappings are kept as pairs so the config
    stays hashable; raw role values are compared case-insensitively."""

    term: FieldPath
    path: str = "/status"
    method: str = "GET"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    role: FieldPath | None = None  # without it the role follows from `leader` (this node, another, none)
    roles: tuple[tuple[str, str], ...] = ()  # raw value -> role; default: the role names themselves
    leader: FieldPath | None = None
    leader_ids: tuple[tuple[str, str], ...] = ()  # raw leader value -> node id, checked first
    leader_match: Literal["address", "host"] = "address"  # else: node id, or host:port / host of a node
    applied_index: FieldPath | None = None  # the index that fences reads
    commit_index: FieldPath | None = None
    has_quorum: FieldPath | None = None


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
    max_resends: int = 3  # re-sends of one request to a node (a failed read-index round is not one)
    retry_after: int = 1  # seconds, on 503s the proxy produces
    fence_wait: float = 1.0  # fenced reads wait this long for some node to reach the client's index
    follower_wait: float = 0.05  # ... and this long for a follower when only the leader has it (0: never)
    # Reads preferring followers: the leader takes one only when every follower at the index has at least this
    # many more requests outstanding than it (None: never, while a follower is at the index).
    leader_read_margin: int | None = 16
    # How requests from HTTP/2 clients reach the nodes: `http1` (HTTP/1.1) or `http2` (h2c, or TLS with ALPN
    # h2: multiplexed connections). gRPC calls always go over HTTP/2; HTTP/1.1 clients over HTTP/1.1.
    upstream_protocol: str = "http1"
    index_cookie: bool = False  # every route sets and honours the raftlb-index cookie (routes may override)
    read_index_path: str = "/raft/read_index"  # where the leader hands out read indexes (linearizable)
    session_gap_wait: float = 1.0  # a session write waits this long for the seq before it to arrive
    max_sessions: int = 100_000  # session ordering state kept (least recently used dropped beyond)
    # Authenticated announcements: HMAC-SHA256 keys (any one verifies: two during a rotation), and how far
    # an event's ts_ms may be from our clock before it counts as a replay.
    announce_keys: tuple[bytes, ...] = ()
    announce_max_skew: float = 5.0
    tls: TlsConfig | None = None  # for https:// node and announce URLs
    hold: HoldConfig = field(default_factory=HoldConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    sidecar: bool = False  # etcd/json: each node's announce_url is a `raftlb announce` sidecar (streamed)
    status: StatusConfig | None = None  # kind json: how a status answer is read


@dataclass(frozen=True)
class TlsConfig:
    """TLS files. On a listener: `cert`+`key` (required), `ca` to require client certificates (mTLS).
    For a cluster's https nodes: `ca` to verify them (default: the system store), `cert`+`key` to present a
    client certificate, `verify: false` to skip verification (tests only)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    verify: bool = True


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    cluster: str  # name of the cluster it fronts
    max_connections: int = 10000
    tls: TlsConfig | None = None


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
    send_timeout: float = 60.0  # a client that reads nothing of its answer for this long is cut off


@dataclass(frozen=True)
class H2Config:
    """Downstream HTTP/2 (h2c with prior knowledge, and TLS with ALPN `h2`), on every listener."""

    enabled: bool = True
    max_concurrent_streams: int = 100  # per connection (SETTINGS_MAX_CONCURRENT_STREAMS)
    initial_window_size: int = 65535  # per stream, for request bodies (the connection's is 4x)
    # Beyond these per connection and second: GOAWAY ENHANCE_YOUR_CALM (rapid reset, SETTINGS/PING floods).
    max_resets_per_second: int = 200
    max_control_frames_per_second: int = 1000


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    enabled: bool = True
    tls: TlsConfig | None = None
    token: str | None = None  # bearer token required by mutating endpoints (POST /v1/reload)
    # Host names (beside IP literals and `localhost`) the admin answers to: a browser tricked into sending a
    # request by DNS rebinding names the attacker's host. An entry `.example.com` also allows its subdomains;
    # `*` allows any name.
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = 10000  # connections beyond are answered 503 overloaded and closed


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
    workers: int = 1  # processes sharing the listeners (SO_REUSEPORT); worker i serves the admin on port + i
    http2: H2Config = field(default_factory=H2Config)
    source: str | None = None  # the file it came from

    def cluster(self, name: str) -> ClusterConfig:
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(name)


CLUSTER_KINDS: tuple[str, ...] = ("native", "etcd", "json")
ETCD_POLL_INTERVAL = 0.025  # etcd's status answer is cheap: poll it often, so a new leader is seen soon
MAX_WORKERS = 64
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[str, ...] = ("text", "json")


WILDCARD_HOSTS: tuple[str, ...] = ("0.0.0.0", "::")


def shared_port_problem(cfg: Config, workers: int) -> str | None:
    """Why `workers` processes cannot share `cfg`'s addresses (None: they can). Every listener port is
    shared (SO_REUSEPORT), so it must be a fixed one; the admin listener takes one port per worker (port,
    port + 1, ...), none of them a listener's."""
    if workers <= 1:
        return None
    for lc in cfg.listeners:
        if lc.port == 0:
            return (f"listener {lc.name} has port 0 (any free port), which {workers} workers cannot share: "
                    "give it a port")
    admin = cfg.admin
    if not admin.enabled or admin.port == 0:
        return None  # (port 0: each worker's admin listener gets a free port of its own, logged at start)
    last = admin.port + workers - 1
    if last > 65535:
        return f"the admin ports of {workers} workers ({admin.port}-{last}) go past 65535"
    for lc in cfg.listeners:
        same_host = lc.host == admin.host or lc.host in WILDCARD_HOSTS or admin.host in WILDCARD_HOSTS
        if same_host and admin.port <= lc.port <= last:
            return (f"the admin ports of {workers} workers ({admin.port}-{last}) include listener "
                    f"{lc.name}'s port {lc.port}")
    return None
