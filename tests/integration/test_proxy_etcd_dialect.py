"""The etcd dialect of the data path, against fake nodes that answer like etcd's JSON gateway."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from raftlb.config.model import RouteConfig
from raftlb.core.dialects import dialect_for, etcd_revision
from tests.support.fakes import FakeCluster, FakeRequest, FakeResponse
from tests.support.harness import running, url_of, wait_for

pytestmark = pytest.mark.integration

RANGE = RouteConfig(methods=None, path=re.compile("^/v3/kv/range$"), kind="read", policy="fenced",
                    idempotent=False)


def etcd_answer(revision: int) -> FakeResponse:
    body = {"header": {"cluster_id": "1", "member_id": "2", "revision": str(revision), "raft_term": "3"}}
    return FakeResponse.json(body)


def test_etcd_revision_parsing() -> None:
    assert etcd_revision(b'{"header":{"revision":"123"},"kvs":[]}') == 123
    assert etcd_revision(b'{"header":{}}') is None
    assert etcd_revision(b"not json") is None
    assert etcd_revision(b'{"header":{"revision":"x"}}') is None


async def test_writes_carry_hasleader_and_the_body_revision_becomes_x_raft_index() -> None:
    async with FakeCluster(3) as fc:
        fc.elect("n1")
        for n in fc.nodes:
            n.set(applied_index=41, commit_index=41)

        async def leader(req: FakeRequest) -> FakeResponse:
            return etcd_answer(41)

        async def follower(req: FakeRequest) -> FakeResponse:
            return etcd_answer(40)  # announces 41, answers from 40: the answer decides

        fc["n1"].handler = leader
        fc["n2"].handler = follower
        fc["n3"].handler = follower
        async with running(fc.config(routes=(RANGE,))) as srv, httpx.AsyncClient(base_url=url_of(srv)) as c:
            srv.proxies["c1"].dialect = dialect_for("etcd")
            await wait_for(lambda: srv.proxies["c1"].table.leader(time.monotonic()) == "n1"
                           and srv.proxies["c1"].table.nodes["n3"].applied_index == 41)
            r = await c.post("/v3/kv/put", json={"key": "Zm9v", "value": "YmFy"})
            assert r.headers["x-raft-index"] == "41"
            assert fc["n1"].requests[-1].header("grpc-metadata-hasleader") == "true"
            # A fenced range with the put's token: the followers answer revision 40, which is discarded.
            r = await c.post("/v3/kv/range", json={"key": "Zm9v", "serializable": True},
                             headers={"X-Raft-Min-Index": r.headers["x-raft-index"]})
            assert r.status_code == 200
            assert r.headers["x-raft-index"] == "41" and r.headers["x-raft-node"] == "n1"
            assert srv.proxies["c1"].stats.fence_stale == 1
            # Reads carry no hasleader header (a serializable read may be served without a leader).
            follower_requests = fc["n2"].requests + fc["n3"].requests
            assert all(q.header("grpc-metadata-hasleader") is None for q in follower_requests)
