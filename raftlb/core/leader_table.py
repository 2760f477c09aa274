"""The leader table: which node leads right now, fenced by Raft term.

Pure state: no I/O and no clock of its own (callers pass monotonic `now`). Subscriptions are its only
writers; the data path asks `leader(now)` on every write, so that answer is cached and recomputed only when
the state changes or when a live node's liveness deadline passes. `now` must never go backwards.

Which term governs. One node's word alone must not fence the cluster for good (a follower announcing term
2**63, by bug, corruption or malice, would otherwise depose the real leader until restart), so the term
that governs is computed from evidence, every time:

- The *quorum floor*: the k-th highest of the configured nodes' last known terms, k a majority of them
  (nodes never heard count as term 0). A majority has reached it, so a Raft cluster is at least there; a
  minority of liars cannot raise it. It never decreases (only `forget`, an operator's action, recomputes
  it from scratch).
- A *leader claim*: a live node announcing `role=leader` at a term at or above the floor. The highest live
  claim governs while its node stays live and keeps claiming, so a new leader's first announcement deposes
  the old one at once, before any follower reports the new term. Once the claimant goes silent, is down or
  says something else, its term stops governing unless the floor reached it meanwhile.
- With no live claim, a *hint*: the live non-leaders' `leader` fields at the highest term at or above the
  floor that any of them reports (a 421's `X-Raft-Leader` counts as its node's hint). They govern only when
  they name one node that is not down, not deposed, and has not spoken for itself at that term or later.

So a follower, candidate or 421 at an absurd term changes nothing while a leader claims live; a node that
claims leadership at an absurd term takes writes (or holds them) only while it is live and claiming, and
writes go back to the honest leader within one liveness timeout of it falling silent or correcting
itself. The corner case this opens: an honest new leader that dies before any follower has reported its
term stops governing after a liveness timeout, and the old leader (if still live and claiming) gets writes
again. That is safe, because Raft itself keeps the old leader from committing (the voters of the new term
refuse its appends, and it steps down when it hears of the new term, which its 421s then tell us), and it
is short: the voters of the new term adopt it when they vote and announce it within a heartbeat, which
raises the floor.

A node's own term going backwards is a stale event (from an old stream) and rejected, until its current
term was last confirmed more than a liveness timeout ago: a node that announced a bogus term and then
corrected itself is believed again after one liveness timeout. `forget` (the admin API) resets one node's
view at once.

Decisions taken beyond the rules in docs/how-it-works.md, on purpose:

- Two live nodes claiming leader at the same term cannot both be right (Raft elects at most one leader per
  term, so one is lying or broken): no leader, writes are held rather than sent to a guess. Only live
  claims count, so the hold ends when a liar goes silent or down, or when a higher term is claimed.
- Hints are taken from every live non-leader node (learners too: they receive the leader's appends like
  followers). If live hints at the hinted term name more than one node, none is used.
- A hint naming a deposed node is ignored even if that node was re-elected: the hold lasts only until the
  node announces the new term, which it does at once on a term change.
- A 421 carries the answering node's own term: it moves that node's view (role follower, its hint) like an
  announcement would, and governs only by the rules above.
- Terms, indexes, `seq` and `ts_ms` are JSON integers from 0 to 2**64-1 (etcd's uint64); anything else is
  refused when parsed (raftlb.core.announcement), so every accepted value converts to a float (metrics)
  and prints.
- Liveness is the one rule of raftlb.core.liveness: heard within the liveness timeout (and not reported
  down by its follower).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

from raftlb.core.announcement import MAX_UINT64, ROLES, Announcement
from raftlb.core.liveness import is_live, live_until

__all__ = ["MAX_UINT64", "ROLES", "Announcement", "LeaderChange", "LeaderTable", "NodeView"]

_MONOTONIC = ("last_heard", "term_heard")  # NodeView fields in monotonic time: not shown in snapshots


@dataclass(slots=True)
class NodeView:
    """What the table knows of one node. Only LeaderTable writes it; the proxy and admin read it."""

    id: str
    term: int = 0  # the node's own last known term
    role: str | None = None  # None until heard
    leader_hint: str | None = None  # the node's view of the leader at `term`
    commit_index: int | None = None
    applied_index: int | None = None
    has_quorum: bool | None = None
    seq: int | None = None
    last_heard: float | None = None  # monotonic time of the last announcement
    term_heard: float | None = None  # monotonic time `term` was last confirmed (announcement or 421)
    down: bool = False  # the subscription says unreachable/silent; cleared by the next announcement

    def is_live(self, now: float, liveness_timeout: float) -> bool:
        """Heard within the liveness timeout and not reported down."""
        return not self.down and is_live(self.last_heard, now, liveness_timeout)

    def spoke_at(self, term: int) -> bool:
        """This node's own word at `term` is known, so it governs over anyone's hint about it."""
        return self.term == term and self.role is not None


@dataclass(frozen=True, slots=True)
class LeaderChange:
    """The write target changed (or kept its id across a term). Terms are the table's before/after."""

    old_leader: str | None
    new_leader: str | None
    old_term: int
    new_term: int
    # announced | hint (how the new target was chosen); silent | down | deposed | misdirect | no_quorum |
    # stepped_down | removed | conflict (why the old target was lost)
    reason: str

    def __str__(self) -> str:
        old, new = f"{self.old_leader}@{self.old_term}", f"{self.new_leader}@{self.new_term}"
        return f"leader {old} -> {new} ({self.reason})"


