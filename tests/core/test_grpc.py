"""gRPC rules: message framing over arbitrary DATA chunks, grpc-timeout, status in trailers, and the table
from raftlb's errors to gRPC status codes."""

from __future__ import annotations

import gzip
import zlib

import pytest

from raftlb import errors
from raftlb.core.grpc import (
    STATUS_FOR_ERROR,
    CallHead,
    MalformedMessage,
    Message,
    MessageReader,
    NotLeader,
    Status,
    answer_metadata,
    error_answer,
    format_timeout,
    frame,
    is_grpc,
    not_leader,
    parse_timeout,
    payload,
    percent_decode,
    percent_encode,
    read_call_head,
    read_status,
    status_for,
    status_trailers,
    trailers_only,
)

# --- framing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("payload", "compressed", "wire"), [
    (b"", False, b"\x00\x00\x00\x00\x00"),
    (b"ab", False, b"\x00\x00\x00\x00\x02ab"),
    (b"z", True, b"\x01\x00\x00\x00\x01z"),
    (b"x" * 300, False, b"\x00\x00\x00\x01\x2c" + b"x" * 300),
])
def test_frame(payload: bytes, compressed: bool, wire: bytes) -> None:
    assert frame(payload, compressed) == wire
    assert MessageReader().feed(wire) == [Message(compressed, payload)]


TWO = frame(b"first") + frame(b"", compressed=False) + frame(b"third", compressed=True)
EXPECTED = [Message(False, b"first"), Message(False, b""), Message(True, b"third")]


@pytest.mark.parametrize("chunks", [
    [TWO],  # several messages in one DATA frame
    [TWO[:1], TWO[1:]],  # a prefix split after its flag
    [TWO[:3], TWO[3:7], TWO[7:]],  # a prefix split inside its length, a payload split
    [TWO[i:i + 1] for i in range(len(TWO))],  # one byte a frame
    [b"", TWO, b""],  # empty DATA frames
])
def test_reader_reassembles_whatever_the_chunk_boundaries(chunks: list[bytes]) -> None:
    reader = MessageReader()
    got: list[Message] = []
    for chunk in chunks:
        got += reader.feed(chunk)
    assert got == EXPECTED
    assert reader.at_boundary and reader.buffered == 0 and reader.messages == 3
    reader.close()  # ended at a message boundary: fine


@pytest.mark.parametrize(("data", "status", "match"), [
    (b"\x02\x00\x00\x00\x00", Status.INTERNAL, "compressed flag 2"),
    (b"\xff\x00\x00\x00\x00", Status.INTERNAL, "compressed flag 255"),
    (b"\x00\x00\x00\x04\x01", Status.RESOURCE_EXHAUSTED, "over the 1024-byte limit"),  # 1025 bytes
    (b"\x00\xff\xff\xff\xff", Status.RESOURCE_EXHAUSTED, "4294967295-byte message"),
])
def test_reader_rejects_bad_prefixes_before_buffering(data: bytes, status: Status, match: str) -> None:
    reader = MessageReader(max_message=1024)
    with pytest.raises(MalformedMessage, match=match) as info:
        reader.feed(data)
    assert info.value.status == status


def test_a_message_at_the_limit_is_read() -> None:
    assert MessageReader(max_message=4).feed(frame(b"1234")) == [Message(False, b"1234")]


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00\x00\x03ab"])
def test_a_stream_ending_inside_a_message_is_malformed(tail: bytes) -> None:
    reader = MessageReader()
    assert reader.feed(frame(b"ok") + tail) == [Message(False, b"ok")]
    assert not reader.at_boundary
    with pytest.raises(MalformedMessage, match="ended inside a message") as info:
        reader.close()
    assert info.value.status == Status.INTERNAL


@pytest.mark.parametrize(("content_type", "grpc"), [
    ("application/grpc", True),
    ("application/grpc+proto", True),
    ("application/grpc+json", True),
    (b"application/grpc; charset=utf-8", True),
    ("Application/GRPC", True),
    ("application/grpcx", False),
    ("application/grpc-web", False),  # gRPC-Web is another protocol
    ("application/json", False),
    ("", False),
    (None, False),
])
def test_is_grpc(content_type: str | bytes | None, grpc: bool) -> None:
    assert is_grpc(content_type) is grpc


