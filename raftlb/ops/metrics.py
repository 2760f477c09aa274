"""Every Prometheus metric raftlb exports is defined here, in `SPECS`, and nowhere else.

Two sources feed them:

- **Scrape time** (`RuntimeCollector`): what the leader table, the proxies' `ProxyStats`, the upstream pools,
  the subscriptions and the listeners already know is read when Prometheus scrapes, so the data path pays
  nothing for it.
- **Events** (`Metrics`): per-request counts and durations come from one call when a proxied request
  finishes (`request_done`), and the failover histogram pairs a leader change (`on_leader_change`) with the
  first write the new leader answers.

Each server owns one `Metrics` with its own `CollectorRegistry` (never the global one), so a test process
can run many servers. Labels are bounded: cluster, node, listener and the fixed sets named in `SPECS`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from raftlb import __version__
from raftlb.core.grpc import status_name as grpc_status_name
from raftlb.core.leader_table import ROLES, LeaderChange, LeaderTable
from raftlb.core.router import RouteDecision
from raftlb.http.exchange import Exchange
from raftlb.ops.logs import access_enabled, access_log, log_access
from raftlb.ops.runtime import Runtime
from raftlb.proxy.cluster import ClusterProxy

# prometheus-client would add a `*_created` series (the start time of each series) to every counter and
# histogram: undocumented, rarely used and doubling the series count. The switch is process-wide; raftlb's
# processes export nothing else through prometheus-client.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


# The classic text format: what every Prometheus (and promtool) version parses.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

__all__ = ["CONTENT_TYPE", "SPECS", "Metrics", "MetricSpec", "RuntimeCollector", "lag_entries"]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family: its name as scraped (counters end in `_total`), type, labels, meaning."""

    name: str
    type: str  # gauge | counter | histogram
    labels: tuple[str, ...]
    help: str

    @property
    def family(self) -> str:
        """The name prometheus_client takes (without `_total`)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name


_C, _N, _L = ("cluster",), ("cluster", "node"), ("listener",)
SPECS: dict[str, MetricSpec] = {s.name: s for s in (
    # -- leadership (scrape time, except the failover histogram)
    MetricSpec("raftlb_leader", "gauge", _N, "1 for the node raftlb sends writes to, 0 for the others"),
    MetricSpec("raftlb_cluster_has_leader", "gauge", _C, "1 while the cluster has a live leader"),
    MetricSpec("raftlb_cluster_term", "gauge", _C, "The governing Raft term: a majority's, or a live "
               "leader's claim above it"),
    MetricSpec("raftlb_leader_changes_total", "counter", _C, "Changes of the write target (id or term)"),
    MetricSpec("raftlb_leaderless_gap_seconds", "gauge", _C, "Seconds the current leaderless gap has lasted "
               "(0 with a leader)"),
    MetricSpec("raftlb_leaderless_seconds_total", "counter", _C, "Seconds spent without a live leader"),
    MetricSpec("raftlb_failover_seconds", "histogram", _C, "Leader lost to the first write answered by the "
               "new leader"),
    # -- nodes (scrape time)
    MetricSpec("raftlb_node_up", "gauge", _N, "1 while the node is heard within the liveness timeout"),
    MetricSpec("raftlb_node_role", "gauge", (*_N, "role"), "1 for the role the node last announced"),
    MetricSpec("raftlb_node_term", "gauge", _N, "The term the node last announced"),
    MetricSpec("raftlb_node_applied_index", "gauge", _N, "The applied index the node last announced"),
    MetricSpec("raftlb_node_commit_index", "gauge", _N, "The commit index the node last announced"),
    MetricSpec("raftlb_node_lag_entries", "gauge", _N, "Entries the node's applied index is behind the "
               "leader's commit index"),
    MetricSpec("raftlb_node_announcement_age_seconds", "gauge", _N, "Seconds since the node's last valid "
               "announcement"),
    MetricSpec("raftlb_announcements_total", "counter", _N, "Valid announcements received from the node"),
    MetricSpec("raftlb_announce_streams_opened_total", "counter", _N, "Announce streams opened to the node"),
    MetricSpec("raftlb_announcements_rejected_total", "counter", (*_C, "reason"), "Announcements dropped, "
               "by reason"),
    # -- requests (per-request events)
    MetricSpec("raftlb_requests_total", "counter", (*_N, "kind", "policy", "code"), "Proxied requests "
               "finished, by route kind, read policy, node (none: never sent) and status class"),
    MetricSpec("raftlb_request_duration_seconds", "histogram", (*_C, "kind", "policy"), "From the request "
               "head to the end of the response, holds and re-sends included"),
    # -- requests (scrape time)
    MetricSpec("raftlb_requests_by_protocol_total", "counter", (*_C, "protocol"), "Requests received, by the "
               "client's protocol: http1, http2 (HTTP/2, not gRPC), grpc"),
    MetricSpec("raftlb_grpc_calls_total", "counter", (*_C, "status"), "Calls over gRPC ended, by the status "
               "they ended with (the node's, or raftlb's own: docs/protocol.md)"),
    MetricSpec("raftlb_reads_total", "counter", (*_C, "served_by"), "Reads sent to a node, by who served "
               "them: leader or follower"),
    MetricSpec("raftlb_fenced_reads_total", "counter", (*_C, "outcome"), "Index-fenced reads that did not go "
               "straight to a node: waited, leader_fallback, follower_waited, stale_resent"),
    MetricSpec("raftlb_session_writes_parked_total", "counter", _C, "Session writes parked until an earlier "
               "X-Raft-Seq arrived"),
    MetricSpec("raftlb_session_gaps_total", "counter", _C, "Session writes failed because an earlier "
               "X-Raft-Seq never arrived"),
    MetricSpec("raftlb_responses_total", "counter", (*_C, "code"), "Responses completed, by status class "
               "(from the proxy's own counters)"),
    MetricSpec("raftlb_hold_requests_total", "counter", _C, "Requests that entered the hold queue (no "
               "leader, or a re-send backing off)"),
    MetricSpec("raftlb_hold_released_total", "counter", _C, "Held requests released to a node"),
    MetricSpec("raftlb_hold_expired_total", "counter", _C, "Held requests failed after the hold timeout "
               "(503 no_leader; 502 outcome_unknown for a write an earlier attempt reached)"),
    MetricSpec("raftlb_hold_queue_requests", "gauge", _C, "Requests in the hold queue now"),
    MetricSpec("raftlb_hold_queue_bytes", "gauge", _C, "Request body bytes in the hold queue now"),
    MetricSpec("raftlb_resends_total", "counter", (*_C, "reason"), "Requests re-sent to another node, by "
               "reason"),
    MetricSpec("raftlb_misdirected_total", "counter", _C, "421 Misdirected Request answers from nodes"),
    MetricSpec("raftlb_preempted_total", "counter", _C, "Requests taken back from a node deposed by a "
               "higher term"),
    MetricSpec("raftlb_outcome_unknown_total", "counter", _C, "Writes answered 502 outcome_unknown (not safe "
               "to re-send, or out of re-sends or hold time)"),
    # -- connections (scrape time)
    MetricSpec("raftlb_downstream_connections", "gauge", _L, "Open client connections"),
    MetricSpec("raftlb_downstream_connections_rejected_total", "counter", _L, "Client connections refused "
               "at the connection limit"),
    MetricSpec("raftlb_downstream_requests_total", "counter", _L, "Requests received on the listener"),
    MetricSpec("raftlb_downstream_send_timeouts_total", "counter", _L, "Client connections cut because the "
               "client read nothing of its answer for limits.send_timeout"),
    MetricSpec("raftlb_upstream_connections", "gauge", (*_N, "state"), "Connections to the node: active, "
               "idle, connecting"),
    MetricSpec("raftlb_upstream_outstanding_requests", "gauge", _N, "Requests assigned to the node and "
               "not finished"),
    MetricSpec("raftlb_upstream_connect_failures_total", "counter", _N, "Failed connection attempts to "
               "the node"),
    # -- the process
    MetricSpec("raftlb_config_reloads_total", "counter", ("result",), "Config reloads: applied or rejected"),
    MetricSpec("raftlb_config_last_reload_success_timestamp_seconds", "gauge", (), "When the running "
               "config was loaded (Unix time)"),
    MetricSpec("raftlb_draining", "gauge", (), "1 once shutdown has begun (readiness is failing)"),
    MetricSpec("raftlb_build_info", "gauge", ("version",), "Always 1; the raftlb version as a label"),
)}

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Bucket bounds as the text format writes them (what prometheus_client's own histograms print).
_DURATION_LE = [*(repr(float(b)) for b in DURATION_BUCKETS), "+Inf"]
FAILOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
_CODES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


def lag_entries(table: LeaderTable, now: float) -> dict[str, int]:
    """Per node with a known applied index: entries behind the leader's commit index (or, without a leader,
    the highest commit index any live node reported). Nodes with nothing to compare are left out."""
    nodes = table.nodes
    leader = table.leader(now)
    ref = nodes[leader].commit_index if leader is not None else None
    if ref is None:
        known = [v.commit_index for v in nodes.values()
                 if v.commit_index is not None and v.is_live(now, table.liveness_timeout)]
        ref = max(known, default=None)
    if ref is None:
        return {}
    return {v.id: max(0, ref - v.applied_index) for v in nodes.values() if v.applied_index is not None}


_Families = dict[str, GaugeMetricFamily | CounterMetricFamily]


def _family(name: str) -> GaugeMetricFamily | CounterMetricFamily:
    spec = SPECS[name]
    if spec.type == "counter":
        return CounterMetricFamily(spec.family, spec.help, labels=spec.labels)
    return GaugeMetricFamily(spec.family, spec.help, labels=spec.labels)


class RuntimeCollector(Collector):
    """Reads the running state (raftlb.ops.runtime.Runtime) at scrape time (see the module doc)."""

    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self.runtime = runtime
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        now = time.monotonic()
        fams = {name: _family(name) for name, s in SPECS.items()
                if s.type != "histogram" and name not in self.metrics.instrumented}
        for name, proxy in self.runtime.proxies.items():
            self._cluster(fams, name, proxy, now)
        for srv in self.runtime.served_listeners():
            lbl = [srv.name]
            fams["raftlb_downstream_connections"].add_metric(lbl, len(srv.connections))
            fams["raftlb_downstream_connections_rejected_total"].add_metric(lbl, srv.rejected_connections)
            fams["raftlb_downstream_requests_total"].add_metric(lbl, srv.requests)
            fams["raftlb_downstream_send_timeouts_total"].add_metric(lbl, srv.send_timeouts)
        fams["raftlb_draining"].add_metric([], 1 if self.runtime.draining else 0)
        fams["raftlb_build_info"].add_metric([__version__], 1)
        return fams.values()

    def _cluster(self, fams: _Families, name: str, proxy: ClusterProxy, now: float) -> None:
        table, stats = proxy.table, proxy.stats
        leader = table.leader(now)
        c = [name]
        fams["raftlb_cluster_has_leader"].add_metric(c, 0 if leader is None else 1)
        fams["raftlb_cluster_term"].add_metric(c, table.term)
        fams["raftlb_leader_changes_total"].add_metric(c, stats.leader_changes)
        gap = self.metrics.leaderless(name, now)
        fams["raftlb_leaderless_gap_seconds"].add_metric(c, gap[0])
        fams["raftlb_leaderless_seconds_total"].add_metric(c, gap[1])
        for i, n in enumerate(stats.responses_by_class):
            if n:
                fams["raftlb_responses_total"].add_metric([name, _CODES[i]], n)
        fams["raftlb_hold_requests_total"].add_metric(c, stats.held)
        fams["raftlb_hold_released_total"].add_metric(c, stats.released)
        fams["raftlb_hold_expired_total"].add_metric(c, stats.expired)
        fams["raftlb_hold_queue_requests"].add_metric(c, len(proxy.held))
        fams["raftlb_hold_queue_bytes"].add_metric(c, proxy.held_bytes)
        for reason, n in sorted(stats.resends.items()):
            fams["raftlb_resends_total"].add_metric([name, reason], n)
        fams["raftlb_misdirected_total"].add_metric(c, stats.misdirected)
        fams["raftlb_preempted_total"].add_metric(c, stats.preempted)
        fams["raftlb_outcome_unknown_total"].add_metric(c, stats.outcome_unknown)
        for proto, n in (("http1", stats.requests - stats.h2_requests - stats.grpc_calls),
                         ("http2", stats.h2_requests), ("grpc", stats.grpc_calls)):
            fams["raftlb_requests_by_protocol_total"].add_metric([name, proto], n)
        for code, n in sorted(stats.grpc_status.items()):
            fams["raftlb_grpc_calls_total"].add_metric([name, grpc_status_name(code)], n)
        fams["raftlb_reads_total"].add_metric([name, "leader"], stats.reads_leader)
        fams["raftlb_reads_total"].add_metric([name, "follower"], stats.reads_follower)
        for outcome, n in (("waited", stats.fence_waited), ("leader_fallback", stats.fence_fallback),
                           ("follower_waited", stats.follower_waited), ("stale_resent", stats.fence_stale)):
            fams["raftlb_fenced_reads_total"].add_metric([name, outcome], n)
        fams["raftlb_session_writes_parked_total"].add_metric(c, stats.session_parked)
        fams["raftlb_session_gaps_total"].add_metric(c, stats.session_gaps)
        rejected = {"table": stats.rejected_announcements}
        subs = self.runtime.subscriptions.get(name)
        if subs is not None:
            rejected.update(subs.rejected)
        for reason, n in sorted(rejected.items()):
            fams["raftlb_announcements_rejected_total"].add_metric([name, reason], n)
        self._nodes(fams, name, proxy, now, leader)

    def _nodes(self, fams: _Families, name: str, proxy: ClusterProxy, now: float, leader: str | None) -> None:
        table = proxy.table
        subs = self.runtime.subscriptions.get(name)
        lags = lag_entries(table, now)
        for view in table.nodes.values():
            n_ = [name, view.id]
            fams["raftlb_leader"].add_metric(n_, 1 if view.id == leader else 0)
            fams["raftlb_node_up"].add_metric(n_, 1 if view.is_live(now, table.liveness_timeout) else 0)
            for role in ROLES:
                fams["raftlb_node_role"].add_metric([*n_, role], 1 if view.role == role else 0)
            fams["raftlb_node_term"].add_metric(n_, view.term)
            if view.applied_index is not None:
                fams["raftlb_node_applied_index"].add_metric(n_, view.applied_index)
            if view.commit_index is not None:
                fams["raftlb_node_commit_index"].add_metric(n_, view.commit_index)
            if view.id in lags:
                fams["raftlb_node_lag_entries"].add_metric(n_, lags[view.id])
            if view.last_heard is not None:
                fams["raftlb_node_announcement_age_seconds"].add_metric(n_, max(0.0, now - view.last_heard))
            sub = subs.nodes.get(view.id) if subs is not None else None
            if sub is not None:
                fams["raftlb_announcements_total"].add_metric(n_, sub.announcements)
                fams["raftlb_announce_streams_opened_total"].add_metric(n_, sub.connects)
            pool = proxy.pools.get(view.id)
            if pool is not None:
                for state, count in (("active", len(pool.busy)), ("idle", len(pool.idle)),
                                     ("connecting", pool.connecting)):
                    fams["raftlb_upstream_connections"].add_metric([*n_, state], count)
                fams["raftlb_upstream_outstanding_requests"].add_metric(n_, pool.outstanding)
                fams["raftlb_upstream_connect_failures_total"].add_metric(n_, pool.connect_failures)


class _Buckets:
    """One histogram series kept by hand: counts per bucket (the last one is +Inf) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0


