"""The few fields of etcd's gRPC API that raftlb reads, by their numbers in etcd's API definition
(`api/etcdserverpb/rpc.proto`; the lock and election services have their own packages, `v3lockpb` and
`v3electionpb`, and answer with the same `etcdserverpb.ResponseHeader` as field 1).

- `RangeRequest.serializable` (bool, field 7): a serializable range is answered from the member's own copy,
  so raftlb fences it by the client's `x-raft-min-index`; a linearizable one is made current by etcd itself
  (a read index from the leader) on any member.
- `ResponseHeader` (field 1 of every etcd answer): `cluster_id` 1, `member_id` 2, `revision` 3 (int64),
  `raft_term` 4. Its revision is what raftlb relays as `x-raft-index`: the revision a write created, or the
  revision a read saw.
- `StatusResponse` (Maintenance/Status): `leader` 4, `raftIndex` 5, `raftTerm` 6, `raftAppliedIndex` 7 (3.4+).

Writers for the requests raftlb (or its tests) send are here too; nothing else of the API is modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from raftlb.core.protowire import (
    VARINT,
    Buffer,
    ProtoError,
    bytes_field,
    fields,
    first_message,
    last_varint,
    signed64,
    varint_field,
)

RANGE_SERIALIZABLE = 7  # RangeRequest.serializable
RESPONSE_HEADER = 1  # the `header` field of every etcd answer
HEADER_REVISION = 3  # ResponseHeader.revision

# Metadata on calls that go to the leader, as the JSON gateway path does (`Grpc-Metadata-hasleader`): a
# member that has lost its leader fails the call at once (UNAVAILABLE, "no leader") instead of waiting for
# one, so raftlb can hold the call and send it to the next leader.
LEADER_METADATA: tuple[tuple[bytes, bytes], ...] = ((b"hasleader", b"true"),)

# The etcd gRPC method paths (`/<package>.<Service>/<Method>`, case-sensitive).
KV_RANGE = "/etcdserverpb.KV/Range"
KV_PUT = "/etcdserverpb.KV/Put"
MAINTENANCE_STATUS = "/etcdserverpb.Maintenance/Status"


@dataclass(frozen=True, slots=True)
class ResponseHeader:
    """`etcdserverpb.ResponseHeader`: absent fields are 0, as in proto3."""

    cluster_id: int = 0
    member_id: int = 0
    revision: int = 0
    raft_term: int = 0


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """What raftlb reads of a `StatusResponse`: the leader's member id (0: none), the member's raft term,
    and its applied index (`raftAppliedIndex`, 3.4+; 0 when absent) beside the header's revision."""

    header: ResponseHeader
    leader: int = 0
    raft_index: int = 0
    raft_term: int = 0
    raft_applied_index: int = 0


def is_serializable(range_request: Buffer) -> bool:
    """Whether a `RangeRequest` asks for a serializable read (field 7 set). ProtoError if malformed."""
    return bool(last_varint(range_request, RANGE_SERIALIZABLE))


def response_header(message: Buffer) -> ResponseHeader | None:
    """The `ResponseHeader` (field 1) of an etcd answer, or None when it has none. Only the fields up to
    the end of the header are read: etcd writes the header first, so the rest of a large answer (a range's
    key-values) is skipped without being looked at. ProtoError if malformed."""
    header = first_message(message, RESPONSE_HEADER)
    if header is None:
        return None
    values = [0, 0, 0, 0]
    for number, wire, value, _ in fields(header):
        if 1 <= number <= 4:
            if wire != VARINT:
                raise ProtoError(f"ResponseHeader field {number} has wire type {wire}, not a varint")
            values[number - 1] = value
    return ResponseHeader(values[0], values[1], signed64(values[2]), values[3])


def response_revision(message: Buffer) -> int | None:
    """`header.revision` of an etcd answer: the answer's `x-raft-index`. None without a header or with a
    revision of 0 (calls that do not touch the key-value store leave it unset), or if the message is
    malformed (an answer raftlb cannot read is relayed without an index, never failed for it)."""
    try:
        header = response_header(message)
    except ProtoError:
        return None
    if header is None or header.revision <= 0:
        return None
    return header.revision


def member_status(message: Buffer) -> MemberStatus:
    """The fields raftlb reads of a Maintenance/Status answer. ProtoError if malformed."""
    header = response_header(message) or ResponseHeader()
    values = [0, 0, 0, 0]
    for number, wire, value, _ in fields(message):
        if 4 <= number <= 7 and wire == VARINT:
            values[number - 4] = value
    return MemberStatus(header, *values)


def range_request(key: bytes, range_end: bytes = b"", *, serializable: bool = False, limit: int = 0,
                  revision: int = 0) -> bytes:
    """An encoded `RangeRequest` (fields in number order, zero values left out, as etcd's encoder does)."""
    out = bytes_field(1, key)
    if range_end:
        out += bytes_field(2, range_end)
    if limit:
        out += varint_field(3, limit)
    if revision:
        out += varint_field(4, revision)
    if serializable:
        out += varint_field(RANGE_SERIALIZABLE, 1)
    return out


def put_request(key: bytes, value: bytes, *, lease: int = 0) -> bytes:
    """An encoded `PutRequest`: key 1, value 2, lease 3."""
    out = bytes_field(1, key) + bytes_field(2, value)
    if lease:
        out += varint_field(3, lease)
    return out


def response_with_header(header: ResponseHeader, rest: bytes = b"") -> bytes:
    """An etcd answer: `header` as field 1, then `rest` (the answer's other fields, already encoded)."""
    encoded = b"".join(varint_field(n, v) for n, v in enumerate(
        (header.cluster_id, header.member_id, header.revision, header.raft_term), start=1) if v)
    return bytes_field(RESPONSE_HEADER, encoded) + rest


# etcd's answer to a call with `hasleader: true` on a member that knows no leader (rpctypes.ErrGRPCNoLeader).
# etcd's interceptors give it before the call reaches its handler, so it proves the call was not applied:
# raftlb may hold the call and send it to the next leader, as for a native node's "not the leader" answer.
NO_LEADER_MESSAGE = "etcdserver: no leader"


def refused_for_no_leader(status: int, message: str, *, sent_hasleader: bool) -> bool:
    """Whether a member's status ends a call that it never applied: UNAVAILABLE "etcdserver: no leader" on a
    call that carried `hasleader: true`. Other UNAVAILABLEs ("leader changed", "request timed out, possibly
    due to previous leader failure") come after a proposal may have been made: not proof of anything."""
    return sent_hasleader and status == 14 and message == NO_LEADER_MESSAGE
