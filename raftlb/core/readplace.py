"""Read placement: which of the nodes at a read's index serves it (pure: loads in, a node out).

The rule (docs/how-it-works.md, "Reads that never go back in time"):

- Every node at the index is a candidate, the leader included. Each counts its outstanding requests (sent
  and not finished); the leader counts `leader_bias` more. The lowest count serves the read; ties are drawn
  at random.
- `leader_bias` follows the route's `prefer_followers` and the cluster's `leader_read_margin`
  (`leader_bias()`): 0 without the preference (every node alike); the margin with it, so the leader, which
  also serves every write, takes a read only when every follower at the index has at least that many more
  requests outstanding than it: idle followers serve every read, saturated ones let the leader's spare
  capacity serve too; `inf` for a margin of `never` (the leader serves a read only when no follower is at
  the index).
- Patience: while the read has waited less than `patience`, it is not given to a busy node when a node
  `coming` (about to reach the index) is idle. Which follower announces an index first says which applied
  it first, not which answers sooner: a slow node always has requests in flight, a fast one is idle
  between them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

NEVER = math.inf  # a leader bias no load overcomes: followers only, while one is at the index


def leader_bias(prefer_followers: bool, margin: int | None) -> float:
    """The extra load the leader counts: 0 without a preference for followers; `margin` with one (None:
    the leader never takes a read a follower at the index could serve)."""
    if not prefer_followers:
        return 0.0
    return NEVER if margin is None else float(margin)


def place_read(at_index: Sequence[str], coming: Sequence[str], load: Callable[[str], int], waited: float,
               patience: float, rng: Callable[[], float] = random.random, *, leader: str | None = None,
               bias: float = 0.0) -> str | None:
    """The node that serves a read now, among the nodes at its index; None: wait a little for a better one.

    at_index: the nodes allowed to serve it now (non-empty), the leader included if it is at the index.
    coming:   live nodes not at the index yet that very likely reach it within moments (healthy followers
              of a committed index).
    load:     outstanding requests per node; `waited`: seconds since the read arrived.
    leader:   the leader (None: unknown, or not to be told apart); `bias`: the extra load it counts.
    """
    # One pass, one load() per node: this runs for every read.
    if len(at_index) == 1:
        only = at_index[0]
        least: float = load(only) + bias if only == leader else load(only)
        if least > 0 and waited < patience and coming and any(load(n) == 0 for n in coming):
            return None
        return only
    least = math.inf
    best: list[str] = []
    for node in at_index:
        w = load(node) + bias if node == leader else load(node)
        if w < least:
            least, best = w, [node]
        elif w == least:
            best.append(node)
    if least > 0 and waited < patience and coming and any(load(n) == 0 for n in coming):
        return None
    return best[0] if len(best) == 1 else best[int(rng() * len(best))]
