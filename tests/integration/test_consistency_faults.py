"""Fenced reads on the real demo cluster while things go wrong: a follower frozen (SIGSTOP) while writes
continue and thawed behind (SIGCONT), then the leader killed — through two raftlb replicas, with every
client's token alternating between them. The same scenario with `any` and no token shows the checker
catching the stale reads fencing prevents."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from raftlb.config.model import HoldConfig
from raftlb.demo.cluster import DemoCluster
from raftlb.server import Server
from raftlb.tools.loadgen import BenchOptions, BenchReport, run_bench
from tests.support.harness import demo_cluster_config, running, url_of, wait_for

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def replicas(cluster: DemoCluster, count: int) -> AsyncIterator[list[Server]]:
    cfg: dict[str, Any] = {"response_timeout": 2.0, "hold": HoldConfig(timeout=8.0)}
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(running(demo_cluster_config(cluster, **cfg)))
                   for _ in range(count)]
        for srv in servers:
            proxy = srv.proxies["demo"]
            await wait_for(lambda p=proxy: p.table.leader(time.monotonic()) is not None, timeout=10)
        yield servers


async def faults(cluster: DemoCluster, log: list[str]) -> None:
    """Freeze a follower for 3 s under load, then kill the leader."""
    await asyncio.sleep(2.0)
    leader = await asyncio.to_thread(cluster.leader)
    follower = next(n for n in cluster.nodes if n != leader)
    await asyncio.to_thread(cluster.pause, follower)
    log.append(f"paused {follower}")
    await asyncio.sleep(3.0)
    await asyncio.to_thread(cluster.resume, follower)
    log.append(f"resumed {follower}")
    await asyncio.sleep(2.0)
    leader = await asyncio.to_thread(cluster.leader)
    assert leader is not None
    term = await asyncio.to_thread(cluster.term)
    await asyncio.to_thread(cluster.kill, leader)
    new = await asyncio.to_thread(cluster.wait_for_leader, 15.0, min_term=term + 1, exclude=[leader])
    log.append(f"killed {leader}; {new} leads at term > {term}")


async def run_with_faults(cluster: DemoCluster, urls: list[str],
                          **options: Any) -> tuple[BenchReport, list[str]]:
    log: list[str] = []
    opts = BenchOptions(urls=tuple(urls), timeout=8.0, **options)
    bench = asyncio.create_task(run_bench(opts))
    await faults(cluster, log)
    report = await bench
    return report, log


async def test_fenced_reads_never_go_back_in_time_through_pause_and_leader_kill(
        demo_cluster: DemoCluster) -> None:
    async with replicas(demo_cluster, 2) as servers:
        report, log = await run_with_faults(
            demo_cluster, [url_of(s) for s in servers], clients=16, consistency="fenced",
            requests=13_000, duration=90.0, read_ratio=0.8)
        stats = [s.proxies["demo"].stats for s in servers]
    assert len(log) == 3, log  # every fault happened during the run
    assert report.violation_count == 0, report.examples
    assert report.reads >= 10_000, report.reads
    followers = sum(s.reads_follower for s in stats)
    leaders = sum(s.reads_leader for s in stats)
    assert followers >= leaders, (followers, leaders)  # at least half of the reads served by followers
    assert report.exit_code == 0, report.failures()
    assert all(s.requests > 0 for s in stats)  # both replicas carried traffic


async def test_any_without_tokens_goes_back_in_time_under_the_same_faults(demo_cluster: DemoCluster) -> None:
    async with replicas(demo_cluster, 1) as [srv]:
        report, log = await run_with_faults(
            demo_cluster, [url_of(srv)], clients=16, consistency="any", send_token=False,
            keys_per_client=1, read_ratio=0.5, duration=10.0)
    assert len(log) == 3, log
    # The checker catches what fencing prevents: this proves it can fail.
    assert report.violations.get("read_your_writes", 0) + report.violations.get("monotonic", 0) > 0
