"""etcd: polls each member's `POST /v3/maintenance/status` on the JSON gateway (docs/clusters.md,
"etcd").

    {"header": {"cluster_id": "…", "member_id": "…", "revision": "7", "raft_term": "3"}, "version": "3.5.1",
     "dbSize": "…", "leader": "…", "raftIndex": "12", "raftTerm": "3", "raftAppliedIndex": "12", …}

Every 64-bit number is a JSON string and zero fields are omitted. Mapping to an announcement:

- term: `raftTerm` (else `header.raft_term`);
- role: `learner` when `isLearner`; `candidate` (no leader, `has_quorum: false`) when `leader` is absent or
  `errors` says "no leader"; `leader` when `leader` is the member's own id; else `follower`;
- leader: the `leader` member id as a node id. A member's own id is learnt from its status header; ids of
  members not yet heard come from `POST /v3/cluster/member/list` (a member whose clientURLs hold a node's
  url or announce_url, else whose name is a node id);
- applied_index: `header.revision`, the revision the member has applied: what a put returns and what a
  serializable range reflects, so it is the index that fences reads. commit_index carries the same value
  (the member's applied revision is committed; etcd reports no committed revision). `raftIndex` counts
  Raft log entries, another index space: mixing it in would make every lag figure meaningless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from raftlb.config.model import NodeConfig
from raftlb.control.poll import (
    JSON_HEADERS,
    NodeAdapter,
    PollingSubscriptions,
    StatusError,
    as_index,
    decode_json,
)
from raftlb.core.announcement import Announcement

log = logging.getLogger("raftlb.control.etcd")

STATUS_PATH = "/v3/maintenance/status"
MEMBER_LIST_PATH = "/v3/cluster/member/list"
MEMBER_LIST_INTERVAL = 1.0  # an unknown leader id asks for the member list at most this often


def parse_status(doc: object, node_id: str, members: Mapping[str, str]
                 ) -> tuple[Announcement, str, str | None]:
    """A decoded status answer -> (announcement, the member's own id, the leader's member id or None).

    `members` maps member ids to node ids; a leader id missing from it leaves the hint empty. Pure."""
    if not isinstance(doc, dict) or not isinstance(header := doc.get("header"), dict):
        raise StatusError("invalid_fields", "not an etcd status answer (no header)")
    own = header.get("member_id")
    if not isinstance(own, str) or not own.isdigit() or own == "0":
        raise StatusError("invalid_fields", f"header.member_id: must be a member id, got {own!r}")
    term = as_index(doc.get("raftTerm", header.get("raft_term", "0")), "raftTerm")
    revision = as_index(header.get("revision", "0"), "header.revision")
    leader = doc.get("leader")
    if leader is not None and not (isinstance(leader, str) and leader.isdigit()):
        raise StatusError("invalid_fields", f"leader: must be a member id, got {leader!r}")
    errors = doc.get("errors") or []
    if not isinstance(errors, list):
        raise StatusError("invalid_fields", "errors: must be a list")
    if leader == "0" or any("no leader" in str(e) for e in errors):
        leader = None
    has_quorum: bool | None = None
    if doc.get("isLearner") is True:
        role = "learner"
    elif leader is None:
        role, has_quorum = "candidate", False
    elif leader == own:
        role, has_quorum = "leader", True
    else:
        role = "follower"
    hint = node_id if leader == own else members.get(leader) if leader is not None else None
    ann = Announcement(node=node_id, term=term, role=role, leader=hint, commit_index=revision,
                       applied_index=revision, has_quorum=has_quorum)
    return ann, own, leader


def _netloc(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


def map_members(doc: object, nodes: Sequence[NodeConfig]) -> dict[str, str]:
    """A decoded member list -> {member id: node id}: a member whose clientURLs hold a node's url or
    announce_url (host and port), else whose name is a node id. Pure."""
    if not isinstance(doc, dict) or not isinstance(members := doc.get("members", []), list):
        raise StatusError("invalid_fields", "not an etcd member list")
    by_addr: dict[str, str] = {}
    for node in nodes:
        by_addr.setdefault(_netloc(node.url), node.id)
        by_addr.setdefault(_netloc(node.announce_url), node.id)
    ids = {n.id for n in nodes}
    found: dict[str, str] = {}
    for m in members:
        if not isinstance(m, dict) or not isinstance(mid := m.get("ID"), str) or not mid.isdigit():
            continue
        urls = m.get("clientURLs") or []
        matches = [by_addr[a] for a in (_netloc(u) for u in urls if isinstance(u, str)) if a in by_addr]
        if matches:
            found[mid] = matches[0]
        elif m.get("name") in ids:
            found[mid] = str(m["name"])
    return found


class EtcdMembers:
    """member id -> node id for one cluster, shared by its pollers. A member's own status is authoritative
    for its id; the member list fills in members not heard yet."""

    def __init__(self, nodes: Sequence[NodeConfig]) -> None:
        self.nodes = tuple(nodes)
        self.ids: dict[str, str] = {}
        self._own: set[str] = set()  # ids learnt from the members themselves
        self._listed_at = float("-inf")
        self._lock = asyncio.Lock()

    def learn(self, member_id: str, node_id: str) -> None:
        """The node answered with its own member id. Two nodes answering with one id point at one member."""
        other = self.ids.get(member_id)
        if other is not None and other != node_id and member_id in self._own:
            raise StatusError("wrong_node", f"member {member_id} already answers as node {other}: "
                                            "two nodes' urls reach one etcd member")
        if other != node_id:
            for mid in [m for m, n in self.ids.items() if n == node_id]:  # re-added under a new id
                del self.ids[mid]
                self._own.discard(mid)
            self.ids[member_id] = node_id
        self._own.add(member_id)

    async def refresh(self, client: httpx.AsyncClient, base_url: str, timeout: httpx.Timeout) -> None:
        """Ask one member for the member list, at most every MEMBER_LIST_INTERVAL across the cluster."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            if loop.time() - self._listed_at < MEMBER_LIST_INTERVAL:
                return
            self._listed_at = loop.time()
            resp = await client.post(base_url + MEMBER_LIST_PATH, content=b"{}", headers=JSON_HEADERS,
                                     timeout=timeout)
            if resp.status_code != 200:
                return
            for mid, node_id in map_members(decode_json(resp.content), self.nodes).items():
                if mid not in self._own:
                    self.ids[mid] = node_id


