"""Reading a config file: `${ENV}` expansion, YAML with positions, and the schema that turns it into the
frozen dataclasses of `raftlb.config.model`.

A `Cursor` walks the composed YAML node tree alongside the conversion, so every error names the YAML path
(`clusters[0].nodes[2].url`) and the line. Unknown keys are errors, with a suggestion for a typo.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal, cast

import yaml

from raftlb.config.cursor import (
    Conv,
    Cursor,
    Map,
    Reported,
    at_least_one,
    attempt,
    claim,
    collecting,
    combined,
    expand_env,
    give_up_if_failed,
    make_conv,
    mark,
    suggest,
)
from raftlb.config.model import (
    CLUSTER_KINDS,
    ETCD_POLL_INTERVAL,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    READ_POLICIES,
    ROLES,
    UPSTREAM_PROTOCOLS,
    WILDCARD_HOSTS,
    AdminConfig,
    ClusterConfig,
    ClusterKind,
    Config,
    FieldPath,
    H2Config,
    HoldConfig,
    LimitsConfig,
    ListenerConfig,
    LoggingConfig,
    NodeConfig,
    PoolConfig,
    ReadPolicy,
    RouteConfig,
    RouteKind,
    StatusConfig,
    TlsConfig,
    shared_port_problem,
)
from raftlb.errors import ConfigError

MAX_PROTO_FIELD = (1 << 29) - 1  # protobuf field numbers are 29 bits
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Z-]+")  # an HTTP token (RFC 9110 §5.6.2), once upper-cased
# RFC 9110 §9, PATCH (RFC 5789) and the WebDAV/CalDAV methods of the IANA registry.
HTTP_METHODS = (
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH", "MKCALENDAR",
    "ACL", "BIND", "UNBIND", "REBIND", "CHECKOUT", "CHECKIN", "UNCHECKOUT", "MERGE", "LABEL", "UPDATE",
    "VERSION-CONTROL", "MKWORKSPACE", "MKACTIVITY", "BASELINE-CONTROL", "MKREDIRECTREF", "ORDERPATCH",
    "UPDATEREDIRECTREF", "QUERY",
)


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
    expanded = expand_env(text, os.environ if environ is None else environ, source)
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
    # Every error of the file in one run: each setting, list item and section is checked on its own.
    with collecting() as errors:
        try:
            return _config(Cursor(root, "", source))
        except ConfigError as exc:
            errors.append(exc)
        except Reported:
            pass
    raise combined(errors)


def summarize(cfg: Config) -> str:
    """One line for humans: `1 listener, 1 cluster (demo: 3 nodes, 2 routes)`."""
    clusters = "; ".join(
        f"{c.name}: {_n(len(c.nodes), 'node')}, {_n(len(c.routes), 'route')}" for c in cfg.clusters
    )
    workers = f", {cfg.workers} workers" if cfg.workers > 1 else ""
    return f"{_n(len(cfg.listeners), 'listener')}, {_n(len(cfg.clusters), 'cluster')} ({clusters}){workers}"


def check_main(path: str) -> int:
    """`raftlb check -c FILE`: print a summary and return 0, or print the error to stderr and return 2."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for line in str(exc).splitlines():  # one line per error, in file order
            print(f"raftlb: config error: {line}", file=sys.stderr)
        return 2
    print(f"{path}: OK — {summarize(cfg)}")
    return 0


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# Each section: key → converter. `Cursor.duration` is a positive duration, `.integer` and `.size` are >= 0.
_LIMITS: dict[str, Conv] = {
    "max_header_bytes": lambda c: c.size(minimum=1024), "max_headers": at_least_one,
    "max_body_bytes": Cursor.size, "write_buffer_high": lambda c: c.size(minimum=1),
    "header_timeout": Cursor.duration, "body_timeout": Cursor.duration, "idle_timeout": Cursor.duration,
    "send_timeout": Cursor.duration,
}
_LOGGING: dict[str, Conv] = {
    "level": lambda c: c.choice(LOG_LEVELS), "format": lambda c: c.choice(LOG_FORMATS),
    "access_log": Cursor.boolean,
}
_HOLD: dict[str, Conv] = {
    "timeout": lambda c: c.duration(allow_zero=True),  # 0: fail at once rather than hold
    "max_requests": Cursor.integer, "max_bytes": Cursor.size,
}
_POOL: dict[str, Conv] = {"max_idle_per_node": Cursor.integer, "idle_timeout": Cursor.duration}
_RECONNECT: dict[str, Conv] = {"min": Cursor.duration, "max": Cursor.duration}
_CLUSTER: dict[str, Conv] = {
    "liveness_timeout": Cursor.duration, "poll_interval": Cursor.duration,
    "connect_timeout": Cursor.duration, "response_timeout": Cursor.duration,
    "resend_body_limit": Cursor.size, "max_resends": Cursor.integer,
    "retry_after": lambda c: math.ceil(c.duration()),  # Retry-After is in whole seconds
    "hold": make_conv(HoldConfig, _HOLD), "pool": make_conv(PoolConfig, _POOL),
    "fence_wait": lambda c: c.duration(allow_zero=True), "index_cookie": Cursor.boolean,
    "follower_wait": lambda c: c.duration(allow_zero=True),
    "leader_read_margin": lambda c: _margin(c),
    "upstream_protocol": lambda c: c.choice(UPSTREAM_PROTOCOLS),
    "read_index_path": lambda c: _abs_path(c), "session_gap_wait": lambda c: c.duration(allow_zero=True),
    "max_sessions": at_least_one,
}
_HTTP2: dict[str, Conv] = {
    "enabled": Cursor.boolean, "max_concurrent_streams": at_least_one,
    "initial_window_size": lambda c: _window(c),
    "max_resets_per_second": at_least_one, "max_control_frames_per_second": at_least_one,
}
_TOP: dict[str, Conv] = {
    "limits": make_conv(LimitsConfig, _LIMITS),
    "logging": make_conv(LoggingConfig, _LOGGING),
    "drain_timeout": lambda c: c.duration(allow_zero=True),
    "workers": lambda c: _workers(c),  # (checked against the addresses: shared_port_problem)
    "http2": make_conv(H2Config, _HTTP2),
}
# (host, port, YAML path, line) of each address bound so far: two sockets must not share one.
_Bound = list[tuple[str, int, str, int | None]]


