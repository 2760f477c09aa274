"""Configuration: YAML in, frozen dataclasses out, validated once.

Every validation error is a `ConfigError` naming the YAML path (`clusters[0].nodes[2].url`) and, where the
YAML parser knows it, the line. Durations are written `250ms`, `5s`, `1m`; sizes `64KiB`, `16MiB` or plain
bytes. `${NAME}` and `${NAME:-default}` are expanded from the environment before parsing.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor

from raftlb.errors import ConfigError

ClusterKind = Literal["native", "etcd", "json"]
RouteKind = Literal["read", "write"]
ReadPolicy = Literal["leader", "any", "fenced", "bounded", "linearizable"]
READ_POLICIES: tuple[str, ...] = ("leader", "any", "fenced", "bounded", "linearizable")
# Policies the data path implements (all of them; kept separate so a new policy can land in steps).
SUPPORTED_READ_POLICIES: tuple[str, ...] = READ_POLICIES


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
    prefer_followers: bool = True  # reads: the leader serves only when no follower is eligible
    cookie: bool | None = None  # set/honour the raftlb-index cookie; None: the cluster's index_cookie
    fence_wait: float | None = None  # fenced reads: how long to wait for a node to reach the index


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
    max_resends: int = 3
    retry_after: int = 1  # seconds, on 503s the proxy produces
    fence_wait: float = 1.0  # fenced reads wait this long for some node to reach the client's index
    follower_wait: float = 0.05  # ... and this long for a follower when only the leader has it (0: never)
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


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    enabled: bool = True
    tls: TlsConfig | None = None
    token: str | None = None  # bearer token required by mutating endpoints (POST /v1/reload)


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


CLUSTER_KINDS: tuple[str, ...] = ("native", "etcd", "json")
ETCD_POLL_INTERVAL = 0.025  # etcd's status answer is cheap: poll it often, so a new leader is seen soon
_ANNOUNCE_ROLES: tuple[str, ...] = ("leader", "follower", "candidate", "learner")  # as leader_table.ROLES
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[str, ...] = ("text", "json")

T = TypeVar("T")
_Conv = Callable[["_Cursor"], object]
_NULL, _STR, _MERGE = "tag:yaml.org,2002:null", "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Z-]+")  # an HTTP token (RFC 9110 §5.6.2), once upper-cased
_NUMBER_UNIT = re.compile(r"(-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*([A-Za-z]*)")
_DURATION_MS = {"": 1000, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_WILDCARD_HOSTS = ("0.0.0.0", "::")
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def load_config(path: str, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the YAML file at `path`, with `environ` (default `os.environ`) for `${NAME}`.

    Raises `ConfigError` naming the file, the YAML path and the line of anything that cannot be used.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as exc:
        raise ConfigError("", "config file not found", file=path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", "") or exc
        raise ConfigError("", f"cannot read config file: {reason}", file=path) from exc
    return parse_config(text, source=path, environ=environ)


def parse_config(text: str, source: str | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Expand `${NAME}` / `${NAME:-default}` in `text`, parse it as YAML and validate it into a `Config`.

    `source` names the file in errors and becomes `Config.source`.
    """
    expanded = _expand_env(text, os.environ if environ is None else environ, source)
    try:
        root = yaml.compose(expanded, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark, message = exc.problem_mark or exc.context_mark, exc.problem or exc.context
        if exc.problem and exc.context:  # e.g. "while parsing a block mapping (line 3): expected <block end>"
            where = f" (line {exc.context_mark.line + 1})" if exc.context_mark else ""
            message = f"{exc.context}{where}: {exc.problem}"
        line = mark.line + 1 if mark else None
        raise ConfigError("", f"invalid YAML: {message}", line=line, file=source) from exc
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = expanded.count("\n", 0, exc.position) + 1
        message = f"invalid YAML: character U+{exc.character:04X} is not allowed"
        raise ConfigError("", message, line=line, file=source) from exc
    if root is None:
        raise ConfigError("", "the file is empty: it needs at least `listeners` and `clusters`", file=source)
    return _config(_Cursor(root, "", source))


def summarize(cfg: Config) -> str:
    """One line for humans: `1 listener, 1 cluster (demo: 3 nodes, 2 routes)`."""
    clusters = "; ".join(
        f"{c.name}: {_n(len(c.nodes), 'node')}, {_n(len(c.routes), 'route')}" for c in cfg.clusters
    )
    return f"{_n(len(cfg.listeners), 'listener')}, {_n(len(cfg.clusters), 'cluster')} ({clusters})"


def check_main(path: str) -> int:
    """`raftlb check -c FILE`: print a summary and return 0, or print the error to stderr and return 2."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"raftlb: config error: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: OK — {summarize(cfg)}")
    return 0


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _expand_env(text: str, environ: Mapping[str, str], source: str | None) -> str:
    # Line by line, so that an error can name its line. Comment lines are left alone: they show examples.
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if "${" in line and not line.lstrip().startswith("#"):
            fail = partial(ConfigError, "", line=i + 1, file=source)
            lines[i] = _ENV_REF.sub(partial(_env_value, environ, fail), line)
    return "\n".join(lines)


def _env_value(environ: Mapping[str, str], fail: Callable[[str], ConfigError], m: re.Match[str]) -> str:
    if m[0] == "$${":
        return "${"
    name, default = m[1], m[2]
    if name is None:
        raise fail("malformed ${...}: write ${NAME} or ${NAME:-default}, or $${ for a literal ${")
    value = environ.get(name)
    if not value and default is not None:  # `:-` as in the shell: an empty value takes the default too
        value = default
    if value is None:
        raise fail(f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)")
    if "\n" in value or "\r" in value:  # it would shift every line number after it
        raise fail(f"environment variable {name} contains a line break")
    return value


class _Cursor:
    """A YAML node and its path in the document; every accessor raises a ConfigError naming both."""

    def __init__(self, node: yaml.Node, path: str, file: str | None) -> None:
        self.node, self.path, self.file = node, path, file

    @property
    def line(self) -> int | None:
        return self.node.start_mark.line + 1 if self.node.start_mark else None

    def at(self, node: yaml.Node, key: str | int) -> _Cursor:
        path = f"{self.path}[{key}]" if isinstance(key, int) else f"{self.path}.{key}" if self.path else key
        return _Cursor(node, path, self.file)

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.path, message, line=self.line, file=self.file)

    def bad(self, expected: str) -> ConfigError:
        node = self.node
        if isinstance(node, yaml.CollectionNode):
            got = "a mapping" if isinstance(node, yaml.MappingNode) else "a list"
        elif node.tag == _NULL:
            got = "nothing"
        else:
            got = repr(node.value) if node.tag == _STR else str(node.value)
        return self.error(f"must be {expected}, got {got}")

    def mapping(self, keys: Collection[str], extensions: bool = False) -> _Map:
        """The entries of a mapping (nothing counts as empty). Unknown keys are errors; with `extensions`,
        keys starting with `x-` are ignored (a place for YAML anchors)."""
        if self.node.tag == _NULL:
            return _Map(self, {})
        if not isinstance(self.node, yaml.MappingNode):
            raise self.bad("a mapping")
        seen: dict[str, int | None] = {}
        for key_node, _ in self.node.value:  # a key written twice is a mistake; a merged-in key is not
            if key_node.tag != _MERGE:
                _claim(seen, key := self._key(key_node), self.at(key_node, key), "key")
        try:
            SafeConstructor().flatten_mapping(self.node)  # resolves `<<: *anchor`; own keys come last
        except yaml.YAMLError as exc:
            raise self.error(f"invalid merge: {getattr(exc, 'problem', exc)}") from None
        entries: dict[str, _Cursor] = {}
        for key_node, value_node in self.node.value:
            key = self._key(key_node)
            if key in keys:
                entries[key] = self.at(value_node, key)
            elif not (extensions and key.startswith("x-")):
                raise self.at(key_node, key).error(f"unknown key{_suggest(key, keys)}")
        return _Map(self, entries)

    def _key(self, node: yaml.Node) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL:
            raise _Cursor(node, self.path, self.file).error("keys must be plain names")
        return str(node.value)

    def items(self, allow_empty: bool = False) -> list[_Cursor]:
        if allow_empty and self.node.tag == _NULL:
            return []
        if not isinstance(self.node, yaml.SequenceNode) or not (self.node.value or allow_empty):
            raise self.bad("a list" if allow_empty else "a non-empty list")
        return [self.at(node, i) for i, node in enumerate(self.node.value)]

    def scalar(self) -> object:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.bad("a single value")
        try:
            return SafeConstructor().construct_object(self.node)  # fresh: constructors cache every node
        except yaml.YAMLError as exc:  # e.g. an unknown !tag
            raise self.error(str(getattr(exc, "problem", exc))) from None

    def text(self, expected: str = "a string") -> str:
        """The scalar as written, so that `id: 010` is "010", not 8."""
        if not isinstance(self.node, yaml.ScalarNode) or self.node.tag == _NULL:
            raise self.bad(expected)
        return str(self.node.value)

    def name(self) -> str:
        expected = "a name made of letters, digits, '_', '.' and '-'"
        if not _NAME.fullmatch(value := self.text(expected)):
            raise self.bad(expected)
        return value

    def choice(self, options: tuple[str, ...]) -> str:
        expected = f"one of {', '.join(options)}"
        if (value := self.text(expected).lower()) not in options:
            raise self.error(f"must be {expected}, got {self.node.value!r}{_suggest(value, options, False)}")
        return value

    def boolean(self) -> bool:
        if not isinstance(value := self.scalar(), bool):
            raise self.bad("true or false")
        return value

    def integer(self, minimum: int = 0) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad("a whole number")
        if value < minimum:
            raise self.error(f"must be at least {minimum}, got {value}")
        return value

    def duration(self, allow_zero: bool = False) -> float:
        """Seconds, from `250ms`, `1.5s`, `1m`, `2h` or a bare number of seconds."""
        value, expected = self.scalar(), "a duration like 250ms, 5s, 1m or a number of seconds"
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            seconds = float(value)
        elif isinstance(value, str) and (m := _NUMBER_UNIT.fullmatch(value.strip())):
            if m[2] not in _DURATION_MS:
                raise self.error(f"unknown duration unit {m[2]!r} (use ms, s, m or h), got {value!r}")
            seconds = float(m[1]) * _DURATION_MS[m[2]] / 1000
        else:
            raise self.bad(expected)
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise self.bad("zero or more" if allow_zero else "more than zero")
        return seconds

    def size(self, minimum: int = 0) -> int:
        """Bytes, from `64KiB`, `16MiB`, `1GiB`, `10KB`, `1MB` or a bare number of bytes."""
        value = self.scalar()
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str) and (m := _NUMBER_UNIT.fullmatch(value.strip())):
            if (unit := _SIZE_UNITS.get(m[2].lower())) is None:
                units = "B, KB, MB, GB, KiB, MiB or GiB"
                raise self.error(f"unknown size unit {m[2]!r} (use {units}), got {value!r}")
            size = int(m[1]) * unit if m[1].lstrip("-").isdigit() else int(float(m[1]) * unit)
        else:
            raise self.bad("a size like 64KiB, 16MiB or a number of bytes")
        if size < minimum:
            raise self.bad(f"at least {minimum} bytes")
        return size

    def address(self) -> tuple[str, int]:
        """`host:port` to bind (IPv6 in brackets); port 0 picks a free port."""
        expected = "host:port, like 127.0.0.1:8080"
        host, _, port = self.text(expected).rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else "" if ":" in host else host
        valid_port = port.isascii() and port.isdigit() and int(port) <= 65535
        if not host or any(c.isspace() for c in host) or not valid_port:
            raise self.bad(expected)
        return host, int(port)

    def url(self) -> tuple[str, str, int]:
        """A node's URL: (`scheme://host:port`, host, port), the port defaulting to 80 or 443."""
        raw, expected = self.text(), "an http:// or https:// URL with host and port"
        try:
            parts = urlsplit(raw)
            host, port = parts.hostname, parts.port
        except ValueError:
            raise self.bad(expected) from None
        if parts.scheme not in ("http", "https") or not host or port == 0 or any(c.isspace() for c in raw):
            raise self.bad(expected)
        if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in raw or "#" in raw:
            raise self.bad("a URL without path, query or fragment")
        if parts.username is not None:
            raise self.error("must not carry credentials")
        port = port or (443 if parts.scheme == "https" else 80)
        return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}", host, port


