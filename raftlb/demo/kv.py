"""The demo key-value store: the pure state machine `KVState`, and `RaftKV` that replicates it with PySyncObj.

Every write is a `Command` in the Raft log; `KVState.apply(command, index)` is deterministic, so replicas that
apply the same log reach the same state, session table included. Sessions (Raft dissertation §6.3): a write
carrying `(session, seq)` applies at most once; a repeat gets the cached result, original index included.
Sessions expire by *log time*: each command carries the leader's wall clock at submission, and a session idle
longer than the TTL of log time is dropped at the same log position on every replica. A session is created
by its first write (there is no register call), so a write retried after its session expired applies again.

`Idempotency-Key` works the same way without a session: the first write carrying a key applies, its result is
kept with the key in the replicated state, and a later write with that key (a client's retry, or raftlb's
re-send after an outcome-unknown failure, on any node that leads by then) gets that result back, original
index included, without being applied again. The same key with another operation, key or value is refused
(422 `idempotency_key_reused`). Keys expire after the session TTL of log time, and beyond
`max_idempotency_keys` the oldest go first: a key retried after that applies again.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, SyncObjException, replicated
from pysyncobj.pipe_notifier import PipeNotifier

log = logging.getLogger("raftlb.demo")

OP_PUT = "put"
OP_DELETE = "delete"
OP_NOOP = "noop"
# (op, key, value, session, seq, ts_ms) and, for a write with an Idempotency-Key, the key as a 7th element
# (journals written before keys existed hold 6-tuples, which still read).
WireCommand = tuple[str, str, bytes, str | None, int, int] | tuple[str, str, bytes, str | None, int, int, str]
# PySyncObj is untyped; `replicated` returns a method that takes the same arguments plus `callback=`.
_replicated = cast(Callable[[Callable[..., Any]], Callable[..., Any]], replicated)


@dataclass(frozen=True, slots=True)
class Command:
    """One log entry. `ts_ms` is the submitting leader's wall clock; it drives session expiry."""

    op: str
    key: str = ""
    value: bytes = b""
    session: str | None = None
    seq: int = 0
    ts_ms: int = 0
    idempotency_key: str | None = None

    def to_wire(self) -> WireCommand:
        # A plain tuple in the journal: it survives renames of this class.
        if self.idempotency_key is None:
            return (self.op, self.key, self.value, self.session, self.seq, self.ts_ms)
        return (self.op, self.key, self.value, self.session, self.seq, self.ts_ms, self.idempotency_key)

    @classmethod
    def from_wire(cls, wire: WireCommand) -> Command:
        op, key, value, session, seq, ts_ms = wire[:6]
        return cls(op, key, value, session, seq, ts_ms, wire[6] if len(wire) > 6 else None)

    def fingerprint(self) -> tuple[str, str, bytes]:
        """What a write carrying an Idempotency-Key must repeat to be the same write."""
        return (self.op, self.key, hashlib.sha256(self.value).digest())


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of one applied command; cached per session so a replay returns the very same answer."""

    status: int
    index: int
    error: str | None = None
    existed: bool = False  # the key held a value before this write
    duplicate: bool = False  # a replay of a cached (session, seq): nothing was applied


@dataclass(slots=True)
class SessionRecord:
    """Per-session dedup state: results by seq (oldest first) and the highest seq evicted from the cache."""

    last_active_ms: int
    results: dict[int, WriteResult] = field(default_factory=dict)
    floor: int = 0

    def remember(self, seq: int, result: WriteResult, cap: int) -> None:
        self.results[seq] = result
        while len(self.results) > cap:
            oldest = min(self.results)
            del self.results[oldest]
            self.floor = max(self.floor, oldest)


@dataclass(frozen=True, slots=True)
class KeyedResult:
    """The result of the write that first carried an Idempotency-Key, and what that write was."""

    applied_ms: int  # log time of the first application: the key expires a TTL later
    fingerprint: tuple[str, str, bytes]
    result: WriteResult


@dataclass(slots=True)
class KVState:
    """The replicated state: data, session table and log time. Pure: no clocks, no I/O, no threads."""

    session_ttl_ms: int = 10 * 60 * 1000
    max_sessions: int = 10_000
    max_cached_per_session: int = 32
    max_idempotency_keys: int = 100_000
    data: dict[str, bytes] = field(default_factory=dict)
    sessions: OrderedDict[str, SessionRecord] = field(default_factory=OrderedDict)
    keyed: OrderedDict[str, KeyedResult] = field(default_factory=OrderedDict)  # Idempotency-Key -> result
    log_time_ms: int = 0
    applied_index: int = 0

    def apply(self, cmd: Command, index: int) -> WriteResult:
        """Apply the command at log `index`; deterministic in (state, cmd, index)."""
        self.applied_index = max(self.applied_index, index)
        self.log_time_ms = max(self.log_time_ms, cmd.ts_ms)
        self._expire_sessions()
        if cmd.idempotency_key is None:
            return self._apply_in_session(cmd, index)
        fingerprint = cmd.fingerprint()
        kept = self.keyed.get(cmd.idempotency_key)
        if kept is not None:
            if kept.fingerprint != fingerprint:
                return WriteResult(422, index, error="idempotency_key_reused")
            return replace(kept.result, duplicate=True)
        result = self._apply_in_session(cmd, index)
        self.keyed[cmd.idempotency_key] = KeyedResult(self.log_time_ms, fingerprint,
                                                      replace(result, duplicate=False))
        while len(self.keyed) > self.max_idempotency_keys:
            self.keyed.popitem(last=False)
        return result

    def _apply_in_session(self, cmd: Command, index: int) -> WriteResult:
        if cmd.session is None:
            return self._execute(cmd, index)
        record = self.sessions.pop(cmd.session, None) or SessionRecord(self.log_time_ms)
        record.last_active_ms = self.log_time_ms
        self.sessions[cmd.session] = record  # (re)inserted last: the table stays ordered by activity
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        cached = record.results.get(cmd.seq)
        if cached is not None:
            return replace(cached, duplicate=True)
        if cmd.seq <= record.floor:
            # Its result was evicted: it may have been applied, so it must not be applied again.
            return WriteResult(409, index, error="stale_seq")
        result = self._execute(cmd, index)
        record.remember(cmd.seq, result, self.max_cached_per_session)
        return result

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    def _execute(self, cmd: Command, index: int) -> WriteResult:
        if cmd.op == OP_PUT:
            existed = cmd.key in self.data
            self.data[cmd.key] = cmd.value
            return WriteResult(200, index, existed=existed)
        if cmd.op == OP_DELETE:
            if self.data.pop(cmd.key, None) is None:
                return WriteResult(404, index, error="not_found")
            return WriteResult(200, index, existed=True)
        if cmd.op == OP_NOOP:
            return WriteResult(200, index)
        return WriteResult(400, index, error="unknown_op")

    def _expire_sessions(self) -> None:
        # Ordered by last activity, stamped with the monotonic log time: the idle sessions are at the front.
        horizon = self.log_time_ms - self.session_ttl_ms
        while self.sessions and next(iter(self.sessions.values())).last_active_ms < horizon:
            self.sessions.popitem(last=False)
        # Idempotency keys too, by when they were first applied (the table is in that order).
        while self.keyed and next(iter(self.keyed.values())).applied_ms < horizon:
            self.keyed.popitem(last=False)


class ReplicatedKV(SyncObjConsumer):  # type: ignore[misc]
    """The PySyncObj consumer holding a `KVState`. `lock` guards reads from the event-loop thread against
    applies on PySyncObj's tick thread; it is created before `SyncObjConsumer.__init__` so that the
    snapshot (`_serialize`) leaves it out and holds only `state`."""

    def __init__(self, state: KVState) -> None:
        self.lock = threading.Lock()
        super().__init__()
        self.state = state

    @_replicated
    def apply(self, wire: WireCommand) -> WriteResult:
        # PySyncObj increments raftLastApplied right after this call returns, so the entry being applied
        # is the next one (pinned by tests/integration/test_demo_node.py against the journal file).
        index = int(self._syncObj.raftLastApplied) + 1
        try:
            cmd = Command.from_wire(wire)
            with self.lock:
                return self.state.apply(cmd, index)
        except Exception:
            # An exception escaping here would make PySyncObj retry the same entry forever.
            log.exception("cannot apply log entry %d: %r", index, wire)
            return WriteResult(500, index, error="apply_failed")

    def read(self, key: str) -> tuple[bytes | None, int]:
        """The value and the applied index it reflects."""
        with self.lock:
            return self.state.get(key), self._applied_index()

    def scan(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        """The items under `prefix`, sorted by key, and the applied index they reflect."""
        with self.lock:
            return self.state.scan(prefix), self._applied_index()

    def _applied_index(self) -> int:
        # Under the lock no apply is half done, so everything up to PySyncObj's raftLastApplied (which also
        # counts its own no-op entries) is in the state, and so is everything up to our last command.
        sync = self._syncObj
        return max(self.state.applied_index, int(sync.raftLastApplied) if sync is not None else 0)


# -- replication: PySyncObj on its own thread, bridged to the asyncio loop --------------------------------

ROLE_FOLLOWER, ROLE_CANDIDATE, ROLE_LEADER = "follower", "candidate", "leader"
_ROLES = {0: ROLE_FOLLOWER, 1: ROLE_CANDIDATE, 2: ROLE_LEADER}
_NO_QUORUM = -1  # our own failure reason, beside PySyncObj's FAIL_REASON codes
_GATE_BATCH = 1024  # commands admitted per tick
_REFUSALS = {  # PySyncObj failure → (status, code); all mean "not applied" (DISCARDED: another entry won)
    FAIL_REASON.NOT_LEADER: (421, "not_leader"), FAIL_REASON.MISSING_LEADER: (421, "not_leader"),
    FAIL_REASON.LEADER_CHANGED: (421, "not_leader"), FAIL_REASON.DISCARDED: (421, "not_leader"),
    _NO_QUORUM: (503, "no_quorum"), FAIL_REASON.QUEUE_FULL: (503, "overloaded"),
}


@dataclass(frozen=True)
class RaftSettings:
    """Timing of the demo cluster: short, so failover is quick to watch."""

    election_timeout: tuple[float, float] = (0.3, 0.6)
    heartbeat: float = 0.05
    leader_fallback: float = 1.0  # an isolated leader steps down after this long
    session_ttl: float = 600.0
    compaction_entries: int = 100_000
    tick: float = 0.025  # PySyncObj poll timeout: the status snapshot is at most this old


@dataclass(frozen=True, slots=True)
class RaftStatus:
    """A snapshot of the node's Raft state, taken on the tick thread at the end of each tick."""

    term: int
    role: str
    leader: str | None
    commit_index: int
    applied_index: int
    has_quorum: bool

    def identity(self) -> tuple[int, str, str | None]:  # an announce stream reports its changes at once
        return (self.term, self.role, self.leader)


