"""Hot reload and graceful drain under load: no failed request while the config changes (nodes added and
removed, timeouts, routes, limits, listeners), invalid configs rejected with the old one kept, in-flight
requests finishing through a shutdown, and `raftlb run` reloading on SIGHUP and exiting 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from raftlb.config.load import load_config
from raftlb.server import Server
from tests.support.fakes import FakeCluster, FakeNode, delay
from tests.support.harness import raw_exchange, url_of, wait_for

pytestmark = pytest.mark.integration


def config_yaml(nodes: list[FakeNode], *, extra_cluster: str = "", listeners: str = "", admin_port: int = 0,
                listener_port: int = 0, liveness: str = "1s", response_timeout: str = "10s",
                limits: str = "", drain: str = "5s", read_policy: str = "leader") -> str:
    node_lines = "".join(f"      - {{id: {n.id}, url: 'http://127.0.0.1:{n.port}'}}\n" for n in nodes)
    return (
        f"listeners:\n  - {{name: main, address: '127.0.0.1:{listener_port}', cluster: c1}}\n{listeners}"
        f"admin: {{address: '127.0.0.1:{admin_port}'}}\n"
        f"drain_timeout: {drain}\n{limits}"
        "clusters:\n"
        "  - name: c1\n"
        f"    liveness_timeout: {liveness}\n"
        f"    response_timeout: {response_timeout}\n"
        "    hold: {timeout: 5s}\n"
        "    routes:\n"
        f"      - {{methods: [GET], path: '^/kv/', kind: read, policy: {read_policy}}}\n"
        f"    nodes:\n{node_lines}{extra_cluster}"
    )


@contextlib.asynccontextmanager
async def server_from(path: Path) -> AsyncIterator[Server]:
    server = Server(load_config(str(path)))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def leader_of(server: Server, name: str = "c1") -> str | None:
    return server.proxies[name].table.leader(time.monotonic())


class Load:
    """Clients writing (PUT and POST with an Idempotency-Key) and reading through one listener on keep-alive
    connections; every answer that is not 200 is a failure."""

    def __init__(self, base_url: str, clients: int = 4, timeout: float = 15.0) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.clients = clients
        self.ok = 0
        self.failures: list[str] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def client(self, n: int) -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, limits=limits) as c:
            i = 0
            while not self.stop.is_set():
                key = f"/kv/c{n}-{i % 20}"
                try:
                    if i % 3 == 0:
                        r = await c.get(key)
                    elif i % 3 == 1:
                        r = await c.put(key, content=str(i).encode())
                    else:
                        r = await c.post(key, content=str(i).encode(),
                                         headers={"idempotency-key": f"{n}-{i}"})
                except httpx.HTTPError as exc:
                    self.failures.append(f"{key}: {exc!r}")
                else:
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.request.method} {key}: {r.status_code} {r.text[:200]}")
                i += 1

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.client(n)) for n in range(self.clients)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def progress(self, requests: int = 40) -> None:
        """Wait until `requests` more have been answered."""
        target = self.ok + requests
        await wait_for(lambda: self.ok >= target or bool(self.failures), timeout=10)


async def test_reload_under_load_adds_moves_and_removes_nodes_without_a_failed_request(
        tmp_path: Path) -> None:
    async with FakeCluster(4) as fc:
        fc.elect("n1")
        cfg = tmp_path / "raftlb.yaml"
        cfg.write_text(config_yaml(fc.nodes[:3]))
        async with server_from(cfg) as srv:
            await wait_for(lambda: leader_of(srv) == "n1")
            listener = srv.listeners[0]
            load = Load(url_of(srv))
            load.start()
            await load.progress()

            async def reload(text: str, expect: str = "applied") -> list[str]:
                cfg.write_text(text)
                result = await srv.reload()
                assert result.to_json()["result"] == expect, result
                await load.progress()
                return result.changes

            # 1. a fourth node joins the config, and then takes the leadership.
            assert await reload(config_yaml(fc.nodes)) == ["cluster c1: node n4 added"]
            await wait_for(lambda: srv.proxies["c1"].table.nodes["n4"].role is not None)
            fc.elect("n4")
            await wait_for(lambda: leader_of(srv) == "n4")
            await load.progress()
            # 2. timeouts and limits change under the running connections.
            changes = await reload(config_yaml(fc.nodes, liveness="1500ms", response_timeout="8s",
                                               limits="limits: {max_headers: 80, idle_timeout: 30s}\n"))
            assert changes == ["cluster c1: settings changed", "limits changed"]
            assert srv.proxies["c1"].table.liveness_timeout == 1.5
            assert all(conn.limits.max_headers == 80 for conn in listener.connections)
            # 3. a follower leaves; the old leader leaves (and the limits go back to the defaults).
            changes = await reload(config_yaml([fc["n1"], fc["n2"], fc["n4"]]))
            assert changes == ["cluster c1: node n3 removed", "limits changed"]
            assert await reload(config_yaml([fc["n2"], fc["n4"]])) == ["cluster c1: node n1 removed"]
            # 4. an invalid file changes nothing.
            await reload("clusters: []\n", expect="rejected")
            assert set(srv.proxies["c1"].table.nodes) == {"n2", "n4"}
            # 5. a node comes back.
            assert await reload(config_yaml([fc["n2"], fc["n3"], fc["n4"]])) == ["cluster c1: node n3 added"]
            await load.finish()
            assert srv.listeners == [listener]  # the same listener throughout: no connection was dropped
            applied = srv.metrics.reloads.labels("applied")._value.get()  # no public getter
            assert applied == 5
    assert load.failures == []
    assert load.ok > 200


async def test_removing_a_node_with_reads_in_flight_resends_them(tmp_path: Path) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n3"].handler = delay(0.5)
        cfg = tmp_path / "raftlb.yaml"
        cfg.write_text(config_yaml(fc.nodes, read_policy="any"))
        async with server_from(cfg) as srv:
            await wait_for(lambda: all(v.role for v in srv.proxies["c1"].table.nodes.values()))
            port = srv.listeners[0].port
            request = b"GET /kv/r HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            # Raw sockets, not httpx: a request that hangs must not leave client coroutines behind.
            reads = [asyncio.create_task(raw_exchange(port, request, read_timeout=3.0)) for _ in range(12)]
            try:
                await wait_for(lambda: srv.proxies["c1"].pools["n3"].outstanding > 0)
                cfg.write_text(config_yaml(fc.nodes[:2], read_policy="any"))
                assert (await srv.reload()).changes == ["cluster c1: node n3 removed"]
            finally:
                answers = await asyncio.gather(*reads, return_exceptions=True)
    assert [a if isinstance(a, BaseException) else a.split(b"\r\n", 1)[0] for a in answers] == \
        [b"HTTP/1.1 200 OK"] * 12


async def test_an_invalid_reload_is_rejected_with_its_yaml_path_and_the_old_config_keeps_running(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n2")
        cfg = tmp_path / "raftlb.yaml"
        cfg.write_text(config_yaml(fc.nodes))
        async with server_from(cfg) as srv, httpx.AsyncClient() as c:
            await wait_for(lambda: leader_of(srv) == "n2")
            before = srv.config
            cfg.write_text(config_yaml(fc.nodes, liveness="soon"))
            with caplog.at_level(logging.ERROR, logger="raftlb.ops.reload"):
                r = await c.post(f"http://127.0.0.1:{srv.admin.port}/v1/reload")  # type: ignore[union-attr]
            assert r.status_code == 422
            doc = r.json()
            assert (doc["error"], doc["path"]) == ("invalid_config", "clusters[0].liveness_timeout")
            assert "clusters[0].liveness_timeout" in caplog.text and "the running config stays" in caplog.text
            assert srv.config is before
            assert (await c.put(url_of(srv) + "/kv/a", content=b"1")).status_code == 200
            events = [e for e in srv.events.recent() if e.type == "config_reload"]
            assert events[-1].data["result"] == "rejected"


async def test_reload_adds_and_removes_listeners_and_clusters_and_rejects_an_address_in_use(
        tmp_path: Path) -> None:
    async with FakeCluster(3) as fc, FakeCluster(1, prefix="m") as other:
        fc.elect("n1")
        other.elect("m1")
        cfg = tmp_path / "raftlb.yaml"
        cfg.write_text(config_yaml(fc.nodes))
        async with server_from(cfg) as srv, httpx.AsyncClient() as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            second = ("  - name: c2\n    nodes:\n"
                      f"      - {{id: m1, url: 'http://127.0.0.1:{other.nodes[0].port}'}}\n")
            cfg.write_text(config_yaml(fc.nodes, extra_cluster=second,
                                       listeners="  - {name: side, address: '127.0.0.1:0', cluster: c2}\n"))
            result = await srv.reload()
            assert result.applied, result
            assert result.changes[0] == "cluster c2: added (1 nodes)"
            side = next(s for s in srv.listeners if s.name == "side")
            await wait_for(lambda: leader_of(srv, "c2") == "m1")
            r = await c.put(f"http://127.0.0.1:{side.port}/kv/x", content=b"1")
            assert (r.status_code, r.headers["x-raft-node"]) == (200, "m1")
            # A listener on an address that is taken: the whole reload is rejected.
            main_port = srv.listeners[0].port
            cfg.write_text(config_yaml(fc.nodes, extra_cluster=second, listeners=(
                f"  - {{name: side, address: '127.0.0.1:0', cluster: c2}}\n"
                f"  - {{name: clash, address: '127.0.0.1:{main_port}', cluster: c2}}\n")))
            result = await srv.reload()
            assert (result.applied, result.error) == (False, "bind_failed")
            assert result.path == "listeners[2].address"
            assert [s.name for s in srv.listeners] == ["main", "side"]
            # Back to one cluster: the side listener drains and closes, then c2 stops.
            cfg.write_text(config_yaml(fc.nodes))
            result = await srv.reload()
            assert result.changes == ["listener side: removed", "cluster c2: removed"]
            await wait_for(lambda: "c2" not in srv.proxies)
            with pytest.raises(httpx.ConnectError):
                await c.put(f"http://127.0.0.1:{side.port}/kv/x", content=b"1")
            assert (await c.put(url_of(srv) + "/kv/y", content=b"1")).status_code == 200


async def test_a_new_cluster_kind_replaces_the_subscriptions(tmp_path: Path) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        cfg = tmp_path / "raftlb.yaml"
        cfg.write_text(config_yaml(fc.nodes))
        async with server_from(cfg) as srv:
            await wait_for(lambda: leader_of(srv) == "n1")
            before = srv.subscriptions["c1"]
            cfg.write_text(config_yaml(fc.nodes).replace("  - name: c1\n", "  - name: c1\n    kind: etcd\n"))
            result = await srv.reload()
            assert "cluster c1: now followed as kind etcd" in result.changes, result
            after = srv.subscriptions["c1"]
            assert after is not before and type(after).__name__ == "EtcdSubscriptions"
            await wait_for(lambda: not before.nodes)  # the old streams were stopped


async def test_drain_under_load_lets_in_flight_requests_finish_on_a_slow_node(tmp_path: Path) -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        fc["n1"].handler = delay(0.6)
        cfg = tmp_path / "raftlb.yaml"
        cfg.write_text(config_yaml(fc.nodes))
        srv = Server(load_config(str(cfg)))
        await srv.start()
        admin = f"http://127.0.0.1:{srv.admin.port}"  # type: ignore[union-attr]
        port = srv.listeners[0].port
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=50)) as c:
            await wait_for(lambda: leader_of(srv) == "n1")
            assert (await c.get(admin + "/readyz")).status_code == 200
            writes = [asyncio.create_task(c.post(f"{url_of(srv)}/kv/w{i}", content=b"v")) for i in range(20)]
            await wait_for(lambda: len(fc["n1"].requests) == 20)
            stopping = asyncio.create_task(srv.stop())
            await wait_for(lambda: srv.draining)
            r = await c.get(admin + "/readyz")  # the admin answers until the very end
            assert (r.status_code, r.json()["reason"]) == (503, "draining")
            with pytest.raises(OSError):  # no longer accepting
                await asyncio.open_connection("127.0.0.1", port)
            results = await asyncio.gather(*writes)
            assert [r.status_code for r in results] == [200] * 20
            await asyncio.wait_for(stopping, 10)


# -- raftlb run as a process ---------------------------------------------------------------------------------


async def read_log_until(stream: asyncio.StreamReader, pattern: str, lines: list[str],
                         timeout: float = 15.0) -> re.Match[str]:
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"raftlb exited before logging {pattern!r}:\n{''.join(lines)}")
            lines.append(line)
            if m := re.search(pattern, line):
                return m


@pytest.mark.timeout(120)
async def test_raftlb_run_reloads_on_sighup_and_drains_on_sigterm_with_exit_0(tmp_path: Path) -> None:
    async with FakeCluster(4) as fc:
        fc.elect("n1")
        cfg = tmp_path / "raftlb.yaml"
        cfg.write_text(config_yaml(fc.nodes[:3]))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "raftlb", "run", "-c", str(cfg), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        lines: list[str] = []
        try:
            listener = (await read_log_until(proc.stderr, r"listener main on 127\.0\.0\.1:(\d+)", lines))[1]
            admin_port = (await read_log_until(proc.stderr, r"admin on 127\.0\.0\.1:(\d+)", lines))[1]
            admin = f"http://127.0.0.1:{admin_port}"
            async with httpx.AsyncClient(timeout=10) as c:
                deadline = time.monotonic() + 10
                while (await c.get(admin + "/readyz?leader=1")).status_code != 200:
                    assert time.monotonic() < deadline, "never ready"
                    await asyncio.sleep(0.05)
                # SIGHUP: the fourth node joins.
                cfg.write_text(config_yaml(fc.nodes))
                proc.send_signal(signal.SIGHUP)
                await read_log_until(proc.stderr, r"config reloaded \(SIGHUP\): cluster c1: node n4 added",
                                     lines)
                nodes = (await c.get(admin + "/v1/clusters")).json()["clusters"]["c1"]["nodes"]
                assert list(nodes) == ["n1", "n2", "n3", "n4"]
                # SIGTERM with a slow write in flight: it completes, then the process exits 0.
                fc["n1"].handler = delay(1.0)
                write = asyncio.create_task(c.put(f"http://127.0.0.1:{listener}/kv/slow", content=b"v"))
                await wait_for(lambda: any(r.path == "/kv/slow" for r in fc["n1"].requests))
                proc.send_signal(signal.SIGTERM)
                r = await write
                assert r.status_code == 200
            rest = await asyncio.wait_for(proc.stderr.read(), 15)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
            lines.append(rest.decode())
            assert "stopped" in lines[-1]
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_readiness_holds_through_an_election_while_writes_are_held(tmp_path: Path) -> None:
    # A replica that turned unready whenever its cluster had no leader would drop out of its Service during
    # every election, and the writes raftlb holds for the new leader would become connection errors.
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        cfg = tmp_path / "raftlb.yaml"
        cfg.write_text(config_yaml(fc.nodes))
        async with server_from(cfg) as srv, httpx.AsyncClient(timeout=10) as c:
            admin = f"http://127.0.0.1:{srv.admin.port}"  # type: ignore[union-attr]
            await wait_for(lambda: leader_of(srv) == "n1")
            fc.no_leader()
            await wait_for(lambda: leader_of(srv) is None)
            writes = [asyncio.create_task(c.post(f"{url_of(srv)}/kv/w{i}", content=b"v")) for i in range(5)]
            await wait_for(lambda: len(srv.proxies["c1"].held) == 5)
            r = await c.get(admin + "/readyz")
            assert (r.status_code, r.json()) == (200, {"ready": True, "without_leader": ["c1"]})
            r = await c.get(admin + "/readyz?leader=1")  # the opt-in leader check, for alerts
            assert (r.status_code, r.json()["reason"]) == (503, "no_leader")
            fc.elect("n2")
            results = await asyncio.gather(*writes)
            assert [r.status_code for r in results] == [200] * 5
            assert len(fc["n2"].requests) == 5  # released to the new leader
            assert (await c.get(admin + "/readyz?leader=1")).status_code == 200