class _Map:
    """The checked entries of one YAML mapping."""

    def __init__(self, owner: _Cursor, entries: dict[str, _Cursor]) -> None:
        self.owner, self.entries = owner, entries

    def get(self, key: str) -> _Cursor | None:
        return self.entries.get(key)

    def require(self, key: str, message: str = "is required") -> _Cursor:
        if key not in self.entries:
            owner = self.owner
            raise ConfigError(owner.at(owner.node, key).path, message, line=owner.line, file=owner.file)
        return self.entries[key]

    def opt(self, key: str, conv: Callable[[_Cursor], T], default: T) -> T:
        return default if (cur := self.entries.get(key)) is None else conv(cur)

    def fields(self, spec: Mapping[str, _Conv]) -> dict[str, Any]:
        """Converted values of the keys in `spec` that are present; absent keys keep dataclass defaults."""
        return {key: conv(self.entries[key]) for key, conv in spec.items() if key in self.entries}


def _make(make: Callable[..., T], spec: Mapping[str, _Conv]) -> Callable[[_Cursor], T]:
    return lambda cur: make(**cur.mapping(spec).fields(spec))


def _at_least_one(cur: _Cursor) -> int:
    return cur.integer(minimum=1)


# Each section: key → converter. `_Cursor.duration` is a positive duration, `.integer` and `.size` are >= 0.
_LIMITS: dict[str, _Conv] = {
    "max_header_bytes": lambda c: c.size(minimum=1024), "max_headers": _at_least_one,
    "max_body_bytes": _Cursor.size, "write_buffer_high": lambda c: c.size(minimum=1),
    "header_timeout": _Cursor.duration, "body_timeout": _Cursor.duration, "idle_timeout": _Cursor.duration,
}
_LOGGING: dict[str, _Conv] = {
    "level": lambda c: c.choice(LOG_LEVELS), "format": lambda c: c.choice(LOG_FORMATS),
    "access_log": _Cursor.boolean,
}
_HOLD: dict[str, _Conv] = {
    "timeout": lambda c: c.duration(allow_zero=True),  # 0: fail at once rather than hold
    "max_requests": _Cursor.integer, "max_bytes": _Cursor.size,
}
_POOL: dict[str, _Conv] = {"max_idle_per_node": _Cursor.integer, "idle_timeout": _Cursor.duration}
_RECONNECT: dict[str, _Conv] = {"min": _Cursor.duration, "max": _Cursor.duration}
_CLUSTER: dict[str, _Conv] = {
    "liveness_timeout": _Cursor.duration, "poll_interval": _Cursor.duration,
    "connect_timeout": _Cursor.duration, "response_timeout": _Cursor.duration,
    "resend_body_limit": _Cursor.size, "max_resends": _Cursor.integer,
    "retry_after": lambda c: math.ceil(c.duration()),  # Retry-After is in whole seconds
    "hold": _make(HoldConfig, _HOLD), "pool": _make(PoolConfig, _POOL),
    "fence_wait": lambda c: c.duration(allow_zero=True), "index_cookie": _Cursor.boolean,
    "follower_wait": lambda c: c.duration(allow_zero=True),
    "read_index_path": lambda c: _abs_path(c), "session_gap_wait": lambda c: c.duration(allow_zero=True),
    "max_sessions": _at_least_one,
}
_TOP: dict[str, _Conv] = {
    "limits": _make(LimitsConfig, _LIMITS),
    "logging": _make(LoggingConfig, _LOGGING),
    "drain_timeout": lambda c: c.duration(allow_zero=True),
}
# (host, port, YAML path, line) of each address bound so far: two sockets must not share one.
_Bound = list[tuple[str, int, str, int | None]]