def _config(root: Cursor) -> Config:
    m = root.mapping(("listeners", "admin", "clusters", *_TOP), extensions=True)
    cluster_names: dict[str, int | None] = {}  # also those of clusters with errors: listeners name them
    clusters = tuple(attempt(partial(_cluster, cur, cluster_names), None)
                     for cur in attempt(m.require("clusters").items, []))
    bound: _Bound = []
    admin = attempt(partial(_admin, m.get("admin"), bound), AdminConfig())
    names: dict[str, int | None] = {}
    known = tuple(cluster_names)
    listeners = tuple(
        attempt(partial(_listener, cur, i, known, names, bound), None)
        for i, cur in enumerate(attempt(m.require("listeners").items, []))
    )
    top = m.fields(_TOP)
    give_up_if_failed(0)
    cfg = Config(listeners=tuple(lc for lc in listeners if lc), clusters=tuple(c for c in clusters if c),
                 admin=admin, source=root.file, **top)
    if problem := shared_port_problem(cfg, cfg.workers):
        raise m.require("workers").error(problem)
    return cfg


def _margin(cur: Cursor) -> int | None:
    """A whole number of outstanding requests (at least 1), or `never` (None)."""
    if isinstance(value := cur.scalar(), str) and value.lower() == "never":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise cur.bad("a whole number or never")
    return cur.integer(minimum=1)


def _window(cur: Cursor) -> int:
    """An HTTP/2 flow-control window: 1 byte to 2^31-1 (RFC 9113 §6.9.2)."""
    n = cur.size(minimum=1)
    if n > 2**31 - 1:
        raise cur.error(f"at most 2147483647 bytes, got {n}")
    return n


def _workers(cur: Cursor) -> int:
    n = cur.integer(minimum=1)
    if n > MAX_WORKERS:
        raise cur.error(f"at most {MAX_WORKERS} workers, got {n}")
    return n


def _admin(cur: Cursor | None, bound: _Bound) -> AdminConfig:
    keys = ("address", "enabled", "tls", "token", "allowed_hosts", "max_connections")
    m = cur.mapping(keys) if cur else None
    fields = m.fields({"enabled": Cursor.boolean, "tls": lambda c: _tls(c, server=True), "token": _token,
                       "allowed_hosts": _allowed_hosts, "max_connections": at_least_one}) if m else {}
    if address := m.get("address") if m else None:
        fields["host"], fields["port"] = address.address()
    admin = AdminConfig(**fields)
    if admin.enabled:
        bound.append((admin.host, admin.port, "admin.address", address.line if address else None))
    return admin


