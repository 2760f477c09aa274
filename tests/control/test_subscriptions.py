"""Subscriptions against real loopback FakeNodes: streaming, reconnects, liveness, polling, validation."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from raftlb.control.stream import ClusterSubscriptions, EventTooLarge, SSEEvent, SSEParser
from raftlb.core.leader_table import Announcement
from raftlb.tasks import TaskSet
from tests.support import fakes
from tests.support.fakes import FakeCluster, FakeNode, cluster_config


class Recorder:
    """Collects the callbacks and lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self.announcements: list[tuple[str, Announcement, float]] = []
        self.downs: list[tuple[str, str, float]] = []
        self._changed = asyncio.Event()

    def on_announcement(self, node_id: str, ann: Announcement) -> None:
        self.announcements.append((node_id, ann, time.monotonic()))
        self._notify()

    def on_down(self, node_id: str, reason: str) -> None:
        self.downs.append((node_id, reason, time.monotonic()))
        self._notify()

    def of(self, node_id: str) -> list[Announcement]:
        return [a for n, a, _ in self.announcements if n == node_id]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                if predicate():
                    return
                await changed.wait()


def silent_for(reason: str) -> float:
    """The silence a down report names ("silent for 0.31s; ..."), in seconds."""
    found = re.search(r"silent for ([0-9.]+)s", reason)
    assert found is not None, reason
    return float(found.group(1))


@asynccontextmanager
async def subscribed(
    nodes: list[FakeNode], **kw: Any
) -> AsyncIterator[tuple[ClusterSubscriptions, Recorder, TaskSet]]:
    """Subscriptions over `nodes`; kw go to the ClusterConfig, except stream_retry_interval and key."""
    sub_kw = {k: kw.pop(k) for k in ("stream_retry_interval", "key") if k in kw}
    rec = Recorder()
    tasks = TaskSet("test")
    config = cluster_config(nodes, **kw)
    subs = ClusterSubscriptions(config, rec.on_announcement, rec.on_down, tasks, **sub_kw)
    subs.start()
    try:
        yield subs, rec, tasks
    finally:
        await subs.stop()
        await tasks.close()


# -- streaming --------------------------------------------------------------------------------------------


async def test_stream_events_reach_on_announcement_in_order() -> None:
    async with FakeNode("n1", role="leader", term=4) as node, subscribed([node]) as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 5)
        anns = rec.of("n1")
        seqs = [a.seq for a in anns if a.seq is not None]
        assert len(seqs) == len(anns) and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert all(a.node == "n1" and a.term == 4 and a.role == "leader" and a.leader == "n1" for a in anns)
        assert anns[0].has_quorum is True
        assert subs.nodes["n1"].up is True and subs.nodes["n1"].mode == "stream"
        assert not rec.downs and not subs.rejected


async def test_set_is_pushed_at_once_not_at_the_next_tick() -> None:
    # A one-minute tick: only the push on set() can deliver the change within the 10 s wait.
    async with (
        FakeNode("n1", tick=60.0) as node,
        subscribed([node], liveness_timeout=120.0) as (_, rec, _),
    ):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 1)
        node.set(term=2, role="leader")
        await rec.wait_for(lambda: rec.of("n1")[-1].term == 2, timeout=10)
        assert rec.of("n1")[-1].role == "leader"


async def test_cut_stream_reconnects_and_events_resume_without_down() -> None:
    async with FakeNode("n1") as node, subscribed([node], liveness_timeout=1.0) as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 2)
        node.cut_streams()
        await node.wait_until(lambda: node.stream_opens >= 2)
        seen = len(rec.announcements)
        await rec.wait_for(lambda: len(rec.announcements) >= seen + 3)
        assert subs.nodes["n1"].connects == 2
        assert not rec.downs
        assert not subs.rejected  # seq starts again on the new stream


async def test_node_restart_reported_down_then_up_again() -> None:
    async with (
        FakeNode("n1") as node,
        subscribed([node], liveness_timeout=0.3, reconnect_max=0.1) as (s, rec, _),
    ):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 1)
        await node.stop()
        await rec.wait_for(lambda: len(rec.downs) == 1, timeout=10.0)
        assert s.nodes["n1"].up is False
        node.set(term=5)
        await node.start()  # same port
        await rec.wait_for(lambda: rec.of("n1")[-1].term == 5)
        assert s.nodes["n1"].up is True and len(rec.downs) == 1