# --- grpc-timeout -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    ("1H", 3600.0),
    ("2M", 120.0),
    ("1S", 1.0),
    ("100m", 0.1),
    ("250u", 250e-6),
    ("5n", 5e-9),
    ("99999999S", 99999999.0),  # 8 digits: the most there can be
    ("00000010m", 0.01),  # leading zeros count as digits
    ("0m", 0.0),  # already expired
    (b"30S", 30.0),
    (" 3S ", 3.0),  # surrounding whitespace may be stripped (PROTOCOL-HTTP2.md)
])
def test_parse_timeout(value: str | bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    "", "S", "10", "123456789S", "1s", "1h", "1Z", "-1S", "+1S", "1 S", "1.5S", "١S", "0x1S", "1SS",
])
def test_parse_timeout_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="grpc-timeout"):
        parse_timeout(value)


@pytest.mark.parametrize(("seconds", "value"), [
    (0.0, "0n"),
    (-1.0, "0n"),
    (1e-9, "1n"),
    (0.05, "50000000n"),
    (0.5, "500000u"),  # 500,000,000 ns is 9 digits: the next unit
    (1.0, "1000000u"),
    (150.0, "150000m"),
    (1e6, "1000000S"),
    (1e9, "16666667M"),  # rounded up, never less time than there is
    (1e12, "99999999H"),  # 277,777,778 hours: the most 8 digits hold
])
def test_format_timeout(seconds: float, value: str) -> None:
    assert format_timeout(seconds) == value
    if 0 < seconds < 1e11:
        assert parse_timeout(value) >= seconds * (1 - 1e-12)


# --- status -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "encoded"), [
    ("no leader", b"no leader"),
    ("100%", b"100%25"),
    ("a\nb\tc", b"a%0Ab%09c"),
    ("caf\u00e9", b"caf%C3%A9"),
    ("\u2603", b"%E2%98%83"),
    ("~ and !\"#$&'()", b"~ and !\"#$&'()"),  # 0x20-0x7E except % stay as they are
    ("\x7f", b"%7F"),
])
def test_percent_encode(text: str, encoded: bytes) -> None:
    assert percent_encode(text) == encoded
    assert percent_decode(encoded) == text


@pytest.mark.parametrize(("value", "text"), [
    (b"50%", "50%"),  # a broken escape is kept as it is, never an error
    (b"%zz", "%zz"),
    (b"%4", "%4"),
    (b"%c3%a9", "\u00e9"),  # lower-case hex decodes too
    (b"%FF", "\ufffd"),  # not UTF-8: the replacement character
])
def test_percent_decode_is_lenient(value: bytes, text: str) -> None:
    assert percent_decode(value) == text


# raftlb error -> (gRPC status, why). UNAVAILABLE is the code gRPC clients retry: only where nothing applied.
ERROR_TABLE: list[tuple[errors.ProxyError, Status]] = [
    (errors.NoLeader("no leader within 5s"), Status.UNAVAILABLE),
    (errors.HoldQueueFull(), Status.UNAVAILABLE),
    (errors.Overloaded(), Status.UNAVAILABLE),
    (errors.UpstreamFailed(), Status.UNAVAILABLE),
    (errors.IndexNotReached(), Status.UNAVAILABLE),
    (errors.OutcomeUnknown(), Status.UNKNOWN),  # may have been applied: never retried blindly
    (errors.UpstreamTimeout(), Status.DEADLINE_EXCEEDED),
    (errors.RequestTimeout(), Status.DEADLINE_EXCEEDED),
    (errors.SessionGap(), Status.FAILED_PRECONDITION),
    (errors.BadRequest(), Status.INVALID_ARGUMENT),
    (errors.BadConsistency(), Status.INVALID_ARGUMENT),
    (errors.BadMinIndex(), Status.INVALID_ARGUMENT),
    (errors.PayloadTooLarge(), Status.RESOURCE_EXHAUSTED),
    (errors.HeadersTooLarge(), Status.RESOURCE_EXHAUSTED),
    (errors.MethodNotAllowed(), Status.UNIMPLEMENTED),
    (errors.ExpectationFailed(), Status.UNIMPLEMENTED),
    (errors.VersionNotSupported(), Status.UNIMPLEMENTED),
    (errors.ProxyError(), Status.INTERNAL),
]


@pytest.mark.parametrize(("error", "status"), ERROR_TABLE, ids=lambda v: getattr(v, "code", None))
def test_status_for_error(error: errors.ProxyError, status: Status) -> None:
    assert status_for(error) == status