def _bind(bound: _Bound, host: str, port: int, cur: Cursor) -> None:
    for other_host, other_port, path, line in bound:
        same_host = host == other_host or host in WILDCARD_HOSTS or other_host in WILDCARD_HOSTS
        if port and port == other_port and same_host:
            where = f"line {line}" if line else "the default"
            raise cur.error(f"{host}:{port} is already used by {path} ({other_host}:{other_port}, {where})")
    bound.append((host, port, cur.path, cur.line))


def _listener(
    cur: Cursor, i: int, known: tuple[str, ...], names: dict[str, int | None], bound: _Bound
) -> ListenerConfig:
    since = mark()
    m = cur.mapping(("name", "address", "cluster", "max_connections", "tls"))
    name = m.opt("name", Cursor.name, f"listener{i}")
    attempt(partial(claim, names, name, m.get("name") or cur, "listener name"), None)

    def bind() -> tuple[str, int]:
        address = m.require("address")
        host, port = address.address()
        _bind(bound, host, port, address)
        return host, port

    def target() -> str:
        if len(known) == 1 and m.get("cluster") is None:
            return known[0]
        target = m.require("cluster", f"is required when there is more than one cluster ({', '.join(known)})")
        if (cluster := target.text()) not in known:
            raise target.error(f"unknown cluster {cluster!r}{suggest(cluster, known)}")
        return cluster

    host, port = attempt(bind, ("", 0))
    cluster = attempt(target, "")
    fields = m.fields({"max_connections": at_least_one, "tls": lambda c: _tls(c, server=True)})
    give_up_if_failed(since)
    return ListenerConfig(name=name, host=host, port=port, cluster=cluster, **fields)


def _cluster(cur: Cursor, names: dict[str, int | None]) -> ClusterConfig:
    since = mark()
    m = cur.mapping(("name", "kind", "nodes", "routes", "reconnect", "sidecar", "status", "announce_auth",
                     "tls", *_CLUSTER))

    def named() -> str:
        name = (name_cur := m.require("name")).name()
        claim(names, name, name_cur, "cluster name")
        return name

    name = attempt(named, "")
    fields = m.fields(_CLUSTER)
    fields.update(attempt(partial(_adapter_fields, m), {}))
    if reconnect := m.get("reconnect"):
        backoff = attempt(lambda: reconnect.mapping(_RECONNECT).fields(_RECONNECT), {})
        fields.update((f"reconnect_{key}", value) for key, value in backoff.items())
    if (tls := m.get("tls")) is not None:
        fields["tls"] = attempt(partial(_tls, tls, server=False), None)
    if auth := m.get("announce_auth"):
        fields.update(attempt(partial(_announce_auth, auth), {}))
    routes = m.get("routes")
    kind = cast(ClusterKind, m.opt("kind", lambda c: c.choice(CLUSTER_KINDS), "native"))
    nodes = attempt(lambda: _nodes(m.require("nodes")), ())
    route_items = attempt(partial(routes.items, allow_empty=True), []) if routes else []
    route_list = tuple(attempt(partial(_route, r), None) for r in route_items)
    give_up_if_failed(since)
    cfg = ClusterConfig(
        name=name,
        kind=kind,
        nodes=nodes,
        routes=tuple(r for r in route_list if r),
        **fields,
    )
    if reconnect and cfg.reconnect_min > cfg.reconnect_max:
        raise reconnect.error(f"min ({cfg.reconnect_min:g}s) must not exceed max ({cfg.reconnect_max:g}s)")
    return cfg


def _announce_auth(auth: Cursor) -> dict[str, Any]:
    am = auth.mapping(("keys", "max_skew"))
    fields: dict[str, Any] = {}
    keys = tuple(_hmac_key(k) for k in am.require("keys").items())
    if len(keys) > 2:
        raise am.require("keys").error("at most two keys (the current one and the next, in a rotation)")
    fields["announce_keys"] = keys
    if (skew := am.get("max_skew")) is not None:
        fields["announce_max_skew"] = skew.duration()
    return fields


