"""gRPC's rules over HTTP/2, as pure functions: message framing, `grpc-timeout`, and status in trailers.

From gRPC's protocol definition (PROTOCOL-HTTP2.md in grpc/grpc) and its status codes:
- a gRPC body is a run of Length-Prefixed-Messages: a 1-byte compressed flag (0 or 1), a 4-byte big-endian
  length, the message. DATA frame boundaries have no relation to message boundaries: `MessageReader`
  reassembles messages split across frames and splits frames that hold several.
- `grpc-timeout` is at most 8 digits and a unit (H M S m u n).
- an answer ends with trailers holding `grpc-status` (decimal, no leading zeros) and an optional
  `grpc-message` (UTF-8, percent-encoded); an immediate error is a single HEADERS frame, *Trailers-Only*:
  `:status 200`, `content-type`, `grpc-status`, `grpc-message`.

raftlb's own errors (raftlb/errors.py) become a gRPC status by `STATUS_FOR_ERROR`, chosen so a gRPC client's
own retry rules do the right thing: UNAVAILABLE (the code gRPC clients retry, "possibly elsewhere") only
where nothing was applied; an ambiguous write is UNKNOWN, never UNAVAILABLE. The table is in
docs/protocol.md (the gRPC form of the contract).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from enum import IntEnum

from raftlb.errors import BadMinIndex, BadRequest, ProxyError


class Status(IntEnum):
    """gRPC status codes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


CONTENT_TYPE = b"application/grpc"
PREFIX_SIZE = 5  # compressed flag + 4-byte length
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default receive limit

# raftlb error code -> gRPC status. Every ProxyError subclass has a row (a test checks it).
STATUS_FOR_ERROR: dict[str, Status] = {
    # Nothing was sent to a node, or nothing was applied: safe to retry, so the retryable code.
    "no_leader": Status.UNAVAILABLE,
    "hold_queue_full": Status.UNAVAILABLE,  # a NoLeader: the hold budget ran out while there was no leader
    "overloaded": Status.UNAVAILABLE,
    "upstream_failed": Status.UNAVAILABLE,  # only reads get it (a failed write is outcome_unknown)
    "index_not_reached": Status.UNAVAILABLE,  # a read not served: another try (maybe elsewhere) may be
    # A write that may or may not have been applied: UNKNOWN, which clients do not retry on their own.
    "outcome_unknown": Status.UNKNOWN,
    "upstream_timeout": Status.DEADLINE_EXCEEDED,  # a read's node did not answer in time
    "request_timeout": Status.DEADLINE_EXCEEDED,
    "session_seq_gap": Status.FAILED_PRECONDITION,  # an earlier request of the session must arrive first
    "bad_request": Status.INVALID_ARGUMENT,
    "bad_consistency": Status.INVALID_ARGUMENT,
    "bad_min_index": Status.INVALID_ARGUMENT,
    "payload_too_large": Status.RESOURCE_EXHAUSTED,  # gRPC's code for a message over the size limit
    "headers_too_large": Status.RESOURCE_EXHAUSTED,
    "method_not_allowed": Status.UNIMPLEMENTED,
    "expectation_failed": Status.UNIMPLEMENTED,
    "http_version_not_supported": Status.UNIMPLEMENTED,
    "internal_error": Status.INTERNAL,
}

# An HTTP status with no gRPC status beside it (a non-gRPC answer from a node), as gRPC clients map it
# (grpc/grpc doc/http-grpc-status-mapping.md); anything else is UNKNOWN.
STATUS_FOR_HTTP: dict[int, Status] = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}


def status_name(code: int) -> str:
    """A status code's name (UNAVAILABLE), or `CODE_<n>` for one outside the 17 gRPC defines (a bounded
    label: a node cannot make up new values beyond 0..999)."""
    try:
        return Status(code).name
    except ValueError:
        return f"CODE_{code}"


class MalformedMessage(ValueError):
    """A gRPC body that breaks the framing rules. `status` is what the call ends with: INTERNAL for bad
    framing (gRPC's code for an unparsable request), RESOURCE_EXHAUSTED for a message over the limit."""

    def __init__(self, message: str, status: Status = Status.INTERNAL) -> None:
        super().__init__(message)
        self.status = status


def is_grpc(content_type: bytes | str | None) -> bool:
    """Whether a content-type is gRPC's: `application/grpc`, `application/grpc+proto`, `...;params`."""
    if content_type is None:
        return False
    ct = content_type.encode("latin-1") if isinstance(content_type, str) else content_type
    ct = ct.strip().lower()
    return ct == CONTENT_TYPE or (ct.startswith(CONTENT_TYPE) and ct[len(CONTENT_TYPE)] in b"+;")