def _subclasses(cls: type[errors.ProxyError]) -> list[type[errors.ProxyError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def test_every_raftlb_error_has_a_row() -> None:
    codes = {c.code for c in _subclasses(errors.ProxyError) if c.__module__ == errors.__name__}
    assert codes == set(STATUS_FOR_ERROR)
    assert codes == {e.code for e, _ in ERROR_TABLE}


@pytest.mark.parametrize(("http", "status"), [
    (400, Status.INTERNAL), (404, Status.UNIMPLEMENTED), (418, Status.UNKNOWN), (503, Status.UNAVAILABLE),
])
def test_an_unknown_error_code_falls_back_to_its_http_status(http: int, status: Status) -> None:
    class Other(errors.ProxyError):
        code = "something_new"

    Other.status = http
    assert status_for(Other()) == status


def test_error_answer_is_trailers_only_and_names_the_raftlb_code() -> None:
    answer = error_answer(errors.NoLeader("no leader within 5s", retry_after=2), ((b"x-raft-node", b""),))
    assert answer == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"raftlb no_leader: no leader within 5s"),
        (b"grpc-retry-pushback-ms", b"2000"),
        (b"x-raft-node", b""),
    ]
    assert error_answer(errors.OutcomeUnknown("conn reset after send, 100% sent")) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"2"),
        (b"grpc-message", b"raftlb outcome_unknown: conn reset after send, 100%25 sent"),
    ]
    assert error_answer(errors.IndexNotReached())[2:] == [
        (b"grpc-status", b"14"), (b"grpc-message", b"raftlb index_not_reached")]
    # A stream whose headers went out (a Watch whose member died) ends with trailers alone.
    assert error_answer(errors.UpstreamFailed("node n2 is down"), headers_sent=True) == [
        (b"grpc-status", b"14"), (b"grpc-message", b"raftlb upstream_failed: node n2 is down")]


def test_trailers() -> None:
    assert status_trailers(Status.OK) == [(b"grpc-status", b"0")]
    assert status_trailers(0, "", ((b"x-raft-index", b"42"),)) == [
        (b"grpc-status", b"0"), (b"x-raft-index", b"42")]
    assert trailers_only(Status.UNIMPLEMENTED, "no such method") == [
        (b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"12"),
        (b"grpc-message", b"no such method")]


@pytest.mark.parametrize(("headers", "http", "status", "message"), [
    ([(b"grpc-status", b"0")], 200, 0, ""),
    ([(b"grpc-status", b"14"), (b"grpc-message", b"etcdserver: no leader")], 200, 14,
     "etcdserver: no leader"),
    ([(b"grpc-status", b"3"), (b"grpc-message", b"a%20b")], 200, 3, "a b"),
    ([], 200, Status.UNKNOWN, "no grpc-status in the trailers"),
    ([(b"grpc-status", b"x")], 200, Status.UNKNOWN, "no grpc-status in the trailers"),
    ([(b"grpc-status", b"-1")], 200, Status.UNKNOWN, "no grpc-status in the trailers"),
    ([], 503, Status.UNAVAILABLE, "HTTP 503"),
    ([(b"grpc-status", b"0")], 404, Status.UNIMPLEMENTED, "HTTP 404"),  # a non-200 is never OK
    ([], 500, Status.UNKNOWN, "HTTP 500"),
])
def test_read_status(headers: list[tuple[bytes, bytes]], http: int, status: int, message: str) -> None:
    got = read_status(headers, trailers_only_answer=True, http_status=http)
    assert (got.status, got.message, got.trailers_only) == (status, message, True)


@pytest.mark.parametrize(("headers", "verdict"), [
    ([(b"grpc-status", b"14"), (b"x-raft-leader", b"n2"), (b"x-raft-term", b"7")], NotLeader("n2", 7)),
    ([(b"grpc-status", b"14"), (b"x-raft-leader", b"")], NotLeader(None, None)),  # knows no leader
    ([(b"grpc-status", b"14"), (b"x-raft-leader", b"n2"), (b"x-raft-term", b"x")], NotLeader("n2", None)),
    ([(b"grpc-status", b"14")], None),  # UNAVAILABLE alone: not proof that nothing was applied
    ([(b"grpc-status", b"2"), (b"x-raft-leader", b"n2")], None),  # only UNAVAILABLE means "not applied"
    ([(b"grpc-status", b"0"), (b"x-raft-leader", b"n1")], None),
])
def test_not_leader(headers: list[tuple[bytes, bytes]], verdict: NotLeader | None) -> None:
    assert not_leader(headers) == verdict