def _config(root: _Cursor) -> Config:
    m = root.mapping(("listeners", "admin", "clusters", *_TOP), extensions=True)
    cluster_names: dict[str, int | None] = {}
    clusters = tuple(_cluster(cur, cluster_names) for cur in m.require("clusters").items())
    bound: _Bound = []
    admin = _admin(m.get("admin"), bound)
    names: dict[str, int | None] = {}
    listeners = tuple(
        _listener(cur, i, clusters, names, bound) for i, cur in enumerate(m.require("listeners").items())
    )
    return Config(listeners=listeners, clusters=clusters, admin=admin, source=root.file, **m.fields(_TOP))


def _admin(cur: _Cursor | None, bound: _Bound) -> AdminConfig:
    m = cur.mapping(("address", "enabled", "tls", "token")) if cur else None
    fields = m.fields({"enabled": _Cursor.boolean, "tls": lambda c: _tls(c, server=True),
                       "token": _token}) if m else {}
    if address := m.get("address") if m else None:
        fields["host"], fields["port"] = address.address()
    admin = AdminConfig(**fields)
    if admin.enabled:
        bound.append((admin.host, admin.port, "admin.address", address.line if address else None))
    return admin


def _bind(bound: _Bound, host: str, port: int, cur: _Cursor) -> None:
    for other_host, other_port, path, line in bound:
        same_host = host == other_host or host in _WILDCARD_HOSTS or other_host in _WILDCARD_HOSTS
        if port and port == other_port and same_host:
            where = f"line {line}" if line else "the default"
            raise cur.error(f"{host}:{port} is already used by {path} ({other_host}:{other_port}, {where})")
    bound.append((host, port, cur.path, cur.line))


