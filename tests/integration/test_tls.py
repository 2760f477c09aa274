"""TLS: the client listener (with certificate reload), https nodes with client certificates (mTLS) for
both traffic and announce streams."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trustme

from raftlb.config.model import TlsConfig
from raftlb.server import Server
from tests.support.fakes import FakeCluster
from tests.support.harness import make_config, wait_for

pytestmark = pytest.mark.integration


def write_pem(path: Path, blob: trustme.Blob) -> str:
    blob.write_to_path(str(path))
    return str(path)


async def test_tls_listener_and_mtls_to_https_nodes(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("raftlb-client")
    ca_pem = write_pem(tmp_path / "ca.pem", ca.cert_pem)
    cert_pem = write_pem(tmp_path / "server.pem", server_cert.cert_chain_pems[0])
    key_pem = write_pem(tmp_path / "server.key", server_cert.private_key_pem)
    ccert = write_pem(tmp_path / "client.pem", client_cert.cert_chain_pems[0])
    ckey = write_pem(tmp_path / "client.key", client_cert.private_key_pem)

    # Nodes serve https and demand a client certificate from this CA.
    node_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(node_ctx)
    ca.configure_trust(node_ctx)
    node_ctx.verify_mode = ssl.CERT_REQUIRED
    fc = FakeCluster(3)
    for n in fc.nodes:
        n.ssl = node_ctx
    async with fc:
        fc.elect("n1")
        cluster = fc.config(tls=TlsConfig(ca=ca_pem, cert=ccert, key=ckey))
        cfg = make_config(cluster)
        listener = replace(cfg.listeners[0], tls=TlsConfig(cert=cert_pem, key=key_pem))
        cfg = replace(cfg, listeners=(listener,))
        server = Server(cfg)
        await server.start()
        try:
            proxy = server.proxies["c1"]
            await wait_for(lambda: proxy.table.leader(time.monotonic()) == "n1", timeout=10)
            url = f"https://127.0.0.1:{server.listeners[0].port}"
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_pem)) as c:
                r = await c.put(f"{url}/kv/a", content=b"secret")
                assert r.status_code == 200 and r.headers["x-raft-node"] == "n1"
            assert fc["n1"].requests[-1].body == b"secret"

            # Plain HTTP on the TLS port: refused cleanly, the listener keeps serving.
            with pytest.raises(httpx.HTTPError):
                async with httpx.AsyncClient() as c:
                    await c.get(f"http://127.0.0.1:{server.listeners[0].port}/kv/a")

            # Certificate rotation: new files, then a reload; new handshakes present the new certificate.
            ca2 = trustme.CA()
            cert2 = ca2.issue_cert("127.0.0.1")
            write_pem(tmp_path / "server.pem", cert2.cert_chain_pems[0])
            write_pem(tmp_path / "server.key", cert2.private_key_pem)
            server.reload_certificates()
            ca2_pem = write_pem(tmp_path / "ca2.pem", ca2.cert_pem)
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca2_pem)) as c:
                r = await c.put(f"{url}/kv/b", content=b"v")
                assert r.status_code == 200
        finally:
            await server.stop()


async def test_node_with_an_untrusted_certificate_gets_no_traffic(tmp_path: Path) -> None:
    good_ca, rogue_ca = trustme.CA(), trustme.CA()
    ca_pem = write_pem(tmp_path / "ca.pem", good_ca.cert_pem)
    rogue_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    rogue_ca.issue_cert("127.0.0.1").configure_cert(rogue_ctx)
    fc = FakeCluster(1)
    fc.nodes[0].ssl = rogue_ctx
    async with fc:
        fc.elect("n1")
        cfg = make_config(fc.config(tls=TlsConfig(ca=ca_pem), liveness_timeout=0.3))
        server = Server(cfg)
        await server.start()
        try:
            await asyncio.sleep(1.0)  # several announce attempts, every one refused at the handshake
            assert server.proxies["c1"].table.leader(time.monotonic()) is None
            assert fc["n1"].stream_opens == 0
        finally:
            await server.stop()


def test_listener_config_rejects_a_missing_certificate_file(tmp_path: Path) -> None:
    from raftlb.config.load import parse_config
    from raftlb.errors import ConfigError

    text = f"""
listeners:
  - address: 127.0.0.1:8443
    tls: {{cert: {tmp_path}/nope.pem, key: {tmp_path}/nope.key}}
clusters:
  - name: c
    nodes: [{{id: n1, url: "http://127.0.0.1:7001"}}]