# --- the call's head --------------------------------------------------------------------------------------

BASE = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/etcdserverpb.KV/Range"),
        (b":authority", b"raftlb"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]


@pytest.mark.parametrize(("extra", "expected"), [
    ([], CallHead("/etcdserverpb.KV/Range")),
    ([(b"grpc-timeout", b"100m")], CallHead("/etcdserverpb.KV/Range", timeout=0.1)),
    ([(b"x-raft-min-index", b"42"), (b"x-raft-min-index", b"7")],  # the first one counts
     CallHead("/etcdserverpb.KV/Range", min_index=42)),
    ([(b"x-raft-min-index", b"18446744073709551615")],
     CallHead("/etcdserverpb.KV/Range", min_index=2**64 - 1)),
    ([(b"x-raft-consistency", b"leader")], CallHead("/etcdserverpb.KV/Range", consistency="leader")),
    ([(b"x-raft-session", b"s1"), (b"x-raft-seq", b"3")],
     CallHead("/etcdserverpb.KV/Range", session=b"s1", seq=3)),
    ([(b"x-raft-seq", b"x")], CallHead("/etcdserverpb.KV/Range")),  # a seq without a session: not read
])
def test_read_call_head(extra: list[tuple[bytes, bytes]], expected: CallHead) -> None:
    assert read_call_head(BASE + extra) == expected


@pytest.mark.parametrize(("headers", "code", "status"), [
    (BASE + [(b"grpc-timeout", b"1x")], "bad_request", Status.INVALID_ARGUMENT),
    (BASE + [(b"grpc-timeout", b"123456789S")], "bad_request", Status.INVALID_ARGUMENT),
    (BASE + [(b"x-raft-min-index", b"-1")], "bad_min_index", Status.INVALID_ARGUMENT),
    (BASE + [(b"x-raft-min-index", b"18446744073709551616")], "bad_min_index", Status.INVALID_ARGUMENT),
    (BASE + [(b"x-raft-session", b"s"), (b"x-raft-seq", b"1.5")], "bad_request", Status.INVALID_ARGUMENT),
    ([(b":method", b"GET"), *BASE[1:]], "bad_request", Status.INVALID_ARGUMENT),
])
def test_read_call_head_refuses(headers: list[tuple[bytes, bytes]], code: str, status: Status) -> None:
    refused = read_call_head(headers).refused
    assert refused is not None and refused.code == code and status_for(refused) == status


def test_answer_metadata() -> None:
    assert answer_metadata(42, "n2") == ((b"x-raft-index", b"42"), (b"x-raft-node", b"n2"))
    assert answer_metadata(None, "n2") == ((b"x-raft-node", b"n2"),)


# --- compressed messages ----------------------------------------------------------------------------------

RANGE = b"\x0a\x03foo\x38\x01"


@pytest.mark.parametrize(("message", "encoding", "expected"), [
    (Message(False, RANGE), None, RANGE),
    (Message(False, RANGE), b"gzip", RANGE),  # the flag says whether this message is compressed
    (Message(True, gzip.compress(RANGE)), b"gzip", RANGE),
    (Message(True, gzip.compress(RANGE)), b" GZIP ", RANGE),
    (Message(True, zlib.compress(RANGE)), b"deflate", RANGE),
    (Message(True, gzip.compress(b"")), b"gzip", b""),
])
def test_payload(message: Message, encoding: bytes | None, expected: bytes) -> None:
    assert payload(message, encoding) == expected


@pytest.mark.parametrize(("message", "encoding", "status", "match"), [
    (Message(True, RANGE), None, Status.INTERNAL, "without a grpc-encoding"),
    (Message(True, RANGE), b"identity", Status.INTERNAL, "without a grpc-encoding"),
    (Message(True, RANGE), b"snappy", Status.UNIMPLEMENTED, "'snappy' is not one raftlb reads"),
    (Message(True, b"not gzip"), b"gzip", Status.INTERNAL, "does not decompress"),
    (Message(True, gzip.compress(RANGE)[:-12]), b"gzip", Status.INTERNAL, "truncated gzip"),
    (Message(True, gzip.compress(b"\0" * 10_000_000)), b"gzip", Status.RESOURCE_EXHAUSTED, "past the 1024"),
])
def test_payload_refuses(message: Message, encoding: bytes | None, status: Status, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match) as info:
        payload(message, encoding, limit=1024)
    assert info.value.status == status
