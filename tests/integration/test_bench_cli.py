"""`raftlb bench` against raftlb in front of the real demo cluster (PySyncObj Raft, three processes), over
HTTP/1.1 and over HTTP/2 (`--http2 --streams 4`, counted by raftlb's metrics as HTTP/2 requests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raftlb.demo.cluster import DemoCluster
from raftlb.server import Server
from raftlb.tools.loadgen import BenchOptions, BenchProgress, run_bench
from tests.support.harness import demo_cluster_config, make_config, running, url_of, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def proxies(cluster: DemoCluster, count: int = 1, **cfg: Any) -> AsyncIterator[list[Server]]:
    """`count` independent raftlb servers in front of the cluster, each already seeing its leader."""
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(running(demo_cluster_config(cluster, **cfg)))
                   for _ in range(count)]
        for srv in servers:
            proxy = srv.proxies["demo"]
            await wait_for(lambda p=proxy: p.table.leader(time.monotonic()) is not None, timeout=10)
        yield servers


def bench(urls: list[str], **kw: Any) -> BenchOptions:
    base: dict[str, Any] = {"urls": tuple(urls), "clients": 8, "duration": 3.0, "timeout": 5.0}
    return BenchOptions(**(base | kw))


async def test_leader_reads_through_raftlb_show_no_violations(demo_cluster: DemoCluster) -> None:
    async with proxies(demo_cluster) as [srv]:
        report = await run_bench(bench([url_of(srv)]))
    leader = await asyncio.to_thread(demo_cluster.leader)
    assert report.violation_count == 0, report.examples
    assert report.exit_code == 0, report.failures()
    assert report.throughput > 0 and report.reads > 0 and report.writes > 0
    assert report.reads_by_node == {leader: report.reads}  # route policy `leader`
    assert report.verified_keys > 0 and report.unverified_keys == 0


async def test_a_token_carried_across_two_raftlb_replicas_keeps_fenced_follower_reads_consistent(
        demo_cluster: DemoCluster) -> None:
    async with proxies(demo_cluster, 2) as servers:
        report = await run_bench(bench([url_of(s) for s in servers], consistency="fenced"))
        served = [s.proxies["demo"].stats.requests for s in servers]
    leader = await asyncio.to_thread(demo_cluster.leader)
    assert report.violation_count == 0, report.examples
    assert report.exit_code == 0, report.failures()
    assert all(n > report.requests / 4 for n in served), served  # each client alternated between both
    followers = {n: c for n, c in report.reads_by_node.items() if n != leader}
    assert sum(followers.values()) > 0, report.reads_by_node


async def test_unfenced_reads_without_a_token_are_reported_as_violations(demo_cluster: DemoCluster) -> None:
    """The control run: the checker can fail. Followers apply a write a heartbeat after the leader, so a
    client that reads its own key right after writing it, from a follower, often sees the older value."""
    async with proxies(demo_cluster) as [srv]:
        report = await run_bench(bench([url_of(srv)], consistency="any", send_token=False,
                                       keys_per_client=1, read_ratio=0.5))
    assert report.violations["read_your_writes"] > 0, report.to_json()
    assert report.violations["lost"] == 0  # stale, not lost: the leader has every acknowledged write
    assert report.exit_code == 1


async def test_the_cli_prints_the_table_and_writes_json(demo_cluster: DemoCluster, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    async with proxies(demo_cluster) as [srv]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "raftlb", "bench", "--url", url_of(srv), "--duration", "2",
            "--clients", "4", "--json", str(out),
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = stdout.decode()
    assert proc.returncode == 0, text + stderr.decode()
    for needle in ("== raftlb bench", "throughput", "read latency", "reads per node", "PASS: no violations"):
        assert needle in text, needle
    doc = json.loads(out.read_text())
    assert doc["passed"] is True and doc["requests"] > 0 and doc["violation_count"] == 0
    assert sum(doc["reads_by_node"].values()) == doc["latency_ms"]["read"]["count"]


async def bench_cli(*args: str) -> tuple[int, str, str]:
    """Run `raftlb bench ARGS` as a process; its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "raftlb", "bench", *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def test_the_cli_over_http2_with_four_streams_per_connection(demo_cluster: DemoCluster,
                                                                   tmp_path: Path) -> None:
    """Each of 4 connections carries 4 request loops; raftlb's metrics count every request as HTTP/2."""
    out = tmp_path / "bench.json"
    async with running(demo_cluster_config(demo_cluster), admin=True) as srv:
        proxy = srv.proxies["demo"]
        await wait_for(lambda: proxy.table.leader(time.monotonic()) is not None, timeout=10)
        code, text, err = await bench_cli("--url", url_of(srv), "--http2", "--streams", "4", "--clients", "4",
                                          "--duration", "2", "--json", str(out))
        assert srv.admin is not None
        async with httpx.AsyncClient(timeout=10) as c:
            scrape = (await c.get(f"http://127.0.0.1:{srv.admin.port}/metrics")).text
    assert code == 0, text + err
    for needle in ("http2 (HTTP/2), 4 streams per connection", "4 clients x 4 streams",
                   "PASS: no violations"):
        assert needle in text, needle
    doc = json.loads(out.read_text())
    assert doc["protocol"] == "http2" and doc["streams"] == 4 and doc["clients"] == 4
    assert doc["violation_count"] == 0 and doc["violations"]["lost"] == 0 and doc["requests"] > 0
    assert doc["verified_keys"] > 0 and doc["unverified_keys"] == 0
    assert doc["errors"] == {"read": {}, "write": {}}
    by_protocol = {s.labels["protocol"]: s.value for fam in text_string_to_metric_families(scrape)
                   for s in fam.samples if s.name == "raftlb_requests_by_protocol_total"}
    # The load and the read-back (each key read once, twice at most), nothing over HTTP/1 or gRPC.
    assert by_protocol["http1"] == 0 and by_protocol["grpc"] == 0
    assert doc["requests"] + doc["verified_keys"] <= by_protocol["http2"]
    assert by_protocol["http2"] <= doc["requests"] + 2 * doc["verified_keys"]


