"""Downstream HTTP/2, fed through a mock transport: an h2 client-side connection in the test makes the
frames (or hyperframe, for what a well-behaved client would never send), the listener's HttpConnection
sees the preface and hands the transport over to an H2ServerConnection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)

from raftlb.config.model import H2Config, LimitsConfig
from raftlb.http.exchange import FRAMING_CHUNKED, FRAMING_LENGTH, FRAMING_NONE, Exchange
from raftlb.http.h2server import PREFACE, H2ServerConnection, h2_head
from raftlb.http.server import HttpConnection, HttpServer
from tests.support.transport import MockTransport


class Transport(MockTransport):
    """A mock transport that can change hands (HTTP/1 → HTTP/2)."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Any = None

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol


class Handler:
    """Answers `GET`s at once with the target, bodies once complete with their length; `hold` keeps them."""

    def __init__(self, hold: bool = False) -> None:
        self.exchanges: list[Exchange] = []
        self.bodies: dict[int, bytearray] = {}
        self.aborted: list[tuple[Exchange, str]] = []
        self.hold = hold

    def on_request(self, ex: Exchange) -> None:
        self.exchanges.append(ex)
        body = self.bodies.setdefault(id(ex), bytearray())
        ex.on_abort = lambda reason: self.aborted.append((ex, reason))

        def done() -> None:
            if not self.hold:
                ex.respond(200, f"{ex.method} {ex.target.decode()} {len(body)}".encode(),
                           content_type=b"text/plain")

        ex.set_body_sink(body.extend, done)


class Client:
    """An HTTP/2 client connected to a listener through a mock transport."""

    def __init__(self, handler: Handler, limits: LimitsConfig | None = None, h2: H2Config | None = None,
                 client_settings: dict[int, int] | None = None) -> None:
        self.server = HttpServer(handler, limits or LimitsConfig(), h2=h2)
        self.transport = Transport()
        http1 = HttpConnection(self.server)
        http1.connection_made(self.transport)
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        if client_settings:
            self.h2.update_settings(client_settings)
        data = self.h2.data_to_send()
        assert data.startswith(PREFACE)
        http1.data_received(data)
        assert isinstance(self.transport.protocol, H2ServerConnection)
        self.conn: H2ServerConnection = self.transport.protocol
        self.read = 0

    def send(self, data: bytes | None = None) -> None:
        self.conn.data_received(self.h2.data_to_send() if data is None else data)

    async def events(self) -> list[Event]:
        """What the server has sent since the last call, as the client's events."""
        for _ in range(5):
            await asyncio.sleep(0)
        out = bytes(self.transport.out[self.read:])
        self.read = len(self.transport.out)
        events = self.h2.receive_data(out)
        self.send()  # (acknowledgements, window updates)
        return events

    def request(self, path: str = "/a", method: str = "GET", body: bytes | None = None,
                headers: list[tuple[str, str]] | None = None) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(":method", method), (":path", path), (":scheme", "http"),
                                   (":authority", "db.example"), *(headers or [])],
                             end_stream=body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=True)
        self.send()
        return sid


def answers(events: list[Event]) -> dict[int, tuple[dict[bytes, bytes], bytes, bool]]:
    """Per stream: response headers, body, ended."""
    out: dict[int, tuple[dict[bytes, bytes], bytes, bool]] = {}
    for e in events:
        if isinstance(e, ResponseReceived) and e.stream_id is not None:
            out[e.stream_id] = (dict(e.headers or []), b"", False)
        elif isinstance(e, DataReceived) and e.stream_id is not None:
            h, b, end = out.get(e.stream_id, ({}, b"", False))
            out[e.stream_id] = (h, b + (e.data or b""), end)
        elif isinstance(e, StreamEnded) and e.stream_id is not None:
            h, b, _ = out.get(e.stream_id, ({}, b"", False))
            out[e.stream_id] = (h, b, True)
    return out


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def frames(data: bytes) -> list[Frame]:
    """The frames in what the server wrote (after the preface's SETTINGS: all of it)."""
    out: list[Frame] = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def goaway(events: list[Event]) -> ConnectionTerminated | None:
    return next((e for e in events if isinstance(e, ConnectionTerminated)), None)


