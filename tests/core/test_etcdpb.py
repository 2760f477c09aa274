"""The protobuf wire reader and etcd's fields: hand-encoded bytes (by the field numbers of etcd's
api/etcdserverpb/rpc.proto), bytes made by the protobuf library's own encoder, and malformed input."""

from __future__ import annotations

from typing import Any

import pytest

from raftlb.core import etcdpb, protowire
from raftlb.core.dialects import dialect_for
from raftlb.core.etcdpb import MemberStatus, ResponseHeader
from raftlb.core.protowire import ProtoError

# --- varints ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "wire"), [
    (0, b"\x00"),
    (1, b"\x01"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (300, b"\xac\x02"),
    (2**63 - 1, b"\xff" * 8 + b"\x7f"),
    (2**64 - 1, b"\xff" * 9 + b"\x01"),
    (-1, b"\xff" * 9 + b"\x01"),  # a negative int64: its two's complement, 10 bytes
])
def test_varint_round_trip(value: int, wire: bytes) -> None:
    assert protowire.varint(value) == wire
    decoded, end = protowire.read_varint(wire + b"tail", 0)
    assert (protowire.signed64(decoded) if value < 0 else decoded, end) == (value, len(wire))


@pytest.mark.parametrize(("wire", "match"), [
    (b"", "truncated varint at byte 0"),
    (b"\x80", "truncated varint at byte 1"),
    (b"\xff" * 9, "truncated varint at byte 9"),
    (b"\xff" * 9 + b"\x02", "longer than 64 bits"),
    (b"\xff" * 10 + b"\x01", "longer than 64 bits"),  # 11 bytes: never loops on, whatever follows
])
def test_read_varint_rejects(wire: bytes, match: str) -> None:
    with pytest.raises(ProtoError, match=match):
        protowire.read_varint(wire, 0)


# --- fields -----------------------------------------------------------------------------------------------

def test_fields_walks_every_wire_type() -> None:
    msg = (b"\x08\x96\x01"  # 1: varint 150
           b"\x12\x03abc"  # 2: bytes "abc"
           b"\x19" + b"\x01" * 8 +  # 3: fixed64
           b"\x25" + b"\x02" * 4 +  # 4: fixed32
           b"\xa0\x1f\x01")  # 500: varint 1 (a two-byte key)
    got = [(n, w, bytes(msg[s:e]) if w != protowire.VARINT else s) for n, w, s, e in protowire.fields(msg)]
    assert got == [(1, 0, 150), (2, 2, b"abc"), (3, 1, b"\x01" * 8), (4, 5, b"\x02" * 4), (500, 0, 1)]


@pytest.mark.parametrize(("msg", "match"), [
    (b"\x12\x05abc", "field 2: 5 bytes at byte 2, past the end"),  # truncated bytes
    (b"\x12", "truncated varint"),  # a key without its length
    (b"\x08", "truncated varint"),  # a key without its value
    (b"\x19\x00\x00", "field 3: 8 bytes"),  # truncated fixed64
    (b"\x25\x00", "field 4: 4 bytes"),
    (b"\x0b", "wire type 3"),  # start group
    (b"\x0c", "wire type 4"),  # end group
    (b"\x0e", "wire type 6"),
    (b"\x00\x01", "field number 0"),
    (b"\x80\x80\x80\x80\x10\x00", "field number 536870912"),  # 2^29: past the 29 bits
    (b"\x12\xff\xff\xff\xff\x0f", "past the end"),  # a 4 GiB length in a 6-byte message
])
def test_fields_rejects_malformed(msg: bytes, match: str) -> None:
    with pytest.raises(ProtoError, match=match):
        list(protowire.fields(msg))


def test_last_varint_and_first_message() -> None:
    msg = b"\x38\x01\x0a\x01k\x38\x00"  # 7 = true, 1 = "k", 7 = false: the last one wins
    assert protowire.last_varint(msg, 7) == 0
    assert protowire.last_varint(msg, 9) is None
    with pytest.raises(ProtoError, match="field 1 has wire type 2, not a varint"):
        protowire.last_varint(msg, 1)
    first = protowire.first_message(b"\x0a\x02hi\x0a\x01x", 1)
    assert first is not None and first.tobytes() == b"hi"
    assert protowire.first_message(msg, 4) is None
    with pytest.raises(ProtoError, match="not length-delimited"):
        protowire.first_message(msg, 7)


