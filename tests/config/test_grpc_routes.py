"""gRPC routes: the `proto_flag` key (loader and router), and the shipped etcd route table for every method of
etcd's gRPC API (api/etcdserverpb/rpc.proto, v3lockpb, v3electionpb), beside the JSON gateway's routes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raftlb.config.load import load_config, parse_config
from raftlb.config.model import RouteConfig
from raftlb.core import etcdpb
from raftlb.core.protowire import ProtoError
from raftlb.core.router import Router
from raftlb.errors import ConfigError
from tests.config.test_config import GOOD

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_proto_flag_is_loaded() -> None:
    cfg = parse_config(GOOD + """    routes:
      - {path: "^/svc\\\\.KV/Get$", proto_flag: 7, kind: read, policy: fenced}
      - {path: "^/svc\\\\.KV/Get$", kind: read, policy: any}
      - {path: "^/svc\\\\.KV/Put$", proto_flag: 536870911}
""")
    flagged, plain, write = cfg.clusters[0].routes
    assert (flagged.proto_flag, plain.proto_flag, write.proto_flag) == (7, None, 536870911)
    assert write.kind == "write"


@pytest.mark.parametrize(("route", "message"), [
    ('{path: "^/a$", proto_flag: 0}', r"routes\[0\]\.proto_flag: must be at least 1, got 0"),
    ('{path: "^/a$", proto_flag: -3}', r"routes\[0\]\.proto_flag: must be at least 1"),
    ('{path: "^/a$", proto_flag: 536870912}', r"routes\[0\]\.proto_flag: a protobuf field number is at "
                                               r"most 536870911"),
    ('{path: "^/a$", proto_flag: true}', r"routes\[0\]\.proto_flag: .*whole number"),
    ('{path: "^/a$", proto_flag: serializable}', r"routes\[0\]\.proto_flag: .*whole number"),
    ("{proto_flag: 7, kind: read}", r"routes\[0\]\.proto_flag: needs a `path`"),
    ('{path: "^/a$", proto_flags: 7}', r"routes\[0\]\.proto_flags: unknown key \(did you mean "
                                        r"proto_flag\?\)"),
])
def test_proto_flag_errors(route: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(GOOD + f"    routes: [{route}]\n")


ROUTES = (
    RouteConfig(methods=None, path=re.compile(r"^/svc\.KV/Get$"), kind="read", policy="fenced",
                idempotent=False, proto_flag=7),
    RouteConfig(methods=None, path=re.compile(r"^/svc\.KV/"), kind="read", policy="any", idempotent=False),
    RouteConfig(methods=frozenset({"GET"}), path=re.compile(r"^/svc\.Other/"), kind="read", policy="any",
                idempotent=False),
)
FLAG = b"\x38\x01"  # field 7 = true


@pytest.mark.parametrize(("path", "message", "kind", "policy"), [
    ("/svc.KV/Get", FLAG, "read", "fenced"),
    ("/svc.KV/Get", b"\x0a\x01k" + FLAG, "read", "fenced"),
    ("/svc.KV/Get", b"\x38\x00", "read", "any"),  # flag false: the next route
    ("/svc.KV/Get", b"", "read", "any"),  # flag absent
    ("/svc.KV/Get", None, "read", "any"),  # no message read: a flag route cannot match
    ("/svc.KV/List", FLAG, "read", "any"),  # the flag route is for its path only
    ("/svc.Other/X", None, "write", "leader"),  # a GET-only route never matches a gRPC call (a POST)
    ("/svc.Nothing/X", None, "write", "leader"),  # no match: a write
])
def test_classify_call(path: str, message: bytes | None, kind: str, policy: str) -> None:
    d = Router(ROUTES).classify_call(path, message)
    assert (d.kind, d.policy) == (kind, policy)


def test_classify_call_takes_the_consistency_override_and_rejects_a_malformed_flag_message() -> None:
    router = Router(ROUTES)
    assert router.classify_call("/svc.KV/Get", FLAG, "leader").policy == "leader"
    with pytest.raises(ProtoError):
        router.classify_call("/svc.KV/Get", b"\x0a\x05k")


def test_http1_requests_never_match_a_flag_route() -> None:
    # classify() has no message: the flag route is not in its table, the next route answers.
    assert Router(ROUTES).classify("POST", "/svc.KV/Get").policy == "any"


# --- the shipped etcd routes ------------------------------------------------------------------------------

SERIALIZABLE = etcdpb.range_request(b"k", serializable=True)
LINEARIZABLE = etcdpb.range_request(b"k")

# method path -> (kind, policy, stream); every rpc of etcd's API, with its default message where it matters.
ETCD_GRPC: list[tuple[str, bytes | None, str, str, bool]] = [
    ("/etcdserverpb.KV/Range", SERIALIZABLE, "read", "fenced", False),  # followers first, fenced
    ("/etcdserverpb.KV/Range", LINEARIZABLE, "read", "any", False),  # etcd's read index: any member
    ("/etcdserverpb.KV/Put", b"", "write", "leader", False),
    ("/etcdserverpb.KV/DeleteRange", b"", "write", "leader", False),
    ("/etcdserverpb.KV/Txn", b"", "write", "leader", False),
    ("/etcdserverpb.KV/Compact", b"", "write", "leader", False),
    ("/etcdserverpb.Watch/Watch", None, "read", "any", True),
    ("/etcdserverpb.Lease/LeaseGrant", b"", "write", "leader", False),
    ("/etcdserverpb.Lease/LeaseRevoke", b"", "write", "leader", False),
    ("/etcdserverpb.Lease/LeaseKeepAlive", None, "write", "leader", True),
    ("/etcdserverpb.Lease/LeaseTimeToLive", b"", "write", "leader", False),
    ("/etcdserverpb.Lease/LeaseLeases", b"", "write", "leader", False),
    ("/etcdserverpb.Cluster/MemberList", b"", "read", "any", False),
    ("/etcdserverpb.Cluster/MemberAdd", b"", "write", "leader", False),
    ("/etcdserverpb.Cluster/MemberRemove", b"", "write", "leader", False),
    ("/etcdserverpb.Cluster/MemberPromote", b"", "write", "leader", False),
    ("/etcdserverpb.Maintenance/Status", b"", "read", "any", False),
    ("/etcdserverpb.Maintenance/Snapshot", b"", "read", "any", True),
    ("/etcdserverpb.Maintenance/Alarm", b"", "write", "leader", False),
    ("/etcdserverpb.Maintenance/MoveLeader", b"", "write", "leader", False),
    ("/etcdserverpb.Auth/Authenticate", b"", "write", "leader", False),
    ("/etcdserverpb.Auth/UserAdd", b"", "write", "leader", False),
    ("/etcdserverpb.Auth/AuthEnable", b"", "write", "leader", False),
    ("/v3lockpb.Lock/Lock", b"", "write", "leader", True),  # waits until granted
    ("/v3lockpb.Lock/Unlock", b"", "write", "leader", False),
    ("/v3electionpb.Election/Campaign", b"", "write", "leader", True),  # waits until elected
    ("/v3electionpb.Election/Proclaim", b"", "write", "leader", False),
    ("/v3electionpb.Election/Resign", b"", "write", "leader", False),
    ("/v3electionpb.Election/Leader", b"", "read", "any", False),
    ("/v3electionpb.Election/Observe", b"", "read", "any", True),
    ("/grpc.health.v1.Health/Check", b"", "read", "any", False),
    # Paths are case-sensitive: a misspelt method is no route, so a write (the node answers UNIMPLEMENTED).
    ("/etcdserverpb.kv/range", LINEARIZABLE, "write", "leader", False),
]


@pytest.fixture(scope="module")
def etcd_router() -> Router:
    return Router(load_config(str(CONFIGS / "etcd.yaml"), environ={}).clusters[0].routes)


@pytest.mark.parametrize(("path", "message", "kind", "policy", "stream"), ETCD_GRPC)
def test_shipped_etcd_grpc_routes(etcd_router: Router, path: str, message: bytes | None, kind: str,
                                  policy: str, stream: bool) -> None:
    d = etcd_router.classify_call(path, message)
    assert (d.kind, d.policy, d.stream) == (kind, policy, stream)
    assert d.prefer_followers  # reads: followers first


@pytest.mark.parametrize(("path", "kind", "policy", "stream"), [
    ("/v3/kv/range", "read", "fenced", False),
    ("/v3/watch", "read", "any", True),
    ("/v3/maintenance/status", "read", "any", False),
    ("/v3/kv/put", "write", "leader", False),
    ("/v3/lease/keepalive", "write", "leader", False),
    ("/etcdserverpb.KV/Range", "read", "any", False),  # over HTTP/1 only the unflagged gRPC route exists
])
def test_shipped_etcd_gateway_routes_are_unchanged(etcd_router: Router, path: str, kind: str, policy: str,
                                                   stream: bool) -> None:
    d = etcd_router.classify("POST", path)
    assert (d.kind, d.policy, d.stream) == (kind, policy, stream)


@pytest.mark.parametrize(("path", "waits"), [
    ("/etcdserverpb.KV/Range", True),  # a flag route matches the path: the call waits for its first message
    ("/etcdserverpb.KV/Put", False),
    ("/etcdserverpb.Watch/Watch", False),  # (a stream is placed at once: its first message may come late)
])
def test_only_calls_a_flag_route_may_match_wait_for_their_first_message(etcd_router: Router, path: str,
                                                                      waits: bool) -> None:
    assert etcd_router.call_reads_message(path) == waits
