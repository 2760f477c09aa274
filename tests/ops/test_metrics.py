"""Metrics: names and labels by Prometheus conventions, scrape-time values from the table and the stats, the
failover histogram and leaderless time, without sockets."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from raftlb.core.leader_table import Announcement, LeaderChange, LeaderTable
from raftlb.core.router import RouteDecision
from raftlb.ops.metrics import SPECS, Metrics, lag_entries, metric_names
from raftlb.proxy.cluster import ClusterProxy
from tests.support.offline import ann, offline_server

UNBOUNDED_LABELS = {"path", "target", "url", "method", "client", "key"}


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, keyed by (name, sorted labels)."""
    out = {}
    for fam in text_string_to_metric_families(metrics.exposition().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# -- names and labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS.values(), ids=lambda s: s.name)
def test_metric_names_follow_prometheus_conventions(spec: Any) -> None:
    assert re.fullmatch(r"raftlb_[a-z0-9_]+", spec.name)
    assert spec.type in ("gauge", "counter", "histogram")
    assert spec.name.endswith("_total") == (spec.type == "counter")
    if "seconds" in spec.name or "duration" in spec.name:
        assert "_seconds" in spec.name  # base units
    assert not UNBOUNDED_LABELS & set(spec.labels), "labels must be bounded"
    assert spec.help and not spec.help[0].islower() and not spec.help.endswith(".")


def test_no_two_metrics_share_a_family_name() -> None:
    families = [s.family for s in SPECS.values()]
    derived = [f"{s.name}_{x}" for s in SPECS.values() if s.type == "histogram"
               for x in ("bucket", "sum", "count")]
    assert len(set(families)) == len(families)
    assert not set(derived) & set(families)


def test_every_metric_is_exposed_with_its_help_and_type() -> None:
    server = offline_server()
    families = {f.name: f for f in text_string_to_metric_families(server.metrics.exposition().decode())}
    for spec in SPECS.values():
        fam = families[spec.family]
        assert fam.type == spec.type, spec.name
        assert fam.documentation == spec.help
    assert set(metric_names()) >= {"raftlb_failover_seconds_bucket", "raftlb_leader"}


def test_a_scrape_has_only_the_documented_series() -> None:
    # prometheus-client adds an undocumented `*_created` series to every counter and histogram unless told not
    # to: a scrape holds the series metric_names() lists (docs/metrics.md) and the process_* ones.
    server = offline_server()
    server.metrics.observe_request("c1", "write", "leader", "n1", 200, 0.01)
    server.metrics.reloads.labels("applied").inc()
    names = {s.name for f in text_string_to_metric_families(server.metrics.exposition().decode())
             for s in f.samples}
    raftlb = {n for n in names if not n.startswith("process_")}
    assert raftlb and raftlb <= set(metric_names()), sorted(raftlb - set(metric_names()))
    assert not [n for n in names if n.endswith("_created")]


def test_two_servers_in_one_process_have_separate_registries() -> None:
    a, b = offline_server(), offline_server()
    a.metrics.observe_request("c1", "write", "leader", "n1", 200, 0.01)
    assert value(scrape(a.metrics), "raftlb_requests_total", cluster="c1", node="n1", kind="write",
                 policy="leader", code="2xx") == 1
    assert value(scrape(b.metrics), "raftlb_requests_total", cluster="c1", node="n1", kind="write",
                 policy="leader", code="2xx") is None


# -- scrape-time values ------------------------------------------------------------------------------------


def test_scrape_reports_the_leader_term_roles_and_lag_from_the_table() -> None:
    server = offline_server()
    proxy = server.proxies["c1"]
    proxy.on_announcement("n1", ann("n1", 4, "follower", "n2", applied=90, commit=100))
    proxy.on_announcement("n2", ann("n2", 4, "leader", "n2", applied=100, commit=105))
    proxy.on_announcement("n3", ann("n3", 3, "follower", None, applied=40))
    s = scrape(server.metrics)
    assert value(s, "raftlb_leader", cluster="c1", node="n2") == 1
    assert value(s, "raftlb_leader", cluster="c1", node="n1") == 0
    assert value(s, "raftlb_cluster_has_leader", cluster="c1") == 1
    assert value(s, "raftlb_cluster_term", cluster="c1") == 4
    assert value(s, "raftlb_node_role", cluster="c1", node="n2", role="leader") == 1
    assert value(s, "raftlb_node_role", cluster="c1", node="n1", role="leader") == 0
    assert value(s, "raftlb_node_term", cluster="c1", node="n3") == 3
    assert value(s, "raftlb_node_applied_index", cluster="c1", node="n1") == 90
    # Lag is measured against the leader's commit index.
    assert value(s, "raftlb_node_lag_entries", cluster="c1", node="n1") == 15
    assert value(s, "raftlb_node_lag_entries", cluster="c1", node="n2") == 5
    assert value(s, "raftlb_node_lag_entries", cluster="c1", node="n3") == 65
    assert value(s, "raftlb_node_up", cluster="c1", node="n3") == 1
    age = value(s, "raftlb_node_announcement_age_seconds", cluster="c1", node="n1")
    assert age is not None and 0 <= age < 5
    assert value(s, "raftlb_leader_changes_total", cluster="c1") == 1


def test_scrape_is_safe_for_every_accepted_term_and_index() -> None:
    # A 4299-digit integer is valid JSON and was once a term: every scrape after it failed (no float).
    server = offline_server()
    proxy = server.proxies["c1"]
    top = 2**64 - 1
    proxy.on_announcement("n1", ann("n1", top, "leader", "n1", applied=top))
    proxy.on_announcement("n2", ann("n2", 10**4298, "follower", "n1", applied=10**4298))  # refused
    proxy.on_announcement("n3", ann("n3", top, "follower", "n1", applied=top))
    s = scrape(server.metrics)
    assert value(s, "raftlb_cluster_term", cluster="c1") == 2.0**64
    assert value(s, "raftlb_node_term", cluster="c1", node="n1") == 2.0**64
    assert value(s, "raftlb_node_applied_index", cluster="c1", node="n3") == 2.0**64
    assert value(s, "raftlb_node_term", cluster="c1", node="n2") == 0
    assert value(s, "raftlb_leader", cluster="c1", node="n1") == 1
    assert value(s, "raftlb_announcements_rejected_total", cluster="c1", reason="table") == 1


def test_scrape_reads_the_proxy_counters() -> None:
    server = offline_server()
    stats = server.proxies["c1"].stats
    stats.held, stats.released, stats.expired = 7, 5, 2
    stats.resends.update(misdirected=3, connect_failed=1)
    stats.responses_by_class[2] = 40
    stats.responses_by_class[5] = 2
    stats.misdirected, stats.preempted, stats.outcome_unknown = 3, 1, 1
    s = scrape(server.metrics)
    assert value(s, "raftlb_hold_requests_total", cluster="c1") == 7
    assert value(s, "raftlb_hold_released_total", cluster="c1") == 5
    assert value(s, "raftlb_hold_expired_total", cluster="c1") == 2
    assert value(s, "raftlb_hold_queue_requests", cluster="c1") == 0
    assert value(s, "raftlb_resends_total", cluster="c1", reason="misdirected") == 3
    assert value(s, "raftlb_responses_total", cluster="c1", code="2xx") == 40
    assert value(s, "raftlb_responses_total", cluster="c1", code="5xx") == 2
    assert value(s, "raftlb_misdirected_total", cluster="c1") == 3
    assert value(s, "raftlb_outcome_unknown_total", cluster="c1") == 1
    assert value(s, "raftlb_upstream_outstanding_requests", cluster="c1", node="n1") == 0
    assert value(s, "raftlb_draining") == 0
    assert value(s, "raftlb_build_info", version=__import__("raftlb").__version__) == 1


def test_a_cluster_without_a_live_leader_reports_none() -> None:
    server = offline_server()
    s = scrape(server.metrics)
    assert value(s, "raftlb_cluster_has_leader", cluster="c1") == 0
    assert all(value(s, "raftlb_leader", cluster="c1", node=f"n{i}") == 0 for i in (1, 2, 3))
    assert value(s, "raftlb_node_up", cluster="c1", node="n1") == 0
    assert value(s, "raftlb_node_announcement_age_seconds", cluster="c1", node="n1") is None
    gap = value(s, "raftlb_leaderless_gap_seconds", cluster="c1")
    assert gap is not None and gap >= 0


@pytest.mark.parametrize(("anns", "expected"), [
    ([], {}),
    # no commit index known anywhere: nothing to compare with
    ([Announcement("n1", 1, "leader", "n1", applied_index=5)], {}),
    ([Announcement("n1", 1, "leader", "n1", commit_index=10, applied_index=9),
      Announcement("n2", 1, "follower", "n1", commit_index=10, applied_index=3)], {"n1": 1, "n2": 7}),
    # no leader: against the highest commit index a live node reported
    ([Announcement("n1", 2, "candidate", None, commit_index=8, applied_index=8),
      Announcement("n2", 2, "candidate", None, commit_index=12, applied_index=12)], {"n1": 4, "n2": 0}),
    # a node ahead of the leader's last announcement is not behind
    ([Announcement("n1", 1, "leader", "n1", commit_index=10, applied_index=10),
      Announcement("n2", 1, "follower", "n1", commit_index=11, applied_index=11)], {"n1": 0, "n2": 0}),
])
def test_lag_entries(anns: list[Announcement], expected: dict[str, int]) -> None:
    table = LeaderTable(["n1", "n2"], liveness_timeout=1.0)
    for a in anns:
        table.apply(a, 100.0)
    assert lag_entries(table, 100.0) == expected


# -- event-fed metrics -------------------------------------------------------------------------------------


def change(old: str | None, new: str | None, old_term: int, new_term: int) -> LeaderChange:
    return LeaderChange(old, new, old_term, new_term, "announced" if new else "silent")


def failover_samples(m: Metrics) -> tuple[float, float | None]:
    s = scrape(m)
    count = value(s, "raftlb_failover_seconds_count", cluster="c1")
    return count or 0, value(s, "raftlb_failover_seconds_sum", cluster="c1")


def test_failover_is_measured_from_leader_loss_to_the_first_write_the_new_leader_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    m = Metrics(process=False)
    clock = [1000.0]
    monkeypatch.setattr("raftlb.ops.metrics.time.monotonic", lambda: clock[0])
    m.on_leader_change("c1", change(None, "n1", 0, 1))  # startup: not a failover
    m.observe_request("c1", "write", "leader", "n1", 200, 0.001)
    assert failover_samples(m)[0] == 0
    m.on_leader_change("c1", change("n1", None, 1, 2))
    clock[0] += 0.5
    m.on_leader_change("c1", change(None, "n2", 2, 2))
    clock[0] += 0.25
    m.observe_request("c1", "read", "any", "n2", 200, 0.001)  # reads do not end a failover
    m.observe_request("c1", "write", "leader", "n1", 200, 0.001)  # nor the old leader's late answer
    m.observe_request("c1", "write", "leader", "n2", 503, 0.001)  # nor a failure
    assert failover_samples(m)[0] == 0
    m.observe_request("c1", "write", "leader", "n2", 201, 0.001)
    count, total = failover_samples(m)
    assert count == 1 and total == pytest.approx(0.75)
    m.observe_request("c1", "write", "leader", "n2", 200, 0.001)  # once per failover
    assert failover_samples(m)[0] == 1


def test_a_direct_leader_move_starts_a_failover_and_a_new_term_of_the_same_leader_does_not() -> None:
    m = Metrics(process=False)
    m.on_leader_change("c1", change(None, "n1", 0, 1))
    m.on_leader_change("c1", change("n1", "n1", 1, 2))
    m.observe_request("c1", "write", "leader", "n1", 200, 0.001)
    assert failover_samples(m)[0] == 0
    m.on_leader_change("c1", change("n1", "n3", 2, 3))
    m.observe_request("c1", "write", "leader", "n3", 200, 0.001)
    assert failover_samples(m)[0] == 1


def test_leaderless_seconds_accumulate_over_gaps() -> None:
    m = Metrics(process=False)
    m.cluster_added("c1", now=10.0)
    m.on_leader_change("c1", change(None, "n1", 0, 1), now=11.0)
    assert m.leaderless("c1", 12.0) == (0.0, 1.0)
    m.on_leader_change("c1", change("n1", None, 1, 2), now=20.0)
    m.on_leader_change("c1", change(None, None, 2, 3), now=20.5)  # still the same gap
    assert m.leaderless("c1", 21.0) == (1.0, 2.0)
    m.on_leader_change("c1", change(None, "n2", 3, 3), now=22.0)
    assert m.leaderless("c1", 30.0) == (0.0, 3.0)


def test_requests_are_counted_by_kind_policy_node_and_status_class() -> None:
    m = Metrics(process=False)
    for status in (200, 204, 404, 503, 0):
        m.observe_request("c1", "read", "any", "n2" if status else None, status, 0.002)
    s = scrape(m)
    labels = {"cluster": "c1", "kind": "read", "policy": "any"}
    assert value(s, "raftlb_requests_total", node="n2", code="2xx", **labels) == 2
    assert value(s, "raftlb_requests_total", node="n2", code="4xx", **labels) == 1
    assert value(s, "raftlb_requests_total", node="n2", code="5xx", **labels) == 1
    assert value(s, "raftlb_requests_total", node="none", code="none", **labels) == 1
    assert value(s, "raftlb_request_duration_seconds_count", **labels) == 5
    assert value(s, "raftlb_request_duration_seconds_bucket", le="0.0025", **labels) == 5


@dataclass
class StubExchange:
    method: str = "PUT"
    target: bytes = b"/kv/a?x=1"
    status: int = 200
    started_at: float = 0.0
    client_addr: str = "10.0.0.7"


def test_request_done_records_the_request_and_writes_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    import time

    m = Metrics(process=False)
    ex = StubExchange(started_at=time.monotonic() - 0.05)
    access = logging.getLogger("raftlb.access")
    access.disabled = False
    with caplog.at_level(logging.INFO, logger="raftlb.access"):
        m.request_done("c1", RouteDecision("write", "leader", False), "n1", ex)  # type: ignore[arg-type]
    [record] = [r for r in caplog.records if r.name == "raftlb.access"]
    assert record.getMessage().startswith('10.0.0.7 "PUT /kv/a?x=1" 200 c1/n1 ')
    assert record.access["duration_ms"] >= 50  # type: ignore[attr-defined]
    s = scrape(m)
    assert value(s, "raftlb_requests_total", cluster="c1", node="n1", kind="write", policy="leader",
                 code="2xx") == 1


def test_reload_outcomes_are_counted() -> None:
    m = Metrics(process=False)
    m.config_reloaded(True)
    m.config_reloaded(False)
    m.config_reloaded(False)
    s = scrape(m)
    assert value(s, "raftlb_config_reloads_total", result="applied") == 1
    assert value(s, "raftlb_config_reloads_total", result="rejected") == 2


def test_proxy_without_requests_has_no_request_series() -> None:
    server = offline_server()
    assert isinstance(server.proxies["c1"], ClusterProxy)
    assert not [k for k in scrape(server.metrics) if k[0] == "raftlb_requests_total"]
