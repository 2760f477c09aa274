"""Observability end to end: the admin listener over real sockets, `promtool check metrics` on a live scrape,
a real Prometheus following the leader, the status page in headless Chromium, and `raftlb status`.

Chromium and Prometheus come from Debian (`chromium`, `prometheus`); `tests/support/tools.py` installs
them when missing (as root) and the test is skipped, with the reason, only when that is impossible.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raftlb.config.model import LimitsConfig
from raftlb.proxy.cluster import ClusterProxy
from raftlb.server import Server
from raftlb.tools import status as status_cli
from tests.support.cdp import Chromium
from tests.support.fakes import FakeCluster
from tests.support.harness import demo_cluster_config, make_config, raw_exchange, running, url_of, wait_for
from tests.support.tools import free_port, require_debian_package

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def admin_url(server: Server) -> str:
    assert server.admin is not None
    return f"http://127.0.0.1:{server.admin.port}"


def leader_of(server: Server, name: str = "c1") -> str | None:
    return server.proxies[name].table.leader(time.monotonic())


async def kill_leader(fc: FakeCluster, old: str, new: str) -> None:
    """The leader dies (its port refuses connections); the survivors elect `new` at the next term."""
    await fc[old].stop()
    term = fc.term + 1
    for node in fc.nodes:
        if node.id != old:
            node.set(term=term, role="leader" if node.id == new else "follower", leader=new)


async def write_load(server: Server, stop: asyncio.Event, period: float = 0.01) -> int:
    """PUTs through raftlb until `stop`; the number answered 200."""
    ok = 0
    async with httpx.AsyncClient(base_url=url_of(server), timeout=10) as c:
        i = 0
        while not stop.is_set():
            r = await c.put(f"/kv/k{i % 50}", content=str(i).encode())
            ok += r.status_code == 200
            i += 1
            await asyncio.sleep(period)
    return ok


# -- the admin listener over HTTP ----------------------------------------------------------------------------


async def test_event_stream_announces_leader_changes_and_nodes_going_down() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=0.4), admin=True) as srv, httpx.AsyncClient() as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            events: list[dict[str, Any]] = []

            async def follow() -> None:
                async with c.stream("GET", admin_url(srv) + "/v1/events",
                                    headers={"last-event-id": "0"}) as r:
                    assert r.headers["content-type"] == "text/event-stream"
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(json.loads(line[6:]))

            task = asyncio.create_task(follow())
            # The history first: the startup election and the nodes coming up.
            await wait_for(lambda: any(e["type"] == "leader_change" and e["new_leader"] == "n1"
                                       for e in events))
            await kill_leader(fc, "n1", "n3")
            await wait_for(lambda: any(e["type"] == "leader_change" and e["new_leader"] == "n3"
                                       for e in events))
            await wait_for(lambda: any(e["type"] == "node_down" and e["node"] == "n1" for e in events))
            change = next(e for e in events if e["type"] == "leader_change" and e["new_leader"] == "n3")
            assert change["old_term"] < change["new_term"] == fc.term
            ids = [e["id"] for e in events]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_live_scrape_passes_promtool_check_metrics() -> None:
    promtool = require_debian_package("prometheus", "promtool")
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=0.5), admin=True) as srv, httpx.AsyncClient() as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            for i in range(20):
                await c.put(url_of(srv) + f"/kv/{i}", content=b"v")
            # Until the proxy calls Metrics.request_done itself, so the request series are in the scrape too.
            srv.metrics.observe_request("c1", "write", "leader", "n1", 200, 0.002)
            fc.elect("n2")
            await wait_for(lambda: leader_of(srv) == "n2")
            r = await c.get(admin_url(srv) + "/metrics")
            assert r.status_code == 200
            scrape = r.content
    assert b'raftlb_leader{cluster="c1",node="n2"} 1.0' in scrape
    done = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


@pytest.mark.skipif(not hasattr(ClusterProxy, "observer"),
                    reason="the proxy does not report finished requests yet: ClusterProxy.observer calling "
                           "Metrics.request_done (see the issue 6 report)")
async def test_requests_and_the_failover_time_are_measured_through_a_leader_kill() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=0.3), admin=True) as srv:
            await wait_for(lambda: leader_of(srv) == "n1")
            stop = asyncio.Event()
            load = asyncio.create_task(write_load(srv, stop, period=0.005))
            await wait_for(lambda: len(fc["n1"].requests) > 20)
            t0 = time.monotonic()
            await kill_leader(fc, "n1", "n2")
            await wait_for(lambda: len(fc["n2"].requests) > 20)
            bound = time.monotonic() - t0
            stop.set()
            await load
            async with httpx.AsyncClient() as c:
                scrape = (await c.get(admin_url(srv) + "/metrics")).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(scrape) for s in fam.samples}
    assert samples[("raftlb_failover_seconds_count", (("cluster", "c1"),))] == 1
    assert 0 < samples[("raftlb_failover_seconds_sum", (("cluster", "c1"),))] <= bound
    ok = {node: samples.get(("raftlb_requests_total", (("cluster", "c1"), ("code", "2xx"), ("kind", "write"),
                                                     ("node", node), ("policy", "leader"))), 0)
          for node in ("n1", "n2")}
    assert ok["n1"] > 20 and ok["n2"] > 20
    assert samples[("raftlb_request_duration_seconds_count", (("cluster", "c1"), ("kind", "write"),
                                                              ("policy", "leader")))] >= ok["n1"] + ok["n2"]


# -- a real Prometheus ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, targets: list[str]) -> AsyncIterator[str]:
    """A Prometheus server scraping `targets` (host:port of admin listeners) every 200 ms; its base URL."""
    binary = require_debian_package("prometheus", "prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 200ms, scrape_timeout: 150ms, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: raftlb\n    static_configs: [{{targets: {json.dumps(targets)}}}]\n")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2) as c:
            async def ready() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await c.get(base + "/-/ready")).status_code == 200
                return False

            deadline = time.monotonic() + 30
            while not await ready():
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "prometheus did not become ready in 30s"
                await asyncio.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        log.close()


async def prom_query(base: str, query: str) -> list[tuple[dict[str, str], str]]:
    """An instant query through Prometheus' HTTP API: (labels, value) per series."""
    async with httpx.AsyncClient(timeout=2) as c:
        r = await c.get(base + "/api/v1/query", params={"query": query})
    doc = r.json()
    assert doc["status"] == "success", doc
    return [(s["metric"], s["value"][1]) for s in doc["data"]["result"]]


