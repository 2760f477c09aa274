"""`raftlb bench --http2`: the HTTP/2 client (bench_http.Http2Connection) against a small scripted HTTP/2
server written here on h2's server side (streams, GOAWAY before and after processing, RST_STREAM, a cancelled
stream, TLS with ALPN), against servers that do not speak HTTP/2, and whole runs with several streams per
connection (against the scripted server and raftlb's own HTTP/2 listener code)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from raftlb.http.app import Request, Response, json_response, serve
from raftlb.tools.bench import format_report
from raftlb.tools.bench import main as bench_main
from raftlb.tools.bench_check import BenchReport
from raftlb.tools.bench_http import BenchConnection, Http2Connection, HttpConnection, Target, TransportError
from raftlb.tools.loadgen import BenchOptions, run_bench, unreachable

# -- a scripted HTTP/2 server -----------------------------------------------------------------------------


@dataclass
class TinyH2:
    """A KV store over HTTP/2 (h2, server side): PUT /kv/<key> stores the body, GET /kv/<key> reads it; every
    answer carries X-Raft-Index (the number of writes) and X-Raft-Node n1. GET /reset is answered with
    RST_STREAM, GET /hang never. `goaway_every` n: the (n+1)-th request of a connection gets a GOAWAY and the
    connection ends; `graceful`: the GOAWAY names that request's stream (it is still answered), else the one
    before it (it is not processed). `goaway_at_once`: SETTINGS, then GOAWAY before any stream. `window`:
    the stream flow-control window it grants (a request body larger than that waits for WINDOW_UPDATE)."""

    goaway_every: int | None = None
    graceful: bool = False
    goaway_at_once: bool = False
    window: int | None = None
    store: dict[str, bytes] = field(default_factory=dict)
    index: int = 0
    connections: int = 0
    streams: list[list[int]] = field(default_factory=list)  # the stream ids of each connection
    requests: list[dict[str, str]] = field(default_factory=list)
    resets_received: list[int] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        streams: list[int] = []
        self.streams.append(streams)
        conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        if self.window is not None:
            conn.local_settings = Settings(client=False,
                                           initial_values={SettingCodes.INITIAL_WINDOW_SIZE: self.window})
        conn.initiate_connection()
        if self.goaway_at_once:
            conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        writer.write(conn.data_to_send())
        pending: dict[int, tuple[dict[str, str], bytearray]] = {}
        try:
            while not self.goaway_at_once and (data := await reader.read(65536)):
                for event in conn.receive_data(data):
                    if isinstance(event, RequestReceived):
                        pending[event.stream_id] = (dict(event.headers), bytearray())  # type: ignore[arg-type]
                    elif isinstance(event, DataReceived):
                        pending[event.stream_id][1].extend(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, StreamReset):
                        self.resets_received.append(event.stream_id)
                    elif isinstance(event, StreamEnded):
                        headers, body = pending.pop(event.stream_id)
                        streams.append(event.stream_id)
                        if self.goaway_every is not None and len(streams) > self.goaway_every:
                            last = event.stream_id if self.graceful else streams[-2]
                            writer.write(conn.data_to_send() + goaway(last))
                            if self.graceful:
                                self.answer(conn, event.stream_id, headers, bytes(body))
                                writer.write(conn.data_to_send())
                            await writer.drain()
                            return
                        self.answer(conn, event.stream_id, headers, bytes(body))
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ProtocolError, ConnectionError):
            pass
        finally:
            await asyncio.sleep(0)  # let the last frames reach the socket before it closes
            writer.close()

    def answer(self, conn: H2Connection, stream_id: int, headers: dict[str, str], body: bytes) -> None:
        self.requests.append(headers)
        path, method = headers[":path"], headers[":method"]
        if path == "/reset":
            conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if path == "/hang":
            return
        key = path.removeprefix("/kv/")
        status, out = 200, b""
        if method == "PUT":
            self.store[key] = body
            self.index += 1
            out = b'{"index":%d}' % self.index
        elif key in self.store:
            out = self.store[key]
        else:
            status, out = 404, b'{"error":"not_found"}'
        conn.send_headers(stream_id, [(":status", str(status)), ("content-length", str(len(out))),
                                      ("x-raft-index", str(self.index)), ("x-raft-node", "n1")])
        conn.send_data(stream_id, out, end_stream=True)


def goaway(last_stream_id: int) -> bytes:
    """A GOAWAY frame, written by hand: h2's server side refuses to send anything after its own GOAWAY, and
    a graceful one is followed by the answer to the last stream it names."""
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = ErrorCodes.NO_ERROR
    return frame.serialize()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def listening(handle: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Serve `handle` on a free port; yields the base URL. On the way out the connections still open are
    given a moment to see their client's close, then cut."""
    handlers: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handle(reader, writer)
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(run, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.close()
        if handlers:
            _, pending = await asyncio.wait(list(handlers), timeout=2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()


async def http1_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """What an HTTP/1-only server answers to the HTTP/2 preface (`PRI * HTTP/2.0`)."""
    await reader.read(24)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


def h2(url: str) -> Http2Connection:
    return Http2Connection(Target.parse(url))


# -- the client -------------------------------------------------------------------------------------------

async def test_concurrent_requests_share_one_connection_each_on_its_own_stream() -> None:
    server = TinyH2()
    async with listening(server.handle) as url:
        conn = h2(url + "/base")
        rs = await asyncio.gather(*(conn.request("PUT", f"/kv/k{i}", [("X-Raft-Min-Index", "3")], b"%d" % i)
                                    for i in range(10)))
        assert [r.status for r in rs] == [200] * 10
        r = await conn.request("GET", "/kv/k7")
        assert (r.status, r.body, r.header_int("x-raft-index")) == (200, b"7", 10)
        assert r.headers["x-raft-node"] == "n1"
        assert conn.connects == 1 and conn.is_open()
        conn.close()
        assert not conn.is_open()
    assert server.connections == 1 and sorted(server.streams[0]) == list(range(1, 23, 2))
    put = server.requests[0]
    assert put[":scheme"] == "http" and put[":authority"] == url.removeprefix("http://")
    assert put[":path"].startswith("/base/kv/k") and put["x-raft-min-index"] == "3"
    assert put["content-length"] in {str(len(b"%d" % i)) for i in range(10)}
    assert "content-length" not in server.requests[-1]  # the GET carries no body


async def test_a_server_that_answers_the_preface_with_http1_is_a_not_http2_transport_error() -> None:
    async with listening(http1_only) as url:
        conn = h2(url)
        with pytest.raises(TransportError) as err:
            await conn.connect()
        assert err.value.kind == "not_http2"
        assert "HTTP/1 ('HTTP/1.1 400 Bad Request')" in str(err.value)
        assert "does not speak HTTP/2" in str(err.value)
        with pytest.raises(TransportError) as err:
            await conn.request("GET", "/kv/a")
        assert err.value.kind == "not_http2" and not conn.is_open()


async def test_goaway_before_a_stream_was_processed_fails_it_and_the_next_request_reconnects() -> None:
    server = TinyH2(goaway_every=2)
    async with listening(server.handle) as url:
        conn = h2(url)
        for i in range(2):
            assert (await conn.request("PUT", f"/kv/a{i}", body=b"1")).status == 200
        with pytest.raises(TransportError) as err:
            await conn.request("PUT", "/kv/a2", body=b"1")
        assert err.value.kind == "goaway" and "GOAWAY (NO_ERROR)" in str(err.value)
        assert "a2" not in server.store  # GOAWAY's last stream id said so: not processed
        assert (await conn.request("PUT", "/kv/a3", body=b"1")).status == 200
        assert conn.connects == 2 and server.connections == 2
        conn.close()


async def test_a_stream_named_by_a_graceful_goaway_still_gets_its_answer() -> None:
    server = TinyH2(goaway_every=0, graceful=True)
    async with listening(server.handle) as url:
        conn = h2(url)
        r = await conn.request("PUT", "/kv/g", body=b"5")
        assert r.status == 200 and server.store["g"] == b"5"
        assert not conn.is_open()  # no new stream on a connection that is going away
        assert (await conn.request("GET", "/kv/g")).status == 200
        assert conn.connects == 2
        conn.close()


async def test_goaway_instead_of_a_first_stream_is_a_goaway_transport_error() -> None:
    async with listening(TinyH2(goaway_at_once=True).handle) as url:
        conn = h2(url)
        with pytest.raises(TransportError) as err:
            await conn.connect()
        assert err.value.kind == "goaway" and "ENHANCE_YOUR_CALM" in str(err.value)
        conn.close()


async def test_a_reset_stream_fails_alone_and_the_connection_carries_on() -> None:
    server = TinyH2()
    async with listening(server.handle) as url:
        conn = h2(url)
        with pytest.raises(TransportError) as err:
            await conn.request("GET", "/reset")
        assert err.value.kind == "stream_reset" and "REFUSED_STREAM" in str(err.value)
        assert (await conn.request("PUT", "/kv/x", body=b"1")).status == 200
        assert conn.connects == 1
        conn.close()


async def test_a_cancelled_request_resets_its_stream_and_the_connection_carries_on() -> None:
    server = TinyH2()
    async with listening(server.handle) as url:
        conn = h2(url)
        hung = asyncio.create_task(conn.request("GET", "/hang"))
        await asyncio.wait_for(_until(lambda: any(r[":path"] == "/hang" for r in server.requests)), 10)
        hung.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hung
        assert (await conn.request("PUT", "/kv/y", body=b"1")).status == 200
        await asyncio.wait_for(_until(lambda: server.resets_received == [1]), 10)
        assert conn.connects == 1 and server.connections == 1
        conn.close()


async def test_a_body_larger_than_the_servers_window_waits_for_its_window_updates() -> None:
    server = TinyH2(window=8)
    async with listening(server.handle) as url:
        conn = h2(url)
        body = bytes(range(48, 48 + 50))
        rs = await asyncio.gather(*(conn.request("PUT", f"/kv/w{i}", body=body) for i in range(3)))
        assert [r.status for r in rs] == [200] * 3
        assert [server.store[f"w{i}"] for i in range(3)] == [body] * 3
        conn.close()


async def test_a_refused_connection_is_a_transport_error() -> None:
    async with listening(TinyH2().handle) as url:
        pass  # nothing listens there any more
    with pytest.raises(TransportError) as err:
        await h2(url).request("GET", "/kv/a")
    assert err.value.kind == "connection_refused"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(alpn)
    return context


async def test_https_urls_speak_http2_over_tls_chosen_by_alpn(ca: trustme.CA, tmp_path: Path) -> None:
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    options = BenchOptions(urls=("https://127.0.0.1:1",), http2=True, cafile=str(cafile))
    server = TinyH2()
    async with listening(server.handle, server_tls(ca, ["h2"])) as url:
        conn = options.connection(Target.parse(url))
        assert isinstance(conn, Http2Connection)
        assert (await conn.request("PUT", "/kv/t", body=b"1")).status == 200
        conn.close()
    assert server.requests[0][":scheme"] == "https"
    # A TLS server that offers only HTTP/1.1 by ALPN
    async with listening(http1_only, server_tls(ca, ["http/1.1"])) as url:
        conn = options.connection(Target.parse(url))
        with pytest.raises(TransportError) as err:
            await conn.connect()
        assert err.value.kind == "not_http2" and "did not agree to h2 by ALPN" in str(err.value)
        conn.close()
        # ... and the HTTP/1 client on the same URL goes through the same TLS (ALPN http/1.1)
        http1 = BenchOptions(urls=(url,), cafile=str(cafile)).connection(Target.parse(url))
        assert isinstance(http1, HttpConnection)
        await http1.connect()
        http1.close()
    # Without the CA, the certificate is not trusted.
    async with listening(server.handle, server_tls(ca, ["h2"])) as url:
        with pytest.raises(TransportError) as err:
            await h2(url).connect()
        assert err.value.kind == "tls_error"


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


# -- whole runs -------------------------------------------------------------------------------------------

def options(urls: list[str], **kw: Any) -> BenchOptions:
    base: dict[str, Any] = {"urls": tuple(urls), "clients": 4, "keys_per_client": 2, "read_ratio": 0.6,
                            "requests": 600, "timeout": 2.0, "seed": 1, "http2": True, "streams": 3}
    return BenchOptions(**(base | kw))


async def test_a_run_with_three_streams_per_connection_counts_every_request() -> None:
    server = TinyH2()
    async with listening(server.handle) as url:
        r = await run_bench(options([url]))
    assert r.violation_count == 0 and r.exit_code == 0, r.to_json()
    assert r.protocol == "http2" and r.streams == 3 and r.clients == 4
    assert r.requests == 600 and r.error_count == 0
    assert r.verified_keys == 4 * 3 * 2  # every stream loop is a client with keys of its own
    assert server.connections == 4  # one per client, its three loops multiplexed on it
    assert sum(len(s) for s in server.streams) == 600 + r.verified_keys
    keys = {h[":path"] for h in server.requests}
    assert len(keys) == r.verified_keys
    doc = json.loads(r.to_json())
    assert doc["protocol"] == "http2" and doc["streams"] == 3


async def test_a_run_against_an_http2_listener_of_raftlb_code() -> None:
    """raftlb.http.app serves HTTP/2 with prior knowledge through the listener's h2 code (as the demo node
    does): the run passes with nothing lost."""
    store: dict[str, bytes] = {}

    async def kv(req: Request) -> Response:
        key = req.path.removeprefix("/kv/")
        if req.method == "PUT":
            store[key] = req.body
        headers = [("X-Raft-Index", str(len(store))), ("X-Raft-Node", "n1")]
        if key not in store:
            return json_response({"error": "not_found"}, 404, headers)
        return Response(200, store[key], headers, "application/octet-stream")

    server = await serve(kv, "127.0.0.1", 0)
    try:
        r = await run_bench(options([f"http://127.0.0.1:{server.port}"], streams=4))
    finally:
        await server.close()
    assert r.violation_count == 0 and r.error_count == 0 and r.exit_code == 0, r.to_json()
    assert r.requests == 600 and r.verified_keys == 4 * 4 * 2 and r.violations["lost"] == 0


@pytest.mark.parametrize("graceful", [False, True], ids=["abrupt", "graceful"])
async def test_goaway_mid_run_is_a_transport_error_and_the_clients_reconnect(graceful: bool) -> None:
    server = TinyH2(goaway_every=40, graceful=graceful)
    async with listening(server.handle) as url:
        r = await run_bench(options([url], max_error_rate=1.0))
    assert r.violation_count == 0, r.to_json()  # a stream refused by GOAWAY was not applied: nothing lost
    assert r.requests == 600
    kinds = set(r.errors["read"]) | set(r.errors["write"])
    assert kinds <= {"goaway"}, r.errors
    assert server.connections >= 600 // 41  # each GOAWAY ended a connection; the clients opened new ones
    if not graceful:
        assert r.error_count > 0  # at least the stream each GOAWAY named as unprocessed


async def test_an_http1_only_server_fails_the_start_check_and_every_request() -> None:
    async with listening(http1_only) as url:
        problems = await unreachable(BenchOptions(urls=(url,), http2=True))
        assert await unreachable(BenchOptions(urls=(url,))) == []  # over HTTP/1 it can be reached
        r = await run_bench(BenchOptions(urls=(url,), http2=True, clients=2, requests=10, verify=False))
    assert len(problems) == 1 and problems[0].startswith(f"{url}: the server answered the HTTP/2 connection "
                                                         "preface with HTTP/1")
    assert r.error_count == 10 and set(r.errors["read"]) | set(r.errors["write"]) == {"not_http2"}
    assert r.exit_code == 1


async def test_the_start_check_names_a_dead_url_for_http2_too() -> None:
    async with listening(TinyH2().handle) as url:
        assert await unreachable(BenchOptions(urls=(url,), http2=True)) == []
    problems = await unreachable(BenchOptions(urls=(url,), http2=True))
    assert len(problems) == 1 and problems[0].startswith(f"{url}: ")


def test_streams_without_http2_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--url", "http://127.0.0.1:1", "--streams", "4"]) == 2
    assert "--streams 4 needs --http2" in capsys.readouterr().err
    assert bench_main(["--url", "http://127.0.0.1:1", "--http2", "--streams", "0"]) == 2
    assert "--streams: must be >= 1" in capsys.readouterr().err


def test_the_table_names_the_protocol_and_the_streams() -> None:
    base: dict[str, Any] = {"run_id": "r", "urls": ["http://x:1"], "clients": 8, "consistency": None,
                            "token": True, "requests": 10}
    text = format_report(BenchReport(**base, protocol="http2", streams=4))
    assert "protocol" in text and "http2 (HTTP/2), 4 streams per connection" in text
    assert "8 clients x 4 streams" in text
    text = format_report(BenchReport(**base))
    assert "http1 (HTTP/1.1)" in text and "8 clients, " in text


def test_both_connections_are_bench_connections() -> None:
    target = Target.parse("http://127.0.0.1:1")
    conns: list[BenchConnection] = [HttpConnection(target), Http2Connection(target)]
    assert [c.is_open() for c in conns] == [False, False]
