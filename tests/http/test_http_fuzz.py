"""Fuzzing the downstream HTTP/1.1 parser: generated and mutated raw requests, thousands of them.

Two layers:

- **mock transport** (thousands of cases, no sockets): bytes are fed to an `HttpConnection` in random cuts,
  as tests/http/test_http_server.py does. Properties: nothing raises; the output is a sequence of whole, valid
  HTTP/1.1 responses; a refusal is the last thing said and closes the connection; the handler only ever sees
  well-formed requests; where h11 (an independent, strict parser) reads the same bytes as requests, raftlb
  reads the same requests with the same bodies (no desync); a client that never reads costs a bounded queue.
- **real sockets** (a few hundred cases): the same kind of bytes sent to a running raftlb in front of a fake
  leader. Properties: every connection gets valid responses or a clean close, raftlb stays up, a healthy
  client keeps being served between cases, and nothing is left over afterwards (connections, in-flight
  requests, held requests, busy upstream connections).

- **differential against h11** (thousands of cases, real sockets): requests from a grammar aimed at where
  parsers disagree (Upgrade/h2c/CONNECT, chunk sizes and extensions, odd header names and whitespace,
  obs-fold, TE/CL combinations, HTTP/1.0, pipelining) go to raftlb in front of a fake node, whose h11
  re-parses what arrives. The node must receive exactly the requests h11 frames out of the client's
  bytes (method, target, body), in order, possibly fewer, never more or different; every request h11
  rejects, and everything after it, is refused. `test_diff_was_not_vacuous` checks that many cases of
  every kind were both forwarded and refused.

All run under a time budget (FUZZ_BUDGET_S, FUZZ_SOCKET_BUDGET_S and FUZZ_DIFF_BUDGET_S, 15 s each by
default; the machine this was written on runs ~2,000 mock cases a second, ~30 socket cases and ~250
differential cases): Hypothesis decides the cases, and cases past the budget return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import h11
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raftlb.config.model import ClusterConfig, LimitsConfig
from raftlb.http.server import Exchange, HttpConnection, HttpServer
from tests.support.transport import MockTransport

MOCK_BUDGET = float(os.environ.get("FUZZ_BUDGET_S", "15"))
SOCKET_BUDGET = float(os.environ.get("FUZZ_SOCKET_BUDGET_S", "15"))

# -- generating requests ---------------------------------------------------------------------------------

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
           b"get", b"FOO", b"G ET", b""]
TARGETS = [b"/", b"/kv/a", b"/kv/a?b=c&d", b"*", b"http://example.com/x", b"/%00", b"//", b"/a b", b""]
VERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1",
                                 b"HTTP/1.1 x", b"HTTP/11", b""]
EOLS = [b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n", b"\n\r"]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Connection", b"Upgrade",
         b"X-Raft-Min-Index", b"X-Raft-Consistency", b"Cookie", b"Idempotency-Key", b"X-Forwarded-For", b"TE",
         b"Trailer", b"Content-Length ", b" Host", b"Transfer_Encoding", b"X\x00", b"", b"\xc3\xa4"]
VALUES = [b"x", b"0", b"5", b"-1", b"+5", b"5, 5", b"0x10", b"99999999999999999999", b"chunked",
          b"Chunked", b"chunked, chunked", b"identity", b"gzip, chunked", b"100-continue", b"close",
          b"keep-alive", b"upgrade", b"h2c", b"websocket", b"a\x00b", b"a\rb", b" ", b"", b"\xff\xfe",
          b"a\r\n b"]


def gen_chunked(rng: random.Random, body: bytes) -> bytes:
    """`body` in chunks, sometimes with extensions, trailers, or a lie about a size."""
    out = bytearray()
    i = 0
    while i < len(body):
        n = rng.randint(1, len(body) - i)
        size = b"%x" % n
        if rng.random() < 0.1:
            size = rng.choice([b"%x;a=b" % n, b"%X" % n, b" %x" % n, b"%x " % n, b"-%x" % n, b"0x%x" % n,
                               b"%x" % (n + 1), b"zz", b"f" * 20])
        out += size + b"\r\n" + body[i:i + n] + b"\r\n"
        i += n
    out += rng.choice([b"0\r\n\r\n"] * 6 + [b"0\r\nX-T: 1\r\n\r\n", b"0\r\n", b"", b"0\n\n"])
    return bytes(out)


def gen_request(rng: random.Random) -> bytes:
    """One request from the grammar: mostly well-formed, with every framing trap now and then."""
    method = rng.choice(METHODS)
    target = rng.choice(TARGETS) if rng.random() < 0.8 else b"/" + rng.randbytes(rng.randint(1, 12))
    version = rng.choice(VERSIONS)
    eol = rng.choice(EOLS)
    headers = [(b"Host", b"x")] if rng.random() < 0.9 else []
    for _ in range(rng.randint(0, 5)):
        name = rng.choice(NAMES) if rng.random() < 0.8 else rng.randbytes(rng.randint(1, 12))
        value = rng.choice(VALUES) if rng.random() < 0.8 else rng.randbytes(rng.randint(0, 16))
        headers.append((name, value))
    body = rng.randbytes(rng.randint(0, 40))
    framing = rng.choice(["none", "none", "length", "length", "chunked", "chunked", "short_length",
                          "long_length", "both", "two_lengths"])
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "short_length":
        headers.append((b"Content-Length", b"%d" % max(0, len(body) - 3)))
    elif framing == "long_length":
        headers.append((b"Content-Length", b"%d" % (len(body) + 3)))
    elif framing == "two_lengths":
        headers += [(b"Content-Length", b"%d" % len(body)), (b"Content-Length", b"%d" % (len(body) + 1))]
    elif framing in ("chunked", "both"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        if framing == "both":
            headers.append((b"Content-Length", b"%d" % len(body)))
        body = gen_chunked(rng, body)
    elif rng.random() < 0.8:
        body = b""  # usually nothing; sometimes stray bytes
    rng.shuffle(headers)
    sep = rng.choice([b": "] * 8 + [b":", b" : ", b":\t", b"::"])
    lines = [method + b" " + target + (b" " + version if version else b"")]
    lines += [name + sep + value for name, value in headers]
    return eol.join(lines) + eol + eol + body


def mutate(rng: random.Random, data: bytes, count: int) -> bytes:
    """`count` byte-level mutations: flip a byte, insert bytes, delete, duplicate, or truncate."""
    buf = bytearray(data)
    for _ in range(count):
        if not buf:
            buf += rng.randbytes(3)
            continue
        pos = rng.randrange(len(buf))
        op = rng.randrange(5)
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.choice([rng.randbytes(rng.randint(1, 6)), b"\r\n", b"\n", b"\x00", b" "])
        elif op == 2:
            del buf[pos:pos + rng.randint(1, 6)]
        elif op == 3:
            buf[pos:pos] = buf[pos:pos + rng.randint(1, 24)]
        else:
            del buf[pos:]
    return bytes(buf)


def cut(rng: random.Random, data: bytes) -> list[bytes]:
    """`data` as it might arrive: whole, or in a few pieces of random sizes."""
    if rng.random() < 0.4:
        return [data]
    out, i = [], 0
    while i < len(data):
        n = rng.choice([1, 1, 2, 3, 7, 16, 64, 1000])
        out.append(data[i:i + n])
        i += n
    return out


@dataclass(frozen=True)
class Case:
    """One fuzz case, fully determined by its seed (print it to replay a failure)."""

    seed: int
    requests: int = 1
    mutations: int = 0

    def build(self) -> tuple[bytes, list[bytes], random.Random]:
        rng = random.Random(self.seed)
        data = b"".join(gen_request(rng) for _ in range(self.requests))
        data = mutate(rng, data, self.mutations)
        return data, cut(rng, data), rng


# Hypothesis draws the seed and the shape; the request is built from the seed in microseconds (a composite
# strategy drawing every header took 15 ms a case, which would leave a few hundred cases per budget).
cases = st.builds(Case, seed=st.integers(0, 2**32 - 1), requests=st.integers(1, 3),
                  mutations=st.sampled_from([0, 0, 0, 1, 1, 2, 3]))


# -- checking what was said ---------------------------------------------------------------------------------


@dataclass
class ParsedResponse:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5]\d\d) [\x20-\x7e]*")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): ?([\x20-\x7e\t]*)")


class Unfinished(Exception):
    """The bytes end inside a response."""


def read_responses(out: bytes, head_possible: bool) -> list[ParsedResponse]:
    """Split `out` into HTTP/1.1 responses, strictly; AssertionError on anything invalid, Unfinished when it
    ends inside one. `head_possible`: a HEAD was sent, so an answer may carry a Content-Length and no body
    (it is taken as such when what follows it is another response or the end)."""
    responses = []
    pos = 0
    while pos < len(out):
        end = out.find(b"\r\n\r\n", pos)
        if end < 0:
            raise Unfinished(out[pos:pos + 200])
        status_line, *lines = out[pos:end].split(b"\r\n")
        m = _STATUS_LINE.fullmatch(status_line)
        assert m, status_line
        r = ParsedResponse(int(m.group(1)))
        for line in lines:
            h = _HEADER_LINE.fullmatch(line)
            assert h, line
            r.headers.append((h.group(1).lower(), h.group(2)))
        names = [k for k, _ in r.headers]
        assert names.count(b"content-length") <= 1, r.headers
        assert not (b"content-length" in names and b"transfer-encoding" in names), r.headers
        pos = end + 4
        length = next((int(v) for k, v in r.headers if k == b"content-length"), None)
        if r.status < 200 or r.status in (204, 304):
            pass
        elif (b"transfer-encoding", b"chunked") in r.headers:
            while True:
                eol = out.find(b"\r\n", pos)
                if eol < 0:
                    raise Unfinished(out[pos:pos + 200])
                assert re.fullmatch(rb"[0-9a-f]+", out[pos:eol]), out[pos:eol]
                n = int(out[pos:eol], 16)
                if len(out) < eol + 2 + n + 2:
                    raise Unfinished(out[pos:pos + 200])
                r.body += out[eol + 2:eol + 2 + n]
                assert out[eol + 2 + n:eol + 4 + n] == b"\r\n"
                pos = eol + 4 + n
                if n == 0:
                    break
        elif length is not None:
            bodiless = pos == len(out) or out.startswith(b"HTTP/1.1 ", pos)
            if not (head_possible and bodiless):
                if len(out) < pos + length:
                    raise Unfinished(out[pos:pos + 200])
                r.body += out[pos:pos + length]
                pos += length
        else:
            r.body += out[pos:]  # until the close
            pos = len(out)
        r.complete = True
        responses.append(r)
    return responses


def check_output(out: bytes, closed: bool, sent: bytes = b"", reset: bool = False) -> list[ParsedResponse]:
    """Whole valid responses; an error is the last response and the connection closed after it. After a
    reset (RST) the last response may be cut short: raftlb closes with unread bytes from the client, and the
    kernel then resets, which can swallow the end of what it said (see the lingering-close test)."""
    try:
        responses = read_responses(out, b"HEAD" in sent)
    except Unfinished:
        assert reset, f"a response was cut short without a reset: {out[-200:]!r}"
        cut = out.rfind(b"HTTP/1.1 ")
        responses = read_responses(out[:cut], b"HEAD" in sent) if cut > 0 else []
    for i, r in enumerate(responses):
        if r.status >= 400:
            assert i == len(responses) - 1, "something was said after a refusal"
            assert (b"connection", b"close") in r.headers
            assert b'"error":' in bytes(r.body) or not r.body  # (no body: the answer to a HEAD)
            assert closed, "a refusal must close the connection"
    return responses


# -- mock-transport fuzzing ----------------------------------------------------------------------------------


class FuzzHandler:
    """Answers every request once its body is in: 200 with "METHOD target body-length" (204 for HEAD)."""

    def __init__(self, answer: bool = True) -> None:
        self.exchanges: list[Exchange] = []
        self.bodies: list[bytearray] = []
        self.answer = answer

    def on_request(self, ex: Exchange) -> None:
        self.exchanges.append(ex)
        body = bytearray()
        self.bodies.append(body)

        def done() -> None:
            if not self.answer:
                return
            if ex.method == "HEAD":
                ex.respond(204, b"")
            else:
                ex.respond(200, b"%s %d" % (ex.method.encode(), len(body)), content_type=b"text/plain")

        ex.set_body_sink(body.extend, done)


def h11_requests(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(method, target, body) of the requests h11 reads from `data`, up to its first complaint."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    out: list[tuple[bytes, bytes, bytes]] = []
    current: tuple[bytes, bytes] | None = None
    body = bytearray()
    with contextlib.suppress(h11.RemoteProtocolError, h11.LocalProtocolError):
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                current, body = (event.method, event.target), bytearray()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert current is not None
                out.append((*current, bytes(body)))
                # Answer so that h11 moves on to the next request.
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
            else:
                break
    return out


class Budget:
    """Wall-clock budget of one fuzz test: the clock starts at its first case."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: float | None = None
        self.cases = 0

    def spent(self) -> bool:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        if now - self.started > self.seconds:
            return True
        self.cases += 1
        return False