# --- messages ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Message:
    """One Length-Prefixed-Message: its payload and whether it is compressed (by `grpc-encoding`)."""

    compressed: bool
    payload: bytes


def frame(payload: bytes, compressed: bool = False) -> bytes:
    """A Length-Prefixed-Message."""
    if len(payload) >= 1 << 32:
        raise ValueError("a gRPC message is at most 2^32 - 1 bytes")
    return (b"\x01" if compressed else b"\x00") + len(payload).to_bytes(4, "big") + payload


class MessageReader:
    """Reassembles Length-Prefixed-Messages from DATA frames, whatever their boundaries.

        reader = MessageReader(max_message=4 << 20)
        for chunk in data_frames:
            for msg in reader.feed(chunk): ...
        reader.close()   # at END_STREAM: MalformedMessage if a message was cut short

    A message's declared length is checked against `max_message` as soon as its 5-byte prefix is in,
    before its bytes are buffered, so a peer cannot make raftlb hold more than one limit's worth."""

    __slots__ = ("max_message", "_buf", "_need", "_compressed", "messages")

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._need = -1  # the payload length of the message being read; -1: its prefix is not complete
        self._compressed = False
        self.messages = 0  # messages read so far

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes so far end exactly after a message (where a stream may end)."""
        return not self._buf and self._need < 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """The messages completed by `data` (none, one or several). MalformedMessage on a bad prefix."""
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        pos = 0
        while True:
            if self._need < 0:
                if len(buf) - pos < PREFIX_SIZE:
                    break
                flag = buf[pos]
                if flag > 1:
                    raise MalformedMessage(f"compressed flag {flag} (only 0 and 1 exist)")
                size = int.from_bytes(buf[pos + 1:pos + 5], "big")
                if size > self.max_message:
                    raise MalformedMessage(f"a {size}-byte message is over the {self.max_message}-byte limit",
                                           Status.RESOURCE_EXHAUSTED)
                self._compressed = flag == 1
                self._need = size
                pos += PREFIX_SIZE
            if len(buf) - pos < self._need:
                break
            out.append(Message(self._compressed, bytes(buf[pos:pos + self._need])))
            pos += self._need
            self._need = -1
            self.messages += 1
        if pos:
            del buf[:pos]
        return out

    def close(self) -> None:
        """The stream ended (END_STREAM): MalformedMessage if it ended inside a message."""
        if not self.at_boundary:
            raise MalformedMessage(f"the stream ended inside a message ({self.buffered} bytes of it in)")


def payload(message: Message, encoding: bytes | None, limit: int = DEFAULT_MAX_MESSAGE) -> bytes:
    """A message's bytes as the sender encoded them, for raftlb to read a field of: as they are when not
    compressed; gunzipped or inflated by the call's `grpc-encoding` (gzip, deflate), never past `limit`
    bytes (a small compressed message cannot make raftlb hold a large one). MalformedMessage for a
    compressed message without a known encoding (INTERNAL; UNIMPLEMENTED for an encoding raftlb lacks), a
    corrupt one (INTERNAL) or one over the limit (RESOURCE_EXHAUSTED)."""
    if not message.compressed:
        return message.payload
    name = (encoding or b"identity").strip().lower()
    if name == b"gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif name == b"deflate":
        inflater = zlib.decompressobj()
    elif name == b"identity":
        raise MalformedMessage("a compressed message in a call without a grpc-encoding")
    else:
        raise MalformedMessage(f"grpc-encoding {name[:32].decode('latin-1')!r} is not one raftlb reads",
                               Status.UNIMPLEMENTED)
    try:
        out = inflater.decompress(message.payload, limit + 1)
    except zlib.error as exc:
        raise MalformedMessage(f"a {name.decode()} message that does not decompress: {exc}") from None
    if len(out) > limit:
        raise MalformedMessage(f"a message that decompresses past the {limit}-byte limit",
                               Status.RESOURCE_EXHAUSTED)
    if not inflater.eof:
        raise MalformedMessage(f"a truncated {name.decode()} message")
    return out


# --- grpc-timeout -----------------------------------------------------------------------------------------

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str | bytes) -> float:
    """`grpc-timeout` in seconds: 1 to 8 ASCII digits and a unit. ValueError otherwise (a sign, spaces
    inside, 9 digits, an unknown unit). 0 is accepted: the deadline has already passed."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    digits, unit = text[:-1], text[-1:]
    if not 1 <= len(digits) <= 8 or not (digits.isascii() and digits.isdigit()) or unit not in _TIMEOUT_UNITS:
        raise ValueError(f"grpc-timeout: {text[:32]!r} is not 1-8 digits and one of H M S m u n")
    return int(digits) * _TIMEOUT_UNITS[unit]