def _adapter_fields(m: Map) -> dict[str, Any]:
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


def _status(cur: Cursor) -> StatusConfig:
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
        headers=m.opt("headers", lambda c: _pairs(c, _header_name, Cursor.text), ()),
        roles=m.opt("roles", lambda c: _pairs(c, lambda k: k.text().lower(), _role), ()),
        leader_ids=m.opt("leader_ids", lambda c: _pairs(c, Cursor.text, Cursor.name), ()),
        leader_match=cast(Literal["address", "host"],
                          m.opt("leader_match", lambda c: c.choice(("address", "host")), "address")),
        **paths,
    )


def _field_path(cur: Cursor) -> FieldPath:
    """`store.raft.term` -> ("store", "raft", "term"); `$` is the whole document (a bare JSON value)."""
    text = cur.text("a dotted path like store.raft.term, or $ for the whole document")
    if text == "$":
        return ()
    parts = tuple(text.removeprefix("$.").split("."))
    if not all(p and not p.isspace() for p in parts):
        raise cur.bad("a dotted path like store.raft.term (no empty parts), or $ for the whole document")
    return parts


def _role(cur: Cursor) -> str:
    return cur.choice(ROLES)


def _header_name(cur: Cursor) -> str:
    if not _METHOD.fullmatch((name := cur.text("a header name")).upper()):
        raise cur.bad("a header name")
    return name


def _abs_path_text(cur: Cursor) -> str:
    if not (path := cur.text()).startswith("/"):
        raise cur.bad("an absolute path like /status")
    return path


def _pairs(cur: Cursor, key: Callable[[Cursor], str], value: Callable[[Cursor], str]
           ) -> tuple[tuple[str, str], ...]:
    """A free-form mapping (keys are data, not settings) as (key, value) pairs; repeated keys are errors."""
    if not isinstance(cur.node, yaml.MappingNode):
        raise cur.bad("a mapping")
    seen: dict[str, int | None] = {}
    pairs = []
    for key_node, value_node in cur.node.value:
        k = key(key_cur := cur.at(key_node, str(key_node.value)))
        claim(seen, k, key_cur, "key")
        pairs.append((k, value(cur.at(value_node, str(key_node.value)))))
    return tuple(pairs)


def _nodes(cur: Cursor) -> tuple[NodeConfig, ...]:
    ids: dict[str, int | None] = {}
    urls: dict[str, int | None] = {}
    nodes = []
    since = mark()

    def node(item: Cursor) -> NodeConfig:
        m = item.mapping(("id", "url", "announce_url"))

        def node_id() -> str:
            node_id = (id_cur := m.require("id")).name()
            claim(ids, node_id, id_cur, "node id")
            return node_id

        def node_url() -> tuple[str, str, int]:
            url, host, port = (url_cur := m.require("url")).url()
            claim(urls, url, url_cur, "node url")
            return url, host, port

        item_since = mark()
        nid = attempt(node_id, "")
        url, host, port = attempt(node_url, ("", "", 0))
        announce_url = m.opt("announce_url", lambda c: c.url()[0], url)
        give_up_if_failed(item_since)
        return NodeConfig(id=nid, url=url, announce_url=announce_url, host=host, port=port)

    for item in cur.items():
        if (n := attempt(partial(node, item), None)) is not None:
            nodes.append(n)
    give_up_if_failed(since)
    return tuple(nodes)


_READ_ONLY_KEYS = ("policy", "max_lag_entries", "max_lag_ms", "prefer_followers", "fence_wait")