"""
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.tls\.cert: file not found"):
        parse_config(text)


async def test_admin_over_tls_and_reload_needs_the_token(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_pem = write_pem(tmp_path / "ca.pem", ca.cert_pem)
    tls = TlsConfig(cert=write_pem(tmp_path / "a.pem", cert.cert_chain_pems[0]),
                    key=write_pem(tmp_path / "a.key", cert.private_key_pem))
    async with FakeCluster(1) as fc:
        fc.elect("n1")
        cfg = make_config(fc.config(), admin=True)
        cfg = replace(cfg, admin=replace(cfg.admin, tls=tls, token="s3cret-token-0123456789"))
        server = Server(cfg)
        await server.start()
        try:
            assert server.admin is not None
            url = f"https://127.0.0.1:{server.admin.port}"
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_pem)) as c:
                assert (await c.get(f"{url}/healthz")).status_code == 200
                assert (await c.post(f"{url}/v1/reload")).status_code == 401
                r = await c.post(f"{url}/v1/reload", headers={"Authorization": "Bearer wrong-token-000000"})
                assert r.status_code in (401, 403)
        finally:
            await server.stop()


async def test_a_reload_with_a_new_ca_reaches_the_announce_streams_too(tmp_path: Path) -> None:
    # The nodes' certificates come from `ca`; raftlb starts trusting only `wrong` (no leader: every
    # announce handshake fails), then a reload points it at the right CA. The control plane (announce
    # streams) must take the new settings, not only the data path's pools.
    from raftlb.config.load import load_config

    ca, wrong = trustme.CA(), trustme.CA()
    ca_pem = write_pem(tmp_path / "ca.pem", ca.cert_pem)
    wrong_pem = write_pem(tmp_path / "wrong.pem", wrong.cert_pem)
    node_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(node_ctx)
    fc = FakeCluster(1)
    fc.nodes[0].ssl = node_ctx

    def config(ca_file: str) -> str:
        return ("listeners: [{name: main, address: '127.0.0.1:0', cluster: c1}]\n"
                "admin: {enabled: false}\n"
                "clusters:\n  - name: c1\n    liveness_timeout: 0.3s\n"
                f"    tls: {{ca: '{ca_file}'}}\n"
                f"    nodes: [{{id: n1, url: '{fc.nodes[0].url}'}}]\n")

    async with fc:
        fc.elect("n1")
        path = tmp_path / "raftlb.yaml"
        path.write_text(config(wrong_pem))
        server = Server(load_config(str(path)))
        await server.start()
        try:
            await asyncio.sleep(0.8)
            assert server.proxies["c1"].table.leader(time.monotonic()) is None
            assert fc["n1"].stream_opens == 0
            path.write_text(config(ca_pem))
            result = await server.reload()
            assert result.to_json()["result"] == "applied", result
            assert "cluster c1: new TLS settings" in result.changes
            await wait_for(lambda: server.proxies["c1"].table.leader(time.monotonic()) == "n1", timeout=10)
            port = server.listeners[0].port
            async with httpx.AsyncClient() as c:
                r = await c.put(f"http://127.0.0.1:{port}/kv/a", content=b"v")
                assert r.status_code == 200 and r.headers["x-raft-node"] == "n1"
            await wait_for(lambda: not server._retired_clients)  # the old client was closed
        finally:
            await server.stop()


async def test_a_subscription_stopped_during_its_tls_handshake_closes_the_connection() -> None:
    # A node that accepts the connection and never answers the ClientHello (stalled, or slow under load).
    # The subscription is stopped mid-handshake, as a reload with new TLS settings stops the old ones (or a
    # liveness deadline passes): its connection must close then, not linger until the garbage collector
    # finds it (an "unclosed resource" ResourceWarning, which failed test_tls under load).
    from raftlb.config.model import ClusterConfig, NodeConfig
    from raftlb.control.stream import ClusterSubscriptions
    from raftlb.tasks import TaskSet

    hello, closed = asyncio.Event(), asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        if await reader.read(65536):
            hello.set()
            while await reader.read(65536):
                pass
        closed.set()  # EOF: raftlb closed its end

    node = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = node.sockets[0].getsockname()[1]
    url = f"https://127.0.0.1:{port}"
    n1 = NodeConfig(id="n1", url=url, announce_url=url, host="127.0.0.1", port=port)
    cluster = ClusterConfig(name="c1", kind="native", routes=(), liveness_timeout=30.0, nodes=(n1,))
    client = ClusterSubscriptions.make_client(ssl.create_default_context())
    tasks = TaskSet("test")
    subs = ClusterSubscriptions(cluster, lambda *_: None, lambda *_: None, tasks, client)
    try:
        subs.start()
        await asyncio.wait_for(hello.wait(), timeout=10)
        await subs.stop()
        await asyncio.wait_for(closed.wait(), timeout=5)
    finally:
        await subs.stop()
        await tasks.close()
        await client.aclose()
        for w in writers:
            w.transport.abort()
        node.close()
        await node.wait_closed()


async def test_a_request_on_a_tls_listener_is_forwarded_as_https(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_pem = write_pem(tmp_path / "ca.pem", ca.cert_pem)
    tls = TlsConfig(cert=write_pem(tmp_path / "server.pem", cert.cert_chain_pems[0]),
                    key=write_pem(tmp_path / "server.key", cert.private_key_pem))
    async with FakeCluster(1) as fc:
        fc.elect("n1")
        cfg = make_config(fc.config())
        plain = cfg.listeners[0]
        cfg = replace(cfg, listeners=(plain, replace(plain, name="tls", tls=tls)))
        server = Server(cfg)
        await server.start()
        try:
            await wait_for(lambda: server.proxies["c1"].table.leader(time.monotonic()) == "n1", timeout=10)
            ports = {srv.name: srv.port for srv in server.listeners}
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_pem)) as c:
                # One cluster behind both listeners: the scheme is the listener's, not the cluster's.
                await c.put(f"https://127.0.0.1:{ports['tls']}/kv/a", content=b"1")
                await c.put(f"http://127.0.0.1:{ports['main']}/kv/b", content=b"2")
            assert [(q.path, q.header("x-forwarded-proto")) for q in fc["n1"].requests] == [
                ("/kv/a", "https"), ("/kv/b", "http")]
        finally:
            await server.stop()
