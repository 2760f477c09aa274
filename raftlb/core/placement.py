"""Where a request goes now: the leader, a node its read policy allows, or one of the ways to wait.

Pure: the leader table, the per-node load and `now` come in, a node id or a `Wait` comes out. The data
path (raftlb.proxy.cluster) acts on the answer: it sends, holds, parks the read on the fence wait list, or
hands it to the read-index broker. The rules (docs/how-it-works.md, "What happens to a write" and the read
policies), each in one function:

- `place`: the node for a request now, or how it waits (the whole placement rule, deadlines included).
- `eligible_nodes`: which live nodes a read's policy allows (fenced, bounded, linearizable, any).
  (`raftlb.core.readplace.place_read`: which of them serves it, followers first and the leader's spare
  capacity too, or a short wait for an idle one coming.)
- `is_caught_up`: whether a node counts as caught up with the leader (bounded staleness in time).
- `below_fence`: index fencing of answers (the floor itself: `RequestState.fence`; which requests keep
  the client's token: `raftlb.core.router.keeps_token`, precomputed per route).
- `leader_moved`: a leader-bound request whose connection was being opened when the leader changed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Protocol

from raftlb.core.leader_table import LeaderTable
from raftlb.core.readplace import leader_bias, place_read
from raftlb.core.router import RouteDecision


class Target(Enum):
    """Which nodes a request may go to: the request's routing state (one value, not a set of flags)."""

    LEADER = "leader"  # writes, `leader` reads, and reads that fell back to the leader
    READ = "read"  # a read, among the nodes its policy allows (followers preferred)


class Wait(Enum):
    """What a request does when `place` names no node."""

    HOLD = "hold"  # the hold queue: no leader (no live node for `any`), or a re-send's backoff
    READ_INDEX = "read_index"  # a linearizable read without its read index: the read-index broker
    FOLLOWER = "follower"  # only the leader has the index: wait (follower_wait) for a follower
    FENCE = "fence"  # no node at the index yet (or only busy ones): the fence wait list
    FALL_BACK = "fall_back"  # no node qualifies and waiting is over (or pointless): the leader serves it


# (module-level names for the members the hot path compares: a global is cheaper than an enum attribute)
_LEADER = Target.LEADER


class Placeable(Protocol):
    """What `place` reads of a request."""

    @property
    def target(self) -> Target: ...
    @property
    def route(self) -> RouteDecision: ...
    @property
    def floor(self) -> int: ...
    @property
    def read_index(self) -> int | None: ...
    @property
    def avoid(self) -> str | None: ...
    @property
    def retry_at(self) -> float: ...
    @property
    def wait_until(self) -> float: ...
    @property
    def arrived_at(self) -> float: ...


def wait_budget(wait: Wait, route: RouteDecision, follower_wait: float) -> float:
    """How long a read may wait for a follower (`follower_wait`) or for its fence (the route's
    `fence_wait`), counted from the first time it waits; then the leader serves it."""
    return follower_wait if wait is Wait.FOLLOWER else route.fence_wait