async def wait_prom(base: str, query: str, expected: list[tuple[str, str]], label: str = "node",
                    timeout: float = 15.0) -> None:
    """Wait until `query` returns exactly `expected`: (value of `label`, sample value) per series."""
    deadline = time.monotonic() + timeout
    seen: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        seen = sorted((m.get(label, ""), v) for m, v in await prom_query(base, query))
        if seen == sorted(expected):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"Prometheus: {query} gave {seen}, expected {expected}")


async def wait_prom_leader(base: str, cluster: str, expected: str, timeout: float = 15.0) -> None:
    """The leader as Prometheus knows it: `raftlb_leader{cluster=...} == 1`."""
    await wait_prom(base, f'raftlb_leader{{cluster="{cluster}"}} == 1', [(expected, "1")], timeout=timeout)


@pytest.mark.timeout(600)  # may install Debian prometheus first
async def test_prometheus_scrapes_the_leader_and_follows_a_leader_kill(tmp_path: Path) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=0.4), admin=True) as srv:
            async with prometheus(tmp_path, [f"127.0.0.1:{srv.admin.port}"]) as prom:  # type: ignore[union-attr]
                await wait_prom_leader(prom, "c1", "n1")
                await kill_leader(fc, "n1", "n2")
                await wait_prom_leader(prom, "c1", "n2")
                await wait_prom(prom, 'raftlb_node_up{cluster="c1"}', [("n1", "0"), ("n2", "1"), ("n3", "1")])
                await wait_prom(prom, 'raftlb_cluster_term{cluster="c1"}', [("", str(fc.term))])
                async with httpx.AsyncClient(timeout=2) as c:
                    targets = (await c.get(prom + "/api/v1/targets")).json()["data"]["activeTargets"]
                    assert [(t["health"], t["lastError"]) for t in targets] == [("up", "")]


@pytest.mark.timeout(600)
def test_prometheus_follows_a_leader_kill_on_the_real_demo_cluster(demo_cluster: object,
                                                                   tmp_path: Path) -> None:
    from raftlb.demo.cluster import DemoCluster

    assert isinstance(demo_cluster, DemoCluster)
    cfg = demo_cluster_config(demo_cluster)

    async def scenario() -> None:
        async with running(cfg, admin=True) as srv:
            async with prometheus(tmp_path, [f"127.0.0.1:{srv.admin.port}"]) as prom:  # type: ignore[union-attr]
                first = await asyncio.to_thread(demo_cluster.wait_for_leader, 15.0)
                await wait_prom_leader(prom, "demo", first)
                term = demo_cluster.term()
                await asyncio.to_thread(demo_cluster.kill, first)
                second = await asyncio.to_thread(demo_cluster.wait_for_leader, 20.0, min_term=term + 1)
                assert second != first
                await wait_prom_leader(prom, "demo", second, timeout=20.0)

    asyncio.run(scenario())


