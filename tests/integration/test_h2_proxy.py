"""HTTP/2 clients through raftlb (h2c with prior knowledge, and TLS with ALPN h2), to the nodes over HTTP/1.1
or, with `upstream_protocol: http2`, over multiplexed HTTP/2 connections (the demo nodes speak both): the same
rules as for HTTP/1 clients (writes to the leader, fenced reads, holds through a failover)."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from raftlb.config.model import HoldConfig, TlsConfig
from raftlb.demo.cluster import DemoCluster
from raftlb.http.h2server import H2ServerConnection
from raftlb.server import Server
from tests.support.fakes import FakeCluster
from tests.support.harness import demo_cluster_config, make_config, running, url_of, wait_for

pytestmark = pytest.mark.integration


def h2_client(url: str, **kw: object) -> httpx.AsyncClient:
    """An HTTP/2-only client: over http://, HTTP/2 with prior knowledge (h2c)."""
    return httpx.AsyncClient(base_url=url, http1=False, http2=True, timeout=20, **kw)  # type: ignore[arg-type]


UPSTREAMS = pytest.mark.parametrize("upstream", ["http1", "http2"], ids=["to-nodes-http1", "to-nodes-http2"])


@UPSTREAMS
async def test_h2_writes_land_on_the_leader_and_fenced_reads_carry_the_index(
        demo_cluster: DemoCluster, upstream: str) -> None:
    async with running(demo_cluster_config(demo_cluster, upstream_protocol=upstream)) as srv:
        proxy = srv.proxies["demo"]
        await wait_for(lambda: proxy.table.leader(time.monotonic()) is not None, timeout=10)
        leader = proxy.table.leader(time.monotonic())
        async with h2_client(url_of(srv)) as c:
            r = await c.put("/kv/h2a", content=b"one")
            assert r.status_code == 200, r.text
            assert r.http_version == "HTTP/2" and r.headers["x-raft-node"] == leader
            index = int(r.headers["x-raft-index"])
            fence = {"X-Raft-Consistency": "fenced", "X-Raft-Min-Index": str(index)}
            r = await c.get("/kv/h2a", headers=fence)
            assert r.status_code == 200 and r.content == b"one"
            assert int(r.headers["x-raft-index"]) >= index

            # Many concurrent streams on the one connection: each answered, each write on the leader.
            rs = await asyncio.gather(*(c.put(f"/kv/m{i}", content=b"%d" % i) for i in range(60)))
            assert [r.status_code for r in rs] == [200] * 60
            assert {r.headers["x-raft-node"] for r in rs} == {leader}
            rs = await asyncio.gather(*(c.get(f"/kv/m{i}") for i in range(60)))
            assert [r.content for r in rs] == [b"%d" % i for i in range(60)]
            h2conns = [x for x in srv.listeners[0].connections if isinstance(x, H2ServerConnection)]
            assert len(h2conns) == 1 and h2conns[0].requests >= 122
            # Over HTTP/2 to the nodes: a few multiplexed connections carried them all.
            h2pools = proxy.h2pools.values()
            assert (sum(p.connections for p in h2pools) > 0) == (upstream == "http2")
            assert sum(p.connections for p in h2pools) <= 3 * 4
        # HTTP/1.1 still served on the same port.
        async with httpx.AsyncClient(base_url=url_of(srv), timeout=10) as c:
            r = await c.get("/kv/m3")
            assert r.http_version == "HTTP/1.1" and r.content == b"3"