MOCK = Budget(MOCK_BUDGET)
QUEUE = Budget(5.0)
SOCKET = Budget(SOCKET_BUDGET)


_LOOP: list[asyncio.AbstractEventLoop] = []  # one event loop for every mock case (see the fixture below)


@pytest.fixture(scope="module", autouse=True)
def _mock_loop() -> Iterator[None]:
    yield
    while _LOOP:
        _LOOP.pop().close()


def run_connection(data_pieces: list[bytes], limits: LimitsConfig, handler: FuzzHandler,
                   finish: int) -> tuple[HttpConnection, MockTransport]:
    """Feed the pieces to a fresh connection, letting the event loop run what each one scheduled (the next
    pipelined request is handed to the handler from a loop callback)."""
    if not _LOOP:
        _LOOP.append(asyncio.new_event_loop())
    return _LOOP[0].run_until_complete(_run_connection(data_pieces, limits, handler, finish))


async def _settle(conn: HttpConnection, t: MockTransport) -> None:
    for _ in range(1000):
        before = (len(t.out), len(conn.queue), t.closed)
        await asyncio.sleep(0)
        if (len(t.out), len(conn.queue), t.closed) == before:
            return


async def _run_connection(data_pieces: list[bytes], limits: LimitsConfig, handler: FuzzHandler,
                          finish: int) -> tuple[HttpConnection, MockTransport]:
    server = HttpServer(handler, limits)
    conn = HttpConnection(server)
    t = MockTransport()
    conn.connection_made(t)
    for piece in data_pieces:
        if t.closed or not t.reading:
            break  # a real transport would deliver nothing more
        conn.data_received(piece)
        await _settle(conn, t)
    if finish == 1 and not t.closed:
        conn.on_deadline(time.monotonic())  # whichever timeout is pending fires
    elif finish == 2 and not t.closed:
        if not conn.eof_received():
            t.close()
    await _settle(conn, t)
    return conn, t