# -- the status page in headless Chromium --------------------------------------------------------------------


@pytest.mark.timeout(600)  # may install Debian chromium first
async def test_status_page_shows_the_new_leader_live_after_a_leader_kill(tmp_path: Path) -> None:
    chromium = require_debian_package("chromium", "chromium")
    ARTIFACTS.mkdir(exist_ok=True)
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(liveness_timeout=0.4), admin=True) as srv:
            await wait_for(lambda: leader_of(srv) == "n1")
            stop = asyncio.Event()
            load = asyncio.create_task(write_load(srv, stop))
            async with Chromium(chromium, tmp_path) as browser:
                page = await browser.open(admin_url(srv) + "/")
                card = "document.querySelector('[data-cluster=\"c1\"]')"
                assert await page.wait_for(f"{card}?.dataset.leader") == "n1"
                await wait_for(lambda: len(srv.events.subscribers) == 1)  # the page follows /v1/events
                await asyncio.sleep(2.5)  # a few polls, so the rates have something to draw
                await kill_leader(fc, "n1", "n2")
                # Without a reload: the event stream (and the next poll) update the open page.
                await page.wait_for(f"{card}?.dataset.leader === 'n2'")
                # The dead ex-leader reads down (what to act on), not deposed, with its role in the past.
                await page.wait_for(f"!!{card}.querySelector('tr[data-node=\"n1\"] td.state-down')")
                await asyncio.sleep(1.5)
                state = await page.evaluate(f"""(() => {{
                    const c = {card};
                    return {{
                      pill: c.querySelector('.leader').textContent,
                      term: c.querySelector('.term').textContent,
                      rows: [...c.querySelectorAll('tbody tr')].map(r => [r.dataset.node, r.dataset.role]),
                      n1: [...c.querySelectorAll('tr[data-node="n1"] td')].map(td => td.textContent),
                      timeline: [...c.querySelectorAll('.timeline rect[data-leader]')]
                                  .map(r => r.dataset.leader),
                      events: [...document.querySelectorAll('#event-list li')].map(li => li.dataset.type),
                      live: document.getElementById('conn-text').textContent,
                    }};
                }})()""")
                (ARTIFACTS / "status-page.png").write_bytes(await page.screenshot())
                (ARTIFACTS / "status-page.html").write_text(await page.html())
            stop.set()
            assert await load > 0
    assert state["pill"] == "leader n2"
    assert state["term"] == str(fc.term)
    assert ["n2", "leader"] in state["rows"] and ["n3", "follower"] in state["rows"]
    assert (state["n1"][1], state["n1"][7]) == ("was leader", "down")
    assert state["timeline"][-2:] == ["n1", "n2"]
    assert "leader_change" in state["events"] and "node_down" in state["events"]
    assert state["live"] == "live"


# -- the admin listener against browsers on other sites, and clients that hold it ---------------------------


async def admin_raw(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, object]]:
    """One raw request to the admin listener (`head`: request line and headers); status and JSON body."""
    data = await raw_exchange(port, head.replace("\n", "\r\n").encode() + b"\r\n" + body, read_timeout=5.0)
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2])


async def test_admin_refuses_a_cross_site_form_post_and_a_rebound_host_and_serves_its_tools() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(), admin=True) as srv, httpx.AsyncClient() as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            port = srv.admin.port  # type: ignore[union-attr]
            # <form method=post enctype=text/plain action=http://127.0.0.1:9090/v1/reload> on another site.
            form = (f"POST /v1/reload HTTP/1.1\nHost: 127.0.0.1:{port}\nOrigin: http://evil.example\n"
                    "Content-Type: text/plain\nContent-Length: 4\nConnection: close\n")
            detail = "POST from another origin (http://evil.example) is refused"
            assert await admin_raw(port, form, b"x=y\n") == (403, {"error": "cross_origin", "detail": detail})
            # The same page after rebinding evil.example to 127.0.0.1: its own origin, but the Host names it.
            rebound = (f"POST /v1/reload HTTP/1.1\nHost: evil.example:{port}\n"
                       f"Origin: http://evil.example:{port}\nContent-Length: 0\nConnection: close\n")
            assert (await admin_raw(port, rebound))[1]["error"] == "host_not_allowed"
            for path in ("/v1/events?since=0", "/v1/clusters", "/"):  # nothing to read either
                get_ = f"GET {path} HTTP/1.1\nHost: evil.example:{port}\nConnection: close\n"
                assert await admin_raw(port, get_) == (403, {
                    "error": "host_not_allowed",
                    "detail": f"Host 'evil.example:{port}' is not an IP address, localhost or listed in "
                              "admin.allowed_hosts"})
            assert srv.reloader.reloads == 0
            # What keeps working: curl/httpx POSTs (no body), Prometheus and probes (Host: the pod IP),
            # `raftlb status`, the event stream under localhost.
            r = await c.post(admin_url(srv) + "/v1/reload")
            assert (r.status_code, r.json()["error"]) == (409, "no_config_file")  # past the checks
            scrape = (f"GET /metrics HTTP/1.1\nHost: 127.0.0.1:{port}\nUser-Agent: Prometheus/2.45\n"
                      "Connection: close\n")
            data = await raw_exchange(port, scrape.replace("\n", "\r\n").encode() + b"\r\n")
            assert data.startswith(b"HTTP/1.1 200 ") and b"raftlb_cluster_has_leader" in data
            assert (await c.get(f"http://localhost:{port}/readyz")).status_code == 200
            doc = await asyncio.to_thread(status_cli.fetch, admin_url(srv))
            assert doc["clusters"]["c1"]["leader"] == "n1"
            async with c.stream("GET", f"http://localhost:{port}/v1/events?since=0") as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break


