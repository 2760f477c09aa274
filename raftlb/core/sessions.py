"""Per-session ordering of writes (Raft dissertation §6.3): `X-Raft-Session: id` + `X-Raft-Seq: n`.

Writes of one session go to the leader one at a time, in seq order. A seq that arrives early waits (bounded
by `gap_wait`) for the ones before it; a seq at or below one already sent is a re-send and goes straight
through (the node's session table answers it from its cache). Pure bookkeeping: no I/O, time passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

R = TypeVar("R")


@dataclass
class _Session(Generic[R]):
    last: int  # the highest seq sent to the leader
    in_flight: R | None = None
    parked: dict[int, tuple[R, float]] = field(default_factory=dict)  # seq -> (request, gap deadline)


class SessionOrder(Generic[R]):
    """Decides when each session write may go. `admit` → go now or parked; `done` → what may go next."""

    def __init__(self, gap_wait: float, max_sessions: int) -> None:
        self.gap_wait = gap_wait
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, _Session[R]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __repr__(self) -> str:
        parked = sum(len(s.parked) for s in self._sessions.values())
        return f"<SessionOrder [{len(self._sessions)} sessions, {parked} parked]>"

    def admit(self, req: R, session: str, seq: int, now: float) -> bool:
        """True: send `req` now. False: it is parked until its turn (`done` of the one before) or expiry."""
        st = self._sessions.get(session)
        if st is None:
            # First sight of this session (or it was forgotten): whatever seq it is, it starts the order.
            # Room is made first, so the new session (idle until this write is placed) is never the one
            # forgotten.
            self._evict()
            st = self._sessions[session] = _Session(last=seq - 1)
        else:
            self._sessions.move_to_end(session)
        if seq <= st.last:
            return True  # a re-send of something already sent: the node deduplicates it
        if seq == st.last + 1 and st.in_flight is None:
            st.last = seq
            st.in_flight = req
            return True
        if seq in st.parked:
            return True  # the same seq twice while waiting: let the node sort it out
        st.parked[seq] = (req, now + self.gap_wait)
        return False

    def done(self, req: R, session: str) -> R | None:
        """`req` finished (answered, failed or abandoned): the next seq of its session, if it waits."""
        st = self._sessions.get(session)
        if st is None or st.in_flight is not req:
            return None
        st.in_flight = None
        nxt = st.parked.pop(st.last + 1, None)
        if nxt is None:
            return None
        st.last += 1
        st.in_flight = nxt[0]
        return nxt[0]

    def expired(self, now: float) -> list[R]:
        """Parked writes whose predecessors did not arrive within `gap_wait` (to be failed)."""
        out: list[R] = []
        for st in self._sessions.values():
            if not st.parked:
                continue
            for seq in [s for s, (_, deadline) in st.parked.items() if deadline <= now and s > st.last + 1]:
                out.append(st.parked.pop(seq)[0])
        return out

    def _evict(self) -> None:
        """Make room for one more session: forget the least recently used idle ones beyond `max_sessions`."""
        if len(self._sessions) < self.max_sessions:
            return
        for sid in list(self._sessions):
            st = self._sessions[sid]
            if st.in_flight is None and not st.parked:
                del self._sessions[sid]
                if len(self._sessions) < self.max_sessions:
                    return