# --- etcd: RangeRequest.serializable ----------------------------------------------------------------------

@pytest.mark.parametrize(("msg", "serializable"), [
    (b"", False),  # an empty RangeRequest (every field zero)
    (b"\x0a\x03foo", False),  # key "foo": linearizable, the default
    (b"\x0a\x03foo\x38\x01", True),  # field 7 (serializable) = true
    (b"\x0a\x03foo\x12\x03fop\x18\x0a\x38\x01\x40\x01", True),  # with range_end, limit, keys_only (8)
    (b"\x38\x01\x0a\x03foo", True),  # field order does not matter
    (b"\x40\x01\x48\x01", False),  # keys_only and count_only, not serializable
    (b"\x38\x00", False),  # explicitly false
    (b"\x38\x01\x38\x00", False),  # the last value wins
    (b"\x38\x02", True),  # any non-zero varint is true
    (b"\x0a\x03foo\x58\x05\x38\x01", True),  # min_mod_revision (11) before it
])
def test_is_serializable(msg: bytes, serializable: bool) -> None:
    assert etcdpb.is_serializable(msg) is serializable


@pytest.mark.parametrize("msg", [b"\x0a\x05foo", b"\x38", b"\x3a\x01x", b"\x0a\x03foo\x3b"])
def test_is_serializable_rejects_malformed(msg: bytes) -> None:
    with pytest.raises(ProtoError):
        etcdpb.is_serializable(msg)


def test_range_request_writer() -> None:
    assert etcdpb.range_request(b"foo") == b"\x0a\x03foo"
    assert etcdpb.range_request(b"a", b"b", serializable=True, limit=1, revision=300) == (
        b"\x0a\x01a\x12\x01b\x18\x01\x20\xac\x02\x38\x01")
    assert etcdpb.put_request(b"k", b"v", lease=7) == b"\x0a\x01k\x12\x01v\x18\x07"


# --- etcd: ResponseHeader.revision ------------------------------------------------------------------------

HEADER = (b"\x08\x8e\x9c\x04"  # cluster_id 69134
          b"\x10\x01"  # member_id 1
          b"\x18\x2a"  # revision 42
          b"\x20\x07")  # raft_term 7


@pytest.mark.parametrize(("msg", "header"), [
    (b"\x0a\x0a" + HEADER, ResponseHeader(69134, 1, 42, 7)),
    # then kvs, more, count
    (b"\x0a\x0a" + HEADER + b"\x12\x04\x0a\x02kv\x18\x01\x20\x01", ResponseHeader(69134, 1, 42, 7)),
    (b"\x0a\x02\x18\x05", ResponseHeader(revision=5)),
    (b"\x0a\x00", ResponseHeader()),  # an empty header
    (b"\x0a\x04\x18\x05\x28\x01", ResponseHeader(revision=5)),  # an unknown header field (5) is skipped
    (b"\x0a\x0b\x18" + b"\xff" * 9 + b"\x01", ResponseHeader(revision=-1)),  # int64: signed
    (b"\x10\x01\x0a\x02\x18\x09", ResponseHeader(revision=9)),  # a field before the header is skipped
    (b"\x10\x01", None),  # no header at all
    (b"", None),
    # Only the bytes up to the end of the header are read: what follows may be cut short (or be garbage).
    (b"\x0a\x02\x18\x05\x12\xff\xff", ResponseHeader(revision=5)),
])
def test_response_header(msg: bytes, header: ResponseHeader | None) -> None:
    assert etcdpb.response_header(msg) == header


@pytest.mark.parametrize(("msg", "revision"), [
    (b"\x0a\x0a" + HEADER, 42),
    (b"\x0a\x02\x10\x01", None),  # revision 0 (unset: a call that does not touch the store)
    (b"\x0a\x0b\x18" + b"\xff" * 9 + b"\x01", None),  # never a negative index
    (b"\x12\x00", None),  # no header
    (b"\x0a\x05\x18\x05", None),  # malformed: relayed without an index, never an error
    (b"\x0a\x02\x1a\x00", None),  # revision with the wrong wire type
])
def test_response_revision(msg: bytes, revision: int | None) -> None:
    assert etcdpb.response_revision(msg) == revision


