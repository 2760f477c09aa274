"""Hostile HTTP/2 clients over real sockets: frames built by hand (hyperframe, hpack, or raw bytes for what
hyperframe refuses to build), and `H2Probe`, a connection that records every frame the server sends back
(GOAWAY, RST_STREAM, response heads, DATA) and whether, and how, the connection ended.

The probe parses what it receives with hyperframe itself, not with h2's client state machine: an attacker
breaks the protocol on purpose, and a client state machine would refuse to read the server's answer to it.
It is an asyncio.Protocol rather than a StreamReader, because a StreamReader raises a connection reset before
handing over the bytes that came ahead of it (a GOAWAY followed by the server's RST would be lost).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable
from typing import cast

from h2.errors import ErrorCodes
from hpack import Decoder, Encoder
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags, for frames built as raw bytes.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = range(6)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"",
              length: int | None = None) -> bytes:
    """A frame as bytes, whatever it says (a stream id of 0 on DATA, a length that is not the payload's)."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def request_headers(path: str = "/kv/h2-attack", method: str = "GET",
                    extra: Iterable[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    """A request's header list, pseudo-headers first."""
    return [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
            (b":authority", b"raftlb.test"), *extra]


def settings(values: dict[int, int] | None = None) -> bytes:
    """A SETTINGS frame."""
    frame = SettingsFrame(0)
    frame.settings = dict(values or {})
    return bytes(frame.serialize())


def ping(opaque: bytes = b"h2attack") -> bytes:
    """A PING frame (not an ACK)."""
    return bytes(PingFrame(0, opaque_data=opaque).serialize())


def rst_stream(stream_id: int, code: int = ErrorCodes.CANCEL) -> bytes:
    """A RST_STREAM frame."""
    frame = RstStreamFrame(stream_id)
    frame.error_code = code
    return bytes(frame.serialize())


def window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame (increment 0 and overflows included: built by hand)."""
    return raw_frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment & 0x7FFFFFFF))


def data(stream_id: int, payload: bytes, end: bool = False) -> bytes:
    """A DATA frame."""
    frame = DataFrame(stream_id, flags=["END_STREAM"] if end else [])
    frame.data = payload
    return bytes(frame.serialize())


def headers(stream_id: int, block: bytes, *, end_stream: bool = True, end_headers: bool = True) -> bytes:
    """A HEADERS frame carrying an already encoded header block (or a piece of one)."""
    flags = (["END_STREAM"] if end_stream else []) + (["END_HEADERS"] if end_headers else [])
    frame = HeadersFrame(stream_id, flags=flags)
    frame.data = block
    return bytes(frame.serialize())


def continuation(stream_id: int, block: bytes, end_headers: bool = False) -> bytes:
    """A CONTINUATION frame."""
    frame = ContinuationFrame(stream_id, flags=["END_HEADERS"] if end_headers else [])
    frame.data = block
    return bytes(frame.serialize())


def header_block_frames(stream_id: int, block: bytes, *, end_stream: bool = True,
                        max_frame: int = 16384) -> bytes:
    """A header block of any size as HEADERS + CONTINUATIONs within the default frame size."""
    pieces = [block[i:i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    out = [headers(stream_id, pieces[0], end_stream=end_stream, end_headers=len(pieces) == 1)]
    for i, piece in enumerate(pieces[1:], 2):
        out.append(continuation(stream_id, piece, end_headers=i == len(pieces)))
    return b"".join(out)


class H2Probe(asyncio.Protocol):
    """One client connection that speaks HTTP/2 as told and records what the server says back."""

    def __init__(self, client_settings: dict[int, int] | None = None) -> None:
        self.client_settings = client_settings or {}
        self.transport: asyncio.Transport | None = None
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.buf = bytearray()
        self.frames: list[Frame] = []
        self.goaway: GoAwayFrame | None = None
        self.resets: dict[int, int] = {}  # stream id -> RST_STREAM error code
        self.status: dict[int, int] = {}  # stream id -> the response's :status
        self.body: dict[int, bytearray] = {}
        self.ended: set[int] = set()  # streams the server ended (END_STREAM)
        self.garbage = ""  # what the server sent that is not HTTP/2, if anything
        self.error: Exception | None = None  # how the connection ended (None: a clean close)
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()
        self.next_stream = 1
        self._header_block: tuple[int, bytearray] | None = None

    @classmethod
    async def open(cls, port: int, client_settings: dict[int, int] | None = None,
                   timeout: float = 10.0) -> H2Probe:
        """Connect and send the preface and the client's SETTINGS."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, probe = await loop.create_connection(lambda: cls(client_settings), "127.0.0.1", port)
        return probe

    # -- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports do not subclass it)
        self.transport.write(PREFACE + settings(self.client_settings))

    def data_received(self, chunk: bytes) -> None:
        self.buf += chunk
        while len(self.buf) >= 9 and not self.garbage:
            try:
                frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            except HyperframeError as exc:
                self.garbage = f"bad frame header {bytes(self.buf[:9])!r}: {exc}"
                break
            if len(self.buf) < 9 + length:
                break
            try:
                frame.parse_body(memoryview(self.buf[9:9 + length]))
            except HyperframeError as exc:
                self.garbage = f"bad {type(frame).__name__}: {exc}"
            del self.buf[:9 + length]
            self._on_frame(frame)
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self.closed.set()
        self.changed.set()

    def _on_frame(self, frame: Frame) -> None:
        self.frames.append(frame)
        sid = frame.stream_id
        if isinstance(frame, GoAwayFrame):
            self.goaway = frame
        elif isinstance(frame, RstStreamFrame):
            self.resets[sid] = frame.error_code
        elif isinstance(frame, (HeadersFrame, ContinuationFrame)):
            if isinstance(frame, HeadersFrame):
                self._header_block = (sid, bytearray())
                if "END_STREAM" in frame.flags:
                    self.ended.add(sid)
            if self._header_block is not None:
                self._header_block[1].extend(frame.data)
                if "END_HEADERS" in frame.flags:
                    self._on_head(*self._header_block)
                    self._header_block = None
        elif isinstance(frame, DataFrame):
            self.body.setdefault(sid, bytearray()).extend(frame.data)
            if "END_STREAM" in frame.flags:
                self.ended.add(sid)

    def _on_head(self, sid: int, block: bytearray) -> None:
        decoded = dict(self.decoder.decode(bytes(block), raw=True))
        status = decoded.get(b":status")
        if status is not None and sid not in self.status:  # (trailers carry no :status)
            self.status[sid] = int(status)

    # -- sending -----------------------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Write bytes as they are (nothing once the connection is gone)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(payload)

    def encode(self, header_list: list[tuple[bytes, bytes]]) -> bytes:
        """A header block in this connection's HPACK context."""
        return bytes(self.encoder.encode(header_list))

    def request(self, path: str = "/kv/h2-attack", method: str = "GET",
                extra: Iterable[tuple[bytes, bytes]] = (), body: bytes | None = None) -> int:
        """Open the next stream with a whole request; its stream id."""
        sid = self.next_stream
        self.next_stream += 2
        self.send(header_block_frames(sid, self.encode(request_headers(path, method, extra)),
                                      end_stream=body is None))
        if body is not None:
            self.send(data(sid, body, end=True))
        return sid

    def close(self) -> None:
        """Close our side (a clean FIN, if nothing is left unread)."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- waiting -----------------------------------------------------------------------------------------

    async def wait(self, check: Callable[[], bool], timeout: float = 15.0) -> bool:
        """Wait until `check()` is true or the connection is gone; whether `check()` is true then."""
        try:
            async with asyncio.timeout(timeout):
                while not check():
                    if self.closed.is_set():
                        break
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pass
        return bool(check())

    async def wait_closed(self, timeout: float = 15.0) -> bool:
        """Wait for the server to end the connection; whether it did within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self.closed.wait()
        except TimeoutError:
            return False
        return True

    @property
    def goaway_code(self) -> int | None:
        return None if self.goaway is None else self.goaway.error_code

    def summary(self) -> str:
        """What the server said, for failure messages."""
        kinds: dict[str, int] = {}
        for f in self.frames:
            kinds[type(f).__name__] = kinds.get(type(f).__name__, 0) + 1
        statuses = sorted(set(self.status.values()))
        return (f"goaway={self.goaway_code} resets={len(self.resets)} statuses={statuses} "
                f"frames={kinds} closed={self.closed.is_set()} error={self.error!r} garbage={self.garbage!r}")