def _claim(seen: dict[str, int | None], value: str, cur: _Cursor, what: str) -> None:
    if value in seen:
        raise cur.error(f"duplicate {what} {value!r} (first at line {seen[value]})")
    seen[value] = cur.line


def _listener(
    cur: _Cursor, i: int, clusters: tuple[ClusterConfig, ...], names: dict[str, int | None], bound: _Bound
) -> ListenerConfig:
    m = cur.mapping(("name", "address", "cluster", "max_connections", "tls"))
    name = m.opt("name", _Cursor.name, f"listener{i}")
    _claim(names, name, m.get("name") or cur, "listener name")
    address = m.require("address")
    host, port = address.address()
    _bind(bound, host, port, address)
    known = tuple(c.name for c in clusters)
    if len(known) == 1 and m.get("cluster") is None:
        cluster = known[0]
    else:
        target = m.require("cluster", f"is required when there is more than one cluster ({', '.join(known)})")
        if (cluster := target.text()) not in known:
            raise target.error(f"unknown cluster {cluster!r}{_suggest(cluster, known)}")
    fields = m.fields({"max_connections": _at_least_one, "tls": lambda c: _tls(c, server=True)})
    return ListenerConfig(name=name, host=host, port=port, cluster=cluster, **fields)


def _cluster(cur: _Cursor, names: dict[str, int | None]) -> ClusterConfig:
    m = cur.mapping(("name", "kind", "nodes", "routes", "reconnect", "sidecar", "status", "announce_auth",
                     "tls", *_CLUSTER))
    name = (name_cur := m.require("name")).name()
    _claim(names, name, name_cur, "cluster name")
    fields = m.fields(_CLUSTER)
    fields.update(_adapter_fields(m))
    if reconnect := m.get("reconnect"):
        backoff = reconnect.mapping(_RECONNECT).fields(_RECONNECT)
        fields.update((f"reconnect_{key}", value) for key, value in backoff.items())
    if (tls := m.get("tls")) is not None:
        fields["tls"] = _tls(tls, server=False)
    if auth := m.get("announce_auth"):
        am = auth.mapping(("keys", "max_skew"))
        keys = tuple(_hmac_key(k) for k in am.require("keys").items())
        if len(keys) > 2:
            raise am.require("keys").error("at most two keys (the current one and the next, in a rotation)")
        fields["announce_keys"] = keys
        if (skew := am.get("max_skew")) is not None:
            fields["announce_max_skew"] = skew.duration()
    routes = m.get("routes")
    cfg = ClusterConfig(
        name=name,
        kind=cast(ClusterKind, m.opt("kind", lambda c: c.choice(CLUSTER_KINDS), "native")),
        nodes=_nodes(m.require("nodes")),
        routes=tuple(_route(r) for r in routes.items(allow_empty=True)) if routes else (),
        **fields,
    )
    if reconnect and cfg.reconnect_min > cfg.reconnect_max:
        raise reconnect.error(f"min ({cfg.reconnect_min:g}s) must not exceed max ({cfg.reconnect_max:g}s)")
    return cfg