LIMITS = LimitsConfig(max_header_bytes=2048, max_headers=20, max_body_bytes=4096)


def check_case(data: bytes, data_pieces: list[bytes], finish: int, *, compare_h11: bool) -> None:
    """Feed one case to a fresh connection and check every property of the mock layer."""
    handler = FuzzHandler()
    conn, t = run_connection(data_pieces, LIMITS, handler, finish)
    out = bytes(t.out)
    responses = check_output(out, t.closed, data)

    # The handler only ever saw requests that are whole and unambiguous.
    for ex, body in zip(handler.exchanges, handler.bodies, strict=True):
        assert re.fullmatch(r"[A-Z]+", ex.method), ex.method
        names = [k for k, _ in ex.headers]
        assert not (b"content-length" in names and b"transfer-encoding" in names)
        assert names.count(b"content-length") <= 1 and names.count(b"host") <= 1
        if ex.http11:
            assert b"host" in names
        if ex.body_done and ex.content_length is not None:
            assert len(body) == ex.content_length
        for k, v in ex.headers:
            assert re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9a-z]+", k), k
            assert b"\r" not in v and b"\n" not in v and b"\x00" not in v, v

    # Every answered request got exactly one 200/204, in order.
    ok = [r for r in responses if 200 <= r.status < 400]
    answered = [(ex, body) for ex, body in zip(handler.exchanges, handler.bodies, strict=True)
                if ex.finished and ex.status in (200, 204)]
    assert len(ok) == len(answered)
    for r, (ex, body) in zip(ok, answered, strict=True):
        if ex.method != "HEAD":
            assert bytes(r.body) == b"%s %d" % (ex.method.encode(), len(body))

    # No desync: where h11 and raftlb both read requests out of the same bytes, they read the same ones.
    # (Up to raftlb's first refusal: what it did after one is test_mock_fuzz_nothing_after_a_refusal...)
    if compare_h11:
        theirs = h11_requests(data)
        ours = [(ex.method.encode(), ex.target, bytes(b)) for ex, b in zip(handler.exchanges, handler.bodies,
                                                                            strict=True) if ex.body_done]
        if responses and responses[-1].status >= 400:
            ours = ours[:len(ok)]
        for mine, (method, target, their_body) in zip(ours, theirs, strict=False):
            # raftlb turns an absolute-form target into origin-form (RFC 9112 §3.2.2); h11 keeps it as sent.
            origin = re.sub(rb"^https?://[^/?#]*", b"", target, flags=re.IGNORECASE)
            if origin != target and not origin.startswith(b"/"):
                origin = b"/" + origin
            assert mine == (method, origin, their_body), (mine, (method, target, their_body))


