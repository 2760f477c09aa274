"""Property tests: gRPC framing survives any DATA chunking, and the protobuf reader never fails in any way
but ProtoError, never loops, never reads past the end, on any bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from raftlb.core import etcdpb, protowire
from raftlb.core.grpc import MalformedMessage, Message, MessageReader, frame
from raftlb.core.protowire import ProtoError

messages = st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(messages, st.lists(st.integers(min_value=0, max_value=64), max_size=40))
def test_any_chunking_gives_back_the_messages(msgs: list[tuple[bool, bytes]], cuts: list[int]) -> None:
    wire = b"".join(frame(p, c) for c, p in msgs)
    reader = MessageReader()
    got: list[Message] = []
    pos = 0
    for n in cuts:
        got += reader.feed(wire[pos:pos + n])
        pos += n
    got += reader.feed(wire[pos:])
    assert got == [Message(c, p) for c, p in msgs]
    assert reader.at_boundary
    reader.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=1, max_value=16))
def test_any_bytes_are_messages_or_a_malformed_error(data: bytes, step: int) -> None:
    reader = MessageReader(max_message=32)
    try:
        for i in range(0, len(data), step):
            for m in reader.feed(data[i:i + step]):
                assert len(m.payload) <= 32
        reader.close()
    except MalformedMessage:
        pass
    assert reader.buffered <= 32 + 5  # never more than one message (and its prefix) held


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=80))
def test_the_protobuf_reader_takes_any_bytes(data: bytes) -> None:
    count = 0
    try:
        for number, wire, start, end in protowire.fields(data):
            count += 1
            assert 1 <= number <= protowire.MAX_FIELD
            if wire != protowire.VARINT:
                assert 0 <= start <= end <= len(data)  # a payload lies inside the buffer
    except ProtoError:
        pass
    assert count <= len(data)  # every field takes at least one byte: no loop
    for read in (etcdpb.is_serializable, etcdpb.response_header, etcdpb.member_status):
        try:
            read(data)
        except ProtoError:
            pass
    revision = etcdpb.response_revision(data)  # never raises
    assert revision is None or revision > 0
