"""The demo node without networking: the KV/session state machine, the replicated apply, the HTTP handler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftlb.demo.kv import (
    OP_DELETE,
    OP_NOOP,
    OP_PUT,
    Command,
    KVState,
    RaftSettings,
    RaftStatus,
    ReplicatedKV,
    WriteRefused,
    WriteResult,
)
from raftlb.demo.node import NodeApp, NodeConfig, Peer, parse_args
from raftlb.http.app import EventStream, Request, Response


def put(key: str, value: bytes, session: str | None = None, seq: int = 0, ts: int = 0) -> Command:
    return Command(OP_PUT, key, value, session, seq, ts)


def delete(key: str, session: str | None = None, seq: int = 0, ts: int = 0) -> Command:
    return Command(OP_DELETE, key, b"", session, seq, ts)


# -- the state machine --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("commands", "expected_results", "expected_data"),
    [
        pytest.param([put("a", b"1")], [(200, None, False)], {"a": b"1"}, id="put-new"),
        pytest.param([put("a", b"1"), put("a", b"2")], [(200, None, False), (200, None, True)], {"a": b"2"},
                     id="put-overwrites"),
        pytest.param([put("a", b"1"), delete("a")], [(200, None, False), (200, None, True)], {},
                     id="delete-present"),
        pytest.param([delete("a")], [(404, "not_found", False)], {}, id="delete-absent-is-404"),
        pytest.param([put("a", b"1"), Command(OP_NOOP)], [(200, None, False), (200, None, False)],
                     {"a": b"1"}, id="noop-changes-nothing"),
        pytest.param([Command("frobnicate", "a")], [(400, "unknown_op", False)], {}, id="unknown-op"),
    ],
)
def test_commands_apply_in_log_order(commands: list[Command],
                                     expected_results: list[tuple[int, str | None, bool]],
                                     expected_data: dict[str, bytes]) -> None:
    state = KVState()
    results = [state.apply(cmd, index) for index, cmd in enumerate(commands, start=10)]
    assert [(r.status, r.error, r.existed) for r in results] == expected_results
    assert [r.index for r in results] == list(range(10, 10 + len(commands)))
    assert state.data == expected_data
    assert state.applied_index == 9 + len(commands)


def test_scan_returns_prefix_matches_sorted() -> None:
    state = KVState()
    for i, key in enumerate(["b/2", "a/1", "b/1", "c"]):
        state.apply(put(key, key.encode()), i + 2)
    assert state.scan("b/") == [("b/1", b"b/1"), ("b/2", b"b/2")]
    assert [k for k, _ in state.scan("")] == ["a/1", "b/1", "b/2", "c"]


def test_repeated_session_seq_returns_cached_result_and_does_not_reapply() -> None:
    state = KVState()
    first = state.apply(put("k", b"mine", "s1", 1), 5)
    state.apply(put("k", b"someone else"), 6)
    replay = state.apply(put("k", b"mine", "s1", 1), 7)
    assert replay.duplicate and replay.index == 5 and replay.status == first.status
    assert state.get("k") == b"someone else"


def test_sessions_are_independent_and_seqs_may_arrive_out_of_order() -> None:
    state = KVState()
    state.apply(put("k", b"a2", "a", 2), 2)
    assert not state.apply(put("k", b"b2", "b", 2), 3).duplicate
    assert not state.apply(put("k", b"a1", "a", 1), 4).duplicate  # never seen: applied
    assert state.apply(put("k", b"a2", "a", 2), 5).duplicate
    assert state.get("k") == b"a1"


def test_seq_evicted_from_the_capped_cache_is_refused_not_reapplied() -> None:
    state = KVState(max_cached_per_session=3)
    for seq in range(1, 6):
        state.apply(put(f"k{seq}", b"v", "s", seq), seq + 1)
    assert sorted(state.sessions["s"].results) == [3, 4, 5]
    state.apply(delete("k1"), 10)
    stale = state.apply(put("k1", b"v", "s", 1), 11)
    assert (stale.status, stale.error, stale.duplicate) == (409, "stale_seq", False)
    assert state.get("k1") is None
    assert state.apply(put("k5", b"v", "s", 5), 12).duplicate


def test_sessions_expire_by_log_time_carried_in_commands() -> None:
    state = KVState(session_ttl_ms=1000)
    state.apply(put("k", b"v", "s", 1, ts=10_000), 2)
    assert state.apply(put("k", b"v", "s", 1, ts=10_900), 3).duplicate  # touched at 10_900
    state.apply(Command(OP_NOOP, ts_ms=11_800), 4)
    assert "s" in state.sessions
    state.apply(Command(OP_NOOP, ts_ms=11_901), 5)
    assert "s" not in state.sessions
    # After expiry the session starts over: a late retry applies again (documented limitation).
    assert not state.apply(put("k", b"v", "s", 1, ts=11_950), 6).duplicate


def test_log_time_never_goes_back_when_a_new_leader_has_a_slower_clock() -> None:
    state = KVState(session_ttl_ms=1000)
    state.apply(put("k", b"v", "s", 1, ts=50_000), 2)
    state.apply(put("x", b"v", "t", 1, ts=20_000), 3)  # skewed clock: log time stays at 50_000
    assert state.log_time_ms == 50_000
    assert state.sessions["t"].last_active_ms == 50_000
    state.apply(Command(OP_NOOP, ts_ms=51_001), 4)
    assert not state.sessions


def test_session_table_is_capped_least_recently_used_first() -> None:
    state = KVState(max_sessions=2)
    state.apply(put("k", b"1", "a", 1), 2)
    state.apply(put("k", b"2", "b", 1), 3)
    state.apply(put("k", b"3", "a", 2), 4)  # a is now the most recent
    state.apply(put("k", b"4", "c", 1), 5)
    assert list(state.sessions) == ["a", "c"]


def keyed(cmd: Command, key: str) -> Command:
    return replace(cmd, idempotency_key=key)


def test_a_write_repeated_with_its_idempotency_key_returns_the_first_result_and_is_not_reapplied() -> None:
    state = KVState()
    first = state.apply(keyed(put("k", b"mine"), "key-1"), 5)
    assert (first.status, first.existed, first.duplicate) == (200, False, False)
    state.apply(put("k", b"someone else"), 6)  # a concurrent writer, in between
    replay = state.apply(keyed(put("k", b"mine"), "key-1"), 7)
    assert replay == replace(first, duplicate=True)  # index 5, "created", as the first time
    assert state.get("k") == b"someone else"  # the repeat did not overwrite the later write
    # A keyed DELETE too; another key is another write.
    assert state.apply(keyed(delete("k"), "key-2"), 8).status == 200
    assert state.apply(keyed(delete("k"), "key-2"), 9) == WriteResult(200, 8, existed=True, duplicate=True)
    assert not state.apply(keyed(put("k", b"mine"), "key-3"), 10).duplicate


@pytest.mark.parametrize("other", [put("k", b"other value"), put("j", b"mine"), delete("k")],
                         ids=["value", "key", "op"])
def test_an_idempotency_key_reused_for_another_write_is_refused(other: Command) -> None:
    state = KVState()
    state.apply(keyed(put("k", b"mine"), "key-1"), 5)
    refused = state.apply(keyed(other, "key-1"), 6)
    assert (refused.status, refused.error, refused.duplicate) == (422, "idempotency_key_reused", False)
    assert state.data == {"k": b"mine"}


def test_idempotency_keys_expire_by_log_time_and_are_capped_oldest_first() -> None:
    state = KVState(session_ttl_ms=1000, max_idempotency_keys=2)
    state.apply(keyed(put("k", b"v", ts=10_000), "a"), 2)
    assert state.apply(keyed(put("k", b"v", ts=10_900), "a"), 3).duplicate
    state.apply(Command(OP_NOOP, ts_ms=11_000), 4)
    assert "a" in state.keyed  # a TTL from its first application, not from the repeat
    state.apply(Command(OP_NOOP, ts_ms=11_001), 5)
    assert "a" not in state.keyed
    for i, key in enumerate(["b", "c", "d"]):
        state.apply(keyed(put("k", b"v", ts=12_000), key), 6 + i)
    assert list(state.keyed) == ["c", "d"]
    assert not state.apply(keyed(put("k", b"v", ts=12_000), "b"), 9).duplicate  # forgotten: applies again


def test_idempotency_key_and_session_together_apply_once() -> None:
    state = KVState()
    first = state.apply(keyed(put("k", b"v", "s", 1), "key"), 2)
    assert state.apply(keyed(put("k", b"v", "s", 1), "key"), 3) == replace(first, duplicate=True)
    assert state.apply(put("k", b"v", "s", 1), 4) == replace(first, duplicate=True)


def test_state_survives_a_pickle_round_trip_as_in_a_snapshot() -> None:
    state = KVState()
    state.apply(put("k", b"v", "s", 1, ts=7), 2)
    state.apply(keyed(put("j", b"v", ts=7), "key-1"), 3)
    clone = pickle.loads(pickle.dumps(state))
    assert clone == state
    assert clone.apply(put("k", b"v", "s", 1, ts=8), 4).duplicate
    assert clone.apply(keyed(put("j", b"v", ts=8), "key-1"), 5).duplicate


def test_command_wire_form_is_a_plain_tuple() -> None:
    cmd = put("k", b"v", "s", 3, ts=99)
    wire = cmd.to_wire()
    assert type(wire) is tuple and len(wire) == 6 and Command.from_wire(wire) == cmd  # as before keys
    cmd = keyed(cmd, "key-1")
    wire = cmd.to_wire()
    assert type(wire) is tuple and len(wire) == 7 and wire[6] == "key-1" and Command.from_wire(wire) == cmd


commands = st.builds(
    Command,
    op=st.sampled_from([OP_PUT, OP_DELETE, OP_NOOP]),
    key=st.sampled_from(["a", "b"]),
    value=st.sampled_from([b"1", b"2"]),
    session=st.sampled_from([None, "s", "t"]),
    seq=st.integers(1, 4),
    ts_ms=st.integers(0, 100),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(commands, max_size=40))
def test_every_session_write_applies_at_most_once_and_replicas_agree(cmds: list[Command]) -> None:
    replica_a, replica_b = KVState(), KVState()
    model: dict[str, bytes] = {}
    first_index: dict[tuple[str, int], int] = {}
    for index, cmd in enumerate(cmds, start=2):
        result = replica_a.apply(cmd, index)
        assert replica_b.apply(cmd, index) == result
        if cmd.session is not None and (cmd.session, cmd.seq) in first_index:
            assert result.duplicate and result.index == first_index[(cmd.session, cmd.seq)]
            continue
        if cmd.session is not None:
            first_index[(cmd.session, cmd.seq)] = index
        if cmd.op == OP_PUT:
            model[cmd.key] = cmd.value
        elif cmd.op == OP_DELETE:
            model.pop(cmd.key, None)
    assert replica_a.data == model
    assert replica_a == replica_b


keyed_commands = st.builds(
    Command,
    op=st.sampled_from([OP_PUT, OP_DELETE]),
    key=st.sampled_from(["a", "b"]),
    value=st.sampled_from([b"1", b"2"]),
    ts_ms=st.integers(0, 100),
    idempotency_key=st.sampled_from([None, "k1", "k2", "k3"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(keyed_commands, max_size=40))
def test_every_keyed_write_applies_at_most_once_and_replicas_agree(cmds: list[Command]) -> None:
    replica_a, replica_b = KVState(), KVState()
    model: dict[str, bytes] = {}
    first: dict[str, tuple[Command, int]] = {}
    for index, cmd in enumerate(cmds, start=2):
        result = replica_a.apply(cmd, index)
        assert replica_b.apply(cmd, index) == result
        if cmd.idempotency_key is not None and cmd.idempotency_key in first:
            earlier, earlier_index = first[cmd.idempotency_key]
            if replace(earlier, ts_ms=0) == replace(cmd, ts_ms=0):
                assert result.duplicate and result.index == earlier_index
            else:
                assert (result.status, result.error) == (422, "idempotency_key_reused")
            continue
        if cmd.idempotency_key is not None:
            first[cmd.idempotency_key] = (cmd, index)
        if cmd.op == OP_PUT:
            model[cmd.key] = cmd.value
        else:
            model.pop(cmd.key, None)
    assert replica_a.data == model
    assert replica_a == replica_b


# -- the replicated apply -----------------------------------------------------------------------------------


@dataclass
class _SyncStub:
    raftLastApplied: int  # PySyncObj's attribute name


def test_replicated_apply_uses_the_next_log_index_and_never_raises() -> None:
    kv = ReplicatedKV(KVState())
    kv._syncObj = _SyncStub(raftLastApplied=41)
    result = kv.apply(put("k", b"v").to_wire(), _doApply=True)
    assert (result.status, result.index) == (200, 42)
    assert kv.read("k") == (b"v", 42)
    broken = kv.apply(("put", "k"), _doApply=True)  # a malformed entry must not wedge the apply loop
    assert (broken.status, broken.error) == (500, "apply_failed")


def test_snapshot_of_the_consumer_holds_the_state_but_not_the_lock() -> None:
    kv = ReplicatedKV(KVState())
    assert set(kv._serialize()) == {"state"}


# -- the HTTP handler, with a fake Raft ---------------------------------------------------------------------


@dataclass
class FakeRaft:
    status: RaftStatus
    kv: ReplicatedKV = field(default_factory=lambda: ReplicatedKV(KVState()))
    refuse: WriteRefused | None = None
    submitted: list[Command] = field(default_factory=list)

    async def submit(self, cmd: Command, timeout: float) -> WriteResult:
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append(cmd)
        self.kv._syncObj = _SyncStub(raftLastApplied=self.status.applied_index)
        result: WriteResult = self.kv.apply(cmd.to_wire(), _doApply=True)
        return result

    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_change(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)
        self.changed.clear()


LEADER = RaftStatus(4, "leader", "n1", 9, 9, True)
FOLLOWER = RaftStatus(4, "follower", "n2", 9, 9, False)


def make_app(status: RaftStatus) -> tuple[NodeApp, FakeRaft]:
    peer = Peer("n2", ("127.0.0.1", 7002), "127.0.0.1:7102")
    cfg = NodeConfig("n1", ("127.0.0.1", 7001), "127.0.0.1:7101", (peer,), Path("/nowhere"), RaftSettings())
    raft = FakeRaft(status)
    return NodeApp(cfg, raft), raft  # type: ignore[arg-type]


def request(method: str, target: str, body: bytes = b"", **headers: str) -> Request:
    path, _, query = target.partition("?")
    q = dict(part.split("=", 1) for part in query.split("&") if part)
    return Request(method, target, path, q, {k.replace("_", "-"): v for k, v in headers.items()}, body, None)


async def call(app: NodeApp, req: Request) -> tuple[Response, dict[str, str], Any]:
    resp = await app.handle(req)
    assert isinstance(resp, Response)
    body = json.loads(resp.body) if resp.content_type == "application/json" else resp.body
    return resp, dict(resp.headers), body


async def test_put_then_get_carries_raft_headers() -> None:
    app, _ = make_app(LEADER)
    resp, headers, body = await call(app, request("PUT", "/kv/a%2Fb", b"v"))
    assert resp.status == 200 and body == {"index": 10, "key": "a/b", "created": True}
    assert (headers["X-Raft-Index"], headers["X-Raft-Term"], headers["X-Raft-Node"]) == ("10", "4", "n1")
    resp, headers, body = await call(app, request("GET", "/kv/a%2Fb"))
    assert (resp.status, body, headers["X-Raft-Index"]) == (200, b"v", "10")
    resp, _, body = await call(app, request("GET", "/kv?prefix=a"))
    assert body == [{"key": "a/b", "value": "v"}]


async def test_write_to_follower_is_421_with_leader_hint_and_nothing_submitted() -> None:
    app, raft = make_app(FOLLOWER)
    raft.refuse = WriteRefused(421, "not_leader", "n2")
    resp, headers, body = await call(app, request("DELETE", "/kv/a"))
    assert resp.status == 421 and body == {"error": "not_leader", "leader": "n2"}
    assert headers["X-Raft-Leader"] == "n2" and headers["X-Raft-Leader-Url"] == "http://127.0.0.1:7002"
    raft.refuse = WriteRefused(421, "not_leader", None)
    resp, headers, _ = await call(app, request("PUT", "/kv/a", b"v"))
    assert headers["X-Raft-Leader"] == "" and "X-Raft-Leader-Url" not in headers
    assert raft.submitted == []


@pytest.mark.parametrize("code", ["no_quorum", "timeout", "overloaded"])
async def test_refused_writes_are_503_with_retry_after(code: str) -> None:
    app, raft = make_app(LEADER)
    raft.refuse = WriteRefused(503, code)
    resp, headers, body = await call(app, request("PUT", "/kv/a", b"v"))
    assert (resp.status, body, headers["Retry-After"]) == (503, {"error": code}, "1")


async def test_session_headers_reach_the_command_and_replays_are_marked() -> None:
    app, raft = make_app(LEADER)
    _, h1, b1 = await call(app, request("PUT", "/kv/k", b"v", x_raft_session="s", x_raft_seq="7"))
    _, h2, b2 = await call(app, request("PUT", "/kv/k", b"v", x_raft_session="s", x_raft_seq="7"))
    assert (raft.submitted[0].session, raft.submitted[0].seq) == ("s", 7)
    assert b1 == b2 and h2["X-Raft-Index"] == h1["X-Raft-Index"] and h2["X-Raft-Duplicate"] == "true"
    resp, _, body = await call(app, request("PUT", "/kv/k", b"v", x_raft_session="s", x_raft_seq="x"))
    assert resp.status == 400 and body["error"] == "bad_request"


async def test_an_idempotency_key_reaches_the_command_and_replays_are_marked() -> None:
    app, raft = make_app(LEADER)
    _, h1, b1 = await call(app, request("PUT", "/kv/k", b"v", idempotency_key=" key-1 "))
    _, h2, b2 = await call(app, request("PUT", "/kv/k", b"v", idempotency_key="key-1"))
    assert raft.submitted[0].idempotency_key == "key-1"
    assert b1 == b2 == {"index": 10, "key": "k", "created": True}  # the first answer, not "created: false"
    assert "X-Raft-Duplicate" not in h1 and h2["X-Raft-Duplicate"] == "true"
    resp, _, body = await call(app, request("PUT", "/kv/k", b"other", idempotency_key="key-1"))
    assert (resp.status, body["error"]) == (422, "idempotency_key_reused")
    for bad in ("", "a, b", "x" * 257):
        resp, _, body = await call(app, request("PUT", "/kv/k", b"v", idempotency_key=bad))
        assert (resp.status, body["error"]) == (400, "bad_request"), bad


@pytest.mark.parametrize(
    ("method", "target", "status", "error"),
    [
        ("GET", "/kv/missing", 404, "not_found"),
        ("GET", "/nope", 404, "not_found"),
        ("POST", "/kv/a", 405, "method_not_allowed"),
        ("PUT", "/raft/status", 405, "method_not_allowed"),
        ("PUT", "/kv/", 400, "bad_request"),
    ],
)
async def test_errors_are_json_with_a_stable_code(method: str, target: str, status: int, error: str) -> None:
    app, _ = make_app(LEADER)
    resp, headers, body = await call(app, request(method, target))
    assert (resp.status, body["error"]) == (status, error)
    assert "X-Raft-Index" in headers


async def test_read_index_returns_the_noop_index_and_term() -> None:
    app, raft = make_app(LEADER)
    _, _, body = await call(app, request("GET", "/raft/read_index"))
    assert body == {"read_index": 10, "term": 4} and raft.submitted[0].op == OP_NOOP


@pytest.mark.parametrize(("status", "has_quorum_field"), [(LEADER, True), (FOLLOWER, False)])
async def test_status_follows_the_wire_contract(status: RaftStatus, has_quorum_field: bool) -> None:
    app, _ = make_app(status)
    _, _, body = await call(app, request("GET", "/raft/status"))
    expected = {"node", "term", "role", "leader", "commit_index", "applied_index", "seq", "ts_ms"}
    assert set(body) == expected | ({"has_quorum"} if has_quorum_field else set())
    assert (body["term"], body["role"], body["leader"]) == (4, status.role, status.leader)


async def test_announce_stream_sends_one_event_per_tick_with_rising_seq() -> None:
    app, _ = make_app(LEADER)
    stream = await app.handle(request("GET", "/raft/announce"))
    assert isinstance(stream, EventStream) and stream.content_type == "text/event-stream"
    events: list[dict[str, Any]] = []

    async def send(data: bytes) -> None:
        assert data.startswith(b"data: ") and data.endswith(b"\n\n")
        events.append(json.loads(data[6:]))
        if len(events) == 4:
            app.close()

    await asyncio.wait_for(stream.producer(send), 2.0)
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert all(e["role"] == "leader" and e["has_quorum"] is True for e in events)


async def test_announce_stream_reports_a_leader_change_at_once_and_keeps_ticking() -> None:
    app, raft = make_app(FOLLOWER)
    stream = await app.handle(request("GET", "/raft/announce"))
    assert isinstance(stream, EventStream)
    loop = asyncio.get_running_loop()
    sent: list[tuple[float, dict[str, Any]]] = []

    def elected() -> None:
        raft.status = RaftStatus(5, "leader", "n1", 9, 9, True)
        raft.changed.set()

    async def send(data: bytes) -> None:
        sent.append((loop.time(), json.loads(data[6:])))
        if len(sent) == 1:
            loop.call_later(0.015, elected)
        if len(sent) == 3:
            app.close()

    await asyncio.wait_for(stream.producer(send), 2.0)
    (t0, first), (t1, change), (t2, tick) = sent
    assert (first["term"], change["term"], change["role"], tick["role"]) == (4, 5, "leader", "leader")
    assert t1 - t0 < 0.045  # before the next tick was due
    assert 0.045 <= t2 - t0 < 0.1  # the tick schedule is unchanged


def test_cli_parses_peers_and_rejects_bad_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    cfg, level, loop = parse_args(["--id", "n1", "--http", "127.0.0.1:7001", "--raft", "127.0.0.1:7101",
                                 "--peer", "n2=127.0.0.1:7002/127.0.0.1:7102", "--data-dir", "/tmp/x",
                                 "--election-timeout", "0.2:0.4"])
    assert cfg.peers == (Peer("n2", ("127.0.0.1", 7002), "127.0.0.1:7102"),)
    assert cfg.raft_settings.election_timeout == (0.2, 0.4) and (level, loop) == ("info", "auto")
    for bad in (["--peer", "n2=127.0.0.1:7002"], ["--peer", "n1=127.0.0.1:1/127.0.0.1:2"],
                ["--http", "nohost"], ["--election-timeout", "0.05:0.1"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--id", "n1", "--http", "127.0.0.1:7001", "--raft", "127.0.0.1:7101",
                        "--data-dir", "/tmp/x", *bad])
        assert exc.value.code == 2
    assert "--peer" in capsys.readouterr().err