async def test_silent_stream_reported_down_once_per_transition() -> None:
    liveness = 0.3
    async with FakeNode("n1") as node, subscribed([node], liveness_timeout=liveness) as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 1)
        node.silence()
        await rec.wait_for(lambda: len(rec.downs) == 1, timeout=10.0)
        assert rec.downs[0][0] == "n1"
        # Reported by the liveness check, once the node was silent for the liveness timeout.
        assert silent_for(rec.downs[0][1]) >= liveness
        # Still silent across several reconnects: no second report.
        opens = node.stream_opens
        await node.wait_until(lambda: node.stream_opens >= opens + 2, timeout=10.0)
        assert len(rec.downs) == 1
        node.resume()
        await rec.wait_for(lambda: subs.nodes["n1"].up is True)
        node.silence()
        await rec.wait_for(lambda: len(rec.downs) == 2, timeout=10.0)


async def test_unreachable_node_is_reported_down_once() -> None:
    node = FakeNode("n1")
    await node.start()
    await node.stop()  # a port nobody listens on
    async with subscribed([node], liveness_timeout=0.2, reconnect_max=0.05) as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.downs) == 1, timeout=10.0)
        assert rec.downs[0][1].startswith("never heard; announce stream: ")
        await rec.wait_for(lambda: subs.nodes["n1"]._failures >= 5, timeout=10.0)
        assert len(rec.downs) == 1


async def test_a_node_that_comes_up_keeps_no_error_from_before() -> None:
    # The admin (and the status page) show `last_error` of a node: it once kept "connection refused" from
    # before the node came up, next to state live.
    node = FakeNode("n1")
    await node.start()
    await node.stop()  # nobody listens on its port yet
    async with subscribed([node], liveness_timeout=0.2, reconnect_max=0.05) as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.downs) == 1, timeout=10.0)
        assert "announce stream: " in subs.nodes["n1"].last_error
        await node.start()  # same port
        try:
            await rec.wait_for(lambda: subs.nodes["n1"].up is True, timeout=5.0)
            assert subs.nodes["n1"].last_error == ""
        finally:
            await node.stop()


# -- polling fallback -------------------------------------------------------------------------------------


async def test_node_without_stream_is_polled() -> None:
    async with (
        FakeNode("n1", serve_stream=False, term=3, role="leader") as node,
        subscribed([node], poll_interval=0.05) as (subs, rec, _),
    ):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 3)
        assert subs.nodes["n1"].mode == "poll"
        assert node.status_polls >= 3 and node.stream_opens == 0
        assert rec.of("n1")[0].term == 3
        node.set(term=4, role="follower", leader="n2")
        await rec.wait_for(lambda: rec.of("n1")[-1].term == 4)
        assert rec.of("n1")[-1].leader == "n2"
        assert not rec.downs and not subs.rejected


async def test_polled_node_that_hangs_is_reported_down() -> None:
    async with (
        FakeNode("n1", serve_stream=False) as node,
        subscribed([node], poll_interval=0.05, liveness_timeout=0.3) as (_, rec, _),
    ):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 1)
        node.silence()  # /raft/status now hangs
        await rec.wait_for(lambda: len(rec.downs) == 1, timeout=10.0)
        # Cut by the liveness timeout, though the poll never answers: reported after 0.3 s of silence.
        assert "no announcement within the liveness timeout" in rec.downs[0][1], rec.downs
        assert silent_for(rec.downs[0][1]) >= 0.3
        node.resume()
        seen = len(rec.announcements)
        await rec.wait_for(lambda: len(rec.announcements) > seen)
        assert len(rec.downs) == 1


async def test_polled_node_is_offered_the_stream_again() -> None:
    async with (
        FakeNode("n1", serve_stream=False) as node,
        subscribed([node], poll_interval=0.05, stream_retry_interval=0.2) as (subs, rec, _),
    ):
        await rec.wait_for(lambda: subs.nodes["n1"].mode == "poll" and len(rec.announcements) >= 1)
        node.serve_stream = True
        await node.wait_until(lambda: node.stream_opens == 1)
        seen = len(rec.announcements)
        await rec.wait_for(lambda: len(rec.announcements) >= seen + 2)
        assert subs.nodes["n1"].mode == "stream"


