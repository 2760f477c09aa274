"""`raftlb announce`: the sidecar polls one (fake) etcd member and serves raft-announce/1 for it; raftlb's
own subscriptions follow it like any native node; the CLI checks its arguments."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest

from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.kinds import make_adapter
from raftlb.control.poll import NodePoller
from raftlb.control.stream import ClusterSubscriptions, SSEParser
from raftlb.http.app import serve
from raftlb.tasks import TaskSet
from raftlb.tools.announce import Announcer, parse_args
from tests.support.etcd_members import FakeMember, Recorder, lead
from tests.support.harness import wait_for


def etcd_cluster(members: list[FakeMember], **kw: Any) -> ClusterConfig:
    nodes = tuple(NodeConfig(m.name, m.url, m.url, "127.0.0.1", int(m.url.rsplit(":", 1)[1]))
                  for m in members)
    settings = {"poll_interval": 0.005, "liveness_timeout": 0.3, "reconnect_min": 0.01, "reconnect_max": 0.05,
                **kw}
    return ClusterConfig(name="etcd", kind="etcd", nodes=nodes, routes=(), **settings)


@asynccontextmanager
async def sidecar(cluster: ClusterConfig, node_id: str, tick: float = 0.2,
                  key: bytes | None = None) -> AsyncIterator[tuple[Announcer, str]]:
    """What `raftlb announce` runs, in this event loop: a poller feeding an Announcer on a free port."""
    node = next(n for n in cluster.nodes if n.id == node_id)
    announcer, tasks = Announcer(node_id, tick, key), TaskSet("sidecar")
    client = ClusterSubscriptions.make_client()
    poller = NodePoller(make_adapter(cluster, node, node.url), cluster, client, announcer.on_announcement,
                        announcer.on_down)
    server = await serve(announcer.handle, "127.0.0.1", 0)
    tasks.spawn(poller.run(), name="poll")
    try:
        yield announcer, f"http://127.0.0.1:{server.port}"
    finally:
        announcer.close()
        await server.close()
        await tasks.close()
        await client.aclose()


async def read_events(url: str, events: list[tuple[float, dict[str, Any]]], done: asyncio.Event) -> None:
    parser = SSEParser()
    async with httpx.AsyncClient() as c, c.stream("GET", url + "/raft/announce") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for chunk in resp.aiter_bytes():
            for ev in parser.feed(chunk):
                events.append((time.monotonic(), json.loads(ev.data)))
    done.set()


async def test_a_change_is_pushed_at_once_not_at_the_next_tick() -> None:
    """With a tick of a minute, the change still reaches the stream within the wait (10 s): it was pushed
    when the sidecar saw it, not at the next tick."""
    members = [await FakeMember(f"n{i}", str(500 + i)).start() for i in (1, 2)]
    for m in members:
        m.members = [{"ID": o.member_id, "name": o.name, "clientURLs": [o.url]} for o in members]
    lead(members, members[1], 4)
    try:
        async with sidecar(etcd_cluster(members), "n1", tick=60.0) as (announcer, url):
            await wait_for(lambda: announcer.current is not None and announcer.current.leader == "n2")
            events: list[tuple[float, dict[str, Any]]] = []
            ended = asyncio.Event()
            reader = asyncio.create_task(read_events(url, events, ended))
            await wait_for(lambda: len(events) >= 1, timeout=5)  # the current state, at once
            lead(members, members[0], 5)
            await wait_for(lambda: any(e["role"] == "leader" for _, e in events), timeout=10)
            assert [(e["role"], e["term"]) for _, e in events] == [("follower", 4), ("leader", 5)]
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    finally:
        for m in members:
            await m.stop()


async def test_stream_sends_at_once_on_change_and_every_tick_otherwise() -> None:
    members = [await FakeMember(f"n{i}", str(500 + i)).start() for i in (1, 2)]
    for m in members:
        m.members = [{"ID": o.member_id, "name": o.name, "clientURLs": [o.url]} for o in members]
    lead(members, members[1], 4)
    try:
        async with sidecar(etcd_cluster(members), "n1", tick=0.2) as (announcer, url):
            await wait_for(lambda: announcer.current is not None and announcer.current.leader == "n2")
            async with httpx.AsyncClient() as c:
                status = (await c.get(url + "/raft/status")).json()
            assert (status["node"], status["role"], status["leader"], status["term"]) == ("n1", "follower",
                                                                                       "n2", 4)
            events: list[tuple[float, dict[str, Any]]] = []
            ended = asyncio.Event()
            reader = asyncio.create_task(read_events(url, events, ended))
            await wait_for(lambda: len(events) >= 3, timeout=10)  # at once, then one per 0.2 s tick
            gaps = [b[0] - a[0] for a, b in zip(events, events[1:], strict=False)]
            # Ticks, not a flood (a loaded machine can only make them later: no upper bound asserted).
            assert all(g > 0.1 for g in gaps[:2]), gaps
            lead(members, members[0], 5)  # n1 itself takes over at term 5
            count = len(events)
            await wait_for(lambda: any(e[1]["role"] == "leader" for e in events[count:]), timeout=5)
            leader_event = next(e for _, e in events[count:] if e["role"] == "leader")
            assert (leader_event["term"], leader_event["leader"]) == (5, "n1")
            assert leader_event["has_quorum"] is True
            seqs = [e["seq"] for _, e in events]
            assert seqs == list(range(1, len(seqs) + 1))
            # The member stops answering: the stream ends and both endpoints say 503 until it is back.
            await members[0].stop()
            await asyncio.wait_for(ended.wait(), timeout=10)
            await reader
            async with httpx.AsyncClient() as c:
                for path in ("/raft/status", "/raft/announce"):
                    r = await c.get(url + path)
                    assert r.status_code == 503 and r.json()["error"] == "node_unreachable"
                assert (await c.get(url + "/kv")).status_code == 404
                assert (await c.post(url + "/raft/status")).status_code == 405
    finally:
        for m in members:
            await m.stop()


async def test_raftlb_subscribes_to_sidecars_and_follows_a_leader_change() -> None:
    members = [await FakeMember(f"n{i}", str(600 + i)).start() for i in (1, 2, 3)]
    for m in members:
        m.members = [{"ID": o.member_id, "name": o.name, "clientURLs": [o.url]} for o in members]
    lead(members, members[0], 2)
    cluster = etcd_cluster(members)
    try:
        # One-minute ticks: only the sidecars' push at the change can deliver it within the 10 s wait.
        async with sidecar(cluster, "n1", tick=60.0) as (_, u1), \
                sidecar(cluster, "n2", tick=60.0) as (_, u2), sidecar(cluster, "n3", tick=60.0) as (_, u3):
            urls = {"n1": u1, "n2": u2, "n3": u3}
            nodes = tuple(NodeConfig(n.id, n.url, urls[n.id], n.host, n.port) for n in cluster.nodes)
            followed = ClusterConfig(name="etcd", kind="etcd", nodes=nodes, routes=(), sidecar=True,
                                     liveness_timeout=120.0)
            rec, tasks = Recorder(), TaskSet("raftlb")
            subs = ClusterSubscriptions(followed, rec.on_announcement, rec.on_down, tasks)
            subs.start()
            try:
                await wait_for(lambda: all((a := rec.last(n)) is not None and a.leader == "n1" for n in urls))
                assert all(s.mode == "stream" for s in subs.nodes.values())
                lead(members, members[2], 3)
                await wait_for(lambda: (a := rec.last("n3")) is not None and a.role == "leader", timeout=10)
            finally:
                await subs.stop()
                await tasks.close()
    finally:
        for m in members:
            await m.stop()


def test_cli_builds_the_sidecar_from_flags() -> None:
    cfg, level = parse_args(["--kind", "etcd", "--node-id", "n1", "--node-url", "http://127.0.0.1:2379",
                             "--peer", "n2=http://127.0.0.1:22379", "--listen", "127.0.0.1:2479",
                             "--interval", "5ms", "--tick", "0.1", "--liveness-timeout", "800ms"])
    assert (cfg.host, cfg.port, cfg.status_url, cfg.tick, level) == ("127.0.0.1", 2479, "http://127.0.0.1:2379",
                                                                     0.1, "info")
    assert (cfg.cluster.kind, cfg.cluster.poll_interval, cfg.cluster.liveness_timeout) == ("etcd", 0.005, 0.8)
    assert [n.id for n in cfg.cluster.nodes] == ["n1", "n2"] and cfg.node.id == "n1"


def test_cli_takes_node_and_listen_address_from_a_config(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""\
listeners: [{address: 127.0.0.1:8379}]
admin: {enabled: false}
clusters:
  - name: etcd
    kind: etcd
    sidecar: true
    liveness_timeout: 700ms
    nodes:
      - {id: a, url: "http://127.0.0.1:2379", announce_url: "http://127.0.0.1:2479"}
      - {id: b, url: "http://127.0.0.1:22379", announce_url: "http://127.0.0.1:22479"}
""")
    cfg, _ = parse_args(["-c", str(path), "--node", "b"])
    assert (cfg.node.id, cfg.status_url) == ("b", "http://127.0.0.1:22379")
    assert (cfg.host, cfg.port) == ("127.0.0.1", 22479)
    assert (cfg.cluster.liveness_timeout, cfg.cluster.poll_interval) == (0.7, 0.005)