def _adapter_fields(m: _Map) -> dict[str, Any]:
    """`sidecar`, `status` and the kind's default poll interval, checked against the cluster's kind."""
    kind = m.opt("kind", lambda c: c.choice(CLUSTER_KINDS), "native")
    fields: dict[str, Any] = {}
    if (sidecar := m.get("sidecar")) is not None:
        if kind == "native":
            raise sidecar.error("only applies to kind etcd or json (native nodes announce themselves)")
        fields["sidecar"] = sidecar.boolean()
    status = m.get("status")
    if kind == "json":
        need = "is required for kind json: where the term, role and leader are in a node's status answer"
        fields["status"] = _status(m.require("status", need))
    elif status is not None:
        raise status.error("only applies to kind json")
    if kind == "etcd" and "poll_interval" not in m.entries:
        fields["poll_interval"] = ETCD_POLL_INTERVAL
    return fields


_STATUS_FIELDS = ("term", "role", "leader", "applied_index", "commit_index", "has_quorum")


def _status(cur: _Cursor) -> StatusConfig:
    m = cur.mapping(("path", "method", "body", "headers", "roles", "leader_ids", "leader_match",
                     *_STATUS_FIELDS))
    m.require("term", "is required: the path of the node's Raft term in its status answer")
    if m.get("role") is None and m.get("leader") is None:
        m.require("role", "role or leader (or both) is required: where the node says who leads")
    paths = {key: _field_path(c) for key in _STATUS_FIELDS if (c := m.get(key)) is not None}
    body = m.opt("body", lambda c: c.text().encode(), None)
    return StatusConfig(
        path=m.opt("path", _abs_path_text, "/status"),
        method=m.opt("method", _method, "GET"),
        body=body,
        headers=m.opt("headers", lambda c: _pairs(c, _header_name, _Cursor.text), ()),
        roles=m.opt("roles", lambda c: _pairs(c, lambda k: k.text().lower(), _role), ()),
        leader_ids=m.opt("leader_ids", lambda c: _pairs(c, _Cursor.text, _Cursor.name), ()),
        leader_match=cast(Literal["address", "host"],
                          m.opt("leader_match", lambda c: c.choice(("address", "host")), "address")),
        **paths,
    )


