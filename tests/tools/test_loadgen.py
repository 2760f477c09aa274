"""`raftlb bench`: the checker with scripted observations, the raw HTTP client on scripted bytes, and whole
runs against scripted in-process KV servers that are correct, stale, lossy or ambiguous."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from raftlb.http.app import Request, Response, json_response, serve
from raftlb.tools.bench import build_parser as build_bench_parser
from raftlb.tools.bench import format_report
from raftlb.tools.bench import main as bench_main
from raftlb.tools.bench_check import (
    EXAMPLES_PER_KIND,
    VIOLATION_KINDS,
    BenchReport,
    ClientChecker,
    Tally,
    Violation,
    latency_summary,
    percentile,
)
from raftlb.tools.bench_http import HttpConnection, Target, TransportError
from raftlb.tools.loadgen import BenchOptions, run_bench

KEY = "k"


def checker() -> ClientChecker:
    return ClientChecker(0, [KEY, "other"])


def write(c: ClientChecker, acked: bool = True) -> int:
    value = c.next_write(KEY)
    if acked:
        c.write_acknowledged(KEY, value)
    return value


def read(c: ClientChecker, got: int | bytes | None, *, index: int | None = None,
         token: int | None = None) -> str | None:
    """Feed one read to the checker; the kind of violation it reports, or None."""
    if got is None:
        status, body = 404, b'{"error":"not_found"}'
    else:
        status, body = 200, got if isinstance(got, bytes) else str(got).encode()
    v = c.check_read(KEY, status, body, node="n2", index=index, token=token)
    return v.kind if v is not None else None


# -- the checker ------------------------------------------------------------------------------------------

def test_reads_within_the_allowed_range_are_not_violations() -> None:
    c = checker()
    assert read(c, None) is None  # nothing written yet: a 404 is right
    write(c)
    assert read(c, 1) is None
    write(c)
    write(c)
    assert read(c, 3) is None
    assert read(c, 3) is None  # reading the same value twice is fine


def test_a_read_below_the_last_acknowledged_write_is_a_read_your_writes_violation() -> None:
    c = checker()
    write(c)
    write(c)
    v = c.check_read(KEY, 200, b"1", node="n3", index=7, token=9, at=1.5)
    assert v == Violation("read_your_writes", 0, KEY, 2, 1, "n3", 7, 9, 1.5)
    assert "expected >= 2, got 1 from n3 at index 7 (token 9" in v.describe()


def test_a_404_after_an_acknowledged_write_is_a_read_your_writes_violation() -> None:
    c = checker()
    write(c)
    v = c.check_read(KEY, 404, b"", node="n2", index=3)
    assert v is not None and v.kind == "read_your_writes" and v.got is None
    assert "got 404" in v.describe()


def test_an_ambiguous_write_widens_the_range_but_does_not_raise_its_floor() -> None:
    c = checker()
    write(c)  # 1 acknowledged
    write(c, acked=False)  # 2 failed ambiguously: may or may not be applied
    assert read(c, 1) is None
    assert read(c, 2) is None  # it was applied after all


def test_going_back_after_reading_an_unacknowledged_value_is_a_monotonic_violation() -> None:
    c = checker()
    write(c)
    write(c, acked=False)
    assert read(c, 2) is None
    assert read(c, 1) == "monotonic"
    assert read(c, 2) is None  # the floor stays at the highest value read, not the last


def test_a_404_after_reading_an_unacknowledged_value_is_a_monotonic_violation() -> None:
    c = checker()
    write(c, acked=False)
    assert read(c, 1) is None
    assert read(c, None) == "monotonic"


def test_a_value_never_written_is_a_phantom() -> None:
    c = checker()
    write(c)
    assert read(c, 2) == "phantom"  # above anything attempted
    assert read(c, 0) == "phantom"
    assert read(c, b"hello") == "phantom"
    assert read(c, "\u00b2".encode()) == "phantom"  # a digit to str.isdigit, not to int()
    fresh = checker()
    assert read(fresh, 1) == "phantom"  # a key nobody wrote


def test_an_answer_from_an_index_below_the_token_is_a_stale_index_violation() -> None:
    c = checker()
    write(c)
    assert read(c, 1, index=9, token=10) == "stale_index"
    assert read(c, 1, index=10, token=10) is None
    assert read(c, 1, index=9, token=None) is None  # sent without a token: nothing was promised
    assert read(c, 1, index=None, token=10) is None  # the node does not report an index


def test_a_value_violation_wins_over_a_stale_index() -> None:
    c = checker()
    write(c)
    write(c)
    assert read(c, 1, index=5, token=10) == "read_your_writes"


def test_the_token_only_moves_forward() -> None:
    c = checker()
    for index in (5, 3, None, 8, 7):
        c.observe_index(index)
    assert c.token == 8


def test_keys_are_judged_independently() -> None:
    c = checker()
    write(c)
    write(c)
    assert c.check_read("other", 404, b"") is None
    assert read(c, 2) is None


@pytest.mark.parametrize(("script", "final", "lost"), [
    (["ack", "ack"], 2, False),
    (["ack", "ack"], 1, True),
    (["ack"], None, True),
    (["ack", "ambiguous"], 1, False),
    (["ack", "ambiguous"], 2, False),
    (["ambiguous"], None, False),  # never acknowledged, never seen: it may be gone
    (["ambiguous", "read 1"], None, True),  # seen by a read, then gone
    (["ack", "ambiguous", "read 2"], 1, True),
])
def test_the_final_read_back_reports_lost_writes(script: list[str], final: int | None, lost: bool) -> None:
    c = checker()
    for step in script:
        if step.startswith("read "):
            assert read(c, int(step[5:])) is None
        else:
            write(c, acked=step == "ack")
    status, body = (404, b"") if final is None else (200, str(final).encode())
    v = c.check_final(KEY, status, body, node="n1", index=99)
    assert (v is not None and v.kind == "lost") is lost


# -- the report -------------------------------------------------------------------------------------------

def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0
    assert latency_summary([0.001, 0.002, 0.010]) == {"count": 3, "p50": 2.0, "p90": 10.0, "p99": 10.0,
                                                      "max": 10.0}


def test_the_tally_keeps_only_the_first_examples_of_each_kind() -> None:
    t = Tally()
    for i in range(EXAMPLES_PER_KIND + 3):
        t.violation(Violation("monotonic", 0, f"k{i}", 2, 1, "n2", 1, None))
    t.violation(Violation("lost", 0, "k", 2, None, "n1", 1, None))
    assert t.violations["monotonic"] == EXAMPLES_PER_KIND + 3 and t.violations["lost"] == 1
    assert len(t.examples) == EXAMPLES_PER_KIND + 1


def report(**kw: Any) -> BenchReport:
    base: dict[str, Any] = {"run_id": "r", "urls": ["http://x:1"], "clients": 2, "consistency": None,
                            "token": True, "requests": 1000}
    return BenchReport(**(base | kw))


def test_the_exit_code_fails_on_violations_and_on_too_many_errors() -> None:
    assert report().exit_code == 0
    bad = report(violations=dict.fromkeys(VIOLATION_KINDS, 0) | {"monotonic": 2})
    assert bad.exit_code == 1 and "2 consistency violation(s): monotonic 2" in bad.failures()[0]
    assert report(error_rate=0.02, max_error_rate=0.01).exit_code == 1
    assert report(error_rate=0.01, max_error_rate=0.01).exit_code == 0
    assert report(requests=0).exit_code == 1


def test_the_report_serializes_to_json_with_its_verdict() -> None:
    doc = json.loads(report(errors={"read": {"timeout": 2}, "write": {"503 no_leader": 1}}).to_json())
    assert doc["passed"] is True and doc["violation_count"] == 0 and doc["failures"] == []
    assert set(doc["violations"]) == set(VIOLATION_KINDS)
    assert doc["errors"]["write"] == {"503 no_leader": 1}


def test_the_table_shows_every_section() -> None:
    r = report(reads_by_node={"n1": 30, "n2": 70}, latency_ms={"read": latency_summary([0.001])},
               violations=dict.fromkeys(VIOLATION_KINDS, 0) | {"read_your_writes": 1},
               examples=[{"text": "read_your_writes: client 0 key k: expected >= 2, got 1"}])
    text = format_report(r)
    for needle in ("throughput", "read latency", "p99", "write errors", "n2 70 (70%)",
                   "violations: read_your_writes  1", "first violations:", "FAIL: 1 consistency"):
        assert needle in text, needle


@pytest.mark.parametrize(("change", "message"), [
    ({"urls": ()}, "--url"),
    ({"urls": ("ftp://x:1",)}, "--url"),
    ({"urls": ("http://x:notaport",)}, "--url: bad port"),
    ({"clients": 0}, "--clients"),
    ({"duration": 0.0}, "--duration"),
    ({"requests": 0}, "--requests"),
    ({"read_ratio": 1.5}, "--read-ratio"),
    ({"keys_per_client": 0}, "--keys-per-client"),
    ({"consistency": "strong"}, "--consistency"),
    ({"path_prefix": "kv/"}, "--path-prefix"),
    ({"timeout": 0.0}, "--timeout"),
    ({"max_error_rate": -1.0}, "--max-error-rate"),
    ({"streams": 0, "http2": True}, "--streams: must be >= 1"),
    ({"streams": 2}, "--streams 2 needs --http2"),
])
def test_option_errors_name_the_option(change: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"urls": ("http://127.0.0.1:1",)}
    with pytest.raises(ValueError, match=message):
        BenchOptions(**(base | change)).validate()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main([]) == 2
    assert "--url" in capsys.readouterr().err
    assert bench_main(["--url", "http://127.0.0.1:1", "--read-ratio", "2"]) == 2
    assert bench_main(["--bogus"]) == 2
    assert bench_main(["--url", "http://x:1", "--consistency", "strong"]) == 2


# -- the HTTP client --------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def scripted_server(answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                          ) -> AsyncIterator[Target]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Target.parse(f"http://127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()


def replies(*responses: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A server that answers the n-th request on a connection with responses[n], then closes it."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            head = await reader.readuntil(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            await reader.readexactly(length[0] if length else 0)
            writer.write(response)
            await writer.drain()

    return answer


async def test_the_client_reads_content_length_and_chunked_bodies_on_one_connection() -> None:
    async with scripted_server(replies(
            b"HTTP/1.1 200 OK\r\nX-Raft-Index: 7\r\nX-Raft-Node: n2\r\nContent-Length: 2\r\n\r\n42",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
    )) as target:
        conn = HttpConnection(target)
        r = await conn.request("GET", "/kv/a", [("X-Raft-Min-Index", "3")])
        assert (r.status, r.body, r.header_int("x-raft-index")) == (200, b"42", 7)
        assert r.headers["x-raft-node"] == "n2"
        r = await conn.request("PUT", "/kv/a", body=b"1")
        assert (r.status, r.body) == (200, b"abcde")
        r = await conn.request("GET", "/kv/a")
        assert (r.status, r.body) == (204, b"")
        assert conn.connects == 1 and conn.is_open()
        conn.close()


async def test_the_client_honours_connection_close_and_bodies_ended_by_eof() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    async with scripted_server(replies(closing)) as t:
        conn = HttpConnection(t)
        assert (await conn.request("GET", "/")).body == b"x"
        assert not conn.is_open()
    async with scripted_server(replies(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")) as t:
        conn = HttpConnection(t)
        assert (await conn.request("GET", "/")).body == b"until the end"
        assert not conn.is_open()


async def test_raftlb_json_errors_are_named_by_their_code() -> None:
    body = b'{"error":"no_leader","retry_after":1}'
    no_leader = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    bad_gateway = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
    async with scripted_server(replies(no_leader, bad_gateway)) as t:
        conn = HttpConnection(t)
        assert (await conn.request("PUT", "/kv/a", body=b"1")).error_kind() == "503 no_leader"
        assert (await conn.request("PUT", "/kv/a", body=b"1")).error_kind() == "502"
        conn.close()


@pytest.mark.parametrize(("response", "kind"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "connection_closed"),
    (b"", "connection_closed"),
    (b"SMTP ready\r\n\r\n", "bad_response"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad_response"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad_response"),
])
async def test_broken_responses_are_transport_errors_and_close_the_connection(response: bytes,
                                                                              kind: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()

    async with scripted_server(answer) as t:
        conn = HttpConnection(t)
        with pytest.raises(TransportError) as err:
            await conn.request("GET", "/")
        assert err.value.kind == kind
        assert not conn.is_open()


async def test_a_refused_connection_is_a_transport_error() -> None:
    async with scripted_server(replies()) as t:
        pass  # closed again: nothing listens on the port now
    with pytest.raises(TransportError) as err:
        await HttpConnection(t).request("GET", "/")
    assert err.value.kind == "connection_refused"


# -- whole runs against scripted KV servers ---------------------------------------------------------------

@dataclass
class ScriptedKV:
    """An in-process KV store speaking the demo node's API, with a leader copy and a follower copy that stays
    `lag` writes behind. Reads go to the follower when `stale_reads`, unless `honour_token` and the follower
    is behind the request's X-Raft-Min-Index. `ambiguous` answers every write 500 after applying it;
    `black_hole` acknowledges writes and keeps nothing."""

    stale_reads: bool = False
    honour_token: bool = False
    lag: int = 5
    ambiguous: bool = False
    black_hole: bool = False
    log: list[tuple[str, bytes]] = field(default_factory=list)
    leader: dict[str, bytes] = field(default_factory=dict)
    follower: dict[str, bytes] = field(default_factory=dict)
    follower_index: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)
    flip: bool = False

    async def handle(self, req: Request) -> Response:
        headers = {k.lower(): v for k, v in req.headers.items()}
        self.seen.append(headers | {":method": req.method})
        key = req.path.removeprefix("/kv/")
        if req.method == "PUT":
            if not self.black_hole:
                self.log.append((key, req.body))
                self.leader[key] = req.body
            self._advance_follower()
            if self.ambiguous:
                return json_response({"error": "timeout"}, 500, self._headers(len(self.log), "n1"))
            return json_response({"index": len(self.log)}, 200, self._headers(len(self.log), "n1"))
        min_index = int(headers.get("x-raft-min-index", "0"))
        use_follower = self.stale_reads and not (self.honour_token and min_index > self.follower_index)
        use_follower = use_follower and headers.get("x-raft-consistency") != "leader"
        if self.ambiguous:  # alternate leader and follower: reads go back and forth in time
            self.flip = not self.flip
            use_follower = self.flip
        data, index, node = ((self.follower, self.follower_index, "n2") if use_follower
                             else (self.leader, len(self.log), "n1"))
        value = data.get(key)
        if value is None:
            return json_response({"error": "not_found"}, 404, self._headers(index, node))
        return Response(200, value, self._headers(index, node), "application/octet-stream")

    def _advance_follower(self) -> None:
        while self.follower_index < len(self.log) - self.lag:
            key, value = self.log[self.follower_index]
            self.follower[key] = value
            self.follower_index += 1

    @staticmethod
    def _headers(index: int, node: str) -> list[tuple[str, str]]:
        return [("X-Raft-Index", str(index)), ("X-Raft-Node", node), ("X-Raft-Term", "1")]


@contextlib.asynccontextmanager
async def kv_servers(kv: ScriptedKV, count: int = 1) -> AsyncIterator[list[str]]:
    servers = [await serve(kv.handle, "127.0.0.1", 0, name=f"kv{i}") for i in range(count)]
    try:
        yield [f"http://127.0.0.1:{s.port}" for s in servers]
    finally:
        for s in servers:
            await s.close()


def options(urls: list[str], **kw: Any) -> BenchOptions:
    base: dict[str, Any] = {"urls": tuple(urls), "clients": 4, "keys_per_client": 2, "read_ratio": 0.6,
                            "requests": 600, "timeout": 2.0, "seed": 1}
    return BenchOptions(**(base | kw))


async def test_a_correct_store_passes_with_every_request_counted() -> None:
    kv = ScriptedKV()
    async with kv_servers(kv) as urls:
        r = await run_bench(options(urls))
    assert r.violation_count == 0 and r.exit_code == 0, r.to_json()
    assert r.requests == 600 and r.reads + r.writes == 600 and r.error_count == 0
    assert r.reads_by_node == {"n1": r.reads} and r.writes_by_node == {"n1": r.writes}
    assert r.latency_ms["read"]["count"] == r.reads and r.latency_ms["read"]["p99"] > 0
    assert r.throughput > 0 and r.verified_keys == 8 and r.unverified_keys == 0


async def test_the_token_rises_and_travels_on_reads_and_writes() -> None:
    kv = ScriptedKV()
    async with kv_servers(kv) as urls:
        await run_bench(options(urls, clients=1, consistency="fenced", verify=False))
    first_write = next(i for i, h in enumerate(kv.seen) if h[":method"] == "PUT")
    tokens = [int(h.get("x-raft-min-index", "0")) for h in kv.seen]
    assert all(tokens[first_write + 1:])  # once an index above 0 was seen, every request carries it
    assert tokens == sorted(tokens) and tokens[-1] in (len(kv.log) - 1, len(kv.log))
    assert {h[":method"] for h in kv.seen if "x-raft-min-index" in h} == {"GET", "PUT"}
    assert all(h.get("x-raft-consistency") == ("fenced" if h[":method"] == "GET" else None) for h in kv.seen)


async def test_stale_follower_reads_are_caught() -> None:
    kv = ScriptedKV(stale_reads=True)
    async with kv_servers(kv) as urls:
        r = await run_bench(options(urls, keys_per_client=1))
    assert r.violations["read_your_writes"] > 0 and r.exit_code == 1
    assert r.violations["lost"] == 0  # the leader has everything
    assert r.examples and r.examples[0]["node"] == "n2"
    assert r.reads_by_node.get("n2", 0) > 0


async def test_a_store_that_honours_the_token_passes_and_without_the_token_it_fails() -> None:
    kv = ScriptedKV(stale_reads=True, honour_token=True)
    async with kv_servers(kv) as urls:
        fenced = await run_bench(options(urls, keys_per_client=1))
        control = await run_bench(options(urls, keys_per_client=1, send_token=False))
    assert fenced.violation_count == 0, fenced.examples
    assert fenced.reads_by_node.get("n2", 0) > 0  # the follower did serve the reads it could
    assert control.violations["read_your_writes"] > 0
    assert control.violations["stale_index"] == 0  # no token sent: no index promised


async def test_an_index_below_the_token_is_caught_even_when_the_value_is_right() -> None:
    kv = ScriptedKV(stale_reads=True, lag=1)
    async with kv_servers(kv) as urls:
        r = await run_bench(options(urls, clients=1, keys_per_client=2))
    # The client writes one key at index n, then reads the other (unchanged) one from index n - 1.
    assert r.violations["stale_index"] > 0


async def test_values_going_back_after_ambiguous_writes_are_monotonic_violations() -> None:
    kv = ScriptedKV(ambiguous=True, lag=2)
    async with kv_servers(kv) as urls:
        r = await run_bench(options(urls, clients=1, keys_per_client=1, read_ratio=0.5, send_token=False,
                                    max_error_rate=1.0, requests=60))  # each failed write backs off 50 ms
    assert r.errors["write"] == {"500 timeout": r.writes}
    assert r.violations["monotonic"] > 0 and r.violations["read_your_writes"] == 0


async def test_acknowledged_writes_that_vanish_are_lost() -> None:
    kv = ScriptedKV(black_hole=True)
    async with kv_servers(kv) as urls:
        r = await run_bench(options(urls))
    assert r.violations["read_your_writes"] > 0
    assert r.violations["lost"] == r.verified_keys == 8


async def test_clients_alternate_between_urls() -> None:
    kv = ScriptedKV()
    async with kv_servers(kv, 2) as urls:
        r = await run_bench(options(urls, requests=400, verify=False))
    assert r.violation_count == 0 and r.requests == 400
    # Both listeners share one store; the request log cannot tell them apart, so count connections instead.
    bench_ports = {h.get("host") for h in kv.seen}
    assert bench_ports == {u.removeprefix("http://") for u in urls}


async def test_errors_are_counted_by_kind_and_fail_the_run_above_the_rate() -> None:
    kv = ScriptedKV(ambiguous=True)
    async with kv_servers(kv) as urls:
        r = await run_bench(options(urls, read_ratio=0.0, requests=50, verify=False))
    assert r.errors["write"] == {"500 timeout": 50} and r.error_rate == 1.0
    assert r.exit_code == 1 and "error rate" in r.failures()[0]


async def test_a_dead_url_ends_the_run_on_time_with_errors() -> None:
    async with kv_servers(ScriptedKV()) as urls:
        pass  # nothing listens there any more
    # Ends on its own: a run that kept retrying the dead URL past its 0.5 s would not end within 10 s.
    options = BenchOptions(urls=tuple(urls), clients=2, duration=0.5, timeout=0.5)
    r = await asyncio.wait_for(run_bench(options), 10)
    assert not r.interrupted
    assert set(r.errors["read"]) <= {"connection_refused"} and r.error_count > 0 and r.exit_code == 1


async def test_setting_stop_ends_the_run_with_a_partial_report() -> None:
    kv = ScriptedKV()
    stop = asyncio.Event()
    progress: list[int] = []
    async with kv_servers(kv) as urls:
        loop = asyncio.get_running_loop()
        loop.call_later(0.6, stop.set)
        r = await run_bench(BenchOptions(urls=tuple(urls), clients=2, duration=30),
                            stop=stop, on_progress=lambda p: progress.append(p.requests))
    assert r.interrupted and r.duration_s < 5 and r.requests > 0
    assert r.verified_keys == 0  # the read-back is skipped when interrupted
    assert progress and progress == sorted(progress)


async def test_setting_stop_during_the_read_back_cuts_it_short() -> None:
    kv = ScriptedKV()
    stop = asyncio.Event()

    async def hang_leader_reads(req: Request) -> Response:
        if req.headers.get("x-raft-consistency") == "leader":  # only the read-back asks for the leader
            stop.set()
            await asyncio.sleep(30)
        return await kv.handle(req)

    server = await serve(hang_leader_reads, "127.0.0.1", 0)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await run_bench(BenchOptions(urls=(f"http://127.0.0.1:{server.port}",), clients=2, requests=100,
                                         timeout=10.0), stop=stop)
    finally:
        await server.close()
    assert loop.time() - t0 < 5.0
    assert r.requests == 100 and r.interrupted and r.verified_keys == 0 and r.unverified_keys > 0


async def test_a_hung_server_is_cut_off_by_the_request_timeout() -> None:
    async def hang(req: Request) -> Response:
        await asyncio.sleep(30)
        return Response(200)

    server = await serve(hang, "127.0.0.1", 0)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await run_bench(BenchOptions(urls=(f"http://127.0.0.1:{server.port}",), clients=2, duration=0.3,
                                         timeout=0.5, verify=False))
    finally:
        await server.close()
    assert loop.time() - t0 < 3.0
    assert r.error_count == 2 and set(r.errors["read"]) | set(r.errors["write"]) == {"timeout"}


def test_the_cli_writes_the_json_report(tmp_path: Any) -> None:
    """bench_cli.main runs its own event loop: the scripted server lives on a thread of its own."""
    import threading

    kv = ScriptedKV()
    ready: list[str] = []
    done = threading.Event()

    def serve_in_thread() -> None:
        async def main() -> None:
            async with kv_servers(kv) as urls:
                ready.extend(urls)
                while not done.is_set():
                    await asyncio.sleep(0.02)

        asyncio.run(main())

    thread = threading.Thread(target=serve_in_thread)
    thread.start()
    try:
        while not ready:
            threading.Event().wait(0.01)
        out = io.StringIO()
        path = tmp_path / "report.json"
        argv = ["--url", ready[0], "--requests", "200", "--clients", "2", "--json", str(path)]
        code = bench_main(argv, out)
    finally:
        done.set()
        thread.join(10)
    assert code == 0
    assert "PASS: no violations" in out.getvalue()
    assert "\r" not in out.getvalue()  # no progress line off a TTY
    doc = json.loads(path.read_text())
    assert doc["requests"] == 200 and doc["passed"] is True


def test_the_cli_stops_at_once_naming_a_url_that_refuses_connections(capsys: pytest.CaptureFixture[str]
                                                                     ) -> None:
    """One URL listening and one refusing: no load, no report, exit 2 naming the dead URL (not seconds of
    connection_refused errors and a FAIL)."""
    import socket

    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()  # the kernel completes the connect; nobody needs to accept it
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
        live, dead = (f"http://127.0.0.1:{s.getsockname()[1]}" for s in (listening, closed))
        out = io.StringIO()
        code = bench_main(["--url", live, "--url", dead, "--duration", "3", "--timeout", "5"], out)
    assert code == 2 and out.getvalue() == ""
    err = capsys.readouterr().err
    assert f"raftlb bench: cannot connect to {dead}: Connection refused" in err
    assert live not in err and "nothing run" in err


def test_documented_bench_commands_target_what_the_demo_serves() -> None:
    """The README's and docs' `raftlb bench` examples run as written against `raftlb demo --keep`: every
    --url is the demo config's listener, and the arguments parse."""
    import shlex
    from importlib import resources
    from pathlib import Path

    from raftlb.config.load import load_config

    repo = Path(__file__).resolve().parents[2]
    with resources.as_file(resources.files("raftlb.demo").joinpath("demo.yaml")) as demo_yaml:
        listener = load_config(str(demo_yaml)).listeners[0]
    served = f"http://{listener.host}:{listener.port}"
    commands = [line.split("#")[0] for doc in ("README.md", "docs/bench.md")
                for line in (repo / doc).read_text().splitlines() if line.startswith("raftlb bench ")]
    assert len(commands) >= 4
    for command in commands:
        args = build_bench_parser().parse_args(shlex.split(command)[2:])
        assert args.url == [served], command
