"""etcd's gRPC field numbers, proved against real etcd members (3.5 and 3.4): raw unary calls with request
bytes encoded by raftlb/core/etcdpb.py, answers read by it. No generated stubs: the channel carries bytes.

- the ResponseHeader (field 1 of every answer) read by `response_header` names the member and the
  revision that the member's JSON status reports, and a put's revision is its `x-raft-index`; every message
  of a Watch stream carries it too (an event: the revision of the put it reports); Maintenance/Status's
  leader, term and indexes agree with the JSON status;
- a RangeRequest with field 7 set is served by a member that has lost its quorum (etcd answers it from its
  own copy), one without it is not (etcd needs a read index from a leader), so field 7 is `serializable`;
- `hasleader: true` metadata (what raftlb adds to calls for the leader) makes a leaderless member fail a call
  at once with UNAVAILABLE instead of waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from raftlb.core import etcdpb
from raftlb.core.protowire import bytes_field
from tests.support.etcd_cluster import EtcdCluster, etcd_binary

grpc: Any = pytest.importorskip("grpc")

pytestmark = pytest.mark.integration


@pytest.fixture(params=[pytest.param("distro", id="etcd3.5"), pytest.param("debian", id="etcd3.4")])
def etcd(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    binary = etcd_binary(request.param)
    if binary is None:
        pytest.skip("no etcd binary")
    with EtcdCluster(binary, heartbeat_ms=50, election_ms=500) as cluster:
        yield cluster


def call(cluster: EtcdCluster, member: str, method: str, request: bytes, *, timeout: float = 5.0,
         metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One raw unary call: request bytes in, answer bytes out (the channel does the gRPC framing)."""
    m = cluster.members[member]
    with grpc.insecure_channel(f"{m.host}:{m.client_port}") as channel:
        rpc = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        answer: bytes = rpc(request, timeout=timeout, metadata=metadata)
        return answer


def watch_then_put(cluster: EtcdCluster, member: str, leader: str) -> int | None:
    """Open a watch on `member`, put a key on `leader`, and return the revision of the watch's event message
    (the created message first has the store's revision)."""
    m = cluster.members[member]
    done = threading.Event()

    def requests() -> Iterator[bytes]:
        yield bytes_field(1, bytes_field(1, b"grpc-key"))  # WatchRequest.create_request{key}
        done.wait(10.0)  # keep the sending side open until the test has what it needs

    with grpc.insecure_channel(f"{m.host}:{m.client_port}") as channel:
        rpc = channel.stream_stream("/etcdserverpb.Watch/Watch", request_serializer=None,
                                    response_deserializer=None)
        answers = rpc(requests(), timeout=10.0)
        try:
            created = next(answers)
            assert etcdpb.response_revision(created) is not None
            put = call(cluster, leader, etcdpb.KV_PUT, etcdpb.put_request(b"grpc-key", b"v2"))
            event = next(answers)
            assert etcdpb.response_revision(event) == etcdpb.response_revision(put)
            return etcdpb.response_revision(event)
        finally:
            done.set()
            answers.cancel()


def test_field_numbers_against_a_real_etcd(etcd: EtcdCluster) -> None:
    leader = etcd.wait_for_leader()
    followers = [m for m in etcd.members if m != leader]
    status = etcd.status(leader)
    assert status is not None
    member_id, cluster_id = int(status["header"]["member_id"]), int(status["header"]["cluster_id"])

    # A put: its header names the member and the revision it created (the answer's x-raft-index).
    put = call(etcd, leader, "/etcdserverpb.KV/Put", etcdpb.put_request(b"grpc-key", b"v1"),
               metadata=(("hasleader", "true"),))
    header = etcdpb.response_header(put)
    assert header is not None
    assert (header.member_id, header.cluster_id) == (member_id, cluster_id)
    assert header.raft_term == int(status["raftTerm"])
    revision = etcdpb.response_revision(put)
    assert revision is not None and revision == header.revision >= 2
    after = etcd.status(leader)
    assert after is not None and int(after["header"]["revision"]) >= revision

    # A linearizable range on a follower sees the put: its revision is the store's, at least the put's.
    linear = etcdpb.range_request(b"grpc-key")
    assert not etcdpb.is_serializable(linear)
    got = etcdpb.response_revision(call(etcd, followers[0], etcdpb.KV_RANGE, linear))
    assert got is not None and got >= revision

    # Maintenance/Status over gRPC agrees with the JSON gateway's status of the same member.
    st = etcdpb.member_status(call(etcd, followers[0], etcdpb.MAINTENANCE_STATUS, b""))
    js = etcd.status(followers[0])
    assert js is not None
    assert st.header.member_id == int(js["header"]["member_id"])
    assert st.leader == member_id == int(js["leader"])
    assert st.raft_term == int(js["raftTerm"])
    assert st.raft_index > 0
    if "raftAppliedIndex" in js:  # 3.4+
        assert st.raft_applied_index > 0

    # A watch (a bidirectional stream) on a follower: every message of it has the header too; the event of a
    # put comes with the put's revision.
    watch_revision = watch_then_put(etcd, followers[1], leader)
    assert watch_revision is not None and watch_revision > revision

    # Field 7 is `serializable`: a member cut off from its quorum still answers a serializable range from
    # its own copy (with the revision of the last put, once it has applied it), and cannot answer a
    # linearizable one.
    lone = followers[0]
    serializable = etcdpb.range_request(b"grpc-key", serializable=True)
    assert etcdpb.is_serializable(serializable)
    def applied() -> bool | None:
        s = etcd.status(lone)
        return s is not None and int(s["header"]["revision"]) >= watch_revision or None

    etcd.wait_for(applied, 15.0, f"{lone} to apply revision {watch_revision}")
    for other in etcd.members:
        if other != lone:
            etcd.kill(other)
    etcd.wait_for(lambda: (s := etcd.status(lone)) is not None and s.get("leader", "0") == "0" or None,
                  15.0, f"{lone} to know it has no leader")
    answer = call(etcd, lone, etcdpb.KV_RANGE, serializable)
    assert etcdpb.response_revision(answer) == watch_revision  # the last put's, on the lone member too
    assert b"v2" in answer  # the key-value itself (field 2), for the record
    # (etcd answers UNAVAILABLE, UNKNOWN "request timed out", or the deadline passes, by version and timing.)
    with pytest.raises(grpc.RpcError):
        call(etcd, lone, etcdpb.KV_RANGE, linear, timeout=2.0)

    # hasleader: a leaderless member fails the call at once with UNAVAILABLE ("no leader").
    with pytest.raises(grpc.RpcError) as no_leader:
        call(etcd, lone, etcdpb.KV_PUT, etcdpb.put_request(b"k", b"v"), timeout=10.0,
             metadata=tuple((k.decode(), v.decode()) for k, v in etcdpb.LEADER_METADATA))
    assert no_leader.value.code() == grpc.StatusCode.UNAVAILABLE
    assert etcdpb.refused_for_no_leader(no_leader.value.code().value[0], no_leader.value.details(),
                                        sent_hasleader=True)