async def test_prior_knowledge_request_is_served_as_an_exchange() -> None:
    handler = Handler()
    c = Client(handler)
    sid = c.request("/v1/kv/a?x=1", headers=[("x-raft-min-index", "7"), ("cookie", "a=1"), ("cookie", "b=2")])
    got = answers(await c.events())
    headers, body, ended = got[sid]
    assert (headers[b":status"], body, ended) == (b"200", b"GET /v1/kv/a?x=1 0", True)
    assert headers[b"content-length"] == b"18" and b"connection" not in headers
    ex = handler.exchanges[0]
    assert (ex.method, ex.target, ex.header(b"host")) == ("GET", b"/v1/kv/a?x=1", b"db.example")
    assert ex.header(b"x-raft-min-index") == b"7"
    assert ex.header(b"cookie") == b"a=1; b=2"  # (RFC 9113 §8.2.3: crumbs joined for HTTP/1)
    assert c.server.requests == 1 and c.conn in c.server.connections


async def test_preface_split_across_reads_is_still_http2() -> None:
    server = HttpServer(Handler(), LimitsConfig())
    t = Transport()
    http1 = HttpConnection(server)
    http1.connection_made(t)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    data = client.data_to_send()
    http1.data_received(data[:10])
    http1.data_received(data[10:])
    assert isinstance(t.protocol, H2ServerConnection)
    assert http1 not in server.connections and t.protocol in server.connections


async def test_streams_are_multiplexed_and_answered_in_any_order() -> None:
    handler = Handler(hold=True)
    c = Client(handler)
    sids = [c.request(f"/k{i}") for i in range(3)]
    await c.events()
    assert [ex.target for ex in handler.exchanges] == [b"/k0", b"/k1", b"/k2"]
    for ex in reversed(handler.exchanges):
        ex.respond(200, ex.target)
    got = answers(await c.events())
    assert {sid: got[sid][1] for sid in sids} == {sids[0]: b"/k0", sids[1]: b"/k1", sids[2]: b"/k2"}
    assert all(got[sid][2] for sid in sids)
    assert not c.conn.streams


async def test_request_body_is_relayed_and_unknown_length_goes_chunked() -> None:
    handler = Handler()
    c = Client(handler)
    sid = c.request("/w", "POST", b"x" * 5000)
    got = answers(await c.events())
    assert got[sid][1] == b"POST /w 5000"
    ex = handler.exchanges[0]
    assert ex.chunked and ex.has_body and ex.content_length is None
    sid = c.request("/w", "POST", b"abc", headers=[("content-length", "3")])
    got = answers(await c.events())
    assert got[sid][1] == b"POST /w 3"
    assert handler.exchanges[1].content_length == 3 and not handler.exchanges[1].chunked


async def test_an_empty_post_says_content_length_0() -> None:
    handler = Handler()
    c = Client(handler)
    c.request("/w", "POST")
    await c.events()
    assert handler.exchanges[0].content_length == 0 and not handler.exchanges[0].has_body


async def test_client_reset_aborts_its_request_only() -> None:
    handler = Handler(hold=True)
    c = Client(handler)
    s1, s2 = c.request("/a"), c.request("/b")
    await c.events()
    c.h2.reset_stream(s1, ErrorCodes.CANCEL)
    c.send()
    assert [(ex.target, reason) for ex, reason in handler.aborted] == [(b"/a", "client_closed")]
    handler.exchanges[1].respond(200, b"ok")
    got = answers(await c.events())
    assert got[s2][1] == b"ok" and s1 not in got


async def test_streaming_answer_waits_for_the_client_window_and_pauses_the_upstream() -> None:
    handler = Handler(hold=True)
    c = Client(handler, LimitsConfig(write_buffer_high=1000),
               client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 100})
    await c.events()
    sid = c.request("/big")
    await c.events()
    ex = handler.exchanges[0]
    paused: list[str] = []
    ex.on_pause_writing = lambda: paused.append("pause")
    ex.on_resume_writing = lambda: paused.append("resume")
    ex.send_head(b"HTTP/1.1 200 OK\r\n", FRAMING_CHUNKED)
    ex.send_body(b"y" * 3000)
    got = answers(await c.events())
    assert len(got[sid][1]) == 100 and not got[sid][2]  # (the stream's window, no more)
    assert paused == ["pause"] and ex.conn.writing_paused
    ex.end()
    c.h2.increment_flow_control_window(10_000, sid)
    c.h2.increment_flow_control_window(10_000)
    c.send()
    got = answers(await c.events())
    assert len(got[sid][1]) == 2900 and got[sid][2]
    assert paused == ["pause", "resume"] or paused == ["pause"]  # (callbacks dropped once the exchange ends)
    assert not c.conn.streams