BATCH = 8  # cases per Hypothesis example: its own overhead (~1 ms an example) is then paid once per batch


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=cases, finish=st.integers(0, 2))
def test_mock_fuzz_never_crashes_never_desyncs_and_always_answers_validly(case: Case, finish: int) -> None:
    for k in range(BATCH):
        if MOCK.spent():
            return
        sub = replace(case, seed=(case.seed * BATCH + k) % 2**32) if k else case
        data, data_pieces, _ = sub.build()
        try:
            check_case(data, data_pieces, (finish + k) % 3, compare_h11=sub.mutations == 0)
        except Exception as exc:
            raise AssertionError(f"{sub}: {data!r} in {len(data_pieces)} pieces") from exc


REGRESSIONS = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD / HTTP/1.1\r\n\r\n",  # refused, and a HEAD answer has a length but no body
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
    b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("data", REGRESSIONS)
@pytest.mark.parametrize("piece", [0, 1, 5])
@pytest.mark.parametrize("finish", [0, 1, 2])
def test_mock_fuzz_regressions(data: bytes, piece: int, finish: int) -> None:
    data_pieces = [data] if piece == 0 else [data[i:i + piece] for i in range(0, len(data), piece)]
    check_case(data, data_pieces, finish, compare_h11=True)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=st.builds(Case, seed=st.integers(0, 2**32 - 1), requests=st.just(2)))
@example(case=Case(seed=-1))  # seed -1: the request pair below, not a generated one
def test_mock_fuzz_nothing_after_a_refusal_reaches_the_handler(case: Case) -> None:
    data = (b"GET / HTTP/1.1\r\n\r\nDELETE /kv/x HTTP/1.1\r\nHost: x\r\n\r\n" if case.seed == -1
            else case.build()[0])
    handler = FuzzHandler()
    conn, t = run_connection([data], LIMITS, handler, 0)
    responses = check_output(bytes(t.out), t.closed, data)
    if responses and responses[-1].status >= 400:
        # Handled: the answered requests, and perhaps the refused one itself if its body was what broke.
        # Nothing after it.
        answered = sum(1 for r in responses if 200 <= r.status < 400)
        unanswered = [ex for ex in handler.exchanges if ex.status not in (200, 204)]
        assert len(handler.exchanges) - len(unanswered) == answered
        assert not unanswered or unanswered == [handler.exchanges[-1]]
        assert not unanswered or unanswered[0].status >= 400


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=st.builds(Case, seed=st.integers(0, 2**32 - 1), requests=st.integers(2, 40)))
def test_mock_fuzz_a_client_that_is_never_answered_costs_a_bounded_queue(case: Case) -> None:
    if QUEUE.spent():
        return
    data, data_pieces, _ = case.build()
    handler = FuzzHandler(answer=False)
    limits = replace(LIMITS, write_buffer_high=1024)
    conn, t = run_connection(data_pieces, limits, handler, 0)
    # One handled, at most one parsed behind it (plus the refusals that end the stream); the rest waits.
    assert sum(ex.error is None for ex in conn.queue) <= 2, case
    assert len(conn.queue) <= 4, case
    assert len(handler.exchanges) <= 1, case
    buffered = sum(ex.body_buffered for ex in conn.queue)
    assert buffered <= limits.write_buffer_high + 4096, case


def test_mock_fuzz_ran_thousands_of_cases() -> None:
    # Runs after the fuzz tests above (file order): the budget did not cut them down to a token run.
    assert MOCK.started is None or MOCK.cases >= 2000, MOCK.cases


# -- socket-level fuzzing against a running raftlb ----------------------------------------------------------