@UPSTREAMS
async def test_h2_sigkill_leader_under_writes_loses_no_acknowledged_write(demo_cluster: DemoCluster,
                                                                         upstream: str) -> None:
    cfg = demo_cluster_config(demo_cluster, hold=HoldConfig(timeout=8.0), upstream_protocol=upstream)
    async with running(cfg) as srv:
        proxy = srv.proxies["demo"]
        await wait_for(lambda: proxy.table.leader(time.monotonic()) is not None, timeout=10)
        acked: dict[str, bytes] = {}
        errors: list[str] = []
        stop = asyncio.Event()

        async def load(c: httpx.AsyncClient, w: int) -> None:
            i = 0
            while not stop.is_set():
                key, value = f"h2w{w}-{i}", f"v-{w}-{i}".encode()
                try:
                    r = await c.put(f"/kv/{key}", content=value)
                    if r.status_code == 200:
                        acked[key] = value
                    else:
                        errors.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                i += 1

        async with h2_client(url_of(srv)) as c:  # (8 writers, streams of one connection)
            task = asyncio.gather(*(load(c, w) for w in range(8)))
            await wait_for(lambda: len(acked) > 50, timeout=10)
            victim = await asyncio.to_thread(demo_cluster.leader)
            assert victim is not None
            term = await asyncio.to_thread(demo_cluster.term)
            await asyncio.to_thread(demo_cluster.kill, victim)
            new = await asyncio.to_thread(demo_cluster.wait_for_leader, 15.0, min_term=term + 1,
                                          exclude=[victim])
            await wait_for(lambda: proxy.table.leader(time.monotonic()) == new, timeout=10)
            at_switch = len(acked)
            await wait_for(lambda: len(acked) > at_switch + 50, timeout=10)
            stop.set()
            await task
            assert errors == []  # (the re-election was shorter than the hold timeout)

            sem = asyncio.Semaphore(32)

            async def value_of(key: str) -> bytes | None:
                async with sem:
                    r = await c.get(f"/kv/{key}")
                    return r.content if r.status_code == 200 else None

            keys = list(acked)
            values = await asyncio.gather(*(value_of(k) for k in keys))
        lost = [k for k, v in zip(keys, values, strict=True) if v != acked[k]]
        assert lost == [] and len(keys) > 100


async def test_tls_listener_offers_h2_by_alpn_beside_http11(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_pem, key_pem, ca_pem = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    async with FakeCluster(3) as fc:
        fc.elect("n2")
        cfg = make_config(fc.config())
        listener = replace(cfg.listeners[0], tls=TlsConfig(cert=str(cert_pem), key=str(key_pem)))
        server = Server(replace(cfg, listeners=(listener,)))
        await server.start()
        try:
            await wait_for(lambda: server.proxies["c1"].table.leader(time.monotonic()) == "n2", timeout=10)
            url = f"https://127.0.0.1:{server.listeners[0].port}"
            verify = ssl.create_default_context(cafile=str(ca_pem))
            async with httpx.AsyncClient(base_url=url, http2=True, verify=verify, timeout=10) as c:
                r = await c.put("/kv/t", content=b"over-h2")
                assert r.status_code == 200 and r.http_version == "HTTP/2"
                assert r.headers["x-raft-node"] == "n2"
            assert fc["n2"].requests[-1].body == b"over-h2"
            async with httpx.AsyncClient(base_url=url, verify=verify, timeout=10) as c:
                r = await c.put("/kv/t", content=b"over-h1")
                assert r.status_code == 200 and r.http_version == "HTTP/1.1"
        finally:
            await server.stop()


async def test_h2_requests_are_counted_in_the_metrics() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        async with running(fc.config(), admin=True) as srv:
            await wait_for(lambda: srv.proxies["c1"].table.leader(time.monotonic()) == "n1", timeout=10)
            async with h2_client(url_of(srv)) as c:
                rs = await asyncio.gather(*(c.put(f"/kv/{i}", content=b"v") for i in range(7)))
                assert {(r.status_code, r.http_version) for r in rs} == {(200, "HTTP/2")}
            assert srv.admin is not None
            async with httpx.AsyncClient() as c:
                scrape = (await c.get(f"http://127.0.0.1:{srv.admin.port}/metrics")).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(scrape) for s in fam.samples}
    assert samples[("raftlb_requests_total", (("cluster", "c1"), ("code", "2xx"), ("kind", "write"),
                                              ("node", "n1"), ("policy", "leader")))] == 7
    by_protocol = {dict(k[1])["protocol"]: v for k, v in samples.items()
                   if k[0] == "raftlb_requests_by_protocol_total"}
    assert by_protocol == {"http1": 0, "http2": 7, "grpc": 0}