def place(req: Placeable, table: LeaderTable, now: float, follower_wait: float,
          caught_up_at: Mapping[str, float], load: Callable[[str], int], leader_margin: int | None = None,
          rng: Callable[[], float] = random.random) -> str | Wait:
    """The node `req` goes to now, or how it waits.

    LEADER: the leader; none, or a re-send still in its backoff (`retry_at`): HOLD.
    READ:
      - linearizable without a read index: READ_INDEX.
      - no node the policy allows: `any` holds; `bounded` falls back to the leader at once; fenced and
        linearizable wait for the fence (FENCE) until `wait_until`, then FALL_BACK.
      - only the leader allows it, followers are preferred and there are live followers: FOLLOWER, until
        `wait_until` (the leader serves it after that, as one of the nodes at the index).
      - else `raftlb.core.readplace.place_read` among them (the node the last attempt failed on avoided;
        followers preferred: the leader counts `leader_bias(prefer_followers, leader_margin)` more
        requests than it has); its short wait for an idle node is a FENCE wait.
    `wait_until` is 0.0 until the request first waits; the caller sets it to `now + wait_budget(...)`.
    (Arguments by position: this runs per read.)
    """
    if req.target is _LEADER:
        if req.retry_at > now:
            return Wait.HOLD
        leader = table.leader(now)
        return Wait.HOLD if leader is None else leader
    route = req.route
    policy = route.policy
    if policy == "linearizable" and req.read_index is None:
        return Wait.READ_INDEX
    floor = req.floor
    if floor > 0 and (policy == "fenced" or policy == "linearizable"):
        cands = table.applied_at_least(floor, now)  # (eligible_nodes' rule for these, without the call)
    else:
        cands = eligible_nodes(table, route, floor, now, caught_up_at)
    if not cands:
        if policy == "any":
            return Wait.HOLD
        if policy == "bounded":
            return Wait.FALL_BACK
        return Wait.FALL_BACK if 0.0 < req.wait_until <= now else Wait.FENCE
    wait_over = 0.0 < req.wait_until <= now
    leader = table.leader(now)
    if len(cands) == 1:
        if (route.prefer_followers and follower_wait > 0 and not wait_over and cands[0] == leader
                and len(table.live_nodes(now)) > 1):
            # Only the leader has the index yet; followers usually apply it within a heartbeat. Wait a
            # little for one rather than load the leader with every read that follows a write.
            return Wait.FOLLOWER
        if wait_over and cands[0] == leader:
            return leader  # its wait for a follower is over: the leader serves it, busy or not
        at_index = cands
    else:
        at_index = cands
        avoid = req.avoid
        if avoid is not None and len(cands) > 1 and avoid in cands:
            cands = [n for n in cands if n != avoid]
    coming: list[str] = []
    quarter = route.fence_wait / 4
    patience = follower_wait if follower_wait < quarter else quarter  # (not min(): per read, and slower)
    if (patience > 0 and floor > 0 and policy in ("fenced", "linearizable")
            and len(at_index) < len(table.nodes)):
        # Live nodes that will very likely reach the index within moments: caught up with the leader's
        # commit recently (not a node still replaying its log), and not one the read is steered from.
        steer = leader if route.prefer_followers else None
        recent = now - table.liveness_timeout
        coming = [n for n in table.live_nodes(now)
                  if n not in at_index and n != steer and n != req.avoid
                  and caught_up_at.get(n, recent - 1) >= recent]
    node = place_read(cands, coming, load, now - req.arrived_at, patience, rng, leader=leader,
                      bias=leader_bias(route.prefer_followers, leader_margin))
    if node is not None:
        return node
    return Wait.FALL_BACK if wait_over else Wait.FENCE


def eligible_nodes(table: LeaderTable, route: RouteDecision, floor: int, now: float,
                   caught_up_at: Mapping[str, float]) -> list[str]:
    """Live nodes allowed to serve a read right now (the leader included; the caller prefers followers).

    fenced / linearizable: applied index ≥ `floor` (the client's token, or the read index).
    bounded: within `max_lag_entries` of the leader's commit index and/or caught up with the leader no
             longer than `max_lag_ms` ago; and ≥ `floor`.
    any: every live node.
    """
    if route.policy == "any":
        return table.live_nodes(now)
    nodes = table.applied_at_least(floor, now) if floor > 0 else table.live_nodes(now)
    if route.policy != "bounded" or not nodes:
        return nodes
    leader = table.leader(now)
    if leader is None:
        return []
    commit = table.nodes[leader].commit_index or 0
    out = []
    for nid in nodes:
        view = table.nodes[nid]
        if route.max_lag_entries is not None and commit - (view.applied_index or 0) > route.max_lag_entries:
            continue
        if route.max_lag_ms is not None and nid != leader:
            if (now - caught_up_at.get(nid, float("-inf"))) * 1000 > route.max_lag_ms:
                continue
        out.append(nid)
    return out


def is_caught_up(node: str, leader: str, applied: int | None, leader_commit: int | None) -> bool:
    """A node is caught up with the leader when it is the leader or has applied the leader's commit index
    (the clock of `bounded` reads' `max_lag_ms`, and of the nodes `place` expects at an index soon)."""
    return node == leader or (leader_commit is not None and (applied or 0) >= leader_commit)


def below_fence(route: RouteDecision, status: int, index: int, floor: int) -> bool:
    """A read answered (not 5xx) from an index below its floor: never returned to the client."""
    return 0 <= index < floor and route.kind == "read" and status < 500


def leader_moved(target: Target, node: str, leader: str | None) -> bool:
    """A leader-bound request got its connection to `node` after another leader was announced: it is
    placed again rather than sent to the old one."""
    return target is _LEADER and leader is not None and leader != node