def _route(cur: Cursor) -> RouteConfig:
    since = mark()
    m = cur.mapping(("methods", "path", "kind", "idempotent", "cookie", "stream", "proto_flag",
                     *_READ_ONLY_KEYS))
    methods = m.opt("methods", lambda c: frozenset(attempt(partial(_method, item), "") for item in c.items()),
                    None)
    path = m.opt("path", _regex, None)
    proto_flag = m.opt("proto_flag", _proto_field, None)
    if proto_flag is not None and m.get("path") is None:
        raise m.require("proto_flag").error("needs a `path`: the gRPC method whose request it reads")
    kind = cast(RouteKind, m.opt("kind", lambda c: c.choice(("read", "write")), "write"))
    give_up_if_failed(since)  # the checks below depend on the kind
    if kind == "write":
        for key in _READ_ONLY_KEYS:
            if (value := m.get(key)) is not None:
                raise value.error("only applies to read routes (add `kind: read`)")
    policy: ReadPolicy = m.opt("policy", _read_policy, "fenced" if kind == "read" else "leader")
    give_up_if_failed(since)  # the lag checks depend on the policy
    lag_entries = m.opt("max_lag_entries", Cursor.integer, None)
    lag_ms = m.opt("max_lag_ms", Cursor.integer, None)
    if (lag_entries is not None or lag_ms is not None) and policy != "bounded":
        raise (m.get("max_lag_entries") or m.require("max_lag_ms")).error("only applies to policy: bounded")
    if policy == "bounded" and lag_entries is None and lag_ms is None:
        raise m.require("policy").error("bounded needs max_lag_entries and/or max_lag_ms")
    give_up_if_failed(since)
    return RouteConfig(
        methods=methods,
        path=path,
        kind=kind,
        policy=policy,
        idempotent=m.opt("idempotent", Cursor.boolean, False),
        max_lag_entries=lag_entries,
        max_lag_ms=lag_ms,
        prefer_followers=m.opt("prefer_followers", Cursor.boolean, True),
        cookie=m.opt("cookie", Cursor.boolean, None),
        fence_wait=m.opt("fence_wait", lambda c: c.duration(allow_zero=True), None),
        stream=m.opt("stream", Cursor.boolean, False),
        proto_flag=proto_flag,
    )


def _proto_field(cur: Cursor) -> int:
    number = cur.integer(minimum=1)
    if number > MAX_PROTO_FIELD:
        raise cur.error(f"a protobuf field number is at most {MAX_PROTO_FIELD}, got {number}")
    return number


def _tls(cur: Cursor, server: bool) -> TlsConfig:
    m = cur.mapping(("cert", "key", "ca", "verify"))
    files = {k: _file(c) for k in ("cert", "key", "ca") if (c := m.get(k)) is not None}
    if server:
        m.require("cert")
        m.require("key")
        if m.get("verify") is not None:
            raise m.require("verify").error("only applies to a cluster's tls (client side)")
    elif ("cert" in files) != ("key" in files):
        raise (m.get("cert") or m.require("key")).error("a client certificate needs both cert and key")
    return TlsConfig(**files, verify=m.opt("verify", Cursor.boolean, True))


def _file(cur: Cursor) -> str:
    if not os.path.isfile(path := cur.text("a file path")):
        raise cur.error(f"file not found: {path!r}")
    return path


def _token(cur: Cursor) -> str:
    if len(token := cur.text("a bearer token")) < 16:
        raise cur.error("the admin token must be at least 16 characters long")
    return token


_HOST_NAME = re.compile(r"(\*|\.?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)")


def _allowed_hosts(cur: Cursor) -> tuple[str, ...]:
    hosts = []
    for item in cur.items(allow_empty=True):
        name = item.text("a host name").strip().lower().rstrip(".")
        if not _HOST_NAME.fullmatch(name):
            raise item.bad("a host name (no port), `.domain` for a domain and its subdomains, or `*`")
        hosts.append(name)
    return tuple(hosts)


def _hmac_key(cur: Cursor) -> bytes:
    if len(key := cur.text("a shared secret of at least 16 characters")) < 16:
        raise cur.error("an announcement key must be at least 16 characters long")
    return key.encode()


def _abs_path(cur: Cursor) -> str:
    if not (path := cur.text()).startswith("/"):
        raise cur.bad("an absolute path like /raft/read_index")
    return path


def _method(cur: Cursor) -> str:
    expected = "an HTTP method like GET"
    if not _METHOD.fullmatch(method := cur.text(expected).upper()):
        raise cur.bad(expected)
    if method not in HTTP_METHODS:  # a typo like GTE would make the route match nothing, silently
        raise cur.error(f"unknown HTTP method {cur.node.value!r}{suggest(method, HTTP_METHODS)}")
    return method


def _regex(cur: Cursor) -> re.Pattern[str]:
    try:
        return re.compile(cur.text())
    except re.error as exc:
        raise cur.error(f"invalid regular expression: {exc}") from None


def _read_policy(cur: Cursor) -> ReadPolicy:
    return cast(ReadPolicy, cur.choice(READ_POLICIES))


