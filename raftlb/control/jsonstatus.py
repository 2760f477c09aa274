"""Any node with a JSON status endpoint (kind `json`): rqlite's `/status`, Consul's `/v1/agent/self`, ...

The cluster's `status:` settings (config.StatusConfig) say what to request and where each field is:

    status:
      path: /status                 # GET {announce_url}/status (method, body and headers can be set)
      term: store.raft.term         # dotted paths; list items by number (servers.0.id); $ = the whole answer
      role: store.raft.state        # mapped through `roles` (default: leader/follower/candidate/learner,
      roles: {shutdown: follower}   #   compared case-insensitively)
      leader: store.leader.node_id  # mapped to a node id: `leader_ids`, else a node id, else a node's
      leader_ids: {"1": n1}         #   url/announce_url host:port (`leader_match: host`: the host alone)
      applied_index: store.raft.applied_index
      commit_index: store.raft.commit_index

Numbers may be JSON numbers or decimal strings; booleans may be `true` or "true". Without `role`, the role
follows from `leader`: this node -> leader, another -> follower, none -> candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from raftlb.config.model import ClusterConfig, FieldPath, NodeConfig, StatusConfig
from raftlb.control.poll import NodeAdapter, PollingSubscriptions, StatusError, as_index, decode_json
from raftlb.core.announcement import ROLES, Announcement

log = logging.getLogger("raftlb.control.kinds.json")

_MISSING = object()


def lookup(doc: object, path: FieldPath) -> object:
    """The value at `path` in `doc`, or _MISSING. Parts that are numbers index lists."""
    value = doc
    for part in path:
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
        if value is _MISSING:
            return value
    return value


def _text(value: object) -> str | None:
    """A scalar as text (`true` -> "true", 3 -> "3"); None for null, missing or empty."""
    if value is _MISSING or value is None or isinstance(value, dict | list):
        return None
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return text.strip() or None


class LeaderResolver:
    """Maps the raw `leader` values of a status answer to node ids (module doc), in that order."""

    def __init__(self, nodes: Sequence[NodeConfig], status: StatusConfig) -> None:
        self.explicit = dict(status.leader_ids)
        self.ids = {n.id for n in nodes}
        self.by_addr: dict[str, str] = {}
        hosts: dict[str, set[str]] = {}
        for node in nodes:
            for url in (node.url, node.announce_url):
                parts = urlsplit(url)
                host = (parts.hostname or "").lower()
                self.by_addr.setdefault(f"{host}:{parts.port}", node.id)
                hosts.setdefault(host, set()).add(node.id)
        # A host shared by several nodes (one machine, several ports) names none of them.
        self.by_host = {h: next(iter(ids)) for h, ids in hosts.items() if len(ids) == 1}
        self.match_host = status.leader_match == "host"

    def node_id(self, raw: str) -> str | None:
        if raw in self.explicit:
            return self.explicit[raw]
        if raw in self.ids:
            return raw
        addr = raw.split("://", 1)[-1].rstrip("/").lower()
        if addr in self.by_addr:
            return self.by_addr[addr]
        if self.match_host:
            host = addr.rsplit(":", 1)[0] if ":" in addr else addr
            return self.by_host.get(host.strip("[]"))
        return None


def parse_status(doc: object, node_id: str, status: StatusConfig, leaders: LeaderResolver
                 ) -> tuple[Announcement, str | None]:
    """A decoded status answer -> (the node's announcement, a raw leader value no node matched). Pure.

    An unmatched leader leaves the hint empty when the role is read from the answer; without `role`, it
    cannot tell whether this node leads, and the answer is rejected."""
    term_value = lookup(doc, status.term)
    if term_value is _MISSING:
        raise StatusError("invalid_fields", f"term: nothing at {'.'.join(status.term) or '$'}")
    term = as_index(term_value, "term")
    raw_leader = _text(lookup(doc, status.leader)) if status.leader is not None else None
    leader = leaders.node_id(raw_leader) if raw_leader is not None else None
    unmatched = raw_leader if raw_leader is not None and leader is None else None
    if status.role is not None:
        raw_role = _text(lookup(doc, status.role))
        role = _roles(status).get(raw_role.lower()) if raw_role is not None else None
        if role is None:
            raise StatusError("invalid_fields", f"role: {raw_role!r} maps to no role (see status.roles)")
    elif unmatched is not None:
        raise StatusError("unknown_leader", f"leader {unmatched!r} is none of the configured nodes "
                                            "(map it with status.leader_ids)")
    else:
        role = "candidate" if leader is None else "leader" if leader == node_id else "follower"
    if role == "leader":
        leader = node_id
    ann = Announcement(
        node=node_id, term=term, role=role, leader=leader,
        commit_index=_index(doc, status.commit_index, "commit_index"),
        applied_index=_index(doc, status.applied_index, "applied_index"),
        has_quorum=_flag(doc, status.has_quorum, "has_quorum"),
    )
    return ann, unmatched


def _roles(status: StatusConfig) -> dict[str, str]:
    return {**{r: r for r in ROLES}, **dict(status.roles)}


def _index(doc: object, path: FieldPath | None, name: str) -> int | None:
    if path is None or (value := lookup(doc, path)) is _MISSING or value is None:
        return None
    return as_index(value, name)


def _flag(doc: object, path: FieldPath | None, name: str) -> bool | None:
    if path is None or (value := lookup(doc, path)) is _MISSING or value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise StatusError("invalid_fields", f"{name}: must be true or false, got {value!r}")


class JsonStatusAdapter(NodeAdapter):
    """One node's JSON status endpoint, read through the cluster's `status:` settings."""

    def __init__(self, node: NodeConfig, base_url: str, status: StatusConfig,
                 leaders: LeaderResolver) -> None:
        super().__init__(node, base_url)
        self.status = status
        self.leaders = leaders
        self._url = self.base_url + status.path
        self._headers = {"accept": "application/json", **{k: v for k, v in status.headers if v}}
        self._unmatched: set[str] = set()  # leader values already warned about

    async def poll(self, client: httpx.AsyncClient, timeout: httpx.Timeout) -> Announcement:
        s = self.status
        resp = await client.request(s.method, self._url, content=s.body, headers=self._headers,
                                    timeout=timeout)
        doc: Any = decode_json(self.check(resp))
        ann, unmatched = parse_status(doc, self.node.id, s, self.leaders)
        if unmatched is not None and unmatched not in self._unmatched:
            self._unmatched.add(unmatched)
            log.warning("node %s: leader %r is none of the configured nodes; map it with status.leader_ids",
                        self.node.id, unmatched)
        return ann


def json_adapter(node: NodeConfig, cluster: ClusterConfig, base_url: str) -> JsonStatusAdapter:
    if cluster.status is None:
        raise ValueError(f"cluster {cluster.name}: kind json needs `status` settings")
    return JsonStatusAdapter(node, base_url, cluster.status, LeaderResolver(cluster.nodes, cluster.status))


class JsonSubscriptions(PollingSubscriptions):
    """Polls every node's JSON status endpoint (kind `json`)."""

    def make_adapter(self, node: NodeConfig) -> NodeAdapter:
        return json_adapter(node, self.cluster, node.announce_url)

    def needs_restart(self, old: ClusterConfig, new: ClusterConfig) -> bool:
        return old.status != new.status or old.nodes != new.nodes  # the leader mapping reads every node