def test_response_header_rejects_a_header_field_of_the_wrong_type() -> None:
    with pytest.raises(ProtoError, match="ResponseHeader field 3 has wire type 2"):
        etcdpb.response_header(b"\x0a\x02\x1a\x00")


def test_response_with_header_writer() -> None:
    assert etcdpb.response_with_header(ResponseHeader(69134, 1, 42, 7)) == b"\x0a\x0a" + HEADER
    assert etcdpb.response_with_header(ResponseHeader(revision=3), b"\x18\x01") == b"\x0a\x02\x18\x03\x18\x01"


def test_member_status() -> None:
    msg = (etcdpb.response_with_header(ResponseHeader(1, 2, 30, 4)) +
           b"\x12\x053.5.1"  # version
           b"\x18\x80\x80\x01"  # dbSize
           b"\x20\x02\x28\x21\x30\x04\x38\x20")  # leader 2, raftIndex 33, raftTerm 4, raftAppliedIndex 32
    assert etcdpb.member_status(msg) == MemberStatus(ResponseHeader(1, 2, 30, 4), 2, 33, 4, 32)


# --- against the protobuf library's encoder ---------------------------------------------------------------

def _etcd_messages() -> dict[str, Any]:
    """RangeRequest, ResponseHeader, RangeResponse, StatusResponse, built from a descriptor with etcd's
    field numbers and types (no generated code)."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="raftlb_test_etcd.proto", package="raftlbtest",
                                              syntax="proto3")

    def message(name: str, *specs: tuple[str, int, int, str]) -> None:
        m = file.message_type.add(name=name)
        for field_name, number, type_, type_name in specs:
            label = f.LABEL_REPEATED if field_name == "kvs" else f.LABEL_OPTIONAL
            added = m.field.add(name=field_name, number=number, type=type_, label=label)
            if type_name:
                added.type_name = type_name

    message("RangeRequest", ("key", 1, f.TYPE_BYTES, ""), ("range_end", 2, f.TYPE_BYTES, ""),
            ("limit", 3, f.TYPE_INT64, ""), ("revision", 4, f.TYPE_INT64, ""),
            ("sort_order", 5, f.TYPE_INT32, ""), ("sort_target", 6, f.TYPE_INT32, ""),
            ("serializable", 7, f.TYPE_BOOL, ""), ("keys_only", 8, f.TYPE_BOOL, ""),
            ("count_only", 9, f.TYPE_BOOL, ""), ("min_mod_revision", 10, f.TYPE_INT64, ""),
            ("max_create_revision", 13, f.TYPE_INT64, ""))
    message("ResponseHeader", ("cluster_id", 1, f.TYPE_UINT64, ""), ("member_id", 2, f.TYPE_UINT64, ""),
            ("revision", 3, f.TYPE_INT64, ""), ("raft_term", 4, f.TYPE_UINT64, ""))
    message("KeyValue", ("key", 1, f.TYPE_BYTES, ""), ("create_revision", 2, f.TYPE_INT64, ""),
            ("mod_revision", 3, f.TYPE_INT64, ""), ("version", 4, f.TYPE_INT64, ""),
            ("value", 5, f.TYPE_BYTES, ""), ("lease", 6, f.TYPE_INT64, ""))
    message("RangeResponse", ("header", 1, f.TYPE_MESSAGE, ".raftlbtest.ResponseHeader"),
            ("kvs", 2, f.TYPE_MESSAGE, ".raftlbtest.KeyValue"), ("more", 3, f.TYPE_BOOL, ""),
            ("count", 4, f.TYPE_INT64, ""))
    message("StatusResponse", ("header", 1, f.TYPE_MESSAGE, ".raftlbtest.ResponseHeader"),
            ("version", 2, f.TYPE_STRING, ""), ("dbSize", 3, f.TYPE_INT64, ""),
            ("leader", 4, f.TYPE_UINT64, ""),
            ("raftIndex", 5, f.TYPE_UINT64, ""), ("raftTerm", 6, f.TYPE_UINT64, ""),
            ("raftAppliedIndex", 7, f.TYPE_UINT64, ""))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"raftlbtest.{name}"))
            for name in ("RangeRequest", "RangeResponse", "StatusResponse")}


@pytest.mark.parametrize(("fields", "serializable"), [
    ({"key": b"foo"}, False),
    ({"key": b"foo", "serializable": True}, True),
    ({"key": b"a" * 300, "range_end": b"\x00", "limit": 10, "revision": 2**40, "sort_order": 2,
      "sort_target": 3, "serializable": True, "keys_only": True, "count_only": True,
      "min_mod_revision": 5, "max_create_revision": 9}, True),
    ({"key": b"\x00", "range_end": b"\x00", "keys_only": True, "count_only": True}, False),
])
def test_serializable_from_the_protobuf_encoder(fields: dict[str, object], serializable: bool) -> None:
    encoded = _etcd_messages()["RangeRequest"](**fields).SerializeToString()
    assert etcdpb.is_serializable(encoded) is serializable


@pytest.mark.parametrize(("revision", "kvs"), [(1, 0), (42, 3), (2**40 + 7, 200), (2**63 - 1, 1)])
def test_revision_from_the_protobuf_encoder(revision: int, kvs: int) -> None:
    classes = _etcd_messages()
    resp = classes["RangeResponse"](count=kvs, more=kvs > 100)
    resp.header.cluster_id = 2**64 - 1
    resp.header.member_id = 0x8E9E05C52164694D
    resp.header.revision = revision
    resp.header.raft_term = 3
    for i in range(kvs):
        resp.kvs.add(key=b"k%d" % i, value=b"v" * i, mod_revision=revision, create_revision=1)
    encoded = resp.SerializeToString()
    assert etcdpb.response_revision(encoded) == revision
    assert etcdpb.response_header(encoded) == ResponseHeader(2**64 - 1, 0x8E9E05C52164694D, revision, 3)
    # The writers agree with the library's encoder, byte for byte.
    assert classes["RangeResponse"].FromString(
        etcdpb.response_with_header(ResponseHeader(1, 2, revision, 3))).header.revision == revision
    parsed = classes["RangeRequest"].FromString(etcdpb.range_request(b"k", b"l", serializable=True, limit=2))
    assert (parsed.key, parsed.range_end, parsed.serializable, parsed.limit) == (b"k", b"l", True, 2)


def test_member_status_from_the_protobuf_encoder() -> None:
    status = _etcd_messages()["StatusResponse"](version="3.5.1", dbSize=20480, leader=2**63 + 5, raftIndex=99,
                                                raftTerm=4, raftAppliedIndex=98)
    status.header.revision = 17
    assert etcdpb.member_status(status.SerializeToString()) == MemberStatus(
        ResponseHeader(revision=17), 2**63 + 5, 99, 4, 98)


@pytest.mark.parametrize(("status", "message", "hasleader", "refused"), [
    (14, "etcdserver: no leader", True, True),  # the interceptor's answer: never reached the handler
    (14, "etcdserver: no leader", False, False),  # not the interceptor: no proof
    (14, "etcdserver: leader changed", True, False),  # a proposal may have been made
    (14, "etcdserver: request timed out, possibly due to previous leader failure", True, False),
    (9, "etcdserver: not leader", True, False),
    (0, "", True, False),
])
def test_refused_for_no_leader(status: int, message: str, hasleader: bool, refused: bool) -> None:
    assert etcdpb.refused_for_no_leader(status, message, sent_hasleader=hasleader) is refused


def test_the_etcd_dialect_reads_grpc_answers_too() -> None:
    etcd, native = dialect_for("etcd"), dialect_for("native")
    assert etcd.leader_metadata == ((b"hasleader", b"true"),)
    assert etcd.index_from_message is not None
    assert etcd.index_from_message(etcdpb.response_with_header(ResponseHeader(revision=9))) == 9
    assert (native.leader_metadata, native.index_from_message) == ((), None)