# -- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inject", "reason"),
    [
        (lambda n: n.inject_raw(b"data: {not json}\n\n"), "malformed_json"),
        (lambda n: n.inject_raw(b"data: [1, 2]\n\n"), "invalid_fields"),
        (lambda n: n.inject_event(term="seven"), "invalid_fields"),
        (lambda n: n.inject_event(role="king"), "invalid_fields"),
        (lambda n: n.inject_event(node="n9"), "wrong_node"),
        (lambda n: n.inject_event(seq=0), "seq_backwards"),
    ],
    ids=["malformed_json", "not_an_object", "term_not_int", "unknown_role", "wrong_node", "seq_backwards"],
)
async def test_bad_event_is_rejected_counted_and_the_stream_continues(
    inject: Callable[[FakeNode], None], reason: str
) -> None:
    async with FakeNode("n1") as node, subscribed([node]) as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 2)
        inject(node)
        await rec.wait_for(lambda: subs.rejected.get(reason) == 1)
        seen = len(rec.announcements)
        await rec.wait_for(lambda: len(rec.announcements) >= seen + 2)
        assert subs.nodes["n1"].rejected == {reason: 1}
        assert subs.nodes["n1"].connects == 1  # same stream
        assert all(a.node == "n1" and a.role == "follower" for a in rec.of("n1"))


async def test_oversized_event_cuts_the_stream_which_reconnects() -> None:
    async with FakeNode("n1") as node, subscribed([node]) as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 1)
        node.inject_raw(b"data: " + b"x" * 100_000)
        await node.wait_until(lambda: node.stream_opens >= 2)
        assert subs.rejected == {"oversized": 1}
        seen = len(rec.announcements)
        await rec.wait_for(lambda: len(rec.announcements) > seen)


async def test_rejections_are_logged_once_per_burst(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="raftlb.control.stream")
    async with FakeNode("n1") as node, subscribed([node]) as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 1)
        for _ in range(20):
            node.inject_raw(b"data: garbage\n\n")
        node.inject_event(node="n2")
        await rec.wait_for(lambda: subs.rejected == {"malformed_json": 20, "wrong_node": 1})
    warnings = [r.getMessage() for r in caplog.records if "rejected announcement" in r.getMessage()]
    assert len(warnings) == 2  # one per reason
    assert any("JSONDecodeError" in w for w in warnings) and any("'n2'" in w for w in warnings)


async def test_signed_announcements_are_checked_when_a_key_is_set() -> None:
    async with (
        FakeNode("n1", key=b"secret") as good,
        FakeNode("n2", key=b"wrong") as forged,
        FakeNode("n3") as unsigned,
        subscribed([good, forged, unsigned], key=b"secret") as (subs, rec, _),
    ):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 3)
        await rec.wait_for(lambda: subs.nodes["n2"].rejected.get("bad_signature", 0) >= 3)
        await rec.wait_for(lambda: subs.nodes["n3"].rejected.get("bad_signature", 0) >= 3)
        assert not rec.of("n2") and not rec.of("n3")


async def test_a_sig_that_is_not_ascii_or_not_a_string_is_a_bad_signature_and_the_stream_continues() -> None:
    # hmac.compare_digest raises TypeError on a non-ASCII str: that once ended the stream, uncounted.
    async with FakeNode("n1", key=b"secret") as node, subscribed([node], key=b"secret") as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 2)
        doc = node.announcement()
        for sig in ("\u00e9" * 64, "\udc80", 12345, None):
            node.inject_raw(b"data: " + json.dumps({**doc, "sig": sig}).encode() + b"\n\n")
        raw = json.dumps({**doc, "sig": "\u00e9"}, ensure_ascii=False).encode()  # UTF-8 on the wire
        node.inject_raw(b"data: " + raw + b"\n\n")
        # Correctly signed, but a timestamp no float can hold: too old to be fresh, not a crash.
        node.inject_event(ts_ms=10**4000)
        await rec.wait_for(lambda: subs.rejected == {"bad_signature": 5, "replayed": 1})
        seen = len(rec.announcements)
        await rec.wait_for(lambda: len(rec.announcements) >= seen + 2)
        assert subs.nodes["n1"].connects == 1  # same stream
        assert subs.nodes["n1"].last_error == ""


