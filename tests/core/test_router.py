"""Routing decisions: route matching, per-request consistency override, power-of-two choices."""

from __future__ import annotations

import re
from collections import Counter
from itertools import cycle

import pytest

from raftlb.config.model import RouteConfig
from raftlb.core.router import Router, power_of_two

ROUTES = (
    RouteConfig(methods=frozenset({"GET", "HEAD"}), path=re.compile(r"^/kv/"), kind="read", policy="any",
                idempotent=False),
    RouteConfig(methods=None, path=re.compile(r"^/admin-ish/"), kind="write", policy="leader",
                idempotent=True),
    RouteConfig(methods=frozenset({"GET"}), path=None, kind="read", policy="leader", idempotent=False),
)


@pytest.mark.parametrize(("method", "path", "header", "kind", "policy", "idempotent"), [
    ("GET", "/kv/a", None, "read", "any", False),
    ("HEAD", "/kv/a", None, "read", "any", False),
    ("PUT", "/kv/a", None, "write", "leader", False),  # no route matches: a write
    ("POST", "/admin-ish/x", None, "write", "leader", True),
    ("GET", "/other", None, "read", "leader", False),  # first match wins: the catch-all GET route
    ("GET", "/kv/a", "leader", "read", "leader", False),  # the header narrows a read's policy
    ("GET", "/kv/a", " LEADER ", "read", "leader", False),
    ("PUT", "/kv/a", "nonsense", "write", "leader", False),  # a write ignores the header
    ("PUT", "/kv/a", "any", "write", "leader", False),  # never turns a write into a read
])
def test_classify(method: str, path: str, header: str | None, kind: str, policy: str,
                  idempotent: bool) -> None:
    d = Router(ROUTES).classify(method, path, header)
    assert (d.kind, d.policy, d.idempotent) == (kind, policy, idempotent)
    assert d.needs_leader == (kind == "write" or policy == "leader")


@pytest.mark.parametrize(("header", "reason"), [
    ("nonsense", "is not one of leader, any, fenced, bounded, linearizable"),
    ("", "is not one of"),
    ("bounded", "bounded needs a route with max_lag_entries or max_lag_ms"),  # this route has no limits
])
def test_a_read_policy_raftlb_cannot_give_is_an_error_not_another_policy(header: str, reason: str) -> None:
    # Serving a client that asked for a guarantee with a weaker one would be a silent lie.
    with pytest.raises(ValueError, match=reason):
        Router(ROUTES).classify("GET", "/kv/a", header)


def test_no_routes_means_everything_is_a_write() -> None:
    assert Router(()).classify("GET", "/x").kind == "write"


def test_power_of_two_prefers_the_less_loaded() -> None:
    load = {"n1": 10, "n2": 0, "n3": 5}
    picks = Counter(power_of_two(["n1", "n2", "n3"], load.__getitem__) for _ in range(3000))
    assert picks["n1"] == 0  # the most loaded never wins a pair
    assert picks["n2"] > picks["n3"]


def test_power_of_two_samples_two_distinct_candidates() -> None:
    rng = cycle([0.0, 0.0]).__next__  # would pick index 0 twice without the distinctness rule
    assert power_of_two(["a", "b"], {"a": 1, "b": 0}.__getitem__, rng) == "b"
    assert power_of_two(["only"], lambda n: 0) == "only"
