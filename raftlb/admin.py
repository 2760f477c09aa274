"""The admin listener: health, readiness and the leader table as JSON, on its own address."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from raftlb import __version__
from raftlb.http.app import EventStream, Request, Response, json_response
from raftlb.http.app import serve as serve_app
from raftlb.http.server import HttpServer

if TYPE_CHECKING:
    from raftlb.server import Server


class Admin:
    """Routes of the admin listener. Read-only views of the running server."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def start(self, host: str, port: int) -> HttpServer:
        return await serve_app(self.handle, host, port, self.server.config.limits, name="admin")

    async def handle(self, req: Request) -> Response | EventStream:
        path = req.path
        if path == "/healthz":
            return json_response({"status": "ok", "version": __version__})
        if path == "/readyz":
            return self._readyz()
        if path == "/v1/clusters":
            return json_response(self.clusters())
        return json_response({"error": "not_found", "path": path}, 404)

    def _readyz(self) -> Response:
        now = time.monotonic()
        if self.server.draining:
            return json_response({"ready": False, "reason": "draining"}, 503)
        missing = [name for name, p in self.server.proxies.items() if p.table.leader(now) is None]
        if missing:
            return json_response({"ready": False, "reason": "no_leader", "clusters": missing}, 503)
        return json_response({"ready": True})

    def clusters(self) -> dict[str, object]:
        now = time.monotonic()
        out: dict[str, object] = {}
        for name, proxy in self.server.proxies.items():
            snap = proxy.table.snapshot(now)
            s = proxy.stats
            snap["stats"] = {
                "requests": s.requests, "held": s.held, "released": s.released, "expired": s.expired,
                "held_now": len(proxy.held), "resends": dict(s.resends), "outcome_unknown": s.outcome_unknown,
                "misdirected": s.misdirected, "preempted": s.preempted, "leader_changes": s.leader_changes,
                "rejected_announcements": s.rejected_announcements,
                "responses": {f"{i}xx": n for i, n in enumerate(s.responses_by_class) if i and n},
                "outstanding": {nid: p.outstanding for nid, p in proxy.pools.items()},
            }
            out[name] = snap
        return {"clusters": out}