async def test_the_cli_refuses_streams_without_http2_and_a_listener_without_http2(tmp_path: Path) -> None:
    code, _, err = await bench_cli("--url", "http://127.0.0.1:1", "--streams", "4")
    assert code == 2 and "--streams 4 needs --http2" in err

    async def http1_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(24)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http1_only, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        code, text, err = await bench_cli("--url", url, "--http2", "--duration", "1")
    finally:
        server.close()
        await server.wait_closed()
    assert code == 2 and text == "", text
    assert f"raftlb bench: cannot connect to {url}: the server answered the HTTP/2 connection preface with " \
           "HTTP/1 ('HTTP/1.1 400 Bad Request')" in err, err


async def test_raftlb_draining_under_http2_load_ends_streams_cleanly(demo_cluster: DemoCluster) -> None:
    """raftlb stopping (GOAWAY to each HTTP/2 client, the streams it took still answered) in the middle of an
    HTTP/2 run: the bench sees transport errors of the expected kinds only, and no violation."""
    srv = Server(make_config(demo_cluster_config(demo_cluster)))
    await srv.start()
    stopped = False
    try:
        proxy = srv.proxies["demo"]
        await wait_for(lambda: proxy.table.leader(time.monotonic()) is not None, timeout=10)
        loaded, stop = asyncio.Event(), asyncio.Event()

        def on_progress(p: BenchProgress) -> None:
            if p.requests >= 300:
                loaded.set()

        run = asyncio.create_task(run_bench(
            bench([url_of(srv)], http2=True, streams=4, clients=4, duration=60.0, max_error_rate=1.0),
            stop=stop, on_progress=on_progress))
        await asyncio.wait_for(loaded.wait(), 30)
        await srv.stop()
        stopped = True
        stop.set()
        report = await asyncio.wait_for(run, 30)
    finally:
        if not stopped:
            await srv.stop()
    assert report.interrupted and report.requests >= 300
    assert report.violation_count == 0, report.examples
    kinds = set(report.errors["read"]) | set(report.errors["write"])
    assert kinds <= {"goaway", "connection_refused", "connection_closed", "connection_reset"}, report.errors