def _field_path(cur: _Cursor) -> FieldPath:
    """`store.raft.term` -> ("store", "raft", "term"); `$` is the whole document (a bare JSON value)."""
    text = cur.text("a dotted path like store.raft.term, or $ for the whole document")
    if text == "$":
        return ()
    parts = tuple(text.removeprefix("$.").split("."))
    if not all(p and not p.isspace() for p in parts):
        raise cur.bad("a dotted path like store.raft.term (no empty parts), or $ for the whole document")
    return parts


def _role(cur: _Cursor) -> str:
    return cur.choice(_ANNOUNCE_ROLES)


def _header_name(cur: _Cursor) -> str:
    if not _METHOD.fullmatch((name := cur.text("a header name")).upper()):
        raise cur.bad("a header name")
    return name


def _abs_path_text(cur: _Cursor) -> str:
    if not (path := cur.text()).startswith("/"):
        raise cur.bad("an absolute path like /status")
    return path


def _pairs(cur: _Cursor, key: Callable[[_Cursor], str], value: Callable[[_Cursor], str]
           ) -> tuple[tuple[str, str], ...]:
    """A free-form mapping (keys are data, not settings) as (key, value) pairs; repeated keys are errors."""
    if not isinstance(cur.node, yaml.MappingNode):
        raise cur.bad("a mapping")
    seen: dict[str, int | None] = {}
    pairs = []
    for key_node, value_node in cur.node.value:
        k = key(key_cur := cur.at(key_node, str(key_node.value)))
        _claim(seen, k, key_cur, "key")
        pairs.append((k, value(cur.at(value_node, str(key_node.value)))))
    return tuple(pairs)


def _nodes(cur: _Cursor) -> tuple[NodeConfig, ...]:
    ids: dict[str, int | None] = {}
    urls: dict[str, int | None] = {}
    nodes = []
    for item in cur.items():
        m = item.mapping(("id", "url", "announce_url"))
        node_id = (id_cur := m.require("id")).name()
        _claim(ids, node_id, id_cur, "node id")
        url, host, port = (url_cur := m.require("url")).url()
        _claim(urls, url, url_cur, "node url")
        announce_url = m.opt("announce_url", lambda c: c.url()[0], url)
        nodes.append(NodeConfig(id=node_id, url=url, announce_url=announce_url, host=host, port=port))
    return tuple(nodes)


