"""`raftlb bench` against raftlb in front of the real demo cluster (PySyncObj Raft, three processes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from raftlb.demo.cluster import DemoCluster
from raftlb.server import Server
from raftlb.tools.loadgen import BenchOptions, run_bench
from tests.support.harness import demo_cluster_config, running, url_of, wait_for

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