async def test_head_answers_carry_no_body() -> None:
    handler = Handler()
    c = Client(handler)
    sid = c.request("/h", "HEAD")
    got = answers(await c.events())
    assert got[sid][1] == b"" and got[sid][2] and got[sid][0][b"content-length"] == b"9"


async def test_too_many_concurrent_streams_end_the_connection() -> None:
    handler = Handler(hold=True)
    c = Client(handler, h2=H2Config(max_concurrent_streams=2))
    # (the client has not read the server's SETTINGS yet, so it does not know the limit)
    for i in range(3):
        c.h2.send_headers(c.h2.get_next_available_stream_id(),
                          [(":method", "GET"), (":path", f"/{i}"), (":scheme", "http"), (":authority", "x")],
                          end_stream=True)
        c.send()
    events = await c.events()
    term = goaway(events)
    assert term is not None and term.error_code == ErrorCodes.PROTOCOL_ERROR
    assert len(handler.exchanges) == 2 and c.transport.closed


async def test_oversized_header_list_is_refused() -> None:
    handler = Handler()
    c = Client(handler, LimitsConfig(max_header_bytes=2048))
    await c.events()
    c.request("/a", headers=[("x-big", "v" * 4000)])
    events = await c.events()
    term = goaway(events)
    assert term is not None and c.transport.closed  # (HPACK's decoder refuses the header list)
    assert handler.exchanges == []


async def test_too_many_headers_are_answered_431() -> None:
    handler = Handler()
    c = Client(handler, LimitsConfig(max_headers=5))
    sid = c.request("/a", headers=[(f"x-h{i}", "v") for i in range(10)])
    got = answers(await c.events())
    assert got[sid][0][b":status"] == b"431" and got[sid][2]
    assert handler.exchanges == [] and not c.transport.closed


async def test_body_above_the_limit_is_answered_413() -> None:
    handler = Handler(hold=True)
    c = Client(handler, LimitsConfig(max_body_bytes=1000))
    sid = c.request("/w", "POST", b"z" * 2000)
    got = answers(await c.events())
    assert got[sid][0][b":status"] == b"413"
    sid = c.h2.get_next_available_stream_id()  # (announces a body too large: refused before it comes)
    c.h2.send_headers(sid, [(":method", "POST"), (":path", "/w"), (":scheme", "http"), (":authority", "x"),
                            ("content-length", "5000")])
    c.send()
    got = answers(await c.events())
    assert got[sid][0][b":status"] == b"413" and got[sid][2]
    assert not c.transport.closed


async def test_a_grpc_call_refused_by_a_limit_gets_a_grpc_status() -> None:
    """A gRPC client reads the call's status, not the HTTP one: a body over the limit ends the call with
    RESOURCE_EXHAUSTED (Trailers-Only, HTTP 200), naming raftlb's error code."""
    handler = Handler(hold=True)
    c = Client(handler, LimitsConfig(max_body_bytes=1000))
    sid = c.request("/etcdserverpb.KV/Put", "POST", b"z" * 2000,
                    headers=[("content-type", "application/grpc")])
    head, body, ended = answers(await c.events())[sid]
    assert head[b":status"] == b"200" and head[b"content-type"] == b"application/grpc"
    assert head[b"grpc-status"] == b"8" and head[b"grpc-message"].startswith(b"raftlb payload_too_large")
    assert body == b"" and ended and not c.transport.closed


async def test_rapid_reset_is_bounded() -> None:
    handler = Handler(hold=True)
    c = Client(handler, h2=H2Config(max_resets_per_second=50))
    await c.events()
    for _ in range(200):
        sid = c.request("/slow")
        c.h2.reset_stream(sid, ErrorCodes.CANCEL)
        c.send()
        if c.transport.closed:
            break
    events = await c.events()
    term = goaway(events)
    assert term is not None and term.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert c.transport.closed and len(handler.exchanges) <= 51
    assert all(reason == "client_closed" for _, reason in handler.aborted)