_READ_ONLY_KEYS = ("policy", "max_lag_entries", "max_lag_ms", "prefer_followers", "fence_wait")


def _route(cur: _Cursor) -> RouteConfig:
    m = cur.mapping(("methods", "path", "kind", "idempotent", "cookie", *_READ_ONLY_KEYS))
    kind = cast(RouteKind, m.opt("kind", lambda c: c.choice(("read", "write")), "write"))
    if kind == "write":
        for key in _READ_ONLY_KEYS:
            if (value := m.get(key)) is not None:
                raise value.error("only applies to read routes (add `kind: read`)")
    policy: ReadPolicy = m.opt("policy", _read_policy, "fenced" if kind == "read" else "leader")
    lag_entries = m.opt("max_lag_entries", _Cursor.integer, None)
    lag_ms = m.opt("max_lag_ms", _Cursor.integer, None)
    if (lag_entries is not None or lag_ms is not None) and policy != "bounded":
        raise (m.get("max_lag_entries") or m.require("max_lag_ms")).error("only applies to policy: bounded")
    if policy == "bounded" and lag_entries is None and lag_ms is None:
        raise m.require("policy").error("bounded needs max_lag_entries and/or max_lag_ms")
    return RouteConfig(
        methods=m.opt("methods", lambda c: frozenset(_method(item) for item in c.items()), None),
        path=m.opt("path", _regex, None),
        kind=kind,
        policy=policy,
        idempotent=m.opt("idempotent", _Cursor.boolean, False),
        max_lag_entries=lag_entries,
        max_lag_ms=lag_ms,
        prefer_followers=m.opt("prefer_followers", _Cursor.boolean, True),
        cookie=m.opt("cookie", _Cursor.boolean, None),
        fence_wait=m.opt("fence_wait", lambda c: c.duration(allow_zero=True), None),
    )


def _tls(cur: _Cursor, server: bool) -> TlsConfig:
    m = cur.mapping(("cert", "key", "ca", "verify"))
    files = {k: _file(c) for k in ("cert", "key", "ca") if (c := m.get(k)) is not None}
    if server:
        m.require("cert")
        m.require("key")
        if m.get("verify") is not None:
            raise m.require("verify").error("only applies to a cluster's tls (client side)")
    elif ("cert" in files) != ("key" in files):
        raise (m.get("cert") or m.require("key")).error("a client certificate needs both cert and key")
    return TlsConfig(**files, verify=m.opt("verify", _Cursor.boolean, True))


def _file(cur: _Cursor) -> str:
    if not os.path.isfile(path := cur.text("a file path")):
        raise cur.error(f"file not found: {path!r}")
    return path


def _token(cur: _Cursor) -> str:
    if len(token := cur.text("a bearer token")) < 16:
        raise cur.error("the admin token must be at least 16 characters long")
    return token


def _hmac_key(cur: _Cursor) -> bytes:
    if len(key := cur.text("a shared secret of at least 16 characters")) < 16:
        raise cur.error("an announcement key must be at least 16 characters long")
    return key.encode()


def _abs_path(cur: _Cursor) -> str:
    if not (path := cur.text()).startswith("/"):
        raise cur.bad("an absolute path like /raft/read_index")
    return path


def _method(cur: _Cursor) -> str:
    expected = "an HTTP method like GET"
    if not _METHOD.fullmatch(method := cur.text(expected).upper()):
        raise cur.bad(expected)
    return method


def _regex(cur: _Cursor) -> re.Pattern[str]:
    try:
        return re.compile(cur.text())
    except re.error as exc:
        raise cur.error(f"invalid regular expression: {exc}") from None


def _read_policy(cur: _Cursor) -> ReadPolicy:
    if (policy := cur.choice(READ_POLICIES)) not in SUPPORTED_READ_POLICIES:
        supported = ", ".join(SUPPORTED_READ_POLICIES)
        raise cur.error(f"policy {policy!r} is not supported yet (supported: {supported})")
    return cast(ReadPolicy, policy)


def _suggest(word: str, options: Collection[str], list_all: bool = True) -> str:
    if close := difflib.get_close_matches(word, options, n=1):
        return f" (did you mean {close[0]}?)"
    return f" (expected one of: {', '.join(options)})" if list_all else ""
