"""The admin listener, on its own address (127.0.0.1:9090 by default).

    GET  /               the live status page (raftlb/static/status.html)
    GET  /metrics        Prometheus text format (raftlb.ops.metrics)
    GET  /healthz        200 while the process serves
    GET  /readyz         200 while this replica can take traffic (started, not draining), leader or not: a
                         write that arrives during an election is held and released, which is raftlb's job;
                         `?leader=1` also asks for a live leader in every cluster (`?exclude=c1,c2` leaves
                         clusters out of that check)
    GET  /v1/clusters    the leader table per cluster: per node term, role, indices, last heard, lag; stats
    GET  /v1/clusters/N  one cluster
    GET  /v1/events      text/event-stream: leader_change, node_up, node_down, config_reload, draining;
                         resumes after `Last-Event-ID` (or `?since=ID`); `?types=a,b` filters
    POST /v1/reload      read the config file again and apply it (as SIGHUP does); with `admin.token` set,
                         it needs `Authorization: Bearer <token>`
    POST /v1/clusters/N/nodes/ID/forget
                         drop what the leader table knows of one node (term, role, hint, indexes), so its
                         next announcement is taken as new (the way back from a node that announced a
                         bogus term); the same token rule

The admin has no token by default and often listens on an operator's machine, where any web page the
operator opens can make the browser send it requests. So, before any route: a `Host` that is not an IP
literal, `localhost` or a name in `admin.allowed_hosts` is refused (DNS rebinding: the browser names the
attacker's host), for reads too (the status page and the event stream would leak); a request that changes
something (any method but GET, HEAD, OPTIONS) is refused when its `Origin` is not the admin's own or
`Sec-Fetch-Site` says cross-site, and when it has a body type an HTML form or a no-cors fetch can send
without a preflight (anything but `application/json`).

Every error is JSON with a stable `error` code: not_found, method_not_allowed, unknown_cluster, bad_request,
unauthorized, host_not_allowed, cross_origin, unsupported_media_type, invalid_config, bind_failed,
no_config_file, draining, internal_error, unknown_node.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time
from importlib import resources
from typing import Protocol
from urllib.parse import urlsplit

from raftlb import __version__
from raftlb.core.grpc import status_name as grpc_status_name
from raftlb.http.app import EventStream, Request, Response, Send, json_response
from raftlb.http.app import serve as serve_app
from raftlb.http.server import HttpServer
from raftlb.ops.metrics import CONTENT_TYPE, Metrics, lag_entries
from raftlb.ops.reload import ReloadResult
from raftlb.ops.runtime import Runtime
from raftlb.proxy.cluster import ClusterProxy
from raftlb.tls import server_context

KEEPALIVE_INTERVAL = 15.0  # an SSE comment this often, so proxies keep the stream and dead clients are found
# The page is self-contained: inline script and style, data from this origin only.
PAGE_HEADERS = [
    ("cache-control", "no-cache"),
    ("content-security-policy", "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "img-src 'self' data:"),
    ("x-content-type-options", "nosniff"),
]
_GET = ("GET", "HEAD")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_SAME_SITE_FETCHES = ("same-origin", "none")  # Sec-Fetch-Site values of a request not made by another site


def error(status: int, code: str, detail: str | None = None, **extra: object) -> Response:
    doc: dict[str, object] = {"error": code}
    if detail is not None:
        doc["detail"] = detail
    doc.update(extra)
    return json_response(doc, status)


class AdminHost(Protocol):
    """What the admin serves from (raftlb.server.Server): the running state, its metrics, and reload."""

    @property
    def runtime(self) -> Runtime: ...

    @property
    def metrics(self) -> Metrics: ...

    async def reload(self, trigger: str = "api") -> ReloadResult:
        """Read the config file again and apply it."""
        ...


class Admin:
    """Routes of the admin listener: read-only views of the running state, plus reload and forget."""

    def __init__(self, host: AdminHost, keepalive: float = KEEPALIVE_INTERVAL) -> None:
        self.host = host
        self.runtime = host.runtime
        self.keepalive = keepalive
        self._page: bytes | None = None

    async def start(self, host: str, port: int) -> HttpServer:
        admin = self.runtime.config.admin
        ctx = server_context(admin.tls) if admin.tls is not None else None
        return await serve_app(self.handle, host, port, self.runtime.config.limits, name="admin", ssl=ctx,
                               max_connections=admin.max_connections)

    async def handle(self, req: Request) -> Response | EventStream:
        if (refused := self.refusal(req)) is not None:
            return refused
        path = req.path.rstrip("/") or "/"
        if path == "/v1/reload":
            if req.method != "POST":
                return self._not_allowed("POST")
            return await self._reload(req)
        if path.startswith("/v1/clusters/") and path.endswith("/forget"):
            if req.method != "POST":
                return self._not_allowed("POST")
            return self._forget(req, path)
        if req.method not in _GET:
            return self._not_allowed("GET, HEAD")
        if path == "/":
            return Response(200, self.page(), list(PAGE_HEADERS), "text/html; charset=utf-8")
        if path == "/metrics":
            return Response(200, self.host.metrics.exposition(), [("cache-control", "no-cache")],
                            CONTENT_TYPE)
        if path == "/healthz":
            return json_response({"status": "ok", "version": __version__})
        if path == "/readyz":
            return self._readyz(req)
        if path == "/v1/clusters":
            return json_response(self.clusters())
        if path.startswith("/v1/clusters/"):
            name = path.removeprefix("/v1/clusters/")
            proxy = self.runtime.proxies.get(name)
            if proxy is None:
                return error(404, "unknown_cluster", f"no cluster named {name!r}",
                             clusters=list(self.runtime.proxies))
            return json_response(self.cluster(name, proxy, time.monotonic()))
        if path == "/v1/events":
            return self._events(req)
        return error(404, "not_found", f"no admin route {path}")

    def refusal(self, req: Request) -> Response | None:
        """The answer to a request a browser may have been made to send (DNS rebinding, cross-site request
        forgery), or None when the request may be served."""
        admin = self.runtime.config.admin
        host = req.headers.get("host")
        # (No Host at all is an HTTP/1.0 client, never a browser.)
        target = _split_host(host) if host is not None else None
        if host is not None and (target is None or not _host_allowed(target[0], admin.allowed_hosts)):
            return error(403, "host_not_allowed",
                         f"Host {host!r} is not an IP address, localhost or listed in admin.allowed_hosts")
        if req.method in _SAFE_METHODS:
            return None
        origin = req.headers.get("origin")
        scheme = "https" if admin.tls is not None else "http"
        if origin is not None and (target is None or not _same_origin(origin, scheme, target)):
            return error(403, "cross_origin", f"{req.method} from another origin ({origin}) is refused")
        if req.headers.get("sec-fetch-site", "same-origin").strip().lower() not in _SAME_SITE_FETCHES:
            return error(403, "cross_origin", f"{req.method} from another site is refused")
        content_type = req.headers.get("content-type")
        if content_type is not None and content_type.partition(";")[0].strip().lower() != "application/json":
            return error(415, "unsupported_media_type",
                         f"{req.method} takes no body or application/json, not {content_type!r}")
        return None

    def page(self) -> bytes:
        if self._page is None:
            self._page = resources.files("raftlb").joinpath("static/status.html").read_bytes()
        return self._page

    @staticmethod
    def _not_allowed(allow: str) -> Response:
        resp = error(405, "method_not_allowed", f"allowed: {allow}")
        resp.headers.append(("allow", allow))
        return resp

    # -- health -------------------------------------------------------------------------------------------

    def _readyz(self, req: Request) -> Response:
        """Readiness is "send me traffic": listeners bound, config loaded, subscriptions started (all done
        before the admin listener starts), not draining. A cluster without a leader does not make a replica
        unready: raftlb holds writes through an election and releases them to the new leader, and a
        balancer (a Kubernetes Service) that dropped every replica during an election would turn those held
        writes into connection errors. `?leader=1` adds the leader check, for alerts and for a balancer in
        front that wants it."""
        now = time.monotonic()
        if self.runtime.draining:
            return json_response({"ready": False, "reason": "draining"}, 503)
        exclude = {c for c in req.query.get("exclude", "").split(",") if c}
        missing = [name for name, p in self.runtime.proxies.items()
                   if name not in exclude and p.table.leader(now) is None]
        if missing and req.query.get("leader", "").lower() in ("1", "true", "yes"):
            return json_response({"ready": False, "reason": "no_leader", "clusters": missing}, 503)
        return json_response({"ready": True, "without_leader": missing})

    # -- the leader table ---------------------------------------------------------------------------------

    def clusters(self) -> dict[str, object]:
        now = time.monotonic()
        rt = self.runtime
        listeners = [{"name": s.name, "address": f"{s.host}:{s.port}",
                      "cluster": s.handler.cluster.name if isinstance(s.handler, ClusterProxy) else None,
                      "connections": len(s.connections), "requests": s.requests} for s in rt.listeners]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "worker": {"index": rt.worker.index, "count": rt.worker.count} if rt.worker else None,
            "uptime_s": round(time.time() - rt.started_at, 3),
            "draining": rt.draining,
            "config": rt.config.source,
            "reloads": rt.reloads,
            "listeners": listeners,
            "clusters": {name: self.cluster(name, p, now) for name, p in rt.proxies.items()},
        }

    def cluster(self, name: str, proxy: ClusterProxy, now: float) -> dict[str, object]:
        snap = proxy.table.snapshot(now)
        lags = lag_entries(proxy.table, now)
        subs = self.runtime.subscriptions.get(name)
        urls = {n.id: n.url for n in proxy.cluster.nodes}
        nodes = snap["nodes"]
        assert isinstance(nodes, dict)
        for node_id, doc in nodes.items():
            sub = subs.nodes.get(node_id) if subs is not None else None
            doc["lag"] = lags.get(node_id)
            doc["url"] = urls.get(node_id)
            doc["subscription"] = None if sub is None else {"mode": sub.mode, "up": sub.up,
                                                            "last_error": sub.last_error or None}
            doc["state"] = node_state(doc, sub.up if sub is not None else None)
            pool = proxy.pools.get(node_id)
            doc["outstanding"] = pool.outstanding if pool is not None else 0
        snap["leaderless_s"] = round(self.host.metrics.leaderless(name, now)[0], 3)
        s = proxy.stats
        snap["stats"] = {
            "requests": s.requests, "held": s.held, "released": s.released, "expired": s.expired,
            "held_now": len(proxy.held), "resends": dict(s.resends), "outcome_unknown": s.outcome_unknown,
            "misdirected": s.misdirected, "preempted": s.preempted, "leader_changes": s.leader_changes,
            "rejected_announcements": s.rejected_announcements,
            "responses": {f"{i}xx": n for i, n in enumerate(s.responses_by_class) if i and n},
            "protocols": {"http1": s.requests - s.h2_requests - s.grpc_calls, "http2": s.h2_requests,
                          "grpc": s.grpc_calls},
            "grpc": {grpc_status_name(code): n for code, n in sorted(s.grpc_status.items())},
        }
        return snap

    # -- events and reload --------------------------------------------------------------------------------

    def _events(self, req: Request) -> Response | EventStream:
        raw = req.headers.get("last-event-id") or req.query.get("since")
        after: int | None = None
        if raw is not None:
            if not raw.strip().isdigit():
                return error(400, "bad_request", "Last-Event-ID / since must be an event id")
            after = int(raw)
        types = {t for t in req.query.get("types", "").split(",") if t}
        bus = self.runtime.events
        keepalive = self.keepalive

        async def produce(send: Send) -> None:
            sub = bus.subscribe(after)
            try:
                await send(b"retry: 1000\n: raftlb events\n\n")
                while True:
                    events = await sub.next(keepalive)
                    if events is None:
                        if sub.closed:
                            return
                        await send(b": keepalive\n\n")
                        continue
                    frames = [e.sse() for e in events if not types or e.type in types]
                    if frames:
                        await send(b"".join(frames))
            finally:
                bus.unsubscribe(sub)

        return EventStream(produce, [("x-accel-buffering", "no")])

    async def _reload(self, req: Request) -> Response:
        token = self.runtime.config.admin.token
        if token is not None and not _bearer_matches(req.headers.get("authorization", ""), token):
            resp = error(401, "unauthorized", "POST /v1/reload needs Authorization: Bearer <admin.token>")
            resp.headers.append(("www-authenticate", 'Bearer realm="raftlb admin"'))
            return resp
        if self.runtime.draining:
            return error(503, "draining", "the server is shutting down")
        result = await self.host.reload("api")
        if result.applied:
            if self.runtime.worker is not None:
                self.runtime.worker.reload_others()  # (the supervisor sends the other workers SIGHUP)
            return json_response(result.to_json())
        status = 422 if result.error in ("invalid_config", "bind_failed") else 409
        return json_response(result.to_json(), status)


    def _forget(self, req: Request, path: str) -> Response:
        token = self.runtime.config.admin.token
        if token is not None and not _bearer_matches(req.headers.get("authorization", ""), token):
            resp = error(401, "unauthorized", "POST .../forget needs Authorization: Bearer <admin.token>")
            resp.headers.append(("www-authenticate", 'Bearer realm="raftlb admin"'))
            return resp
        name, sep, rest = path.removeprefix("/v1/clusters/").partition("/nodes/")
        node_id = rest.removesuffix("/forget")
        if not sep or not node_id or "/" in node_id:
            return error(404, "not_found",
                         f"no admin route {path}: expected /v1/clusters/NAME/nodes/ID/forget")
        proxy = self.runtime.proxies.get(name)
        if proxy is None:
            return error(404, "unknown_cluster", f"no cluster named {name!r}",
                         clusters=list(self.runtime.proxies))
        if node_id not in proxy.table.nodes:
            return error(404, "unknown_node", f"no node {node_id!r} in cluster {name!r}",
                         nodes=list(proxy.table.nodes))
        proxy.forget_node(node_id)
        table = proxy.table
        leader = table.leader(time.monotonic())
        return json_response({"cluster": name, "forgotten": node_id, "leader": leader, "term": table.term,
                              "term_floor": table.floor})


def node_state(doc: dict[str, object], subscribed_up: bool | None) -> str:
    """The state an operator acts on, from a node's leader-table snapshot: `down` (reported down by its
    subscription, or heard once and silent past the liveness timeout) before `deposed` (live, but claiming
    leadership at an old term), then `live`, or `unheard` (nothing yet, not yet judged down). A dead
    ex-leader is down, not deposed: what it needs is a restart, not a look at its term."""
    if doc.get("live"):
        return "deposed" if doc.get("deposed") else "live"
    if doc.get("down") or subscribed_up is False or doc.get("role") is not None:
        return "down"
    return "unheard"


def _split_host(value: str) -> tuple[str, int | None] | None:
    """`Host` (or an origin's authority) as (lower-case name without a trailing dot, port); None if it is
    not one."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    return (name, int(port) if port else None) if name else None


def _host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    if name == "localhost" or "*" in allowed or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return any(a.startswith(".") and (name.endswith(a) or name == a[1:]) for a in allowed)
    return True


def _same_origin(origin: str, scheme: str, host: tuple[str, int | None]) -> bool:
    """Whether `Origin` is scheme://Host of this request (default ports filled in); `null` never is."""
    parts = urlsplit(origin.strip())
    if parts.scheme.lower() != scheme or parts.path or parts.query:
        return False
    theirs = _split_host(parts.netloc)
    if theirs is None:
        return False
    default = 443 if scheme == "https" else 80
    return (theirs[0], theirs[1] or default) == (host[0], host[1] or default)


def _bearer_matches(header: str, token: str) -> bool:
    scheme, _, value = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())
