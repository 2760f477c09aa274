"""The consistency checker and the report of `raftlb bench`: pure code, no I/O.

What a client may read for a key it owns, after it wrote values 1..t and got 200 for values up to a, having
read r before:

    allowed = [max(a, r), t]   (404 only while a = r = 0)

since a write that failed ambiguously (5xx, connection lost) may or may not have been applied. A read counts
as one violation at most, the first of these that applies:

    phantom           a value above t, or not a number: nobody wrote it
    read_your_writes  below a (a 404 once a > 0): the client's own acknowledged write is missing
    monotonic         below r (a 404 once r > 0): the client saw a newer value before
    stale_index       the answer's X-Raft-Index is below the X-Raft-Min-Index the request carried

After the load every key is read once more from the leader: a value below max(a, r), or a 404, is `lost`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

VIOLATION_KINDS = ("read_your_writes", "monotonic", "lost", "stale_index", "phantom")
EXAMPLES_PER_KIND = 5


# -- the checker -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Violation:
    """One read that broke a guarantee. `got` is the value read, or None for a 404."""

    kind: str
    client: int
    key: str
    expected_min: int
    got: int | str | None
    node: str | None
    index: int | None
    token: int | None
    at: float = 0.0  # seconds into the run

    def describe(self) -> str:
        got = "404" if self.got is None else repr(self.got) if isinstance(self.got, str) else str(self.got)
        return (f"{self.kind}: client {self.client} key {self.key}: expected >= {self.expected_min}, "
                f"got {got} from {self.node or '?'} at index {self.index if self.index is not None else '?'}"
                f" (token {self.token if self.token is not None else '-'}, t={self.at:.2f}s)")


@dataclass
class KeyState:
    acked: int = 0  # highest value written with a 200
    attempted: int = 0  # highest value sent (acknowledged or not)
    last_read: int = 0  # highest value read (0: nothing read yet)


class ClientChecker:
    """The guarantees one client is owed for its keys; events in, violations out, no I/O."""

    def __init__(self, client: int, keys: Sequence[str]) -> None:
        self.client = client
        self.keys = {k: KeyState() for k in keys}
        self.token = 0  # the highest X-Raft-Index seen on any response

    def __repr__(self) -> str:
        acked = sum(s.acked for s in self.keys.values())
        return f"<ClientChecker c{self.client} keys={len(self.keys)} acked={acked} token={self.token}>"

    def observe_index(self, index: int | None) -> None:
        if index is not None and index > self.token:
            self.token = index

    def next_write(self, key: str) -> int:
        """The value to write next to `key` (it counts as attempted from now on)."""
        state = self.keys[key]
        state.attempted += 1
        return state.attempted

    def write_acknowledged(self, key: str, value: int) -> None:
        state = self.keys[key]
        state.acked = max(state.acked, value)

    def check_read(self, key: str, status: int, body: bytes, *, node: str | None = None,
                   index: int | None = None, token: int | None = None, at: float = 0.0) -> Violation | None:
        """Judge a read (200 or 404) of `key` that was sent with `token` (None: sent without one)."""
        state = self.keys[key]
        got, value = _parse_value(status, body)

        def violation(kind: str, expected: int) -> Violation:
            return Violation(kind, self.client, key, expected, got, node, index, token, at)

        if value is None and got is not None:
            return violation("phantom", state.acked)
        if value is not None and (value < 1 or value > state.attempted):
            return violation("phantom", state.acked)
        if (value or 0) < state.acked:
            return violation("read_your_writes", state.acked)
        if (value or 0) < state.last_read:
            return violation("monotonic", state.last_read)
        if value is not None:
            state.last_read = value
        if token and index is not None and index < token:
            return violation("stale_index", state.acked)
        return None

    def check_final(self, key: str, status: int, body: bytes, *, node: str | None = None,
                    index: int | None = None, at: float = 0.0) -> Violation | None:
        """Judge the read-back from the leader after the load: an acknowledged value, or one this client
        has read, must still be there."""
        state = self.keys[key]
        got, value = _parse_value(status, body)
        expected = max(state.acked, state.last_read)
        if (value or 0) < expected:
            return Violation("lost", self.client, key, expected, got, node, index, self.token, at)
        return None


def _parse_value(status: int, body: bytes) -> tuple[int | str | None, int | None]:
    """(what to report, the integer value); a 404 is (None, None), garbage is (text, None)."""
    if status == 404:
        return None, None
    text = body.decode("utf-8", "replace").strip()
    if text.isascii() and text.isdigit():
        return int(text), int(text)
    return text[:40], None


# -- the report -------------------------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100), at least 1
    return sorted_values[int(rank) - 1]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    values = sorted(seconds)
    ms = [v * 1000 for v in values]
    return {"count": len(ms), "p50": round(percentile(ms, 50), 3), "p90": round(percentile(ms, 90), 3),
            "p99": round(percentile(ms, 99), 3), "max": round(ms[-1] if ms else 0.0, 3)}


@dataclass
class BenchReport:
    """What a run measured and found. `exit_code`: 0 pass, 1 violations or too many errors."""

    run_id: str
    urls: list[str]
    clients: int
    consistency: str | None
    token: bool
    protocol: str = "http1"  # "http1" or "http2"
    streams: int = 1  # request loops (streams) per connection
    duration_s: float = 0.0
    requests: int = 0
    reads: int = 0
    writes: int = 0
    throughput: float = 0.0
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, dict[str, int]] = field(default_factory=lambda: {"read": {}, "write": {}})
    error_rate: float = 0.0
    max_error_rate: float = 0.01
    reads_by_node: dict[str, int] = field(default_factory=dict)
    writes_by_node: dict[str, int] = field(default_factory=dict)
    violations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VIOLATION_KINDS, 0))
    examples: list[dict[str, Any]] = field(default_factory=list)
    verified_keys: int = 0
    unverified_keys: int = 0
    interrupted: bool = False

    @property
    def violation_count(self) -> int:
        return sum(self.violations.values())

    @property
    def error_count(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.errors.values())

    def failures(self) -> list[str]:
        """Why the run fails (empty: it passes)."""
        reasons = []
        if self.violation_count:
            kinds = ", ".join(f"{k} {n}" for k, n in self.violations.items() if n)
            reasons.append(f"{self.violation_count} consistency violation(s): {kinds}")
        if self.error_rate > self.max_error_rate:
            reasons.append(f"error rate {self.error_rate:.2%} above --max-error-rate "
                           f"{self.max_error_rate:.2%}")
        if self.requests == 0:
            reasons.append("no request completed")
        return reasons

    @property
    def exit_code(self) -> int:
        return 1 if self.failures() else 0

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["violation_count"] = self.violation_count
        doc["passed"] = not self.failures()
        doc["failures"] = self.failures()
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


@dataclass(frozen=True)
class BenchProgress:
    """A snapshot for a progress line."""

    elapsed: float
    requests: int
    errors: int
    violations: int


class Tally:
    """Counts shared by every client of a run (one event loop: no locks)."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {"read": [], "write": []}
        self.errors: dict[str, dict[str, int]] = {"read": {}, "write": {}}
        self.by_node: dict[str, dict[str, int]] = {"read": {}, "write": {}}
        self.violations = dict.fromkeys(VIOLATION_KINDS, 0)
        self.examples: list[Violation] = []
        self.requests = 0
        self.last_done = 0.0  # time.monotonic() when the last request ended

    def success(self, op: str, latency: float, node: str | None) -> None:
        self.requests += 1
        self.last_done = time.monotonic()
        self.latencies[op].append(latency)
        nodes = self.by_node[op]
        nodes[node or "?"] = nodes.get(node or "?", 0) + 1

    def error(self, op: str, kind: str) -> None:
        self.requests += 1
        self.last_done = time.monotonic()
        errors = self.errors[op]
        errors[kind] = errors.get(kind, 0) + 1

    def violation(self, v: Violation) -> None:
        self.violations[v.kind] += 1
        if self.violations[v.kind] <= EXAMPLES_PER_KIND:
            self.examples.append(v)

    def progress(self, elapsed: float) -> BenchProgress:
        return BenchProgress(elapsed, self.requests, sum(sum(e.values()) for e in self.errors.values()),
                             sum(self.violations.values()))