class LeaderTable:
    """Applies announcements with term fencing and answers "who takes writes now" (see module doc)."""

    def __init__(self, node_ids: Iterable[str], liveness_timeout: float) -> None:
        if not liveness_timeout > 0:
            raise ValueError("liveness_timeout: must be positive")
        self._timeout = liveness_timeout
        self._nodes: dict[str, NodeView] = {}
        for node_id in node_ids:
            self._add(node_id)
        self._floor = 0  # the quorum floor (module doc); never decreases except by forget()
        self._term = 0  # the governing term of the cached decision
        self._version = 0
        # The cached decision: correct until _valid_until (the first moment a live node could go silent)
        # unless a mutation recomputes it first.
        self._leader: str | None = None
        self._leader_term: int | None = None
        self._source = ""  # "announced" or "hint": how _leader was chosen
        self._valid_until = math.inf
        # The target last reported in a LeaderChange, so a change first seen by leader() is still reported.
        self._reported: str | None = None
        self._reported_term = 0

    def __repr__(self) -> str:
        return f"<LeaderTable term={self._term} leader={self._leader} [{len(self._nodes)} nodes]>"

    @property
    def term(self) -> int:
        """The governing term (module doc) as of the last `leader(now)` or writer call: the quorum floor, or
        a live leader's claim above it, or a usable hint's term. It goes down when such a claim lapses."""
        return self._term

    @property
    def floor(self) -> int:
        """The quorum floor: the highest term a majority of the configured nodes has been seen at."""
        return self._floor

    @property
    def nodes(self) -> Mapping[str, NodeView]:
        """Per-node state, read-only, in configuration order."""
        return MappingProxyType(self._nodes)

    @property
    def version(self) -> int:
        """Increases every time the write target (id, or its term) changes, whoever first observes it."""
        return self._version

    @property
    def liveness_timeout(self) -> float:
        """Seconds after its last announcement that a node stops counting as live."""
        return self._timeout

    @liveness_timeout.setter
    def liveness_timeout(self, value: float) -> None:
        if not value > 0:
            raise ValueError("liveness_timeout: must be positive")
        self._timeout = value
        self._valid_until = -math.inf  # liveness changed for everyone: recompute on next read

    # -- writers ---------------------------------------------------------------------------------------

    def apply(self, ann: Announcement, now: float) -> LeaderChange | None:
        """Record one announcement. ValueError for an unknown node, a bad role or term, or a term below that
        node's last term confirmed within the liveness timeout (a stale event from an old stream); a
        rejected announcement changes nothing."""
        view = self._view(ann.node)
        if ann.role not in ROLES:
            raise ValueError(f"{ann.node}: role must be one of {', '.join(ROLES)}")
        if not 0 <= ann.term <= MAX_UINT64:
            raise ValueError(f"{ann.node}: term out of range (0 to 2**64-1)")  # (too long to print)
        if ann.term < view.term and not self._term_lapsed(view, now):
            raise ValueError(f"{ann.node}: term went backwards ({ann.term} < {view.term})")
        view.term = ann.term
        view.term_heard = now
        view.role = ann.role
        view.leader_hint = ann.leader or None
        view.commit_index = ann.commit_index
        view.applied_index = ann.applied_index
        view.has_quorum = ann.has_quorum
        view.seq = ann.seq
        view.last_heard = now
        view.down = False
        self._raise_floor()
        return self._settle(now)

    def note_applied(self, node_id: str, index: int) -> bool:
        """An answer from the node reflected `index` (its X-Raft-Index): it has applied at least that much.
        Answers only raise what the last announcement said; the next announcement governs again (a node
        restored from an old disk may go back). True when the table learned something."""
        view = self._nodes.get(node_id)
        if view is None or (view.applied_index is not None and view.applied_index >= index):
            return False
        view.applied_index = index
        return True

    def node_down(self, node_id: str, now: float) -> LeaderChange | None:
        """The node's subscription lost it (refused, reset, silent stream) until its next announcement."""
        self._view(node_id).down = True
        return self._settle(now)

    def misdirected(
        self, node_id: str, leader_hint: str | None, term: int | None, now: float
    ) -> LeaderChange | None:
        """The node answered 421: it is not the leader at `term` (default, or out of range: the table's
        term), and its `X-Raft-Leader` (`leader_hint`, empty or None when unknown) is taken as its hint at
        that term.

        Only this node's view moves (up to that term, so its older in-flight announcements are then
        rejected); the term governs by the rules of the module doc. A 421 below its known term is stale (a
        later announcement governs) and ignored. A 421 is not an announcement: it does not make the node
        live."""
        view = self._view(node_id)
        at = self._term if term is None or not 0 <= term <= MAX_UINT64 else term
        if at < view.term:
            return self._settle(now)
        view.term = at
        view.term_heard = now
        if view.role in (None, "leader"):
            view.role = "follower"
        view.leader_hint = leader_hint or None
        view.has_quorum = None  # a leader's own view of its quorum; meaningless now
        self._raise_floor()
        return self._settle(now, node_id, "misdirect")

    def forget(self, node_id: str, now: float) -> LeaderChange | None:
        """The operator's way back (admin API): drop everything known of one node (term, role, hint,
        indexes, liveness), so its next announcement is taken as new whatever its term, and recompute the
        quorum floor from the nodes' views as they are now (it may go down)."""
        self._nodes[node_id] = NodeView(self._view(node_id).id)
        self._floor = self._quorum_term()
        return self._settle(now)

    def expire(self, now: float) -> LeaderChange | None:
        """Re-evaluate liveness (from a periodic timer); returns the change if the target went silent."""
        return self._settle(now)

    def add_node(self, node_id: str) -> None:
        """Add a node on config reload. A hint naming it may now count: the next read recomputes, and the
        next writer call (or expire) reports any change."""
        self._add(node_id)
        self._valid_until = -math.inf

    def remove_node(self, node_id: str, now: float) -> LeaderChange | None:
        """Forget a node on config reload (its hints go with it). The quorum floor stays: it never
        decreases."""
        self._view(node_id)
        del self._nodes[node_id]
        self._raise_floor()  # a majority of fewer nodes may stand higher
        return self._settle(now)

    # -- readers ---------------------------------------------------------------------------------------

    def leader(self, now: float) -> str | None:
        """The write target now, or None: hold writes. Hot path: O(1) unless a liveness deadline passed."""
        if now > self._valid_until:
            self._recompute(now)
        return self._leader

    def live_nodes(self, now: float) -> list[str]:
        """Nodes heard within the liveness timeout and not down, in configuration order."""
        # (The rule called directly, not through NodeView.is_live: one call per node on every read.)
        timeout = self._timeout
        return [v.id for v in self._nodes.values() if not v.down and is_live(v.last_heard, now, timeout)]

    def applied_at_least(self, index: int, now: float) -> list[str]:
        """Live nodes whose last announced applied index is >= `index` (for index-fenced reads)."""
        timeout = self._timeout
        return [
            v.id
            for v in self._nodes.values()
            if v.applied_index is not None and v.applied_index >= index and not v.down
            and is_live(v.last_heard, now, timeout)
        ]

    def is_deposed(self, node_id: str) -> bool:
        """The node last announced role=leader at a term below the governing one: it gets no writes."""
        return self._deposed(self._view(node_id))

    def snapshot(self, now: float) -> dict[str, object]:
        """JSON-able state for admin: term, leader, version, and per node its fields + live/deposed/age_s."""
        leader = self.leader(now)
        nodes: dict[str, object] = {}
        for v in self._nodes.values():
            doc = {f.name: getattr(v, f.name) for f in fields(v) if f.name not in _MONOTONIC}
            doc["live"] = v.is_live(now, self._timeout)
            doc["deposed"] = self._deposed(v)
            doc["age_s"] = None if v.last_heard is None else round(now - v.last_heard, 3)
            nodes[v.id] = doc
        return {
            "term": self._term,
            "term_floor": self._floor,
            "leader": leader,
            "leader_source": self._source if leader is not None else None,
            "version": self._version,
            "nodes": nodes,
        }

    # -- internals -------------------------------------------------------------------------------------

    def _add(self, node_id: str) -> None:
        if not node_id:
            raise ValueError("node id: must be a non-empty string")
        if node_id in self._nodes:
            raise ValueError(f"duplicate node {node_id!r}")
        self._nodes[node_id] = NodeView(node_id)

    def _view(self, node_id: str) -> NodeView:
        view = self._nodes.get(node_id)
        if view is None:
            raise ValueError(f"unknown node {node_id!r}")
        return view

    def _deposed(self, view: NodeView) -> bool:
        return view.role == "leader" and view.term < self._term

    def _quorum_term(self) -> int:
        """The k-th highest of the nodes' known terms, k a majority of the configured nodes."""
        terms = sorted((v.term for v in self._nodes.values()), reverse=True)
        return terms[len(terms) // 2] if terms else 0

    def _raise_floor(self) -> None:
        self._floor = max(self._floor, self._quorum_term())

    def _term_lapsed(self, view: NodeView, now: float) -> bool:
        """The node's current term was last confirmed more than a liveness timeout ago: a lower one from it
        is a correction (or a restart), no longer an in-flight event of an old stream."""
        return not is_live(view.term_heard, now, self._timeout)

    def _decide(self, now: float) -> tuple[str | None, str, int, float]:
        """(target, how it was chosen, the governing term, until when this holds), from the current state
        (module doc). O(nodes)."""
        floor, timeout = self._floor, self._timeout
        live = [v for v in self._nodes.values() if not v.down and is_live(v.last_heard, now, timeout)]
        # Liveness only ever lapses as time passes, so the decision holds until the first live node's
        # deadline (any node: a lapsing hinter or rival claimant changes it as much as the leader does).
        deadlines = [live_until(v.last_heard, timeout) for v in live if v.last_heard is not None]
        valid_until = min(deadlines, default=math.inf)
        claims = [v for v in live if v.role == "leader" and v.term >= floor]
        if claims:
            # The highest live claim governs and beats any hint; two claims at one term means a liar, so
            # hold (module doc).
            term = max(v.term for v in claims)
            top = [v for v in claims if v.term == term]
            if len(top) == 1 and top[0].has_quorum is not False:
                return top[0].id, "announced", term, valid_until
            return None, "", term, valid_until
        hinters = [v for v in live if v.role != "leader" and v.leader_hint and v.term >= floor]
        if not hinters:
            return None, "", floor, valid_until
        term = max(v.term for v in hinters)
        hinted = {v.leader_hint for v in hinters if v.term == term}
        target = self._nodes.get(hinted.pop() or "") if len(hinted) == 1 else None
        if target is None or target.down or target.role == "leader" or (
            target.role is not None and target.term >= term
        ):
            # Unknown, down, its own claim (deposed, or live and so governing above, or silent), or it
            # spoke for itself at that term or later: its own word beats anyone's hint about it.
            return None, "", floor, valid_until
        return target.id, "hint", term, valid_until

    def _recompute(self, now: float) -> None:
        leader, self._source, self._term, self._valid_until = self._decide(now)
        leader_term = None if leader is None else self._term
        if (leader, leader_term) != (self._leader, self._leader_term):
            self._version += 1
        self._leader, self._leader_term = leader, leader_term

    def _settle(self, now: float, node_id: str | None = None, cause: str = "") -> LeaderChange | None:
        """Recompute after a mutation and report a change against the last reported target. `cause`
        names the loss when `node_id` was that target."""
        self._recompute(now)
        old, new = self._reported, self._leader
        if new == old and (new is None or self._term == self._reported_term):
            self._reported_term = self._term
            return None
        if old is not None and old != new and old == node_id and cause:
            reason = cause
        elif new is not None:
            reason = self._source
        else:
            reason = self._why_lost(old, now)
        change = LeaderChange(old, new, self._reported_term, self._term, reason)
        self._reported, self._reported_term = new, self._term
        return change

    def _why_lost(self, old: str | None, now: float) -> str:
        view = self._nodes.get(old or "")
        if view is None:
            return "removed"
        if view.down:
            return "down"
        if self._deposed(view):
            return "deposed"
        if view.role is not None and view.term >= self._reported_term:
            # Its own word at (or after) the term it was the target at.
            if view.role != "leader":
                return "stepped_down"
            if view.has_quorum is False:
                return "no_quorum"
            # A live claim lost to a rival at its term; else lapsed (a claim above the floor governs only
            # while its node is live).
            return "conflict" if view.is_live(now, self._timeout) else "silent"
        if self._term > self._reported_term:
            return "deposed"  # a hinted target overtaken by a higher term
        hinters = [
            v
            for v in self._nodes.values()
            if v.is_live(now, self._timeout) and v.term == self._term and v.role != "leader" and v.leader_hint
        ]
        return "conflict" if hinters else "silent"