async def test_a_raising_callback_does_not_end_the_subscription() -> None:
    calls: list[Announcement] = []
    three = asyncio.Event()

    def explode(node_id: str, ann: Announcement) -> None:
        calls.append(ann)
        if len(calls) == 3:
            three.set()
        raise RuntimeError("boom")

    async with FakeNode("n1") as node:
        tasks = TaskSet("test")
        subs = ClusterSubscriptions(cluster_config([node]), explode, lambda n, r: None, tasks)
        subs.start()
        await node.wait_until(lambda: node.stream_opens == 1)
        await asyncio.wait_for(three.wait(), 5.0)
        assert subs.nodes["n1"].connects == 1
        await subs.stop()
        await tasks.close()


# -- lifecycle --------------------------------------------------------------------------------------------


async def test_stop_ends_every_task_and_closes_the_streams() -> None:
    async with FakeCluster(3) as fc:
        async with subscribed(fc.nodes) as (subs, rec, tasks):
            await rec.wait_for(lambda: {n for n, _, _ in rec.announcements} == {"n1", "n2", "n3"})
            assert len(tasks) == 3
            await subs.stop()
            assert len(tasks) == 0 and subs.nodes == {}
        for node in fc.nodes:
            await node.wait_until(lambda n=node: n.stream_count == 0)  # type: ignore[misc]


async def test_update_adds_and_removes_nodes_and_keeps_the_rest() -> None:
    async with FakeCluster(3) as fc:
        n1, n2, n3 = fc.nodes
        async with subscribed([n1, n2]) as (subs, rec, tasks):
            await rec.wait_for(lambda: len(rec.of("n1")) >= 1 and len(rec.of("n2")) >= 1)
            kept = subs.nodes["n1"]
            subs.update(cluster_config([n1, n3], liveness_timeout=2.5))
            assert set(subs.nodes) == {"n1", "n3"} and subs.nodes["n1"] is kept
            assert kept.cluster.liveness_timeout == 2.5
            await rec.wait_for(lambda: len(rec.of("n3")) >= 1)
            await n2.wait_until(lambda: n2.stream_count == 0)
            seen = len(rec.of("n2"))
            await rec.wait_for(lambda: len(rec.of("n3")) >= 3)
            assert len(rec.of("n2")) == seen and n1.stream_opens == 1
            assert len(tasks) == 2


async def test_elect_moves_leadership_as_the_subscriptions_see_it() -> None:
    async with FakeCluster(3) as fc, subscribed(fc.nodes) as (_, rec, _):
        term = fc.elect("n2")
        await rec.wait_for(lambda: all(rec.of(n) and rec.of(n)[-1].term == term for n in ("n1", "n2", "n3")))
        assert [rec.of(n)[-1].leader for n in ("n1", "n2", "n3")] == ["n2"] * 3
        assert rec.of("n2")[-1].role == "leader" and rec.of("n1")[-1].role == "follower"


async def test_repr_shows_live_state() -> None:
    async with FakeNode("n1") as node, subscribed([node]) as (subs, rec, _):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 1)
        assert "1 up" in repr(subs) and "c1" in repr(subs)
        assert repr(subs.nodes["n1"]).startswith("<NodeSubscription n1 stream up")


# -- the SSE parser ---------------------------------------------------------------------------------------

SSE_CASES = [
    (b"data: a\n\n", [("message", "a", "")]),
    (b"data: a\r\n\r\n", [("message", "a", "")]),
    (b"data: a\r\rdata: b\r\r", [("message", "a", ""), ("message", "b", "")]),
    (b"data: a\ndata:b\ndata:  c\n\n", [("message", "a\nb\n c", "")]),
    (b": keep-alive\n\n: comment\ndata: x\n\n", [("message", "x", "")]),
    (b"event: announce\nid: 7\ndata: x\n\ndata: y\n\n", [("announce", "x", "7"), ("message", "y", "7")]),
    (b"\xef\xbb\xbfdata: bom\n\n", [("message", "bom", "")]),
    (b"data\n\n", [("message", "", "")]),
    (b"event: e\n\ndata: z\n\n", [("message", "z", "")]),  # an event without data is not dispatched
    (b"retry: 10\nfoo: bar\ndata: z\n\n", [("message", "z", "")]),
    (b"data: incomplete", []),
]


