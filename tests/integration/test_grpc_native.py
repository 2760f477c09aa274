"""gRPC calls through raftlb to a native cluster whose nodes serve gRPC (docs/protocol.md, the gRPC form of
the contract): calls for the leader land on it, a node's "not the leader" answer is re-sent to the leader it
names, calls are held through an election, raftlb's own errors end calls with a gRPC status naming the
raftlb error code, `grpc-timeout` bounds a hold, and a stream on a deposed leader ends UNAVAILABLE so that
its client opens it again, on the new leader.

The nodes are fakes (tests/support/grpc_nodes.py): their announcements are real announce streams, their data
ports real grpcio servers. The client is grpcio (run in a thread: its calls block), or raw HTTP/2 frames where
a test needs a header grpcio does not let a caller set (`grpc-timeout`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raftlb.config.model import HoldConfig, RouteConfig
from raftlb.core import grpc as grpcwire
from raftlb.server import Server
from tests.support.fakes import FakeCluster
from tests.support.grpc_nodes import GrpcNode, grpc, grpc_cluster_config
from tests.support.harness import running, wait_for

pytestmark = pytest.mark.integration

if grpc is None:  # pragma: no cover
    pytest.skip("grpcio is not installed", allow_module_level=True)

STREAM_ROUTE = RouteConfig(methods=None, path=re.compile(r"^/kv\.KV/Stream$"), kind="write", policy="leader",
                           idempotent=False, stream=True)


class Nodes:
    def __init__(self, fc: FakeCluster) -> None:
        self.fc = fc
        self.calls: list[tuple[str, str]] = []
        self.grpc = [GrpcNode(n, self.calls) for n in fc.nodes]

    def __getitem__(self, node_id: str) -> GrpcNode:
        return next(n for n in self.grpc if n.id == node_id)


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    async with FakeCluster(3) as fc:
        ns = Nodes(fc)
        for n in ns.grpc:
            n.start()
        try:
            yield ns
        finally:
            for n in ns.grpc:
                n.stop()


def listener(srv: Server) -> str:
    return f"127.0.0.1:{srv.listeners[0].port}"


def unary(target: str, method: str, request: bytes, timeout: float = 20.0) -> tuple[bytes, dict[str, str]]:
    """A raw unary call: (answer bytes, initial metadata)."""
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        answer, call = rpc.with_call(request, timeout=timeout)
        return answer, dict(call.initial_metadata())


async def call(srv: Server, method: str, request: bytes,
               timeout: float = 20.0) -> tuple[bytes, dict[str, str]]:
    return await asyncio.to_thread(unary, listener(srv), method, request, timeout)


def leader_is(srv: Server, node: str | None) -> Any:
    return lambda: srv.proxies["c1"].table.leader(time.monotonic()) == node


async def test_calls_land_on_the_leader_with_its_index_and_node(nodes: Nodes) -> None:
    nodes.fc.elect("n2")
    async with running(grpc_cluster_config(nodes.grpc)) as srv:
        await wait_for(leader_is(srv, "n2"), timeout=10)
        for i in range(5):
            answer, md = await call(srv, "/kv.KV/Put", b"v%d" % i)
            assert answer == b"v%d" % i
            assert md["x-raft-node"] == "n2" and int(md["x-raft-index"]) == i + 1
        assert {node for _, node in nodes.calls} == {"n2"}


async def test_a_not_the_leader_answer_is_held_and_resent_to_the_next_leader(nodes: Nodes) -> None:
    nodes.fc.elect("n1")
    async with running(grpc_cluster_config(nodes.grpc, hold=HoldConfig(timeout=30.0))) as srv:
        await wait_for(leader_is(srv, "n1"), timeout=10)
        proxy = srv.proxies["c1"]
        for n in nodes.grpc:  # n2 leads at the next term; raftlb has not heard of it yet
            n.actual_leader = "n2"
            n.hint_term = nodes.fc.term + 1
        pending = asyncio.ensure_future(call(srv, "/kv.KV/Put", b"x"))
        await wait_for(lambda: proxy.stats.misdirected >= 1, timeout=10)
        nodes.fc.elect("n2")
        answer, md = await asyncio.wait_for(pending, 20)
        assert answer == b"x" and md["x-raft-node"] == "n2"
        assert nodes.calls[0] == ("/kv.KV/Put", "n1") and nodes.calls[-1] == ("/kv.KV/Put", "n2")
        assert {node for _, node in nodes.calls} == {"n1", "n2"}  # (n1 refused it: applied once, on n2)


async def test_calls_are_held_through_an_election_and_released_to_the_new_leader(nodes: Nodes) -> None:
    nodes.fc.elect("n1")
    async with running(grpc_cluster_config(nodes.grpc, hold=HoldConfig(timeout=30.0))) as srv:
        await wait_for(leader_is(srv, "n1"), timeout=10)
        proxy = srv.proxies["c1"]
        nodes.fc.no_leader()
        await wait_for(leader_is(srv, None), timeout=10)
        pending = asyncio.ensure_future(call(srv, "/kv.KV/Put", b"held"))
        await wait_for(lambda: len(proxy.held) == 1, timeout=10)
        assert nodes.calls == []
        nodes.fc.elect("n3")
        answer, md = await asyncio.wait_for(pending, 20)
        assert answer == b"held" and md["x-raft-node"] == "n3"
        assert nodes.calls == [("/kv.KV/Put", "n3")] and proxy.stats.released == 1


async def test_no_leader_in_time_ends_the_call_unavailable_naming_the_raftlb_error(
        nodes: Nodes, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("raftlb.access"), "disabled", False)
    caplog.set_level(logging.INFO, logger="raftlb.access")
    nodes.fc.no_leader()
    async with running(grpc_cluster_config(nodes.grpc, hold=HoldConfig(timeout=0.3)), admin=True) as srv:
        with pytest.raises(grpc.RpcError) as info:
            await call(srv, "/kv.KV/Put", b"x")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details().startswith("raftlb no_leader")
        assert nodes.calls == []
        nodes.fc.elect("n1")
        await wait_for(leader_is(srv, "n1"), timeout=10)
        await call(srv, "/kv.KV/Put", b"y")
        assert srv.admin is not None
        async with httpx.AsyncClient() as c:
            scrape = (await c.get(f"http://127.0.0.1:{srv.admin.port}/metrics")).text
            stats = (await c.get(f"http://127.0.0.1:{srv.admin.port}/v1/clusters")).json()["clusters"]["c1"]["stats"]
        # (what the status page shows)
        assert stats["protocols"] == {"http1": 0, "http2": 0, "grpc": 2}
        assert stats["grpc"] == {"OK": 1, "UNAVAILABLE": 1}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(scrape) for s in fam.samples}
    calls = {dict(k[1])["status"]: v for k, v in samples.items() if k[0] == "raftlb_grpc_calls_total"}
    assert calls == {"OK": 1, "UNAVAILABLE": 1}
    assert samples[("raftlb_requests_by_protocol_total", (("cluster", "c1"), ("protocol", "grpc")))] == 2
    # The access log tells a failed call from a good one (both are HTTP 200).
    lines = [r.getMessage() for r in caplog.records if r.name == "raftlb.access"]
    assert len(lines) == 2 and all('"POST /kv.KV/Put" 200' in line for line in lines)
    assert lines[0].endswith(" grpc-status=14") and lines[1].endswith(" grpc-status=0")


class RawCall:
    """One gRPC call as raw HTTP/2 frames (for headers grpcio does not let a caller set)."""

    def __init__(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.headers = headers
        self.body = body
        self.answer_headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []

    async def run(self, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"raftlb"),
                              (b":path", b"/kv.KV/Put"), (b"content-type", b"application/grpc"),
                              (b"te", b"trailers"), *self.headers])
        conn.send_data(1, grpcwire.frame(self.body), end_stream=True)
        writer.write(conn.data_to_send())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        self.answer_headers = list(ev.headers or [])
                    elif isinstance(ev, h2.events.TrailersReceived):
                        self.trailers = list(ev.headers or [])
                    elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                        return
                writer.write(conn.data_to_send())
        finally:
            writer.close()

    def status(self) -> tuple[int, str]:
        md = dict(self.trailers or self.answer_headers)
        return int(md[b"grpc-status"]), grpcwire.percent_decode(md.get(b"grpc-message", b""))


async def test_grpc_timeout_bounds_the_hold(nodes: Nodes) -> None:
    nodes.fc.no_leader()
    async with running(grpc_cluster_config(nodes.grpc, hold=HoldConfig(timeout=60.0))) as srv:
        raw = RawCall([(b"grpc-timeout", b"300m")], b"x")
        await asyncio.wait_for(raw.run(srv.listeners[0].port), 20)
        status, message = raw.status()
        # raftlb ended it (the client never cancels here), long before the 60 s hold timeout.
        assert status == grpcwire.Status.DEADLINE_EXCEEDED and message.startswith("raftlb request_timeout")
        assert not srv.proxies["c1"].held or all(r.finished for r in srv.proxies["c1"].held)


@pytest.mark.parametrize(("header", "value"), [
    (b"grpc-timeout", b"soon"),
    (b"x-raft-min-index", b"-1"),
])
async def test_malformed_metadata_ends_the_call_invalid_argument(nodes: Nodes, header: bytes,
                                                                 value: bytes) -> None:
    nodes.fc.elect("n1")
    async with running(grpc_cluster_config(nodes.grpc)) as srv:
        raw = RawCall([(header, value)], b"x")
        await asyncio.wait_for(raw.run(srv.listeners[0].port), 20)
        status, message = raw.status()
        assert status == grpcwire.Status.INVALID_ARGUMENT and message.startswith("raftlb bad_")
        assert nodes.calls == []


def read_stream(target: str, out: list[bytes], md: dict[str, str]) -> grpc.StatusCode:
    """Read a server stream until it ends: its final status code."""
    with grpc.insecure_channel(target) as channel:
        rpc = channel.unary_stream("/kv.KV/Stream", request_serializer=None, response_deserializer=None)
        it = rpc(b"s", timeout=60)
        try:
            md.update(dict(it.initial_metadata()))
            for message in it:
                out.append(message)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK


async def test_a_stream_on_a_deposed_leader_ends_unavailable_and_opens_again_on_the_new_one(
        nodes: Nodes) -> None:
    nodes.fc.elect("n1")
    async with running(grpc_cluster_config(nodes.grpc, routes=(STREAM_ROUTE,))) as srv:
        await wait_for(leader_is(srv, "n1"), timeout=10)
        messages: list[bytes] = []
        md: dict[str, str] = {}
        reading = asyncio.ensure_future(asyncio.to_thread(read_stream, listener(srv), messages, md))
        await wait_for(lambda: len(messages) >= 2, timeout=20)
        assert md["x-raft-node"] == "n1"
        nodes.fc.elect("n2")  # n1 is deposed; it would keep streaming if raftlb let it
        code = await asyncio.wait_for(reading, 20)
        assert code == grpc.StatusCode.UNAVAILABLE
        again: list[bytes] = []
        md2: dict[str, str] = {}
        reading = asyncio.ensure_future(asyncio.to_thread(read_stream, listener(srv), again, md2))
        await wait_for(lambda: len(again) >= 1, timeout=20)
        assert md2["x-raft-node"] == "n2"
        nodes.fc.elect("n3")
        assert await asyncio.wait_for(reading, 20) == grpc.StatusCode.UNAVAILABLE


async def test_a_node_that_does_not_speak_http2_fails_the_call_clearly_and_applies_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    """A node reached over HTTP/2 that does not speak it (misconfigured: a plain HTTP/1.1 server, which
    closes the connection on the preface): no call is sent before the node's SETTINGS, so nothing can have
    been applied; the node is routed around (no leader: the call ends UNAVAILABLE at the hold timeout) and
    the log says why."""
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        cfg = fc.config(hold=HoldConfig(timeout=0.5))
        async with running(cfg) as srv:
            await wait_for(leader_is(srv, "n1"), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                await call(srv, "/kv.KV/Put", b"x")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert all(r.method != "POST" for n in fc.nodes for r in n.requests)
    assert any("not speak HTTP/2" in r.getMessage() for r in caplog.records)


async def test_a_server_stream_to_a_client_that_does_not_read_is_held_back_at_the_node(nodes: Nodes) -> None:
    """Backpressure through raftlb: a client that reads nothing of a fast server stream keeps its window
    shut, raftlb stops reading the node's stream (it does not buffer the stream), and the node's gRPC server
    blocks; once the client reads, the stream flows again, every message in order."""
    nodes.fc.elect("n1")
    leader = nodes["n1"]
    leader.tick = 0.0
    pad = 16 * 1024
    leader.stream_padding = pad
    async with running(grpc_cluster_config(nodes.grpc, routes=(STREAM_ROUTE,))) as srv:
        await wait_for(leader_is(srv, "n1"), timeout=10)
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.listeners[0].port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"raftlb"),
                              (b":path", b"/kv.KV/Stream"), (b"content-type", b"application/grpc"),
                              (b"te", b"trailers")])
        conn.send_data(1, grpcwire.frame(b"s"), end_stream=True)
        writer.write(conn.data_to_send())
        messages = grpcwire.MessageReader(max_message=1 << 20)
        numbers: list[int] = []
        got = 0
        acking = False

        async def pump() -> None:
            nonlocal got
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.DataReceived) and ev.data is not None:
                        got += len(ev.data)
                        numbers.extend(int(m.payload[1:-pad]) for m in messages.feed(ev.data))
                        if acking:
                            conn.acknowledge_received_data(ev.flow_controlled_length or 0, 1)
                writer.write(conn.data_to_send())  # (acks of SETTINGS and PING; WINDOW_UPDATEs once acking)

        pumping = asyncio.ensure_future(pump())
        try:
            await wait_for(lambda: got > 0, timeout=10)
            # The node's output stops growing while the client takes nothing more.
            last = -1
            while leader.streamed != last:
                last = leader.streamed
                await asyncio.sleep(0.3)
            assert got <= 65535  # (the client's own window)
            held = (last - len(numbers)) * pad
            assert held < 16 * 1024 * 1024, f"{held} bytes streamed by the node and not read by the client"
            acking = True
            conn.acknowledge_received_data(got, 1)  # (what was received before: the window opens)
            writer.write(conn.data_to_send())
            await wait_for(lambda: len(numbers) > last + 50, timeout=20)
            assert numbers == list(range(1, len(numbers) + 1))
        finally:
            pumping.cancel()
            writer.close()
