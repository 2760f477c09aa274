"""Cluster kinds: who follows a cluster's nodes, and how one node's native status is read.

`native` nodes (and nodes with a `raftlb announce` sidecar, `sidecar: true`) push raft-announce/1 and are
followed by `stream.ClusterSubscriptions`; `etcd` and `json` nodes are polled through an adapter
(`poll.NodePoller`). `make_subscriptions` picks; `make_adapter` gives the sidecar its one node's adapter.
"""

from __future__ import annotations

import time

import httpx

from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.control.etcd import EtcdAdapter, EtcdMembers, EtcdSubscriptions
from raftlb.control.follower import Clock, OnAnnouncement, OnDown
from raftlb.control.jsonstatus import JsonSubscriptions, json_adapter
from raftlb.control.poll import NodeAdapter, NodeStatus, PollingSubscriptions, Subscriptions
from raftlb.control.stream import ClusterSubscriptions
from raftlb.tasks import TaskSet

__all__ = ["NodeAdapter", "NodeStatus", "PollingSubscriptions", "Subscriptions", "make_adapter",
           "make_subscriptions", "polls"]


def polls(cluster: ClusterConfig) -> bool:
    """raftlb polls this cluster's status APIs itself (rather than subscribing to announce streams)."""
    return cluster.kind != "native" and not cluster.sidecar


def make_subscriptions(cluster: ClusterConfig, on_announcement: OnAnnouncement, on_down: OnDown,
                       tasks: TaskSet, client: httpx.AsyncClient | None = None, *,
                       clock: Clock = time.monotonic) -> Subscriptions:
    """The subscriptions that follow `cluster`'s nodes, chosen by its kind (not yet started). `clock` times
    liveness: the one the leader table is fed with."""
    if not polls(cluster):
        return ClusterSubscriptions(cluster, on_announcement, on_down, tasks, client=client, clock=clock)
    if cluster.kind == "etcd":
        return EtcdSubscriptions(cluster, on_announcement, on_down, tasks, client, clock=clock)
    return JsonSubscriptions(cluster, on_announcement, on_down, tasks, client, clock=clock)


def make_adapter(cluster: ClusterConfig, node: NodeConfig, base_url: str) -> NodeAdapter:
    """The adapter reading `node`'s status at `base_url` (for a sidecar: the node's own client url)."""
    if cluster.kind == "etcd":
        return EtcdAdapter(node, base_url, EtcdMembers(cluster.nodes))
    if cluster.kind == "json":
        return json_adapter(node, cluster, base_url)
    raise ValueError(f"cluster {cluster.name}: kind {cluster.kind} has no status adapter")
