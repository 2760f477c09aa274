"""Start, break and stop a demo cluster: one `raftlb.demo.node` subprocess per node, on loopback ports.

Used by the tests, `raftlb demo` and the benchmarks:

    with DemoCluster(3) as cluster:          # free ports, a temporary data dir, waits for a leader
        leader = cluster.leader()            # "n2"
        cluster.kill(leader)                 # SIGKILL
        cluster.wait_for_leader(min_term=t)  # a survivor takes over
        cluster.restart(leader)              # same ports, same data dir: it replays its journal

Tests can also cut a node off from its Raft peers while raftlb still reaches it (`partition` / `heal`; the
nodes must be started with `node_args=["--debug-partition-control"]`, a test-only switch).

Children never outlive the parent: `stop()` runs at exit, each child polls its parent pid, and on Linux (when
started from the main thread) the kernel SIGKILLs it when the parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the raftlb package


@dataclass(frozen=True)
class NodeSpec:
    """Where one node listens."""

    id: str
    host: str
    http_port: int
    raft_port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def raft_addr(self) -> str:
        return f"{self.host}:{self.raft_port}"

    def peer_arg(self) -> str:
        return f"{self.id}={self.host}:{self.http_port}/{self.raft_addr}"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that were free a moment ago (all held open together, so no duplicates)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class DemoCluster:
    """N demo nodes as child processes. Synchronous API; every wait is bounded and raises TimeoutError."""

    def __init__(self, size: int = 3, *, data_dir: str | Path | None = None, host: str = "127.0.0.1",
                 http_ports: Sequence[int] | None = None, raft_ports: Sequence[int] | None = None,
                 node_args: Sequence[str] = (), log_level: str = "info") -> None:
        ports = free_ports(2 * size, host) if http_ports is None or raft_ports is None else []
        http_ports = list(http_ports) if http_ports is not None else ports[:size]
        raft_ports = list(raft_ports) if raft_ports is not None else ports[size:]
        if len(http_ports) != size or len(raft_ports) != size:
            raise ValueError(f"need {size} http and {size} raft ports")
        specs = [NodeSpec(f"n{i + 1}", host, http_ports[i], raft_ports[i]) for i in range(size)]
        self.nodes = {spec.id: spec for spec in specs}
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="raftlb-demo-")) if data_dir is None else Path(data_dir)
        self.node_args = list(node_args)
        self.log_level = log_level
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._paused: set[str] = set()
        self._http = httpx.Client(timeout=httpx.Timeout(1.0, connect=0.5))
        self._closed = False
        atexit.register(self.stop)

    def __repr__(self) -> str:
        running = sorted(n for n in self.nodes if self.is_running(n))
        return f"<DemoCluster {len(self.nodes)} nodes, running={running} data={self.data_dir}>"

    def __enter__(self) -> DemoCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> DemoCluster:
        """Start every node and wait until a leader with a quorum is elected."""
        try:
            for node_id in self.nodes:
                self._spawn(node_id)
            self.wait_for_leader(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every child (SIGTERM, then SIGKILL after 3 s) and remove a temporary data dir. Idempotent."""
        for node_id, proc in list(self._procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                if node_id in self._paused:
                    proc.send_signal(signal.SIGCONT)
        for proc in self._procs.values():
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3.0)
        self._paused.clear()
        if not self._closed:
            self._closed = True
            self._http.close()
            atexit.unregister(self.stop)
            if self._own_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a node; for SIGKILL/SIGTERM/SIGINT, also wait until it has exited."""
        proc = self._procs[node_id]
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            if node_id in self._paused:
                proc.send_signal(signal.SIGCONT)
            self._paused.discard(node_id)
            proc.wait(5.0)

    def restart(self, node_id: str, timeout: float = 10.0) -> None:
        """Start a node again (SIGKILLing it first if it runs) on the same ports and data dir; wait until it
        answers its status endpoint."""
        self.kill(node_id)
        self._spawn(node_id)
        self.wait_for(lambda: self.status(node_id), timeout, f"{node_id} to answer after restart")

    def pause(self, node_id: str) -> None:
        """Freeze a node (SIGSTOP): its sockets stay open but it says nothing, like a long GC pause."""
        self._procs[node_id].send_signal(signal.SIGSTOP)
        self._paused.add(node_id)

    def resume(self, node_id: str) -> None:
        self._procs[node_id].send_signal(signal.SIGCONT)
        self._paused.discard(node_id)

    def partition(self, node_id: str, peers: Sequence[str] | None = None, *,
                  claim_quorum: bool = False) -> None:
        """Test only: make `node_id` drop its Raft messages to and from `peers` (default: every other node).
        Its client and announce port keep answering; with `claim_quorum`, as a leader it keeps announcing
        `has_quorum: true`. Needs `--debug-partition-control` in `node_args`."""
        isolate = [n for n in self.nodes if n != node_id] if peers is None else list(peers)
        self._set_partition(node_id, isolate, claim_quorum)

    def heal(self, node_id: str) -> None:
        """Undo `partition`: the node exchanges Raft messages with every peer again, and tells the truth."""
        self._set_partition(node_id, [], False)

    def _set_partition(self, node_id: str, isolate: list[str], claim_quorum: bool) -> None:
        doc = {"isolate": isolate, "claim_quorum": claim_quorum}
        r = self._http.post(self.url(node_id) + "/debug/partition", json=doc, timeout=2.0)
        if r.status_code != 200:
            raise RuntimeError(f"{node_id}: /debug/partition answered {r.status_code} {r.text[:200]} "
                               "(started without --debug-partition-control?)")

    def is_running(self, node_id: str) -> bool:
        proc = self._procs.get(node_id)
        return proc is not None and proc.poll() is None

    def returncode(self, node_id: str) -> int | None:
        """The exit status of a node's process (negative: killed by that signal); None while it runs."""
        return self._procs[node_id].poll()

    def pid(self, node_id: str) -> int:
        return self._procs[node_id].pid

    def url(self, node_id: str) -> str:
        return self.nodes[node_id].url

    def log_path(self, node_id: str) -> Path:
        return self.data_dir / f"{node_id}.log"

    def _spawn(self, node_id: str) -> None:
        spec = self.nodes[node_id]
        cmd = [sys.executable, "-m", "raftlb.demo.node", "--id", node_id,
               "--http", f"{spec.host}:{spec.http_port}", "--raft", spec.raft_addr,
               "--data-dir", str(self.data_dir / node_id), "--log-level", self.log_level,
               "--parent-pid", str(os.getpid())]
        # The kernel ties PR_SET_PDEATHSIG to the forking *thread*: only ask for it from the main thread.
        if threading.current_thread() is threading.main_thread():
            cmd.append("--pdeathsig")
        for other in self.nodes.values():
            if other.id != node_id:
                cmd += ["--peer", other.peer_arg()]
        cmd += self.node_args
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(node_id), "ab") as log:
            # A new session: a Ctrl-C in the terminal reaches the parent, which then stops the nodes.
            self._procs[node_id] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                    env=env, start_new_session=True)
        self._paused.discard(node_id)

    # -- observation --------------------------------------------------------------------------------------

    def status(self, node_id: str) -> dict[str, Any] | None:
        """The node's `/raft/status`, or None when it does not answer (dead, paused, starting)."""
        if not self.is_running(node_id) or node_id in self._paused:
            return None
        try:
            r = self._http.get(self.url(node_id) + "/raft/status", timeout=0.5)
            doc: dict[str, Any] = r.json()
            return doc
        except (httpx.HTTPError, ValueError):
            return None

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {node_id: self.status(node_id) for node_id in self.nodes}

    def leader(self) -> str | None:
        """The node that leads at the highest term any node reports, with a quorum; None if there is none."""
        live = [s for s in self.statuses().values() if s is not None]
        if not live:
            return None
        term = max(int(s["term"]) for s in live)
        for s in live:
            if s["role"] == "leader" and s["term"] == term and s.get("has_quorum"):
                return str(s["node"])
        return None

    def term(self) -> int:
        """The highest term any live node reports (0 when none answers)."""
        return max((int(s["term"]) for s in self.statuses().values() if s is not None), default=0)

    def wait_for_leader(self, timeout: float = 10.0, *, min_term: int = 0,
                        exclude: Sequence[str] = ()) -> str:
        """Wait for a leader at a term >= `min_term` that is not in `exclude`; return its id."""

        def check() -> str | None:
            leader = self.leader()
            if leader is None or leader in exclude:
                return None
            st = self.status(leader)
            return leader if st is not None and st["term"] >= min_term else None

        return self.wait_for(check, timeout, f"a leader (term >= {min_term}, not in {list(exclude)})")

    def wait_for(self, probe: Callable[[], T | None], timeout: float, what: str = "condition",
                 interval: float = 0.02) -> T:
        """Poll `probe` until it returns something other than None/False; TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result is not None and result is not False:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; {self!r}")
            time.sleep(interval)