@dataclass
class LiveProxy:
    """raftlb and a fake leader in a thread of their own (Hypothesis drives the test synchronously)."""

    port: int = 0
    server: object = None
    node: object = None  # the fake leader (tests.fakes.FakeNode): what it received, parsed by h11
    loop: asyncio.AbstractEventLoop | None = None
    errors: list[str] = field(default_factory=list)

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn()` on the proxy's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(_call(fn), self.loop).result(5)


async def _call(fn: Callable[[], object]) -> object:
    return fn()


class _ErrorLog(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("raftlb") or record.name == "asyncio":
            self.sink.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def live() -> Iterator[LiveProxy]:
    import uvloop

    from tests.support.fakes import FakeNode
    from tests.support.harness import running

    proxy = LiveProxy()
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    handler = _ErrorLog(proxy.errors)
    logging.getLogger().addHandler(handler)

    async def serve() -> None:
        async with FakeNode("n1", role="leader") as node:
            cfg = ClusterConfig(name="c1", kind="native", nodes=(node.node_config(),), routes=(),
                                response_timeout=2.0)
            limits = LimitsConfig(max_header_bytes=2048, max_headers=20, max_body_bytes=4096,
                                  header_timeout=0.3, body_timeout=0.3, idle_timeout=0.3)
            async with running(cfg, limits=limits) as srv:
                while srv.proxies["c1"].table.leader(time.monotonic()) is None:
                    await asyncio.sleep(0.01)
                proxy.port, proxy.server, proxy.loop = srv.listeners[0].port, srv, asyncio.get_running_loop()
                proxy.node = node
                stop.append(asyncio.Event())
                ready.set()
                await stop[0].wait()

    failure: list[BaseException] = []

    def main() -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(serve())
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=main, name="fuzz-proxy", daemon=True)
    thread.start()
    assert ready.wait(15) and not failure, f"raftlb did not start: {failure}"
    try:
        yield proxy
    finally:
        assert proxy.loop is not None
        proxy.loop.call_soon_threadsafe(stop[0].set)
        thread.join(15)
        logging.getLogger().removeHandler(handler)


_socket_cases = 0


def exchange(port: int, data_pieces: list[bytes], half_close: bool,
             timeout: float) -> tuple[bytes, bool, bool]:
    """Send, optionally half-close, read until raftlb closes; (bytes, closed by raftlb, with a reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            for piece in data_pieces:
                s.sendall(piece)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # raftlb closed first: what it said is still readable
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return b"".join(chunks), False, False
            except ConnectionResetError:
                return b"".join(chunks), True, True
            if not chunk:
                return b"".join(chunks), True, False
            chunks.append(chunk)
        return b"".join(chunks), False, False


@pytest.mark.integration
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=cases, half_close=st.integers(0, 19).map(lambda n: n > 0))
def test_socket_fuzz_every_connection_gets_valid_answers_or_a_clean_close_and_others_are_served(
        live: LiveProxy, case: Case, half_close: bool) -> None:
    if SOCKET.spent():
        return
    data, data_pieces, _ = case.build()
    # Without a half-close, raftlb's 0.3 s header, body and idle timeouts end the connection.
    out, closed, reset = exchange(live.port, data_pieces, half_close, timeout=3.0)
    assert closed, f"{case}: connection left open: {out[-200:]!r}"
    try:
        check_output(out, closed, data, reset)
    except AssertionError as exc:
        raise AssertionError(f"{case}: {data!r}") from exc
    if SOCKET.cases % 10 == 1:
        # A healthy client is served between cases.
        with httpx.Client(base_url=f"http://127.0.0.1:{live.port}", timeout=3) as c:
            r = c.post("/kv/healthy", content=b"v")
            assert r.status_code == 200 and r.headers["x-raft-node"] == "n1"
    assert live.errors == []


@pytest.mark.integration
def test_socket_fuzz_left_nothing_behind(live: LiveProxy) -> None:
    """After the socket fuzz (file order): nothing leaked, and raftlb still serves."""
    srv = live.server

    def state() -> tuple[int, int, int, int]:
        proxy = srv.proxies["c1"]  # type: ignore[attr-defined]
        pool = proxy.pools["n1"]
        return (len(srv.listeners[0].connections), len(proxy.inflight), len(proxy.held),  # type: ignore[attr-defined]
                len(pool.busy))

    deadline = time.monotonic() + 5
    while live.call(state) != (0, 0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.call(state) == (0, 0, 0, 0)
    with httpx.Client(base_url=f"http://127.0.0.1:{live.port}", timeout=3) as c:
        assert c.put("/kv/after-fuzz", content=b"v").status_code == 200
    assert SOCKET.started is None or SOCKET.cases >= 100, SOCKET.cases
    print(f"fuzz cases: mock {MOCK.cases}, queue {QUEUE.cases}, socket {SOCKET.cases}")
    assert live.errors == []


# -- differential: what raftlb forwards against how a strict parser frames the client's bytes ---------------
#
# The same bytes go to raftlb (a real listener, the fake leader behind it) and to h11. Whatever reaches the
# node, re-parsed there by h11, must be exactly the requests h11 reads out of the client's bytes (method,
# target, body), in order, possibly fewer (raftlb refusing more than h11 is fine), never more or different:
# no body dropped or reframed, no body bytes parsed as a request of their own, nothing forwarded at or after
# a request h11 rejects. The generator leans on the places where parsers disagree: Upgrade / h2c / CONNECT,
# chunk sizes and extensions and the bytes around them, odd header names and whitespace, obs-fold, TE/CL
# combinations, HTTP/1.0 and pipelining.

DIFF = Budget(float(os.environ.get("FUZZ_DIFF_BUDGET_S", "15")))
DIFF_STATS: dict[str, int] = {}
DIFF_SEEN: dict[int, list[tuple[bytes, bytes, bytes]]] = {}  # case number -> the h11 reference
_diff_case = 0

_ODD_CHUNK_SIZE = [b"%x;ext", b"%x;a=b", b'%x;a="b c"', b"%x;a=b;c", b"%x ;a=b", b"%x; a=b", b"%X", b"0%x",
                   b"000000000000000000%x", b" %x", b"%x ", b"%x\t", b"0x%x", b"+%x", b"-%x", b"%x\x00",
                   b"%x;a=b\rc", b"%x;a\x00", b"%x;\x7f", b"%x,1"]
_ODD_CHUNK_END = [b"\n", b"\r", b"", b"\r\r\n", b" \r\n", b"\r\n\r\n", b"\n\r"]
_ODD_LAST_CHUNK = [b"0;a=b\r\n\r\n", b"000\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"0\r\nX T: 1\r\n\r\n",
                   b"0\r\nContent-Length: 5\r\n\r\n", b"0\r\nTransfer-Encoding: chunked\r\n\r\n", b"0\n\n",
                   b"0\r\n\n", b"0\r\n", b"0 \r\n\r\n", b"0\r\n\r", b"0\r\nX-T: 1\n\r\n",
                   b"0\r\n X-T: 1\r\n\r\n", b""]
_TE_VALUES = [b"Chunked", b"CHUNKED", b"chunked ", b"chunked\t", b" chunked", b"\tchunked", b"gzip, chunked",
              b"chunked, chunked", b"identity, chunked", b"chunked;a=b", b"chunked\x0b", b"xchunked",
              b"chunked, gzip", b"chunked,", b",chunked", b'"chunked"', b"identity", b"gzip"]
_CL_VALUES = [b"+%d", b" %d", b"%d ", b"0%d", b"%d, %d", b"%d,%d", b"-%d", b"0x%x", b"%d.0", b"%d\x00",
              b"%d%d"]
_ODD_HEADERS = [b"Transfer-Encoding : chunked", b"Content-Length : 0", b" Transfer-Encoding: chunked",
                b"\tContent-Length: 0", b"Transfer_Encoding: chunked", b"X-A\x00: b", b"X A: b",
                b"X-A: a\r\n b",
                b"Transfer-Encoding:\r\n chunked", b"Content-Length:\r\n 0", b"X-A:b", b"x-a:\tb\t",
                b"X-\xc3\xa4: b", b"X-A: \x7f", b": x", b"Host\t: h", b"X-A: a\rb", b"X-A: a\nb", b"X-A:\r\n",
                b"Content-Length\x00: 0", b"Transfer-Encoding\x0b: chunked", b"X-A: \xff", b"X-A: b\r\n\tc"]
_UPGRADE_CONNECTION = [b"Upgrade", b"upgrade", b"Upgrade, HTTP2-Settings", b"keep-alive, Upgrade",
                       b"UPGRADE", b"close, upgrade", b"Upgrade, close"]
_UPGRADE = [b"h2c", b"websocket", b"HTTP/2.0", b"foo/1", b"h2c, websocket", b"TLS/1.2"]
_CONNECTION_TOKENS = [b"x-raft-session, x-raft-seq", b"host", b"Host", b"content-length",
                      b"transfer-encoding", b"x-raft-consistency", b"idempotency-key", b"x-foo", b"close",
                      b"keep-alive", b"te"]


def diff_chunked(rng: random.Random, body: bytes, traits: set[str], wild: bool = True) -> bytes:
    """`body` chunked; `wild`: with an odd size line, chunk end or last chunk now and then."""
    out = bytearray()
    i = 0
    while i < len(body):
        n = rng.randint(1, len(body) - i)
        size = b"%x" % n
        if wild and rng.random() < 0.35:
            traits.add("chunk")
            form = rng.choice(_ODD_CHUNK_SIZE + [b"lie+", b"lie-"])
            size = (b"%x" % (n + 1) if form == b"lie+" else b"%x" % max(0, n - 1) if form == b"lie-"
                    else form.replace(b"%x", b"%x" % n).replace(b"%X", b"%X" % n))
        end = b"\r\n"
        if wild and rng.random() < 0.15:
            traits.add("chunk")
            end = rng.choice(_ODD_CHUNK_END)
        out += size + b"\r\n" + body[i:i + n] + end
        i += n
    last = b"0\r\n\r\n"
    if wild and rng.random() < 0.35:
        traits.add("chunk")
        last = rng.choice(_ODD_LAST_CHUNK)
    return bytes(out + last)


def diff_request(rng: random.Random, tag: bytes, traits: set[str]) -> bytes:
    """One request, its path carrying `tag`: upgrades, HTTP/1.0 and absolute targets in any request, and
    in every other one (`wild`) a few framing traps."""
    wild = rng.random() < 0.5
    method = rng.choice([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"] * 4
                        + ([b"CONNECT", b"get", b"FOO", b"TRACE"] if wild else []))
    path = b"/kv/" + tag + (b"?q=1" if rng.random() < 0.2 else b"")
    target = path
    if rng.random() < 0.1:
        traits.add("absolute")
        target = rng.choice([b"http://h.example", b"HTTP://h.example:80", b"https://h.example"]) + path
    version = b"HTTP/1.1"
    r = rng.random()
    if r < 0.15:
        traits.add("http10")
        version = b"HTTP/1.0"
    elif r < 0.18 and wild:
        version = rng.choice([b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.1 "])
    lines: list[bytes] = []
    r = rng.random() if wild else 0.0
    if r < 0.8:
        lines.append(b"Host: h.example")
    elif r < 0.87:
        traits.add("host")
        lines += [b"Host: h.example", rng.choice([b"Host: h.example", b"Host: other.example", b"host: "])]
    elif r < 0.95:
        traits.add("host")  # none
    else:
        traits.add("host")
        lines.append(rng.choice([b" Host: h.example", b"Host : h.example", b"Host: h.example, x",
                                 b"Host: a b"]))
    if rng.random() < 0.3:
        traits.add("upgrade")
        if rng.random() < 0.85:
            lines.append(b"Connection: " + rng.choice(_UPGRADE_CONNECTION))
        lines.append(b"Upgrade: " + rng.choice(_UPGRADE))
        if rng.random() < 0.3:
            lines.append(b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
    if wild and rng.random() < 0.2:
        traits.add("connection-tokens")
        lines.append(b"Connection: " + rng.choice(_CONNECTION_TOKENS))
        lines.append(rng.choice([b"X-Raft-Session: s1", b"X-Raft-Consistency: leader", b"Idempotency-Key: k",
                                 b"X-Foo: 1", b"TE: trailers"]))
    if rng.random() < 0.05:
        lines.append(rng.choice([b"Expect: 100-continue", b"Expect: 100-Continue", b"Expect: foo"]))
    for _ in range(0 if not wild else 2 if rng.random() < 0.1 else 1 if rng.random() < 0.4 else 0):
        traits.add("header-name")
        lines.append(rng.choice(_ODD_HEADERS))
    body = rng.choice([b"", b"hello", b"GET /kv/" + tag + b"-smuggled HTTP/1.1\r\nHost: h.example\r\n\r\n",
                       b"PUT /kv/" + tag + b"-smuggled HTTP/1.1\r\nHost: h.example\r\n"
                       b"Content-Length: 5\r\n\r\nPWNED", rng.randbytes(rng.randint(1, 30))])
    framing = rng.choice(["none", "length", "length", "chunked", "chunked"] + (["odd"] * 2 if wild else []))
    if framing == "none":
        body = b"" if rng.random() < 0.8 else body  # stray bytes: the next request, as both parsers see it
    elif framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = diff_chunked(rng, body, traits, wild)
    else:
        traits.add("te-cl")
        kind = rng.randrange(6)
        if kind == 0:
            lines.append(b"Transfer-Encoding: " + rng.choice(_TE_VALUES))
            body = diff_chunked(rng, body, traits)
        elif kind == 1:
            lines.append(b"Content-Length: " + rng.choice(_CL_VALUES).replace(b"%d", b"%d" % len(body))
                         .replace(b"%x", b"%x" % len(body)))
        elif kind == 2:  # CL.TE / TE.CL
            lines += [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(body)]
            body = diff_chunked(rng, body, traits)
        elif kind == 3:
            lines += [b"Content-Length: %d" % len(body),
                      b"Content-Length: %d" % rng.choice([len(body), 0, 3])]
        elif kind == 4:
            lines += [b"Transfer-Encoding: " + rng.choice([b"gzip", b"identity", b"chunked"]),
                      b"Transfer-Encoding: chunked"]
            body = diff_chunked(rng, body, traits)
        else:
            wrong = len(body) + rng.choice([-2, 3]) if body else 1
            lines.append(b"Content-Length: %d" % wrong)
    rng.shuffle(lines)
    eol = b"\r\n"
    if wild and rng.random() < 0.08:
        traits.add("eol")
        eol = rng.choice([b"\n", b"\r", b"\r\r\n"])
    head = method + b" " + target + b" " + version + eol + b"".join(line + eol for line in lines) + eol
    return head + body


def h11_reference(data: bytes) -> tuple[list[tuple[bytes, bytes, bytes]], bool]:
    """(method, target, body) of the requests h11 frames out of `data` followed by the client's half-close,
    and whether it rejected one (it reads nothing after that). Each request is read by a fresh h11 connection
    from where the last one ended, which models two things h11 does not do and RFC 9112 allows: empty lines
    before a request line are skipped (§2.2; llhttp does), and an HTTP/1.0 request with `Connection:
    keep-alive` (and no Transfer-Encoding) may be followed by another (h11 always closes after 1.0). CONNECT
    ends the stream."""
    out: list[tuple[bytes, bytes, bytes]] = []
    rest = data
    while True:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(rest.lstrip(b"\r\n"))
        conn.receive_data(b"")
        head: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                else:
                    break
        except h11.RemoteProtocolError:
            return out, True
        if not isinstance(event, h11.EndOfMessage):
            return out, False  # the client's bytes end between requests
        assert head is not None
        out.append((head.method, head.target, bytes(body)))
        if head.method == b"CONNECT":
            return out, False
        conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
        conn.send(h11.EndOfMessage())
        if conn.our_state is h11.MUST_CLOSE:
            tokens = {t.strip().lower() for k, v in head.headers if k == b"connection" for t in v.split(b",")}
            if (head.http_version != b"1.0" or b"keep-alive" not in tokens or b"close" in tokens
                    or any(k == b"transfer-encoding" for k, _ in head.headers)):
                return out, False  # (Transfer-Encoding in HTTP/1.0 is faulty framing: RFC 9112 §6.1 closes)
        rest = conn.trailing_data[0]


def _origin(target: bytes) -> bytes:
    """An absolute-form target as raftlb forwards it (origin-form, RFC 9112 §3.2.2)."""
    origin = re.sub(rb"^https?://[^/?#]*", b"", target, flags=re.IGNORECASE)
    if origin != target and not origin.startswith(b"/"):
        origin = b"/" + origin
    return origin


_TAG = re.compile(r"/kv/(\d+)-")


def _diff_state(live: LiveProxy) -> tuple[int, int, int, int]:
    def state() -> tuple[int, int, int, int]:
        srv = live.server
        proxy = srv.proxies["c1"]  # type: ignore[attr-defined]
        return (len(srv.listeners[0].connections), len(proxy.inflight), len(proxy.held),  # type: ignore[attr-defined]
                len(proxy.pools["n1"].busy))
    return live.call(state)  # type: ignore[return-value]


def _received(live: LiveProxy, case: int) -> list[tuple[bytes, bytes, bytes]]:
    """What the node received for `case`, in order."""
    node = live.node

    def pick() -> list[tuple[bytes, bytes, bytes]]:
        out = []
        for r in node.requests:  # type: ignore[attr-defined]
            m = _TAG.search(r.target)
            if m and int(m.group(1)) == case:
                out.append((r.method.encode(), r.target.encode("latin-1"), r.body))
        return out
    return live.call(pick)  # type: ignore[return-value]


def _count(key: str, n: int = 1) -> None:
    DIFF_STATS[key] = DIFF_STATS.get(key, 0) + n


@dataclass(frozen=True)
class DiffCase:
    """Requests from the differential grammar, pipelined on one connection; fully determined by `seed`."""

    seed: int
    requests: int = 1

    def build(self, number: int) -> tuple[bytes, list[bytes], set[str]]:
        rng = random.Random(self.seed)
        traits: set[str] = set()
        data = b"".join(diff_request(rng, b"%d-%d" % (number, i), traits) for i in range(self.requests))
        if self.requests > 1:
            traits.add("pipelined")
        return data, cut(rng, data), traits


def run_diff_case(live: LiveProxy, case: DiffCase) -> None:
    global _diff_case
    _diff_case += 1
    number = _diff_case
    data, pieces, traits = case.build(number)
    reference, rejected = h11_reference(data)
    DIFF_SEEN[number] = reference
    out, closed, reset = exchange(live.port, pieces, True, timeout=5.0)
    deadline = time.monotonic() + 5
    while _diff_state(live) != (0, 0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    got = _received(live, number)
    expected = [(m, _origin(t), b) for m, t, b in reference]
    where = f"{case} (case {number}): {data!r}"
    assert got == expected[:len(got)], f"{where}\nnode received {got}\nh11 frames {expected}"
    responses = check_output(out, closed, data, reset)
    ok = [r for r in responses if 200 <= r.status < 400]
    assert len(ok) <= len(got), f"{where}: answered {len(ok)} without forwarding them"
    if len(got) < len(expected) and not reset:
        # A request h11 accepts and raftlb does not forward is refused, clearly, and the stream ends there.
        assert responses and responses[-1].status >= 400, f"{where}: {expected[len(got)]} dropped silently"
    _count("cases")
    _count("forwarded", len(got))
    _count("h11_accepted", len(expected))
    if rejected:
        _count("h11_rejected")
    if responses and responses[-1].status >= 400:
        _count("refused")
    for trait in traits:
        _count(f"{trait}:cases")
        if got:
            _count(f"{trait}:forwarded")
        if rejected or (responses and responses[-1].status >= 400):
            _count(f"{trait}:refused")


DIFF_REGRESSIONS = [
    # Issue #16: h2c upgrade with a Content-Length body that is itself a request.
    b"POST /kv/{n}-0 HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: {len}\r\n\r\n"
    b"PUT /kv/{n}-smuggled HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nPWNED",
    # ... and with a chunked one, followed by a pipelined request.
    b"PUT /kv/{n}-0 HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /kv/{n}-1 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /kv/{n}-0 HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    b"DELETE /kv/{n}-1 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"CONNECT /kv/{n}-0 HTTP/1.1\r\nHost: h\r\n\r\nGET /kv/{n}-smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /kv/{n}-0 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://h/kv/{n}-0 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET http://h/kv/{n}-0 HTTP/1.1\r\n\r\n",
    b"GET /kv/{n}-0 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /kv/{n}-1 HTTP/1.1\r\nHost: h\r\n\r\n",
]


@pytest.mark.integration
@pytest.mark.parametrize("template", DIFF_REGRESSIONS, ids=range(len(DIFF_REGRESSIONS)))
def test_diff_regressions_frame_as_h11_does(live: LiveProxy, template: bytes) -> None:
    global _diff_case
    _diff_case += 1
    number = _diff_case
    data = template.replace(b"{n}", b"%d" % number)
    head, _, body = data.partition(b"\r\n\r\n")
    data = head.replace(b"{len}", b"%d" % len(body)) + b"\r\n\r\n" + body
    reference, _ = h11_reference(data)
    expected = [(m, _origin(t), b) for m, t, b in reference]
    out, closed, reset = exchange(live.port, [data], True, timeout=5.0)
    deadline = time.monotonic() + 5
    while _diff_state(live) != (0, 0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    got = _received(live, number)
    assert got == expected[:len(got)], (got, expected)
    responses = check_output(out, closed, data, reset)
    if len(got) < len(expected):
        assert responses and responses[-1].status >= 400, (responses, expected)


@pytest.mark.integration
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=st.builds(DiffCase, seed=st.integers(0, 2**32 - 1), requests=st.sampled_from([1, 1, 2, 3])))
def test_diff_raftlb_forwards_exactly_what_h11_frames(live: LiveProxy, case: DiffCase) -> None:
    if DIFF.spent():
        return
    run_diff_case(live, case)
    assert live.errors == []


@pytest.mark.integration
def test_diff_was_not_vacuous(live: LiveProxy) -> None:
    """After the differential run (file order): many cases, with each trap both forwarded and refused, and
    nothing arrived late that h11 would not have framed."""
    deadline = time.monotonic() + 5
    while _diff_state(live) != (0, 0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    for number, reference in DIFF_SEEN.items():
        got = _received(live, number)
        expected = [(m, _origin(t), b) for m, t, b in reference]
        assert got == expected[:len(got)], (number, got, expected)
    stats = DIFF_STATS
    print(f"differential: {dict(sorted(stats.items()))}")
    if DIFF.started is None:
        pytest.skip("the differential test did not run")
    assert stats.get("cases", 0) >= 300, stats
    assert stats.get("forwarded", 0) >= stats["cases"] // 3, stats
    assert stats.get("refused", 0) >= stats["cases"] // 10, stats
    assert stats.get("h11_rejected", 0) >= stats["cases"] // 20, stats
    least = max(3, stats["cases"] // 100)
    for trait in ("upgrade", "chunk", "header-name", "te-cl", "http10", "pipelined", "host", "absolute",
                  "connection-tokens"):
        assert stats.get(f"{trait}:forwarded", 0) >= least, (trait, stats)
        assert stats.get(f"{trait}:refused", 0) >= least, (trait, stats)