async def test_an_event_stream_client_that_never_reads_is_cut_after_the_send_timeout() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(), admin=True, limits=LimitsConfig(send_timeout=0.5)) as srv:
            admin = srv.admin
            assert admin is not None
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: a small window)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", admin.port))
                sock.send(b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                await wait_for(lambda: len(srv.events.subscribers) == 1)
                conn = next(iter(admin.connections))
                # Events flow (about 1 KiB each); the client reads nothing. Far less than a megabyte must do
                # to stall the stream: the kernel's autotuned send buffer alone would take megabytes.
                sent = 0
                while not conn.writing_paused and sent < 512 * 1024 and not conn.closed:
                    sent += len(srv.events.publish("config_reload", result="applied", pad="x" * 1000).sse())
                    await asyncio.sleep(0.001)
                assert conn.writing_paused, f"{sent} bytes of events and the stream still takes more"
                # Stalled: cut after send_timeout, its subscription and buffers gone.
                await wait_for(lambda: conn.closed and not admin.connections, timeout=10)
                assert admin.send_timeouts == 1
                await wait_for(lambda: not srv.events.subscribers)
            finally:
                sock.close()


async def test_the_admin_connection_cap_is_configurable_and_refuses_the_next_connection() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        cfg = make_config(fc.config(), admin=True)
        cfg = replace(cfg, admin=replace(cfg.admin, max_connections=2))
        server = Server(cfg)
        await server.start()
        try:
            admin = server.admin
            assert admin is not None and admin.max_connections == 2
            held = [await asyncio.open_connection("127.0.0.1", admin.port) for _ in range(2)]
            await wait_for(lambda: len(admin.connections) == 2)
            data = await raw_exchange(admin.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 503 ") and b'"overloaded"' in data
            assert admin.rejected_connections == 1
            for _, writer in held:
                writer.close()
                await writer.wait_closed()
            await wait_for(lambda: not admin.connections)
            data = await raw_exchange(admin.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                  b"Connection: close\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 200 ")
        finally:
            await server.stop()


# -- raftlb status -------------------------------------------------------------------------------------------


async def test_raftlb_status_prints_the_table_and_exits_non_zero_without_a_leader() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n2")
        async with running(fc.config(liveness_timeout=0.4), admin=True) as srv:
            await wait_for(lambda: leader_of(srv) == "n2")
            out = io.StringIO()
            code = await asyncio.to_thread(status_cli.main, admin_url(srv), out=out)
            text = out.getvalue()
            assert code == 0, text
            assert "cluster c1: leader n2 (announced), term 2" in text
            assert [line.split()[:3] for line in text.splitlines() if line.strip().startswith("n2")] == \
                [["n2*", "leader", "2"]]
            out = io.StringIO()
            assert await asyncio.to_thread(status_cli.main, admin_url(srv), as_json=True, out=out) == 0
            assert json.loads(out.getvalue())["clusters"]["c1"]["leader"] == "n2"
            fc.no_leader()
            await wait_for(lambda: leader_of(srv) is None)
            out = io.StringIO()
            assert await asyncio.to_thread(status_cli.main, admin_url(srv), out=out) == 1
            assert "NO LEADER" in out.getvalue()
            port = srv.admin.port  # type: ignore[union-attr]
    assert await asyncio.to_thread(status_cli.main, f"http://127.0.0.1:{port}") == 2