class EtcdAdapter(NodeAdapter):
    """One etcd member's status (module doc)."""

    def __init__(self, node: NodeConfig, base_url: str, members: EtcdMembers) -> None:
        super().__init__(node, base_url)
        self.members = members
        self._url = self.base_url + STATUS_PATH

    async def poll(self, client: httpx.AsyncClient, timeout: httpx.Timeout) -> Announcement:
        resp = await client.post(self._url, content=b"{}", headers=JSON_HEADERS, timeout=timeout)
        doc: Any = decode_json(self.check(resp))
        ann, own, leader = parse_status(doc, self.node.id, self.members.ids)
        self.members.learn(own, self.node.id)
        if leader is not None and ann.leader is None:
            # The status itself is good: a failed member list only leaves the hint empty this time.
            with contextlib.suppress(httpx.HTTPError, StatusError):
                await self.members.refresh(client, self.base_url, timeout)
            ann, _, _ = parse_status(doc, self.node.id, self.members.ids)
            if ann.leader is None:
                log.debug("node %s: leader member %s is none of the configured nodes", self.node.id, leader)
        return ann


class EtcdSubscriptions(PollingSubscriptions):
    """Polls every member of an etcd cluster (kind `etcd`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.members = EtcdMembers(self.cluster.nodes)

    def make_adapter(self, node: NodeConfig) -> NodeAdapter:
        self.members.nodes = self.cluster.nodes  # after a reload, the list maps against the new nodes
        return EtcdAdapter(node, node.announce_url, self.members)