@pytest.mark.parametrize("frame", ["ping", "settings"])
async def test_control_frame_floods_are_bounded(frame: str) -> None:
    handler = Handler()
    c = Client(handler, h2=H2Config(max_control_frames_per_second=100))
    await c.events()
    one = (PingFrame(0, opaque_data=b"12345678") if frame == "ping" else SettingsFrame(0)).serialize()
    for _ in range(1000):
        c.conn.data_received(one)
        if c.transport.closed:
            break
    assert c.transport.closed
    term = goaway(await c.events())
    assert term is not None and term.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    # The answers queued before the cut are bounded too (one ack per frame let in).
    assert len(c.transport.out) < 100 * 20 + 1000


async def test_continuation_flood_is_refused() -> None:
    handler = Handler()
    c = Client(handler)
    await c.events()
    head = HeadersFrame(1)
    head.data = Encoder().encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                  (b":authority", b"x")])
    c.conn.data_received(head.serialize())
    for _ in range(200):
        cont = ContinuationFrame(1)
        cont.data = b"\x40\x01a\x01b"  # (a literal header, never-ending block)
        c.conn.data_received(cont.serialize())
        if c.transport.closed:
            break
    assert c.transport.closed and handler.exchanges == []
    assert goaway(c.h2.receive_data(bytes(c.transport.out[c.read:]))) is not None


@pytest.mark.parametrize("stream_ids", [[2], [5, 3]], ids=["even-id", "id-goes-backwards"])
async def test_stream_id_misuse_is_a_connection_error(stream_ids: list[int]) -> None:
    handler = Handler(hold=True)
    c = Client(handler)
    await c.events()
    enc = Encoder()
    for sid in stream_ids:
        frame = HeadersFrame(sid, flags=["END_HEADERS", "END_STREAM"])
        frame.data = enc.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                 (b":authority", b"x")])
        c.conn.data_received(frame.serialize())
    term = goaway(await c.events())
    assert term is not None and term.error_code == ErrorCodes.PROTOCOL_ERROR and c.transport.closed


async def test_drain_sends_goaway_finishes_open_streams_then_closes() -> None:
    handler = Handler(hold=True)
    c = Client(handler)
    sid = c.request("/a")
    await c.events()
    c.conn.drain()
    later = c.request("/b")  # (sent before the client read the GOAWAY: refused)
    await settle()
    assert not c.transport.closed and len(handler.exchanges) == 1
    handler.exchanges[0].respond(200, b"done")
    await settle()
    got = frames(bytes(c.transport.out))
    away = [f for f in got if isinstance(f, GoAwayFrame)]
    assert [(f.last_stream_id, f.error_code) for f in away] == [(sid, ErrorCodes.NO_ERROR)]
    assert any(isinstance(f, RstStreamFrame) and f.stream_id == later
               and f.error_code == ErrorCodes.REFUSED_STREAM for f in got)
    assert any(isinstance(f, DataFrame) and f.stream_id == sid and f.data == b"done"
               and "END_STREAM" in f.flags for f in got)
    assert c.transport.closed and c.conn not in c.server.connections


async def test_idle_connection_times_out_with_goaway() -> None:
    c = Client(Handler())
    await c.events()
    assert c.conn.deadline_kind
    c.conn.on_deadline(c.conn.deadline)
    term = goaway(await c.events())
    assert term is not None and c.transport.closed


async def test_handler_abort_resets_only_that_stream() -> None:
    handler = Handler(hold=True)
    c = Client(handler)
    s1, s2 = c.request("/a"), c.request("/b")
    await c.events()
    handler.exchanges[0].send_head(b"HTTP/1.1 200 OK\r\n", FRAMING_CHUNKED)
    handler.exchanges[0].abort("upstream_failed")
    handler.exchanges[1].respond(200, b"fine")
    events = await c.events()
    assert any(isinstance(e, StreamReset) and e.stream_id == s1 for e in events)
    assert answers(events)[s2][1] == b"fine" and not c.transport.closed


