"""Pure routing decisions: which class a request falls in, and which node serves it.

No I/O here: the proxy passes values in (method, path, per-node load) and gets decisions out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from raftlb.config.model import READ_POLICIES, RouteConfig
from raftlb.core.protowire import Buffer, last_varint

# RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """How one request is routed. `kind` is "write" or "read"; the rest applies to reads, except
    `idempotent` (writes on the route may be re-sent after an ambiguous failure) and `cookie`."""

    kind: str
    policy: str
    idempotent: bool = False
    cookie: bool = False
    prefer_followers: bool = True
    fence_wait: float = 1.0
    max_lag_entries: int | None = None
    max_lag_ms: int | None = None
    stream: bool = False  # answers are long-lived streams: quiet gaps in them are not a stalled node
    # Derived from kind and policy once per route (fields, not properties: read per request).
    needs_leader: bool = field(init=False, repr=False, compare=False)  # writes and leader reads
    keeps_token: bool = field(init=False, repr=False, compare=False)  # see `keeps_token`

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_leader", self.kind == "write" or self.policy == "leader")
        object.__setattr__(self, "keeps_token", keeps_token(self.kind, self.policy))


def keeps_token(kind: str, policy: str) -> bool:
    """Whether the client's index token (X-Raft-Min-Index, the raftlb-index cookie) fences a request:
    `any` promises nothing, so it ignores the token (and never waits or retries for it)."""
    return policy != "any" or kind == "write"


WRITE = RouteDecision("write", "leader")


class Router:
    """Classifies requests by the configured routes: first match wins; no match is a write."""

    def __init__(self, routes: Sequence[RouteConfig], *, index_cookie: bool = False,
                 fence_wait: float = 1.0) -> None:
        self.routes = tuple(routes)
        self._decisions = tuple(
            RouteDecision(r.kind, r.policy, r.idempotent, index_cookie if r.cookie is None else r.cookie,
                          r.prefer_followers, fence_wait if r.fence_wait is None else r.fence_wait,
                          r.max_lag_entries, r.max_lag_ms, r.stream)
            for r in self.routes)
        # (route, decision) pairs made once: a zip(strict=True) per request costs ~3,000 instructions.
        pairs = tuple(zip(self.routes, self._decisions, strict=True))
        # Routes with a `proto_flag` read a gRPC request message: they are for `classify_call` only, so
        # HTTP/1 requests never look at them (and pay nothing for them).
        self._table = tuple(p for p in pairs if p[0].proto_flag is None)
        self._call_table = pairs
        self._write = replace(WRITE, cookie=index_cookie)
        self._override_cache: dict[tuple[RouteDecision, str], RouteDecision] = {}

    def classify(self, method: str, path: str, consistency: str | None = None) -> RouteDecision:
        """The decision for a request. `consistency` is the `X-Raft-Consistency` header, if any: it may
        change a read's policy (`bounded` only where the route sets its lag limits), never turn a write
        into a read (a write ignores it: it always goes to the leader). ValueError, with the reason, for a
        read whose header names no read policy or `bounded` on a route without lag limits: the client asked
        for a guarantee raftlb cannot give, so it is told rather than served another one."""
        decision = self._write
        for route, d in self._table:
            if route.methods is not None and method not in route.methods:
                continue
            if route.path is not None and route.path.search(path) is None:
                continue
            decision = d
            break
        if consistency is not None and decision.kind == "read":
            decision = self._with_consistency(decision, consistency)
        return decision

    def classify_call(self, path: str, message: Buffer | None,
                      consistency: str | None = None) -> RouteDecision:
        """The decision for a gRPC call (always a POST) to method `path` (`/etcdserverpb.KV/Range`), given its
        first request message (None: not read, or none): a route with `proto_flag` matches only when that
        message has the flag set. `consistency` is the `x-raft-consistency` metadata, as in `classify`.
        ProtoError (a ValueError) if a flag route's message is malformed: the call ends with INTERNAL."""
        decision = self._write
        for route, d in self._call_table:
            if route.methods is not None and "POST" not in route.methods:
                continue
            if route.path is not None and route.path.search(path) is None:
                continue
            flag = route.proto_flag
            if flag is not None and (message is None or not last_varint(message, flag)):
                continue
            decision = d
            break
        if consistency is not None and decision.kind == "read":
            decision = self._with_consistency(decision, consistency)
        return decision

    def call_reads_message(self, path: str) -> bool:
        """Whether a gRPC call to `path` is routed by a field of its first message: some route with a
        `proto_flag` matches the path (the call waits for its first message before it is placed)."""
        for route, _ in self._call_table:
            if route.proto_flag is not None and (route.methods is None or "POST" in route.methods) \
                    and (route.path is None or route.path.search(path) is not None):
                return True
        return False

    def _with_consistency(self, decision: RouteDecision, consistency: str) -> RouteDecision:
        """A read's decision with the client's consistency override applied (see `classify`)."""
        key = (decision, consistency)
        cached = self._override_cache.get(key)
        if cached is None:
            policy = consistency.strip().lower()
            if policy not in READ_POLICIES:
                raise ValueError(f"X-Raft-Consistency: {consistency[:64]!r} is not one of "
                                 f"{', '.join(READ_POLICIES)}")
            if policy == "bounded" and decision.max_lag_entries is None and decision.max_lag_ms is None:
                raise ValueError("X-Raft-Consistency: bounded needs a route with max_lag_entries or "
                                 "max_lag_ms, and this one has neither")
            cached = replace(decision, policy=policy)
            if len(self._override_cache) < 64:
                self._override_cache[key] = cached
        return cached


def power_of_two(candidates: Sequence[str], load: Callable[[str], int],
                 rng: Callable[[], float] = random.random) -> str:
    """Power-of-two-choices: sample two candidates, take the less loaded one (ties go to the first)."""
    n = len(candidates)
    if n == 1:
        return candidates[0]
    i = int(rng() * n)
    j = int(rng() * (n - 1))
    if j >= i:
        j += 1
    a, b = candidates[i], candidates[j]
    return b if load(b) < load(a) else a