def format_timeout(seconds: float) -> str:
    """A `grpc-timeout` for the time left (what raftlb sends a node): the finest unit that fits in 8 digits,
    rounded up so a node never gets less time than there is (≥ 1 ns; a non-positive time is `0n`)."""
    if seconds <= 0:
        return "0n"
    # Whole nanoseconds first (a float like 0.5 / 1e-6 is not exactly 500000), then integer ceilings.
    ns = max(math.ceil(seconds * 1e9 - 1e-3), 1)
    for unit, scale in (("n", 1), ("u", 10**3), ("m", 10**6), ("S", 10**9), ("M", 60 * 10**9),
                        ("H", 3600 * 10**9)):
        count = -(-ns // scale)
        if count < 100_000_000:
            return f"{count}{unit}"
    return "99999999H"


# --- status -----------------------------------------------------------------------------------------------

_UNRESERVED = frozenset(range(0x20, 0x7F)) - {0x25}  # space and VCHAR, except '%'


def percent_encode(message: str) -> bytes:
    """A `grpc-message` value: UTF-8, then every byte outside space..'~' (and '%' itself) as %XX."""
    out = bytearray()
    for b in message.encode("utf-8"):
        if b in _UNRESERVED:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def percent_decode(value: bytes) -> str:
    """A `grpc-message` as text. Lenient, as the spec asks: a broken %-escape is kept as it is, invalid
    UTF-8 becomes U+FFFD; never an error."""
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        b = value[i]
        if b == 0x25 and i + 2 < n and _is_hex(value[i + 1:i + 3]):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(two: bytes) -> bool:
    return len(two) == 2 and all(c in b"0123456789abcdefABCDEF" for c in two)


def status_for(error: ProxyError) -> Status:
    """The gRPC status of one of raftlb's own errors: its row in STATUS_FOR_ERROR, else by its HTTP status."""
    status = STATUS_FOR_ERROR.get(error.code)
    if status is None:
        status = STATUS_FOR_HTTP.get(error.status, Status.UNKNOWN)
    return status


def error_message(error: ProxyError) -> str:
    """The `grpc-message` of one of raftlb's errors: `raftlb <code>` and its detail, so a client's log names
    the raftlb error code (the same stable code the HTTP answer's JSON body carries)."""
    return f"raftlb {error.code}: {error.detail}" if error.detail else f"raftlb {error.code}"


Headers = list[tuple[bytes, bytes]]


def status_trailers(status: Status | int, message: str = "",
                    metadata: tuple[tuple[bytes, bytes], ...] = ()) -> Headers:
    """Trailers ending a call whose answer headers were sent: `grpc-status`, `grpc-message`, metadata."""
    out: Headers = [(b"grpc-status", b"%d" % int(status))]
    if message:
        out.append((b"grpc-message", percent_encode(message)))
    out.extend(metadata)
    return out


def trailers_only(status: Status | int, message: str = "",
                  metadata: tuple[tuple[bytes, bytes], ...] = ()) -> Headers:
    """A Trailers-Only answer (one HEADERS frame, END_STREAM): an immediate error, or an OK with no
    messages. `:status` is 200 even for errors: gRPC carries its status in `grpc-status`."""
    return [(b":status", b"200"), (b"content-type", CONTENT_TYPE),
            *status_trailers(status, message, metadata)]


def error_answer(error: ProxyError, metadata: tuple[tuple[bytes, bytes], ...] = (), *,
                 headers_sent: bool = False) -> Headers:
    """The Trailers-Only answer for one of raftlb's errors, or with `headers_sent` (a stream whose answer
    headers went out: a Watch whose member died) the trailers that end it. An error that tells the client
    when to retry (no leader: `Retry-After` in HTTP) carries it as `grpc-retry-pushback-ms`, gRPC's retry
    hint."""
    extra = metadata
    if error.retry_after is not None:
        extra = ((b"grpc-retry-pushback-ms", b"%d" % (error.retry_after * 1000)), *metadata)
    if headers_sent:
        return status_trailers(status_for(error), error_message(error), extra)
    return trailers_only(status_for(error), error_message(error), extra)


@dataclass(frozen=True, slots=True)
class CallStatus:
    """The end of a call as a node gave it: its gRPC status, message and whether it was Trailers-Only."""

    status: int
    message: str
    trailers_only: bool


def read_status(headers: Headers, *, trailers_only_answer: bool, http_status: int = 200) -> CallStatus:
    """The status a node ended a call with, from its trailers (or its Trailers-Only headers). Without a
    parsable `grpc-status` the status is synthesized from the HTTP status, as gRPC clients do (a non-200
    answer is mapped by STATUS_FOR_HTTP, a 200 without a status is UNKNOWN)."""
    status: int | None = None
    message = b""
    for name, value in headers:
        if name == b"grpc-status":
            text = value.strip()
            status = int(text) if text.isdigit() and len(text) <= 3 else None
        elif name == b"grpc-message":
            message = value
    if http_status != 200:
        return CallStatus(STATUS_FOR_HTTP.get(http_status, Status.UNKNOWN), f"HTTP {http_status}",
                          trailers_only_answer)
    if status is None:
        return CallStatus(Status.UNKNOWN, "no grpc-status in the trailers", trailers_only_answer)
    return CallStatus(status, percent_decode(message), trailers_only_answer)


@dataclass(frozen=True, slots=True)
class NotLeader:
    """A native node's "not the leader" answer (docs/protocol.md, the gRPC form of the contract): the
    leader it knows (None: none) and the term it answered at (None: not given)."""

    leader: str | None
    term: int | None


def not_leader(headers: Headers) -> NotLeader | None:
    """Whether a node's Trailers-Only answer says "not the leader, nothing applied": `grpc-status` 14
    (UNAVAILABLE) with an `x-raft-leader` entry (possibly empty). Any other answer is None: an UNAVAILABLE
    without `x-raft-leader` is not proof that nothing was applied (gRPC libraries make it for broken
    connections too). A term that is not a decimal integer is ignored."""
    status = leader = term = None
    for name, value in headers:
        if name == b"grpc-status":
            status = value.strip()
        elif name == b"x-raft-leader":
            leader = value.strip().decode("latin-1")
        elif name == b"x-raft-term":
            term = value.strip()
    if status != b"14" or leader is None:
        return None
    return NotLeader(leader or None, int(term) if term is not None and term.isdigit() else None)


# --- the call's head --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CallHead:
    """What raftlb reads of a gRPC call's request headers. `refused` is the error the call ends with at once
    (a malformed value raftlb would act on), or None."""

    path: str
    timeout: float | None = None  # seconds from `grpc-timeout`; None: no deadline
    min_index: int | None = None  # `x-raft-min-index`
    consistency: str | None = None  # `x-raft-consistency`
    session: bytes | None = None  # `x-raft-session`
    seq: int | None = None  # `x-raft-seq`
    refused: ProxyError | None = None


def read_call_head(headers: Headers) -> CallHead:
    """The values raftlb acts on in a gRPC call's headers (the first of each), checked as the HTTP/1 path
    checks its headers: `x-raft-min-index` and `x-raft-seq` non-negative decimal integers (below 2^64),
    `grpc-timeout` by `parse_timeout`, `:method` POST (gRPC has no other)."""
    path = method = timeout = token = consistency = session = seq = None
    for name, value in headers:
        if name == b":path":
            path = path or value
        elif name == b":method":
            method = method or value
        elif name == b"grpc-timeout":
            timeout = timeout or value
        elif name == b"x-raft-min-index":
            token = token or value
        elif name == b"x-raft-consistency":
            consistency = consistency or value
        elif name == b"x-raft-session":
            session = session or value
        elif name == b"x-raft-seq":
            seq = seq or value
    refused: ProxyError | None = None
    seconds = None
    if method != b"POST":
        refused = BadRequest(f"a gRPC call is a POST, not {(method or b'').decode('latin-1')[:16]!r}")
    if timeout is not None:
        try:
            seconds = parse_timeout(timeout)
        except ValueError as exc:
            refused = refused or BadRequest(str(exc))
    min_index = _decimal(token)
    if token is not None and min_index is None:
        refused = refused or BadMinIndex(f"x-raft-min-index must be a non-negative decimal integer, got "
                                         f"{token[:32].decode('latin-1')!r}")
    seq_value = _decimal(seq)
    if session is not None and seq is not None and seq_value is None:
        refused = refused or BadRequest(f"x-raft-seq must be a non-negative decimal integer, got "
                                        f"{seq[:32].decode('latin-1')!r}")
    q = (path or b"").find(b"?")
    return CallHead(
        path=(path[:q] if path is not None and q >= 0 else path or b"").decode("latin-1"),
        timeout=seconds,
        min_index=min_index,
        consistency=consistency.decode("latin-1") if consistency is not None else None,
        session=session,
        seq=seq_value,
        refused=refused,
    )


def _decimal(value: bytes | None) -> int | None:
    """A non-negative decimal integer below 2^64, or None."""
    if value is None or not (value.isdigit() and len(value) <= 20):
        return None
    number = int(value)
    return number if number < 1 << 64 else None


def answer_metadata(index: int | None, node: str) -> tuple[tuple[bytes, bytes], ...]:
    """The metadata raftlb adds to an answer's headers: the index it reflects (if known) and the node."""
    node_entry = (b"x-raft-node", node.encode("latin-1"))
    return ((b"x-raft-index", b"%d" % index), node_entry) if index is not None else (node_entry,)