@pytest.mark.parametrize(("stream", "expected"), SSE_CASES)
def test_sse_parser_whole_and_byte_by_byte(stream: bytes, expected: list[tuple[str, str, str]]) -> None:
    whole = [(e.event, e.data, e.id) for e in SSEParser().feed(stream)]
    parser = SSEParser()
    split: list[SSEEvent] = []
    for i in range(len(stream)):
        split += parser.feed(stream[i : i + 1])
    assert whole == expected
    assert [(e.event, e.data, e.id) for e in split] == expected


def test_sse_parser_refuses_endless_lines_and_events() -> None:
    with pytest.raises(EventTooLarge):
        SSEParser(max_bytes=100).feed(b"data: " + b"x" * 200)
    with pytest.raises(EventTooLarge):
        SSEParser(max_bytes=100).feed(b"data: xxxxxxxxxx\n" * 20)


# -- the fake node itself (the proxy's tests lean on it) ---------------------------------------------------


async def test_fake_node_serves_client_traffic_by_role() -> None:
    async with FakeNode("n1", role="leader", applied_index=10) as node, httpx.AsyncClient() as client:
        r = await client.post(node.url + "/kv/a?x=1", content=b"v" * 5_000_000)
        assert r.status_code == 200 and r.headers["x-raft-index"] == "11" and r.headers["x-raft-term"] == "1"
        assert r.json() == {"node": "n1", "method": "POST", "path": "/kv/a", "target": "/kv/a?x=1",
                            "body_len": 5_000_000}  # fmt: skip

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(80):
                yield b"c" * 65536

        r = await client.put(node.url + "/kv/b", content=chunks())
        assert r.json()["body_len"] == 80 * 65536
        node.set(role="follower", leader="n2")
        r = await client.delete(node.url + "/kv/a")
        assert r.status_code == 421 and r.headers["x-raft-leader"] == "n2"
        r = await client.get(node.url + "/bytes/300000?chunked=1")
        assert r.content == fakes.fake_bytes(300_000) and r.headers["transfer-encoding"] == "chunked"
        r = await client.head(node.url + "/bytes/1000")
        assert r.headers["content-length"] == "1000" and r.content == b""
        assert [q.method for q in node.requests] == ["POST", "PUT", "DELETE", "GET", "HEAD"]
        assert node.requests[0].role == "leader" and node.requests[2].role == "follower"
        assert node.requests[1].header("Transfer-Encoding") == "chunked"
        assert node.applied_index == 12


async def test_fake_node_behaviours() -> None:
    async with FakeNode("n1", role="leader") as node, httpx.AsyncClient() as client:
        node.handler = fakes.echo
        r = await client.post(node.url + "/e", content=b"hello", headers={"content-type": "text/plain"})
        assert r.content == b"hello" and r.headers["content-type"] == "text/plain"
        node.handler = fakes.sequence(fakes.respond(503, {"error": "busy"}), None)
        assert (await client.get(node.url + "/a")).status_code == 503
        assert (await client.get(node.url + "/a")).status_code == 200
        for behaviour in (fakes.close_after_read, fakes.reset_after_read):
            node.handler = behaviour
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(node.url + "/w", content=b"x")
        node.handler = fakes.hang
        with pytest.raises(httpx.ReadTimeout):
            await client.get(node.url + "/h", timeout=0.2)
        node.handler = fakes.delay(0.1)
        started = time.monotonic()
        assert (await client.get(node.url + "/d")).status_code == 200
        assert time.monotonic() - started >= 0.1


async def test_key_rotation_accepts_both_keys_and_old_events_are_replays() -> None:
    old, new = b"0123456789abcdef-old", b"0123456789abcdef-new"
    async with (
        FakeNode("n1", key=old) as a,
        FakeNode("n2", key=new) as b,
        FakeNode("n3", key=b"0123456789abcdef-bad") as c,
        subscribed([a, b, c], announce_keys=(old, new), announce_max_skew=2.0) as (subs, rec, _),
    ):
        await rec.wait_for(lambda: len(rec.of("n1")) >= 2 and len(rec.of("n2")) >= 2)
        await rec.wait_for(lambda: subs.nodes["n3"].rejected.get("bad_signature", 0) >= 2)
        assert not rec.of("n3")
        # A correctly signed event from a minute ago (a recording, replayed) is refused.
        a.inject_event(ts_ms=int(time.time() * 1000) - 60_000)
        await rec.wait_for(lambda: subs.nodes["n1"].rejected.get("replayed", 0) >= 1)