async def test_http1_still_served_beside_http2() -> None:
    server = HttpServer(Handler(), LimitsConfig())
    t = Transport()
    conn = HttpConnection(server)
    conn.connection_made(t)
    conn.data_received(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert t.out.startswith(b"HTTP/1.1 200 OK\r\n") and t.protocol is None


async def test_http2_can_be_turned_off() -> None:
    server = HttpServer(Handler(), LimitsConfig(), h2=H2Config(enabled=False))
    t = Transport()
    conn = HttpConnection(server)
    conn.connection_made(t)
    conn.data_received(PREFACE)
    assert t.protocol is None and t.out.startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize(("head", "framing", "length", "want"), [
    (b"HTTP/1.1 200 OK\r\ncontent-type: a/b\r\n", FRAMING_LENGTH, 3,
     [(b":status", b"200"), (b"content-type", b"a/b"), (b"content-length", b"3")]),
    (b"HTTP/1.1 404 Not Found\r\nX-Raft-Node: n1\r\nConnection: close\r\nKeep-Alive: 5\r\n", FRAMING_NONE, 0,
     [(b":status", b"404"), (b"x-raft-node", b"n1")]),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n", FRAMING_CHUNKED, 0,
     [(b":status", b"200")]),
])
def test_h2_head(head: bytes, framing: int, length: int, want: list[tuple[bytes, bytes]]) -> None:
    status, headers = h2_head(head, framing, length)
    assert (status, headers) == (want[0][1], want)


async def test_stalled_request_body_times_out_with_408() -> None:
    handler = Handler(hold=True)
    c = Client(handler)
    sid = c.h2.get_next_available_stream_id()
    c.h2.send_headers(sid, [(":method", "POST"), (":path", "/w"), (":scheme", "http"), (":authority", "x")])
    c.h2.send_data(sid, b"partial")
    c.send()
    await c.events()
    conn = c.conn
    assert conn.deadline_kind  # (a body deadline is armed)
    conn.on_deadline(conn.deadline + c.server.limits.body_timeout)
    got = answers(await c.events())
    assert got[sid][0][b":status"] == b"408" and got[sid][2]
    assert not c.transport.closed


async def test_a_client_that_keeps_its_window_shut_is_cut_off_per_stream() -> None:
    handler = Handler(hold=True)
    c = Client(handler, LimitsConfig(write_buffer_high=10),
               client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
    await c.events()
    sid, other = c.request("/stuck"), c.request("/fine")
    await c.events()
    ex = handler.exchanges[0]
    ex.send_head(b"HTTP/1.1 200 OK\r\n", FRAMING_CHUNKED)
    ex.send_body(b"x" * 100)
    await c.events()
    assert ex.conn.writing_paused
    c.conn.on_deadline(c.conn.deadline)
    events = await c.events()
    assert any(isinstance(e, StreamReset) and e.stream_id == sid for e in events)
    assert handler.aborted == [(ex, "send_timeout")] and c.server.send_timeouts == 1
    handler.exchanges[1].respond(204, b"")
    got = answers(await c.events())
    assert got[other][0][b":status"] == b"204" and not c.transport.closed


async def test_tls_h2_connections_count_against_max_connections() -> None:
    server = HttpServer(Handler(), LimitsConfig(), max_connections=0)
    t = Transport()
    H2ServerConnection(server).adopt(t, "10.0.0.1")
    assert t.closed and server.rejected_connections == 1 and not server.connections
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    term = goaway(client.receive_data(bytes(t.out)))
    assert term is not None and term.error_code == ErrorCodes.REFUSED_STREAM


async def test_resets_the_client_makes_the_server_send_count_against_the_limit() -> None:
    # "MadeYouReset": DATA after END_STREAM is a stream error h2 answers with RST_STREAM; each such request
    # reaches the handler like a rapid reset's, and is bounded the same way.
    handler = Handler(hold=True)
    c = Client(handler, h2=H2Config(max_resets_per_second=50))
    await c.events()
    enc = Encoder()
    for sid in range(1, 401, 2):
        frame = HeadersFrame(sid, flags=["END_HEADERS", "END_STREAM"])
        frame.data = enc.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                 (b":authority", b"x")])
        c.conn.data_received(frame.serialize() + DataFrame(sid, data=b"x").serialize())
        if c.transport.closed:
            break
    got = frames(bytes(c.transport.out[c.read:]))
    away = [f for f in got if isinstance(f, GoAwayFrame)]
    assert [f.error_code for f in away] == [ErrorCodes.ENHANCE_YOUR_CALM]
    assert c.transport.closed and len(handler.exchanges) <= 51


