"""The generic JSON-status adapter, read through the shipped configs/rqlite.yaml and configs/consul.yaml
against status answers shaped after rqlite's and Consul's documentation (tests/data/README.md); and the
config keys it adds (`status`, `sidecar`, the etcd poll interval default)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from raftlb.config.load import check_main, load_config, parse_config
from raftlb.config.model import (
    ETCD_POLL_INTERVAL,
    ClusterConfig,
    StatusConfig,
)
from raftlb.control.jsonstatus import LeaderResolver, lookup, parse_status
from raftlb.control.poll import StatusError
from raftlb.core.leader_table import Announcement
from raftlb.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def sample(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def shipped(name: str) -> ClusterConfig:
    return load_config(str(ROOT / "configs" / name), environ={}).clusters[0]


def read(cluster: ClusterConfig, node_id: str, doc: Any) -> tuple[Announcement, str | None]:
    assert cluster.status is not None
    return parse_status(doc, node_id, cluster.status, LeaderResolver(cluster.nodes, cluster.status))


@pytest.mark.parametrize("name", ["etcd.yaml", "rqlite.yaml", "consul.yaml"])
def test_shipped_configs_pass_check(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_main(str(ROOT / "configs" / name)) == 0
    assert "OK" in capsys.readouterr().out


def test_rqlite_leader_follower_and_candidate() -> None:
    rqlite = shipped("rqlite.yaml")
    ann, unmatched = read(rqlite, "n1", sample("rqlite_status_leader.json"))
    assert unmatched is None
    assert ann == Announcement(node="n1", term=2, role="leader", leader="n1", commit_index=1083,
                               applied_index=1083)
    ann, _ = read(rqlite, "n2", sample("rqlite_status_follower.json"))
    got = (ann.role, ann.leader, ann.term, ann.applied_index, ann.commit_index)
    assert got == ("follower", "n1", 2, 1081, 1083)
    ann, _ = read(rqlite, "n2", sample("rqlite_status_candidate.json"))
    assert (ann.role, ann.leader, ann.term) == ("candidate", None, 3)


def test_rqlite_shutdown_state_is_no_usable_announcement() -> None:
    doc = sample("rqlite_status_follower.json")
    doc["store"]["raft"]["state"] = "Shutdown"
    with pytest.raises(StatusError, match="'Shutdown' maps to no role") as info:
        read(shipped("rqlite.yaml"), "n2", doc)
    assert info.value.reason == "invalid_fields"


def test_consul_strings_are_read_as_numbers_and_the_leader_address_matches_by_host() -> None:
    consul = shipped("consul.yaml")
    ann, _ = read(consul, "alice", sample("consul_agent_self_leader.json"))
    assert ann == Announcement(node="alice", term=4, role="leader", leader="alice", commit_index=45832,
                               applied_index=45832)
    ann, unmatched = read(consul, "bob", sample("consul_agent_self_follower.json"))
    assert (ann.role, ann.leader, ann.applied_index, unmatched) == ("follower", "alice", 45830, None)


def test_consul_status_leader_alone_gives_the_role_from_the_leader_address() -> None:
    consul = shipped("consul.yaml")
    assert consul.status is not None
    status = replace(consul.status, path="/v1/status/leader", term=(), role=None, leader=(),
                     applied_index=None, commit_index=None)
    doc = sample("consul_status_leader.json")  # "127.0.0.1:8300", and `$` (()) is the whole answer
    leaders = LeaderResolver(consul.nodes, status)
    with pytest.raises(StatusError):  # a bare string has no term
        parse_status(doc, "alice", status, leaders)
    status = replace(status, term=("term",), leader=("leader",))
    doc = {"term": "9", "leader": doc}
    assert parse_status(doc, "alice", status, leaders)[0].role == "leader"
    assert parse_status(doc, "bob", status, leaders)[0].role == "follower"
    assert parse_status({"term": 9, "leader": ""}, "bob", status, leaders)[0].role == "candidate"


def test_an_unmatched_leader_empties_the_hint_or_rejects_when_the_role_depends_on_it() -> None:
    rqlite = shipped("rqlite.yaml")
    doc = sample("rqlite_status_follower.json")
    doc["store"]["leader"]["node_id"] = "7"
    ann, unmatched = read(rqlite, "n2", doc)
    assert (ann.role, ann.leader, unmatched) == ("follower", None, "7")
    assert rqlite.status is not None
    no_role = replace(rqlite, status=replace(rqlite.status, role=None))
    with pytest.raises(StatusError) as info:
        read(no_role, "n2", doc)
    assert info.value.reason == "unknown_leader"


def test_leader_values_match_ids_mappings_urls_and_hosts() -> None:
    cfg = parse_config(textwrap.dedent("""\
        listeners: [{address: 127.0.0.1:0}]
        admin: {enabled: false}
        clusters:
          - name: c
            kind: json
            status: {term: t, leader: l, leader_ids: {"raft-a": a}, leader_match: host}
            nodes:
              - {id: a, url: "http://10.0.0.1:80"}
              - {id: b, url: "http://10.0.0.2:8500", announce_url: "http://10.0.0.2:9000"}
              - {id: c, url: "http://10.0.0.3:1"}
              - {id: d, url: "http://10.0.0.3:2"}
        """), environ={})
    cluster = cfg.clusters[0]
    assert cluster.status is not None
    leaders = LeaderResolver(cluster.nodes, cluster.status)
    assert [leaders.node_id(v) for v in ("raft-a", "b", "10.0.0.2:9000", "http://10.0.0.1:80/",
                                         "10.0.0.2:8300", "10.0.0.3:8300", "10.9.9.9:1")] == \
        ["a", "b", "b", "a", "b", None, None]  # 10.0.0.3 is two nodes' host: it names neither


@pytest.mark.parametrize("path, expected", [
    (("a", "b"), 1), (("list", "1", "id"), "y"), ((), {"a": {"b": 1}, "list": [{"id": "x"}, {"id": "y"}]}),
])
def test_lookup_follows_keys_and_list_positions(path: tuple[str, ...], expected: object) -> None:
    assert lookup({"a": {"b": 1}, "list": [{"id": "x"}, {"id": "y"}]}, path) == expected


@pytest.mark.parametrize("doc", [{"a": 1}, {"a": {"c": 1}}, {"a": {"b": []}}])
def test_missing_term_is_rejected(doc: object) -> None:
    status = StatusConfig(term=("a", "b", "0"), role=("r",))
    with pytest.raises(StatusError, match="term"):
        parse_status(doc, "n1", status, LeaderResolver((), status))


def test_has_quorum_and_numbers_accept_json_and_string_forms() -> None:
    status = StatusConfig(term=("t",), role=("r",), has_quorum=("q",), applied_index=("i",))
    leaders = LeaderResolver((), status)
    ann, _ = parse_status({"t": "3", "r": "LEADER", "q": "false", "i": 12}, "n1", status, leaders)
    got = (ann.term, ann.role, ann.has_quorum, ann.applied_index, ann.leader)
    assert got == (3, "leader", False, 12, "n1")
    for bad in ({"t": -1, "r": "leader"}, {"t": 1.5, "r": "leader"}, {"t": 1, "r": "leader", "q": "yes"}):
        with pytest.raises(StatusError):
            parse_status(bad, "n1", status, leaders)


# -- config -----------------------------------------------------------------------------------------------

BASE = """\
listeners: [{address: 127.0.0.1:8080}]
clusters:
  - name: c
    kind: %s
    nodes: [{id: n1, url: "http://127.0.0.1:7001"}]