@pytest.mark.parametrize("argv, message", [
    (["--kind", "etcd", "--node-id", "n1"], "give -c FILE --node ID, or --kind, --node-id and --node-url"),
    (["--kind", "etcd", "--node-id", "n1", "--node-url", "http://127.0.0.1:2379"], "--listen is required"),
    (["--kind", "etcd", "--node-id", "n1", "--node-url", "ftp://x", "--listen", ":1"], "expected HOST:PORT"),
    (["--kind", "etcd", "--node-id", "n1", "--node-url", "ftp://x:1", "--listen", "h:1"], "expected an http://"),
    (["--kind", "etcd", "--node-id", "n1", "--interval", "0ms"], "expected a duration"),
    (["-c", "configs/etcd.yaml"], "-c needs --node"),
    (["-c", "configs/etcd.yaml", "--node", "nope"], "node 'nope' is not in exactly one cluster"),
    (["-c", "configs/etcd.yaml", "--node", "infra1"], "--listen is required"),
])
def test_cli_rejects_incomplete_or_bad_arguments(argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


KEY = b"0123456789abcdef-sidecar"


@pytest.mark.parametrize("keys, accepted", [
    ((b"an-older-key-0123", KEY), True),  # during a rotation either key verifies
    ((b"someone-elses-key!",), False),
])
async def test_signed_sidecar_events_verify_against_the_clusters_keys(keys: tuple[bytes, ...],
                                                                      accepted: bool) -> None:
    (member,) = [await FakeMember("n1", "701").start()]
    lead([member], member, 2)
    cluster = etcd_cluster([member])
    try:
        async with sidecar(cluster, "n1", key=KEY) as (_, url):
            node = cluster.nodes[0]
            followed = ClusterConfig(name="etcd", kind="etcd", nodes=(replace(node, announce_url=url),),
                                     routes=(), sidecar=True, announce_keys=keys)
            rec, tasks = Recorder(), TaskSet("raftlb")
            subs = ClusterSubscriptions(followed, rec.on_announcement, rec.on_down, tasks)
            subs.start()
            try:
                if accepted:
                    await wait_for(lambda: rec.last("n1") is not None)
                else:
                    await wait_for(lambda: subs.rejected.get("bad_signature", 0) > 0)
                    assert rec.last("n1") is None
            finally:
                await subs.stop()
                await tasks.close()
    finally:
        await member.stop()


def test_cli_signs_with_a_key_file_or_the_configs_newest_key(tmp_path: Any) -> None:
    key = tmp_path / "key"
    key.write_bytes(KEY + b"\n")
    base = ["--kind", "etcd", "--node-id", "n1", "--node-url", "http://127.0.0.1:2379", "--listen", "h:1"]
    assert parse_args([*base, "--key-file", str(key)])[0].key == KEY
    assert parse_args(base)[0].key is None