async def test_a_small_answer_held_back_by_a_shut_window_is_reset_after_the_send_timeout() -> None:
    # Smaller than write_buffer_high: the upstream is never paused, yet the stream (and the connection,
    # never idle while it is open) would be held forever.
    handler = Handler()
    c = Client(handler, LimitsConfig(write_buffer_high=1000),
               client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
    await c.events()
    sid = c.request("/small")
    events = await c.events()
    assert answers(events)[sid][1] == b"" and c.conn.streams  # (the head went out, the body waits)
    c.conn.on_deadline(c.conn.deadline)
    events = await c.events()
    assert any(isinstance(e, StreamReset) and e.stream_id == sid and e.error_code == ErrorCodes.CANCEL
               for e in events)
    assert c.server.send_timeouts == 1 and not c.conn.streams and not c.transport.closed


async def test_a_frame_longer_than_max_frame_size_is_refused_at_its_header() -> None:
    handler = Handler(hold=True)
    c = Client(handler)
    await c.events()
    sid = c.h2.get_next_available_stream_id()
    c.h2.send_headers(sid, [(":method", "PUT"), (":path", "/w"), (":scheme", "http"), (":authority", "x")])
    c.send()
    # (h2 alone would buffer the whole 16 MB before looking at the length)
    c.conn.data_received(b"\xff\xff\xff\x00\x00" + sid.to_bytes(4, "big") + b"z" * 100)
    term = goaway(await c.events())
    assert term is not None and term.error_code == ErrorCodes.FRAME_SIZE_ERROR and c.transport.closed


class EofTransport(Transport):
    """A transport that can half-close, as TCP's can."""

    def __init__(self) -> None:
        super().__init__()
        self.eof = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True


async def test_after_a_connection_error_goaway_goes_out_and_input_is_drained_before_the_close() -> None:
    # Closing with the flood still unread would make the kernel reset the connection, and the reset can
    # destroy the GOAWAY on its way.
    server = HttpServer(Handler(hold=True), LimitsConfig(), h2=H2Config(max_control_frames_per_second=10))
    t = EofTransport()
    conn = H2ServerConnection(server)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    conn.adopt(t, "10.0.0.1", client.data_to_send())
    conn.data_received(PingFrame(0, opaque_data=b"12345678").serialize() * 20)
    term = goaway(client.receive_data(bytes(t.out)))
    assert term is not None and term.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert t.eof and not t.closed and t.reading  # half-closed, still reading (and dropping)
    sent = len(t.out)
    conn.data_received(PingFrame(0, opaque_data=b"12345678").serialize() * 20)
    assert len(t.out) == sent and conn in server.connections
    conn.connection_lost(None)  # (the client closes once it has read the GOAWAY)
    assert conn not in server.connections


@pytest.mark.parametrize("kind", ["priority", "empty-data", "unknown"])
async def test_frames_that_are_work_for_nothing_are_rate_bounded(kind: str) -> None:
    handler = Handler(hold=True)
    c = Client(handler, h2=H2Config(max_control_frames_per_second=100))
    await c.events()
    if kind == "empty-data":
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(sid, [(":method", "PUT"), (":path", "/w"), (":scheme", "http"),
                                (":authority", "x")])
        c.send()
        one = DataFrame(sid).serialize()
    elif kind == "priority":
        one = PriorityFrame(101, depends_on=0, stream_weight=15).serialize()
    else:
        one = b"\x00\x00\x01\x42\x00\x00\x00\x00\x00x"  # (type 0x42: unknown, to be ignored)
    for _ in range(1000):
        c.conn.data_received(one)
        if c.transport.closed:
            break
    term = goaway(await c.events())
    assert term is not None and term.error_code == ErrorCodes.ENHANCE_YOUR_CALM and c.transport.closed


async def test_a_request_with_priority_is_not_a_control_frame() -> None:
    # (HEADERS with the PRIORITY flag, as browsers send: h2 reports a PriorityUpdated with each request)
    handler = Handler()
    c = Client(handler, h2=H2Config(max_control_frames_per_second=10))
    await c.events()
    enc = Encoder()
    for sid in range(1, 61, 2):
        frame = HeadersFrame(sid, flags=["END_HEADERS", "END_STREAM", "PRIORITY"], depends_on=0,
                             stream_weight=200)
        frame.data = enc.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                 (b":authority", b"x")])
        c.conn.data_received(frame.serialize())
    assert len(handler.exchanges) == 30 and not c.transport.closed