"""


def cluster(kind: str, extra: str = "") -> ClusterConfig:
    return parse_config(BASE % kind + extra, source="t.yaml", environ={}).clusters[0]


def test_etcd_polls_every_25ms_by_default_and_json_reads_its_status_settings() -> None:
    assert cluster("etcd").poll_interval == ETCD_POLL_INTERVAL == 0.025
    assert cluster("etcd", "    poll_interval: 40ms\n").poll_interval == 0.04
    assert cluster("native").poll_interval == 0.1 and cluster("native").status is None
    c = cluster("json", """\
    sidecar: true
    status:
      path: /v1/agent/self
      method: post
      body: "{}"
      headers: {X-Token: abc}
      term: $.Stats.raft.term
      role: Stats.raft.state
      roles: {Leader: leader, Shutdown: follower}
      applied_index: Stats.raft.applied_index
""")
    assert c.sidecar is True
    assert c.status == StatusConfig(
        term=("Stats", "raft", "term"), path="/v1/agent/self", method="POST", body=b"{}",
        headers=(("X-Token", "abc"),), role=("Stats", "raft", "state"),
        roles=(("leader", "leader"), ("shutdown", "follower")),
        applied_index=("Stats", "raft", "applied_index"))


@pytest.mark.parametrize("kind, extra, message", [
    ("json", "", "t.yaml:3: clusters[0].status: is required for kind json"),
    ("etcd", "    status: {term: t, role: r}\n", "clusters[0].status: only applies to kind json"),
    ("native", "    sidecar: true\n", "clusters[0].sidecar: only applies to kind etcd or json"),
    ("json", "    status: {role: r}\n", "clusters[0].status.term: is required"),
    ("json", "    status: {term: t}\n", "clusters[0].status.role: role or leader (or both) is required"),
    ("json", "    status: {term: a..b, role: r}\n", "clusters[0].status.term: must be a dotted path"),
    ("json", "    status: {term: t, role: r, roles: {Leader: boss}}\n",
     "clusters[0].status.roles.Leader: must be one of leader, follower, candidate, learner"),
    ("json", "    status: {term: t, role: r, roles: {a: leader, A: follower}}\n", "duplicate key 'a'"),
    ("json", "    status: {term: t, leader: l, leader_ids: {x: 'n 1'}}\n",
     "status.leader_ids.x: must be a name"),
    ("json", "    status: {term: t, role: r, path: status}\n", "status.path: must be an absolute path"),
    ("json", "    status: {term: t, role: r, leader_match: port}\n", "status.leader_match: must be one of"),
    ("json", "    status: {term: t, role: r, roles: [leader]}\n", "status.roles: must be a mapping"),
    ("json", "    status: {term: t, role: r, extra: 1}\n", "status.extra: unknown key"),
])
def test_bad_adapter_settings_name_the_yaml_path(kind: str, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cluster(kind, extra)
    assert message in str(info.value)
