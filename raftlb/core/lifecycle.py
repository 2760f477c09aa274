"""One request's life through the proxy, whatever the wire protocol: what the rules read and write.

`RequestState` holds where the request may go (`target`), where it is (`node`), what it has been through
(attempts, holds, waits, the node a write may have reached) and what it must see (the client's index, the
read index, its session). It knows nothing of HTTP framing: the HTTP/1 relay (raftlb.proxy.request) is one
adapter built on it, and another protocol's stream can be a second one without touching the rules in
raftlb.core.placement, raftlb.core.resend and raftlb.core.hold.

What every request reads and writes is in slots; what only some requests change (re-sends, holds, waits,
sessions, read indexes) are class-level defaults, stored in the instance's dict, created only then: a write
to a live leader allocates no dict and stores only what it uses.
"""

from __future__ import annotations

from raftlb.core.placement import Target
from raftlb.core.resend import Verdict, backoff
from raftlb.core.router import RouteDecision

_LEADER, _READ = Target.LEADER, Target.READ


class RequestState:
    """The protocol-independent state of one proxied request (see the module doc)."""

    __slots__ = ("route", "target", "arrived_at", "node", "finished", "sent_term", "min_index", "floor",
                 "read_index", "avoid", "wait_until", "session", "__dict__")

    # Slots, set for every request (in __init__; `sent_term` when it is sent), read on the common paths:
    route: RouteDecision
    target: Target  # LEADER: writes, leader reads, reads that fell back to it; READ: the policy's nodes
    arrived_at: float
    node: str | None  # the node it is bound to now
    finished: bool
    sent_term: int  # the table's term when the request was bound to its node
    min_index: int  # the client's token (X-Raft-Min-Index / raftlb-index cookie)
    floor: int  # the lowest index an answer may reflect (see `fence`)
    read_index: int | None  # linearizable reads: the index the leader handed out
    avoid: str | None  # the node the last attempt failed on (a read prefers another)
    wait_until: float  # a read waiting for a follower or its fence: until then (0.0: has not waited)
    session: tuple[str, int] | None  # (X-Raft-Session, X-Raft-Seq) of a session write
    # Routing history (class defaults until a rule sets them):
    attempts = 0  # re-sends so far, bounded by `max_resends`
    retry_at = 0.0  # a re-send backs off until then
    held_at = 0.0  # when the current hold began (0.0: not held now)
    held_for = 0.0  # time spent in earlier holds: the hold timeout bounds the sum
    released = False  # has left the hold queue once (a re-send held again is not another held request)
    maybe_applied: str | None = None  # a node this write reached, then failed, before a re-send
    failed_rounds = 0  # read-index rounds that failed before one gave the read its index (own budget)

    def __init__(self, route: RouteDecision, arrived_at: float) -> None:
        self.route = route
        self.target = _LEADER if route.needs_leader else _READ
        self.arrived_at = arrived_at
        self.node = self.read_index = self.avoid = self.session = None
        self.finished = False
        self.min_index = self.floor = 0
        self.wait_until = 0.0

    @property
    def safe_to_repeat(self) -> bool:
        """May be re-sent after an ambiguous failure (raftlb.core.resend.safe_to_resend, from the method
        and headers the protocol adapter knows). Asked only after a failure, never per request."""
        raise NotImplementedError

    def fence(self, min_index: int, read_index: int | None) -> None:
        """What an answer must reflect: the client's token and, for a linearizable read, the read index the
        leader handed out. Its floor is the higher of the two: answers below it are never returned."""
        self.min_index = min_index
        if read_index is None:
            self.floor = min_index
        else:
            self.read_index = read_index
            self.floor = min_index if read_index < min_index else read_index

    @property
    def on_leader(self) -> bool:
        """Bound for the leader (a write, a leader read, or a read that fell back to it)."""
        return self.target is _LEADER

    def fall_back_to_leader(self) -> None:
        """No node the read's policy allows served it in time: from now on the leader serves it."""
        self.target = _LEADER

    def will_resend(self, verdict: Verdict, now: float) -> None:
        """Record a re-send the core decided (`verdict.resend`): one more attempt, no node, and the backoff
        before the next one unless it goes at once."""
        self.attempts += 1
        self.node = None
        if verdict.to_leader:
            self.target = _LEADER
        if not verdict.immediate:
            self.retry_at = now + backoff(self.attempts)

    def leader_appeared(self) -> None:
        """A new leader (or term): a re-send backing off (after a connect failure or on a leader that
        failed) goes to it at once; the backoff was for the old one."""
        self.retry_at = 0.0

    def hold_started(self, now: float) -> None:
        """The request joins the hold queue now."""
        self.held_at = now

    def hold_ended(self, now: float) -> None:
        """The request leaves the hold queue for a node: its hold time counts against the hold timeout."""
        self.released = True
        self.held_for += now - self.held_at
        self.held_at = 0.0