class RequestCollector(Collector):
    """raftlb_requests_total and raftlb_request_duration_seconds from the plain per-request counters."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        spec = SPECS["raftlb_requests_total"]
        requests = CounterMetricFamily(spec.family, spec.help, labels=spec.labels)
        for labels, count in list(self.metrics.request_counts.items()):
            requests.add_metric(list(labels), count[0])
        spec = SPECS["raftlb_request_duration_seconds"]
        duration = HistogramMetricFamily(spec.family, spec.help, labels=spec.labels)
        for hlabels, hist in list(self.metrics.request_durations.items()):
            cumulative = list(accumulate(hist.counts))
            duration.add_metric(list(hlabels), list(zip(_DURATION_LE, cumulative, strict=True)), hist.sum)
        return [requests, duration]


@dataclass
class _Failover:
    """A leader loss not yet followed by a write the new leader answered."""

    started: float
    target: str | None = None  # the latest new leader


class Metrics:
    """The registry of one server: event-fed instruments plus the scrape-time collector."""

    def __init__(self, runtime: Runtime | None = None, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.failover = _histogram("raftlb_failover_seconds", r, FAILOVER_BUCKETS)
        self.reloads = _counter("raftlb_config_reloads_total", r)
        spec = SPECS["raftlb_config_last_reload_success_timestamp_seconds"]
        self.last_reload = Gauge(spec.family, spec.help, registry=r)
        self.last_reload.set(time.time())
        for result in ("applied", "rejected"):
            self.reloads.labels(result)
        self.instrumented = frozenset({
            "raftlb_requests_total", "raftlb_config_reloads_total",
            "raftlb_config_last_reload_success_timestamp_seconds",
        })
        # Per-request counts and durations in plain lists (no lock, no label lookup per request), turned
        # into metric families at scrape time by RequestCollector.
        self.request_counts: dict[tuple[str, str, str, str, str], list[int]] = {}
        self.request_durations: dict[tuple[str, str, str], _Buckets] = {}
        # The two cells a request's outcome lands in, by (cluster, node, kind, policy, status class): one
        # lookup per request instead of building both keys (filled by `observe_request` on first use).
        self._cells: dict[tuple[str, str | None, str, str, int], tuple[list[int], _Buckets]] = {}
        self._failovers: dict[str, _Failover] = {}
        self._gap_start: dict[str, float] = {}  # cluster -> monotonic start of its leaderless gap
        self._gap_total: dict[str, float] = {}
        r.register(RequestCollector(self))
        if runtime is not None:
            r.register(RuntimeCollector(runtime, self))
        if process:
            ProcessCollector(registry=r)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    # -- events -------------------------------------------------------------------------------------------

    def cluster_added(self, cluster: str, now: float | None = None) -> None:
        """A cluster starts without a leader: its leaderless time counts from here."""
        self._gap_start.setdefault(cluster, time.monotonic() if now is None else now)
        self._gap_total.setdefault(cluster, 0.0)
        self.failover.labels(cluster)  # the series exists (empty) before the first failover

    def on_leader_change(self, cluster: str, change: LeaderChange, now: float | None = None) -> None:
        """From the server's change listeners: leaderless time and the start of a failover."""
        now = time.monotonic() if now is None else now
        if change.new_leader is None:
            self._gap_start.setdefault(cluster, now)
        elif cluster in self._gap_start:
            start = self._gap_start.pop(cluster)
            self._gap_total[cluster] = self._gap_total.get(cluster, 0.0) + (now - start)
        pending = self._failovers.get(cluster)
        lost = change.old_leader is not None and change.new_leader != change.old_leader
        if pending is None and lost:
            pending = self._failovers[cluster] = _Failover(now)
        if pending is not None:
            pending.target = change.new_leader

    def leaderless(self, cluster: str, now: float) -> tuple[float, float]:
        """(the current gap, all gaps so far) in seconds."""
        start = self._gap_start.get(cluster)
        gap = 0.0 if start is None else max(0.0, now - start)
        return gap, self._gap_total.get(cluster, 0.0) + gap

    def request_done(self, cluster: str, route: RouteDecision, node: str | None, ex: Exchange) -> None:
        """The proxy's per-request hook: one call when a request's response is complete or failed. Also
        writes the access log line, when `logging.access_log` is on."""
        seconds = time.monotonic() - ex.started_at
        status = ex.status
        kind = route.kind
        cls = status // 100 if status > 0 else 0  # (as observe_request reads it: 0 is "none")
        key = (cluster, node, kind, route.policy, cls if cls < 5 else 5)
        cells = self._cells.get(key)
        if cells is None:
            self.observe_request(cluster, kind, route.policy, node, status, seconds)
            code = _CODES[key[4]]
            self._cells[key] = (self.request_counts[(cluster, node or "none", kind, route.policy, code)],
                                self.request_durations[(cluster, kind, route.policy)])
        else:
            cells[0][0] += 1
            hist = cells[1]
            hist.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
            hist.sum += seconds
            if kind == "write" and self._failovers:
                self._failover_answered(cluster, node, status)
        if not access_log.disabled and access_enabled():  # (the first test alone when it is off, the default)
            log_access(cluster, node, ex, seconds)

    def observe_request(self, cluster: str, kind: str, policy: str, node: str | None, status: int,
                        seconds: float) -> None:
        cls = status // 100  # (not min(): a builtin with keyword parsing, per request)
        code = _CODES[cls if cls < 5 else 5] if status > 0 else "none"
        key = (cluster, node or "none", kind, policy, code)
        count = self.request_counts.get(key)
        if count is None:
            count = self.request_counts[key] = [0]
        count[0] += 1
        hkey = (cluster, kind, policy)
        hist = self.request_durations.get(hkey)
        if hist is None:
            hist = self.request_durations[hkey] = _Buckets(DURATION_BUCKETS)
        hist.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        hist.sum += seconds
        if kind == "write" and self._failovers:
            self._failover_answered(cluster, node, status)

    def _failover_answered(self, cluster: str, node: str | None, status: int) -> None:
        """A write answered by `node`: the end of a failover this cluster is timing, when `node` is its new
        leader and the answer is not a failure."""
        if 200 <= status < 500:
            pending = self._failovers.get(cluster)
            if pending is not None and pending.target is not None and node == pending.target:
                del self._failovers[cluster]
                self.failover.labels(cluster).observe(max(0.0, time.monotonic() - pending.started))

    def config_reloaded(self, applied: bool) -> None:
        self.reloads.labels("applied" if applied else "rejected").inc()
        if applied:
            self.last_reload.set(time.time())

    def forget_cluster(self, cluster: str) -> None:
        """A cluster removed by a reload: stop its leaderless clock."""
        self._gap_start.pop(cluster, None)
        self._gap_total.pop(cluster, None)
        self._failovers.pop(cluster, None)


def _counter(name: str, registry: CollectorRegistry) -> Counter:
    spec = SPECS[name]
    return Counter(spec.family, spec.help, spec.labels, registry=registry)


def _histogram(name: str, registry: CollectorRegistry, buckets: tuple[float, ...]) -> Histogram:
    spec = SPECS[name]
    return Histogram(spec.family, spec.help, spec.labels, registry=registry, buckets=buckets)


def metric_names() -> Iterator[str]:
    """Every series name a scrape can contain for SPECS (histograms add _bucket, _sum, _count)."""
    for spec in SPECS.values():
        if spec.type == "histogram":
            yield from (f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count")
        else:
            yield spec.name
