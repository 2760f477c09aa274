"""Admin routes and the event bus, called directly (no sockets): readiness, the leader table JSON, error
codes, the SSE stream with resume, reload answers."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from raftlb.config.model import Config
from raftlb.core.leader_table import Announcement, LeaderChange
from raftlb.http.app import EventStream, Response
from raftlb.ops.admin import Admin
from raftlb.ops.events import EventBus
from raftlb.server import Server
from tests.support.offline import ann, cluster_config, get, offline_server, request


def body(resp: Response) -> dict[str, object]:
    doc = json.loads(resp.body)
    assert isinstance(doc, dict)
    return doc


def elect(server: object, leader: str = "n1", term: int = 2) -> None:
    proxy = server.proxies["c1"]  # type: ignore[attr-defined]
    for n in ("n1", "n2", "n3"):
        proxy.on_announcement(n, ann(n, term, "leader" if n == leader else "follower", leader, applied=10))


# -- health ------------------------------------------------------------------------------------------------


async def test_readyz_is_ready_without_a_leader_and_asks_for_one_only_when_told() -> None:
    # Readiness is "send me traffic": a replica without a leader still holds and releases writes.
    server = offline_server(cluster_config("c1"), cluster_config("c2"))
    admin = Admin(server)
    assert body(await get(admin, "/healthz"))["status"] == "ok"
    r = await get(admin, "/readyz")
    assert (r.status, body(r)) == (200, {"ready": True, "without_leader": ["c1", "c2"]})
    r = await get(admin, "/readyz?leader=1")
    assert r.status == 503
    assert body(r) == {"ready": False, "reason": "no_leader", "clusters": ["c1", "c2"]}
    elect(server)
    r = await get(admin, "/readyz?leader=true")
    assert (r.status, body(r)["clusters"]) == (503, ["c2"])
    assert (await get(admin, "/readyz?leader=1&exclude=c2")).status == 200
    assert body(await get(admin, "/readyz"))["without_leader"] == ["c2"]


async def test_readyz_turns_503_while_draining() -> None:
    server = offline_server()
    elect(server)
    admin = Admin(server)
    assert (await get(admin, "/readyz")).status == 200
    server.draining = True
    r = await get(admin, "/readyz")
    assert (r.status, body(r)["reason"]) == (503, "draining")
    assert (await get(admin, "/healthz")).status == 200  # alive, just not ready


# -- the leader table ----------------------------------------------------------------------------------------


async def test_clusters_json_has_per_node_term_role_indices_age_and_lag() -> None:
    server = offline_server()
    proxy = server.proxies["c1"]
    proxy.on_announcement("n1", ann("n1", 3, "leader", "n1", applied=100, commit=101))
    proxy.on_announcement("n2", ann("n2", 3, "follower", "n1", applied=97))
    doc = body(await get(Admin(server), "/v1/clusters"))
    c1 = doc["clusters"]["c1"]  # type: ignore[index]
    assert (c1["leader"], c1["term"], c1["leaderless_s"]) == ("n1", 3, 0.0)
    n2 = c1["nodes"]["n2"]
    assert (n2["role"], n2["term"], n2["applied_index"], n2["lag"]) == ("follower", 3, 97, 4)
    assert n2["live"] is True
    assert 0 <= n2["age_s"] < 5
    assert n2["url"] == "http://127.0.0.1:9002"
    assert c1["nodes"]["n3"]["role"] is None and c1["nodes"]["n3"]["age_s"] is None
    assert c1["stats"]["leader_changes"] == 1
    assert doc["draining"] is False and doc["listeners"] == []


async def test_node_state_is_down_before_deposed_and_never_unknown_for_a_node_reported_down() -> None:
    server = offline_server()
    proxy = server.proxies["c1"]
    elect(server, "n1", term=2)
    for n in ("n2", "n3"):  # n2 wins term 3; n1 still announces itself leader at 2, n3 has not heard yet
        proxy.on_announcement(n, ann(n, 3, "leader" if n == "n2" else "follower", "n2", applied=11))

    async def states() -> dict[str, str]:
        nodes = body(await get(Admin(server), "/v1/clusters"))["clusters"]["c1"]["nodes"]  # type: ignore[index]
        return {n: d["state"] for n, d in nodes.items()}

    assert await states() == {"n1": "deposed", "n2": "live", "n3": "live"}
    proxy.on_node_down("n1", "refuses connections")  # the deposed leader dies: now it needs a restart
    proxy.on_node_down("n3", "refuses connections")
    assert await states() == {"n1": "down", "n2": "live", "n3": "down"}
    n1 = Admin(server).cluster("c1", proxy, time.monotonic())["nodes"]["n1"]  # type: ignore[index]
    assert (n1["role"], n1["deposed"], n1["live"]) == ("leader", True, False)  # the raw fields stay


async def test_a_node_never_heard_is_unheard_until_reported_down() -> None:
    server = offline_server()
    proxy = server.proxies["c1"]
    doc = Admin(server).cluster("c1", proxy, time.monotonic())
    assert doc["nodes"]["n1"]["state"] == "unheard"  # type: ignore[index]
    proxy.on_node_down("n1", "never heard; announce stream: connection refused")
    doc = Admin(server).cluster("c1", proxy, time.monotonic())
    assert doc["nodes"]["n1"]["state"] == "down"  # type: ignore[index]


async def test_one_cluster_and_an_unknown_one() -> None:
    server = offline_server()
    admin = Admin(server)
    assert body(await get(admin, "/v1/clusters/c1"))["term"] == 0
    r = await get(admin, "/v1/clusters/nope")
    assert (r.status, body(r)["error"], body(r)["clusters"]) == (404, "unknown_cluster", ["c1"])


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/nope", 404, "not_found"),
    ("POST", "/v1/clusters", 405, "method_not_allowed"),
    ("DELETE", "/metrics", 405, "method_not_allowed"),
    ("GET", "/v1/reload", 405, "method_not_allowed"),
    ("GET", "/v1/events?since=abc", 400, "bad_request"),
])
async def test_errors_are_json_with_stable_codes(method: str, path: str, status: int, code: str) -> None:
    r = await get(Admin(offline_server()), path, method)
    assert (r.status, body(r)["error"], r.content_type) == (status, code, "application/json")
    if status == 405:
        assert ("allow", "POST" if path == "/v1/reload" else "GET, HEAD") in r.headers


async def test_status_page_and_metrics_are_served() -> None:
    admin = Admin(offline_server())
    page = await get(admin, "/")
    assert page.content_type.startswith("text/html")
    assert b"<script>" in page.body and b"v1/events" in page.body
    for external in (b'src="http', b"src='http", b'href="http', b"url(http", b"@import", b"//cdn"):
        assert external not in page.body  # self-contained: nothing loaded from elsewhere
    metrics = await get(admin, "/metrics")
    assert metrics.content_type.startswith("text/plain; version=0.0.4")
    assert b"raftlb_cluster_has_leader{cluster=\"c1\"} 0.0" in metrics.body


# -- reload ------------------------------------------------------------------------------------------------


async def test_reload_without_a_config_file_is_refused() -> None:
    r = await get(Admin(offline_server()), "/v1/reload", "POST")
    assert (r.status, body(r)["error"]) == (409, "no_config_file")


async def test_reload_of_an_invalid_file_names_the_yaml_path(tmp_path: Path) -> None:
    cfg = tmp_path / "raftlb.yaml"
    cfg.write_text("listeners: [{address: '127.0.0.1:0'}]\nclusters:\n  - name: c1\n    nodes:\n"
                   "      - {id: n1, url: 'ftp://x'}\n")
    server = offline_server()
    server.config = Config(listeners=(), clusters=server.config.clusters, source=str(cfg))
    r = await get(Admin(server), "/v1/reload", "POST")
    doc = body(r)
    assert (r.status, doc["error"], doc["path"], doc["result"]) == (422, "invalid_config",
                                                                    "clusters[0].nodes[0].url", "rejected")
    assert server.config.source == str(cfg) and server.config.clusters == (cluster_config(),)


async def test_reload_needs_the_admin_token_when_one_is_configured() -> None:
    server = offline_server()
    token = "s3cret-admin-token-0123"
    server.config = replace(server.config, admin=replace(server.config.admin, token=token))
    admin = Admin(server)
    wrong = [{}, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": f"Basic {token}"}]
    for header in wrong:
        r = await get(admin, "/v1/reload", "POST", headers=header)
        assert (r.status, body(r)["error"]) == (401, "unauthorized")
        assert ("www-authenticate", 'Bearer realm="raftlb admin"') in r.headers
    r = await get(admin, "/v1/reload", "POST", headers={"authorization": f"bearer {token}"})
    assert (r.status, body(r)["error"]) == (409, "no_config_file")  # authorized; nothing to reload
    assert (await get(admin, "/v1/clusters")).status == 200  # reading needs no token


async def test_reload_is_refused_while_draining() -> None:
    server = offline_server()
    server.draining = True
    r = await get(Admin(server), "/v1/reload", "POST")
    assert (r.status, body(r)["error"]) == (503, "draining")


# -- forget ------------------------------------------------------------------------------------------------


async def test_forget_resets_one_node_so_its_next_announcement_is_taken_as_new() -> None:
    server = offline_server()
    proxy = server.proxies["c1"]
    elect(server, "n1", term=5)
    # n3 announced a bogus leadership at 2**63, then the truth: refused as going backwards (while fresh).
    proxy.on_announcement("n3", ann("n3", 2**63, "leader", "n3"))
    proxy.on_announcement("n3", ann("n3", 5, "follower", "n1"))
    assert proxy.stats.rejected_announcements == 1
    admin = Admin(server)
    r = await get(admin, "/v1/clusters/c1/nodes/n3/forget", "POST")
    assert r.status == 200, r.body
    assert body(r) == {"cluster": "c1", "forgotten": "n3", "leader": "n1", "term": 5, "term_floor": 5}
    node = body(await get(admin, "/v1/clusters/c1"))["nodes"]["n3"]  # type: ignore[index]
    assert (node["term"], node["role"], node["leader_hint"], node["live"]) == (0, None, None, False)
    proxy.on_announcement("n3", ann("n3", 5, "follower", "n1", applied=10))
    assert proxy.stats.rejected_announcements == 1  # taken as new
    assert proxy.table.nodes["n3"].term == 5 and proxy.table.leader(time.monotonic()) == "n1"


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/v1/clusters/c1/nodes/n3/forget", 405, "method_not_allowed"),
    ("POST", "/v1/clusters/c9/nodes/n3/forget", 404, "unknown_cluster"),
    ("POST", "/v1/clusters/c1/nodes/n9/forget", 404, "unknown_node"),
    ("POST", "/v1/clusters/c1/nodes//forget", 404, "not_found"),
    ("POST", "/v1/clusters/c1/forget", 404, "not_found"),
])
async def test_forget_errors(method: str, path: str, status: int, code: str) -> None:
    r = await get(Admin(offline_server()), path, method)
    assert (r.status, body(r)["error"]) == (status, code)


async def test_forget_needs_the_admin_token_when_one_is_configured() -> None:
    server = offline_server()
    token = "s3cret-admin-token-0123"
    server.config = replace(server.config, admin=replace(server.config.admin, token=token))
    elect(server, "n1", term=5)
    admin = Admin(server)
    r = await get(admin, "/v1/clusters/c1/nodes/n1/forget", "POST")
    assert (r.status, body(r)["error"]) == (401, "unauthorized")
    assert server.proxies["c1"].table.nodes["n1"].term == 5  # nothing forgotten
    auth = {"authorization": f"Bearer {token}"}
    r = await get(admin, "/v1/clusters/c1/nodes/n1/forget", "POST", headers=auth)
    assert r.status == 200 and server.proxies["c1"].table.nodes["n1"].term == 0


# -- events --------------------------------------------------------------------------------------------------


async def collect(stream: EventStream, bus: EventBus, until: int) -> list[dict[str, object]]:
    """Run the SSE producer until `until` events arrived, then close the bus; the decoded events."""
    chunks: list[bytes] = []
    events: list[dict[str, object]] = []

    async def send(data: bytes) -> None:
        chunks.append(data)
        for frame in data.split(b"\n\n"):
            for line in frame.split(b"\n"):
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
        if len(events) >= until:
            bus.close()

    await asyncio.wait_for(stream.producer(send), 5.0)
    assert chunks[0].startswith(b"retry: ")
    return events


async def test_event_stream_replays_after_last_event_id_and_follows_live() -> None:
    server = offline_server()
    bus = server.events
    for i in range(3):
        bus.publish("config_reload", result="applied", n=i)
    stream = await Admin(server).handle(request("/v1/events", headers={"last-event-id": "1"}))
    assert isinstance(stream, EventStream)
    task = asyncio.create_task(collect(stream, bus, until=3))
    await asyncio.sleep(0.01)
    bus.leader_change("c1", LeaderChange("n1", "n2", 4, 5, "announced"))
    events = await task
    assert [e["id"] for e in events] == [2, 3, 4]
    assert events[2] == {"id": 4, "type": "leader_change", "ts_ms": events[2]["ts_ms"], "cluster": "c1",
                         "old_leader": "n1", "new_leader": "n2", "old_term": 4, "new_term": 5,
                         "reason": "announced"}
    assert not bus.subscribers


async def test_event_stream_filters_by_type_and_sends_keepalives() -> None:
    server = offline_server()
    admin = Admin(server, keepalive=0.02)
    stream = await admin.handle(request("/v1/events?types=node_down"))
    assert isinstance(stream, EventStream)
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)
        if data.startswith(b": keepalive"):
            server.events.publish("node_up", cluster="c1", node="n1")
            server.events.publish("node_down", cluster="c1", node="n1", reason="silent")
        elif b"node_down" in data:
            server.events.close()

    await asyncio.wait_for(stream.producer(send), 5.0)
    frames = b"".join(sent)
    assert b"event: node_down" in frames and b"node_up" not in frames


def test_node_callbacks_publish_up_and_down_transitions_once() -> None:
    bus = EventBus()
    seen: list[tuple[str, str]] = []
    on_ann, on_down = bus.node_callbacks("c1", lambda n, a: seen.append(("ann", n)),
                                         lambda n, r: seen.append(("down", n)))
    a = Announcement("n1", 1, "follower")
    on_ann("n1", a)
    on_ann("n1", a)
    on_down("n1", "silent")
    on_down("n1", "silent")
    on_ann("n1", a)
    assert seen == [("ann", "n1"), ("ann", "n1"), ("down", "n1"), ("down", "n1"), ("ann", "n1")]
    assert [(e.type, e.data["node"]) for e in bus.recent()] == [("node_up", "n1"), ("node_down", "n1"),
                                                                ("node_up", "n1")]


async def test_a_subscriber_that_falls_behind_is_dropped_and_can_resume_from_history() -> None:
    bus = EventBus(history=5, max_queue=5)
    slow = bus.subscribe()
    for i in range(10):
        bus.publish("node_up", cluster="c1", node=f"n{i}")
    assert slow.closed and slow.overflowed and slow not in bus.subscribers
    again = bus.subscribe(after=4)  # 5 is gone from the history
    batch = await again.next(1.0)
    assert batch is not None and [e.id for e in batch] == [6, 7, 8, 9, 10]
    assert await again.next(0.01) is None  # nothing new: a timeout, not closed
    bus.close()
    assert await again.next(1.0) is None and again.closed


# -- browsers on other sites: DNS rebinding and cross-site request forgery ---------------------------------


def with_admin(**admin: Any) -> Server:
    server = offline_server()
    server.config = replace(server.config, admin=replace(server.config.admin, **admin))
    return server


@pytest.mark.parametrize("host", ["evil.example:9090", "evil.example", "127.0.0.1.evil.example",
                                  "localhost.evil.example:9090", "raftlb.evil:9090", "[not-an-ip]:9090",
                                  "127.0.0.1:port"])
@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("GET", "/v1/events"), ("GET", "/v1/clusters"),
                                              ("GET", "/metrics"), ("POST", "/v1/reload")])
async def test_a_host_not_an_ip_localhost_or_allowed_is_refused_on_every_route(
        host: str, method: str, path: str) -> None:
    # DNS rebinding: the attacker's name resolves to the admin's address, and the browser sends its Host.
    admin = Admin(with_admin(allowed_hosts=("raftlb", ".svc.example")))
    r = await get(admin, path, method, headers={"host": host})
    assert (r.status, body(r)["error"]) == (403, "host_not_allowed")


@pytest.mark.parametrize("host", ["127.0.0.1:9090", "10.1.2.3:9090", "10.1.2.3", "[::1]:9090", "[fd00::5]",
                                  "localhost:9090", "LOCALHOST.", "raftlb:9090", "raftlb.svc.example:9090",
                                  "svc.example"])
async def test_ip_literals_localhost_and_allowed_names_are_served(host: str) -> None:
    # Prometheus and the kubelet's probes name the pod IP; `raftlb status --admin http://raftlb:9090` a
    # name listed in admin.allowed_hosts (`.svc.example`: that domain and its subdomains).
    admin = Admin(with_admin(allowed_hosts=("raftlb", ".svc.example")))
    for path in ("/metrics", "/healthz", "/readyz", "/v1/clusters"):
        assert (await get(admin, path, headers={"host": host})).status in (200, 503), path
    r = await get(admin, "/v1/reload", "POST", headers={"host": host})
    assert (r.status, body(r)["error"]) == (409, "no_config_file")  # past the checks; nothing to reload


async def test_any_host_with_a_star_in_allowed_hosts() -> None:
    admin = Admin(with_admin(allowed_hosts=("*",)))
    assert (await get(admin, "/healthz", headers={"host": "anything.example"})).status == 200


@pytest.mark.parametrize(("headers", "status", "code"), [
    # A cross-origin form post (text/plain, urlencoded, multipart) or no-cors fetch: refused by its Origin.
    ({"origin": "http://evil.example", "content-type": "text/plain"}, 403, "cross_origin"),
    ({"origin": "http://evil.example"}, 403, "cross_origin"),
    ({"origin": "null"}, 403, "cross_origin"),
    ({"origin": "https://127.0.0.1:9090"}, 403, "cross_origin"),  # another scheme
    ({"origin": "http://127.0.0.1:9091"}, 403, "cross_origin"),  # another port
    ({"origin": "http://localhost:9090"}, 403, "cross_origin"),  # another host name
    ({"sec-fetch-site": "cross-site"}, 403, "cross_origin"),
    ({"sec-fetch-site": "same-site"}, 403, "cross_origin"),
    # A browser that sends no Origin: the body types a form can send without a preflight are refused.
    ({"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ({"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ({"content-type": "multipart/form-data; boundary=x"}, 415, "unsupported_media_type"),
    ({"content-type": "text/plain;charset=UTF-8", "origin": "http://127.0.0.1:9090"}, 415,
     "unsupported_media_type"),
    # What curl, httpx (`raftlb` tooling) and a same-origin page send: past the checks.
    ({}, 409, "no_config_file"),
    ({"origin": "http://127.0.0.1:9090", "sec-fetch-site": "same-origin"}, 409, "no_config_file"),
    ({"content-type": "application/json; charset=utf-8"}, 409, "no_config_file"),
    ({"sec-fetch-site": "none"}, 409, "no_config_file"),  # typed into the address bar
])
async def test_state_changes_from_another_origin_or_as_a_simple_form_are_refused(
        headers: dict[str, str], status: int, code: str) -> None:
    admin = Admin(offline_server())
    r = await get(admin, "/v1/reload", "POST", headers={"host": "127.0.0.1:9090", **headers})
    assert (r.status, body(r)["error"]) == (status, code)
    # Any route that changes something goes through the same gate, whatever its path.
    r = await get(admin, "/v1/anything", "DELETE", headers={"host": "127.0.0.1:9090", **headers})
    assert r.status == (status if status != 409 else 405)


async def test_the_origin_of_an_https_admin_is_https() -> None:
    from raftlb.config.model import TlsConfig

    admin = Admin(with_admin(tls=TlsConfig(cert="c", key="k")))
    same = {"host": "[::1]:9443", "origin": "https://[::1]:9443"}
    assert body(await get(admin, "/v1/reload", "POST", headers=same))["error"] == "no_config_file"
    other = {"host": "[::1]:9443", "origin": "http://[::1]:9443"}
    assert body(await get(admin, "/v1/reload", "POST", headers=other))["error"] == "cross_origin"
    default_port = {"host": "localhost", "origin": "https://localhost:443"}
    assert body(await get(admin, "/v1/reload", "POST", headers=default_port))["error"] == "no_config_file"
