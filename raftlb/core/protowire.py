"""The protobuf wire format, as little of it as raftlb reads: varints and length-delimited fields.

raftlb never decodes whole messages (no generated stubs in the data path): it reads one or two fields of a
gRPC request or answer (etcd's `RangeRequest.serializable`, the `ResponseHeader.revision` of an answer) and
skips the rest. Every read is bounds-checked: a malformed or truncated message raises `ProtoError`, it never
loops, and it never reads past the end of the buffer.

Wire types (protobuf encoding spec): 0 varint, 1 fixed 64-bit, 2 length-delimited, 5 fixed 32-bit. 3 and 4
(groups, deprecated) are not skipped: no proto3 message has them, so seeing one means the bytes are not the
message raftlb expects.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT = 0
FIXED64 = 1
LEN = 2
FIXED32 = 5

MAX_FIELD = (1 << 29) - 1  # field numbers are 29 bits
_U64 = 1 << 64

Buffer = bytes | bytearray | memoryview


class ProtoError(ValueError):
    """Bytes that are not a well-formed protobuf message: names what is wrong and where."""


def read_varint(buf: Buffer, pos: int) -> tuple[int, int]:
    """The unsigned varint at `pos` and the position after it. At most 10 bytes (64 bits)."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise ProtoError(f"truncated varint at byte {pos}")
        if shift == 63 and buf[pos] > 1:  # the 10th byte holds only bit 63
            raise ProtoError(f"varint longer than 64 bits at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def signed64(value: int) -> int:
    """An int64 field's value: a negative int64 travels as its 64-bit two's complement."""
    return value - _U64 if value >= 1 << 63 else value


def fields(buf: Buffer) -> Iterator[tuple[int, int, int, int]]:
    """Every field of a message, in order: (field number, wire type, start, end). For a varint, `start` is
    its value and `end` the position after it; for the others, buf[start:end] is the field's payload
    (a length-delimited field's bytes, the 8 or 4 bytes of a fixed field). Raises ProtoError on the first
    malformed field; the fields before it have been yielded."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if not 1 <= number <= MAX_FIELD:
            raise ProtoError(f"field number {number} at byte {pos} is out of range")
        if wire == VARINT:
            value, pos = read_varint(buf, pos)
            yield number, wire, value, pos
            continue
        if wire == LEN:
            size, pos = read_varint(buf, pos)
            stop = pos + size
        elif wire == FIXED64:
            stop = pos + 8
        elif wire == FIXED32:
            stop = pos + 4
        else:
            raise ProtoError(f"field {number}: wire type {wire} (a group or not a wire type) at byte {pos}")
        if stop > end:
            raise ProtoError(f"field {number}: {stop - pos} bytes at byte {pos}, past the end ({end})")
        yield number, wire, pos, stop
        pos = stop


def last_varint(buf: Buffer, number: int) -> int | None:
    """The value of varint field `number` (the last one wins, as protobuf merges scalars), or None when the
    field is absent (proto3 leaves zero values out). ProtoError when the field has another wire type."""
    found = None
    for n, wire, value, _ in fields(buf):
        if n == number:
            if wire != VARINT:
                raise ProtoError(f"field {number} has wire type {wire}, not a varint")
            found = value
    return found


def first_message(buf: Buffer, number: int) -> memoryview | None:
    """The bytes of the first length-delimited field `number`, reading no further than its end (the rest of
    `buf` may be truncated: only a prefix of a large answer may have arrived), or None if it is absent."""
    for n, wire, start, stop in fields(buf):
        if n == number:
            if wire != LEN:
                raise ProtoError(f"field {number} has wire type {wire}, not length-delimited")
            return memoryview(buf)[start:stop]
    return None


def varint(value: int) -> bytes:
    """The varint encoding of an unsigned 64-bit value (a negative int64: its two's complement)."""
    if value < 0:
        value += _U64
    if not 0 <= value < _U64:
        raise ValueError(f"{value} does not fit in 64 bits")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    """A varint field (bool, int32/64, uint32/64, enum). Zero is still written: callers leave it out."""
    return varint(number << 3 | VARINT) + varint(value)


def bytes_field(number: int, data: bytes) -> bytes:
    """A length-delimited field (bytes, string, an embedded message)."""
    return varint(number << 3 | LEN) + varint(len(data)) + data
