"""The etcd adapter: status answers (captured from a real etcd 3.5.1) -> announcements, member ids -> node
ids, and the polling loop against fake members (liveness, refused connections, unusable answers)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from raftlb.config.model import ClusterConfig, ClusterKind, NodeConfig
from raftlb.control.etcd import EtcdMembers, EtcdSubscriptions, map_members, parse_status
from raftlb.control.kinds import make_subscriptions
from raftlb.control.poll import StatusError
from raftlb.control.stream import ClusterSubscriptions
from raftlb.core.leader_table import Announcement
from raftlb.tasks import TaskSet
from tests.support.etcd_members import FakeMember, Recorder, lead, sample
from tests.support.harness import wait_for

LEADER, FOLLOWER = sample("etcd_status_leader.json"), sample("etcd_status_follower.json")
LEADER_ID, FOLLOWER_ID = LEADER["header"]["member_id"], FOLLOWER["header"]["member_id"]


def test_leader_status_announces_leader_with_revision_as_fencing_index() -> None:
    ann, own, leader = parse_status(LEADER, "n3", {})
    assert (own, leader) == (LEADER_ID, LEADER_ID)
    assert ann == Announcement(node="n3", term=int(LEADER["raftTerm"]), role="leader", leader="n3",
                               commit_index=int(LEADER["header"]["revision"]),
                               applied_index=int(LEADER["header"]["revision"]), has_quorum=True)


def test_follower_names_the_leader_by_node_id_once_the_member_is_known() -> None:
    ann, own, leader = parse_status(FOLLOWER, "n1", {})
    assert (ann.role, ann.leader, own, leader) == ("follower", None, FOLLOWER_ID, LEADER_ID)
    ann, _, _ = parse_status(FOLLOWER, "n1", {LEADER_ID: "n3"})
    assert (ann.role, ann.leader, ann.has_quorum) == ("follower", "n3", None)


def test_member_without_leader_is_a_candidate_without_quorum() -> None:
    doc = sample("etcd_status_no_leader.json")
    assert "leader" not in doc and doc["errors"] == ["etcdserver: no leader"]
    ann, _, leader = parse_status(doc, "n1", {})
    assert (ann.role, ann.leader, ann.has_quorum, leader, ann.term) == ("candidate", None, False, None, 2)


@pytest.mark.parametrize("change, role", [
    ({"isLearner": True}, "learner"),
    ({"leader": "0"}, "candidate"),  # not a member id: treated as absent
    ({"errors": ["etcdserver: no leader"]}, "candidate"),  # errors win over a stale leader field
    ({"errors": ["NOSPACE"]}, "follower"),  # an alarm is not a leadership change
])
def test_role_follows_learner_flag_leader_field_and_errors(change: dict[str, Any], role: str) -> None:
    ann, _, _ = parse_status({**FOLLOWER, **change}, "n1", {})
    assert ann.role == role


def test_omitted_zero_fields_read_as_zero() -> None:
    doc = {"header": {"member_id": "42"}}  # a fresh member: revision, terms and leader all zero, omitted
    ann, own, _ = parse_status(doc, "n1", {})
    assert (ann.term, ann.applied_index, ann.role, own) == (0, 0, "candidate", "42")


@pytest.mark.parametrize("doc", [
    [], {"header": "x"}, {"header": {}}, {"header": {"member_id": "0"}},
    {"header": {"member_id": "1", "revision": "-3"}},
    {"header": {"member_id": "1"}, "raftTerm": "two"},
    {"header": {"member_id": "1"}, "raftTerm": True},
    {"header": {"member_id": "1"}, "leader": 5},
    {"header": {"member_id": "1"}, "errors": "no leader"},
])
def test_answers_that_are_not_etcd_statuses_are_rejected_as_invalid_fields(doc: object) -> None:
    with pytest.raises(StatusError) as info:
        parse_status(doc, "n1", {})
    assert info.value.reason == "invalid_fields"


def node(node_id: str, url: str, announce_url: str | None = None) -> NodeConfig:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return NodeConfig(node_id, url, announce_url or url, host, int(port))


def test_member_list_maps_client_urls_then_names_to_node_ids() -> None:
    doc = sample("etcd_member_list.json")
    by_name = {m["name"]: m for m in doc["members"]}
    nodes = [
        node("a", by_name["n1"]["clientURLs"][0]),  # by client URL
        node("b", "http://10.0.0.9:2379", announce_url=by_name["n2"]["clientURLs"][0]),  # by announce_url
        node("n3", "http://10.0.0.8:2379"),  # no URL matches: by the member's name
    ]
    assert map_members(doc, nodes) == {by_name["n1"]["ID"]: "a", by_name["n2"]["ID"]: "b",
                                       by_name["n3"]["ID"]: "n3"}


def test_a_member_answering_for_two_nodes_is_rejected() -> None:
    members = EtcdMembers([])
    members.learn("7", "n1")
    members.learn("7", "n1")
    with pytest.raises(StatusError) as info:
        members.learn("7", "n2")
    assert info.value.reason == "wrong_node"
    members.learn("8", "n1")  # the member was removed and re-added under a new id
    assert members.ids == {"8": "n1"}


# -- the polling loop, against fake members --------------------------------------------------------------


def cluster_of(members: list[FakeMember], **kw: Any) -> ClusterConfig:
    nodes = tuple(node(m.name, m.url) for m in members)
    settings: dict[str, Any] = {"poll_interval": 0.01, "liveness_timeout": 0.3, "reconnect_min": 0.01,
                                "reconnect_max": 0.05, **kw}
    return ClusterConfig(name="etcd", kind="etcd", nodes=nodes, routes=(), **settings)


async def test_pollers_announce_each_member_and_map_the_leader_through_the_member_list() -> None:
    members = [await FakeMember(f"n{i}", str(1000 + i)).start() for i in (1, 2, 3)]
    for m in members:
        m.members = [{"ID": o.member_id, "name": f"etcd-{o.name}", "clientURLs": [o.url]} for o in members]
    lead(members, members[1], 5)
    rec, tasks = Recorder(), TaskSet("test")
    subs = make_subscriptions(cluster_of(members), rec.on_announcement, rec.on_down, tasks)
    assert isinstance(subs, EtcdSubscriptions)
    subs.start()
    try:
        await wait_for(lambda: all(rec.last(m.name) is not None for m in members), timeout=5)
        await wait_for(lambda: all((rec.last(m.name) or Announcement("x", 0, "x")).leader == "n2"
                                   for m in members), timeout=5)
        roles = [(a.role, a.term) for a in (rec.last("n1"), rec.last("n2")) if a is not None]
        assert roles == [("follower", 5), ("leader", 5)]
        anns = rec.anns["n1"]
        seqs = [a.seq for a in anns if a.seq is not None]
        # seq rises by one per announcement
        assert len(seqs) == len(anns) and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert subs.nodes["n1"].up is True and subs.nodes["n1"].mode == "poll"
        # A new leader at a higher term is announced: the pollers keep polling (the wait is 10 s, a
        # thousand poll intervals).
        lead(members, members[2], 6)
        await wait_for(lambda: (rec.last("n3") or Announcement("x", 0, "x")).role == "leader", timeout=10)
        assert (rec.last("n3") or Announcement("x", 0, "x")).term == 6
    finally:
        await subs.stop()
        await tasks.close()
        for m in members:
            await m.stop()


async def test_member_refusing_connections_is_down_at_once_and_a_silent_one_after_liveness() -> None:
    members = [await FakeMember(f"n{i}", str(2000 + i)).start() for i in (1, 2)]
    lead(members, members[0], 3)
    rec, tasks = Recorder(), TaskSet("test")
    subs = EtcdSubscriptions(cluster_of(members), rec.on_announcement, rec.on_down, tasks)
    subs.start()
    try:
        await wait_for(lambda: rec.last("n1") is not None and rec.last("n2") is not None, timeout=5)
        stopped = time.monotonic()
        await members[0].stop()
        await wait_for(lambda: any(d[0] == "n1" for d in rec.downs), timeout=5)
        assert rec.downs[0][2] - stopped < 0.15  # well before the 0.3 s liveness timeout
        assert "refuses connections" in rec.downs[0][1]
        members[1].hang = True  # SIGSTOP-like: the connection stays, no answer comes
        hung = time.monotonic()
        await wait_for(lambda: any(d[0] == "n2" for d in rec.downs), timeout=5)
        down_after = [d[2] for d in rec.downs if d[0] == "n2"][0] - hung
        assert 0.2 < down_after < 0.6, down_after
        members[1].hang = False
        heard = len(rec.anns["n2"])
        await wait_for(lambda: len(rec.anns["n2"]) > heard, timeout=5)
        assert subs.nodes["n2"].up is True
    finally:
        members[1].hang = False
        await subs.stop()
        await tasks.close()
        await members[1].stop()


async def test_unusable_answers_are_counted_and_the_member_goes_down() -> None:
    (member,) = [await FakeMember("n1", "3001").start()]
    member.status = {"not": "etcd"}
    rec, tasks = Recorder(), TaskSet("test")
    subs = EtcdSubscriptions(cluster_of([member]), rec.on_announcement, rec.on_down, tasks)
    subs.start()
    try:
        await wait_for(lambda: bool(rec.downs), timeout=5)
        assert subs.rejected.get("invalid_fields", 0) >= 1 and "n1" not in rec.anns
        assert "invalid_fields" in subs.nodes["n1"].last_error
    finally:
        await subs.stop()
        await tasks.close()
        await member.stop()


def test_native_and_sidecar_clusters_subscribe_to_announce_streams() -> None:
    tasks = TaskSet("test")
    nodes = (node("n1", "http://127.0.0.1:1"),)
    kinds: tuple[tuple[ClusterKind, bool], ...] = (("native", False), ("etcd", True), ("json", True))
    for kind, sidecar in kinds:
        cluster = ClusterConfig(name="c", kind=kind, nodes=nodes, routes=(), sidecar=sidecar)
        subs = make_subscriptions(cluster, Recorder().on_announcement, Recorder().on_down, tasks)
        assert isinstance(subs, ClusterSubscriptions)