class WriteRefused(Exception):
    """A write that was not applied (421 not_leader, 503 no_quorum / overloaded) or whose outcome is unknown
    (503 timeout: it may still commit; sessions make the retry safe)."""

    def __init__(self, status: int, code: str, leader: str | None = None) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.leader = leader


class _GatedSyncObj(SyncObj):  # type: ignore[misc]
    """A SyncObj whose client commands enter its queue only from the tick thread, right before PySyncObj
    drains that queue, and only while this node leads. Plain PySyncObj forwards a command submitted on a
    follower to the leader; the wire contract wants such a write refused (421) and not applied."""

    def __init__(self, self_addr: str, peers: list[str], conf: Any, consumer: ReplicatedKV,
                 gate: Callable[[Any], None]) -> None:
        # Before SyncObj.__init__: its tick thread starts in there; earlier attributes stay out of snapshots.
        self._gate = gate
        super().__init__(self_addr, peers, conf, consumers=[consumer])

    def _checkCommandsToApply(self) -> None:
        self._gate(self)
        super()._checkCommandsToApply()


class RaftKV:
    """The replicated KV store of one node. `submit()` writes (from the asyncio loop), `kv.read()`, `scan()`
    read the local copy, `status` is the latest snapshot, `wait_change()` wakes on term/role/leader change."""

    def __init__(self, node_id: str, raft_addr: str, peers: dict[str, str], data_dir: Path,
                 settings: RaftSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.node_id = node_id
        self.settings = settings
        self.kv = ReplicatedKV(KVState(session_ttl_ms=int(settings.session_ttl * 1000)))
        self._loop = loop
        self._ids = {raft_addr: node_id, **peers}  # PySyncObj knows members by raft address
        self._cluster_size = 1 + len(peers)
        self._state = 0
        self._pending: collections.deque[tuple[WireCommand, Callable[[Any, int], None]]] = collections.deque()
        self._changed: asyncio.Future[None] = loop.create_future()
        conf = SyncObjConf(
            journalFile=str(data_dir / "raft.journal"), fullDumpFile=str(data_dir / "raft.dump"),
            raftMinTimeout=settings.election_timeout[0], raftMaxTimeout=settings.election_timeout[1],
            appendEntriesPeriod=settings.heartbeat, leaderFallbackTimeout=settings.leader_fallback,
            autoTickPeriod=settings.tick,
            # Replicate each write at once rather than on the next heartbeat: lower latency.
            appendEntriesUseBatch=False,
            # Both ends reconnect quickly (PySyncObj's default retry is 5 s): a restarted node rejoins fast.
            connectionRetryTime=0.2, connectionTimeout=max(1.5, 2 * settings.election_timeout[1]),
            # PySyncObj binds 0.0.0.0 unless told otherwise, and its messages are pickles.
            bindAddress=raft_addr, maxBindRetries=10, bindRetryTime=0.2,
            dynamicMembershipChange=False, commandsWaitLeader=False,
            # Snapshots are written on the tick thread: no fork() of a multi-threaded process.
            useFork=False, logCompactionMinEntries=settings.compaction_entries, logCompactionMinTime=300,
            onStateChanged=self._on_state_changed,
        )
        self._sync = _GatedSyncObj(raft_addr, list(peers), conf, self.kv, self._admit)
        self.status = self._snapshot()  # the term restored from the journal, before the first tick
        self._notifier = PipeNotifier(self._sync._poller)
        self._sync.addOnTickCallback(self._on_tick)

    def __repr__(self) -> str:
        st = self.status
        return f"<RaftKV {self.node_id} term={st.term} {st.role} leader={st.leader} at={st.applied_index}>"

    def raft_transport(self) -> Any:
        """PySyncObj's message transport (its `send` and `_onMessageReceivedCallback`), for the demo's
        partition hook (raftlb.demo.node). PySyncObj keeps it private (name-mangled): tests only."""
        return getattr(self._sync, "_SyncObj__transport")  # noqa: B009

    def wait_bound(self) -> bool:
        """Block until the Raft port is bound; False when binding failed (blocking: call in a thread)."""
        with contextlib.suppress(SyncObjException):
            self._sync.waitBinded()
            return True
        return False

    def close(self) -> None:
        """Stop PySyncObj (flushes the journal) and wake every waiter."""
        self._sync.destroy()
        self._wake()
        self._fire_change()

    async def wait_change(self, timeout: float) -> None:
        """Return when term, role or leader change, or after `timeout` seconds."""
        await asyncio.wait([self._changed], timeout=max(0.0, timeout))

    async def submit(self, cmd: Command, timeout: float) -> WriteResult:
        """Append `cmd` to the log through this node, which must lead with a quorum; wait for it to apply."""
        st = self.status
        if st.role != ROLE_LEADER:
            raise WriteRefused(421, "not_leader", st.leader)
        if not st.has_quorum:
            raise WriteRefused(503, "no_quorum")
        # The leader's wall clock travels in the entry: every replica expires sessions at the same index.
        cmd = replace(cmd, ts_ms=int(time.time() * 1000))
        fut: asyncio.Future[WriteResult] = self._loop.create_future()

        def on_result(result: Any, error: int) -> None:  # on the tick thread
            self._call_in_loop(self._settle, fut, result, error)

        self._pending.append((cmd.to_wire(), on_result))
        self._wake()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise WriteRefused(503, "timeout") from None

    def _settle(self, fut: asyncio.Future[WriteResult], result: Any, error: int) -> None:
        if fut.done():
            return
        if error == FAIL_REASON.SUCCESS:
            fut.set_result(result)
        else:
            status, code = _REFUSALS.get(error, (503, "outcome_unknown"))
            leader = self.status.leader if status == 421 else None  # the snapshot may still name this node
            fut.set_exception(WriteRefused(status, code, None if leader == self.node_id else leader))

    # -- on PySyncObj's tick thread -----------------------------------------------------------------------

    def _admit(self, sync: Any) -> None:
        for _ in range(min(len(self._pending), _GATE_BATCH)):
            wire, callback = self._pending.popleft()
            if not sync._isLeader():
                callback(None, FAIL_REASON.NOT_LEADER)
            elif not self._leader_has_quorum(sync):
                callback(None, _NO_QUORUM)
            else:
                self.kv.apply(wire, callback=callback)

    def _on_state_changed(self, old: int, new: int) -> None:
        self._state = new

    def _on_tick(self) -> None:
        st = self._snapshot()
        previous, self.status = self.status, st
        if st.identity() != previous.identity():
            self._call_in_loop(self._fire_change)

    def _snapshot(self) -> RaftStatus:
        sync = self._sync
        leader = sync._getLeader()
        role = _ROLES.get(self._state, ROLE_FOLLOWER)
        if leader is not None and role != ROLE_LEADER and not sync.isNodeConnected(leader):
            leader = None  # PySyncObj keeps a dead leader on a follower that cannot start an election
        return RaftStatus(
            int(sync.raftCurrentTerm), role, None if leader is None else self._ids.get(leader.id, leader.id),
            int(sync.raftCommitIndex), int(sync.raftLastApplied),
            role == ROLE_LEADER and self._leader_has_quorum(sync))

    def _leader_has_quorum(self, sync: Any) -> bool:
        # PySyncObj's `hasQuorum` counts open TCP connections, which stay open to a frozen peer. A leader
        # heard back from a majority within the election timeout is what has a quorum; PySyncObj keeps
        # the last answer time per follower in a private dict.
        heard = getattr(sync, "_SyncObj__lastResponseTime", None)
        if heard is None:
            return bool(sync.hasQuorum)
        horizon = time.monotonic() - self.settings.election_timeout[1]
        alive = 1 + sum(1 for t in list(heard.values()) if t > horizon)
        return alive * 2 > self._cluster_size

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            self._loop.call_soon_threadsafe(fn, *args)

    # -- on the event loop --------------------------------------------------------------------------------

    def _fire_change(self) -> None:
        fut, self._changed = self._changed, self._loop.create_future()
        if not fut.done():
            fut.set_result(None)

    def _wake(self) -> None:
        """Interrupt PySyncObj's poll so that the next tick admits the pending commands."""
        with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is already pending
            self._notifier.notify()
