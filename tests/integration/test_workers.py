"""`workers: N` on a real demo cluster: `raftlb run` as a process with two workers sharing the listener port
(SO_REUSEPORT). Connections spread over both; a fenced read through one worker sees a write made through the
other; a worker killed with SIGKILL is started again while the other serves; SIGHUP and `POST /v1/reload`
reach both; SIGTERM drains both and exits 0; a port taken by another program stops it at once, exit 1; a
supervisor killed outright takes its workers with it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from raftlb.demo.cluster import DemoCluster
from tests.support.harness import running_demo_cluster
from tests.support.tools import free_port

pytestmark = pytest.mark.integration


def config_text(cluster: DemoCluster, port: int, admin_port: int, *, workers: int = 2,
                extra: str = "") -> str:
    nodes = "".join(f"      - {{id: {s.id}, url: '{s.url}'}}\n" for s in cluster.nodes.values())
    return (f"listeners: [{{name: main, address: '127.0.0.1:{port}'}}]\n"
            f"admin: {{address: '127.0.0.1:{admin_port}'}}\n"
            f"workers: {workers}\n"
            "drain_timeout: 3s\n"
            "clusters:\n"
            "  - name: demo\n"
            "    liveness_timeout: 1s\n"
            f"{extra}"
            f"    nodes:\n{nodes}")


class Run:
    """`raftlb run -c FILE` (the file written with `text`) with its stderr in a file (read by `log`); killed
    on leaving the `with` if still running."""

    def __init__(self, cfg: Path, text: str) -> None:
        cfg.write_text(text)
        self.log_path = cfg.with_suffix(".log")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "raftlb", "run", "-c", str(cfg)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 20.0, count: int = 1) -> list[re.Match[str]]:
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log()))
            if len(found) >= count:
                return found
            assert self.proc.poll() is None or len(found) >= count, f"raftlb exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {pattern!r} ({count}x) in:\n{self.log()}"
            time.sleep(0.05)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def held_port(port: int) -> Iterator[None]:
    """127.0.0.1:`port` listened on by another program, without SO_REUSEPORT: nobody else may bind it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        yield


def wait_until(what: Callable[[], Any], timeout: float = 15.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if result := what():
                return result
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, message or f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # (a zombie, not yet reaped by its parent, is gone for this purpose)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def status(admin_port: int) -> dict[str, Any]:
    r = httpx.get(f"http://127.0.0.1:{admin_port}/v1/clusters", timeout=5)
    r.raise_for_status()
    doc: dict[str, Any] = r.json()
    return doc


def requests_served(admin_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("raftlb_requests_total{"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[DemoCluster]:
    """One demo cluster for the module's tests (raftlb processes come and go in front of it)."""
    with running_demo_cluster() as c:
        yield c


@pytest.fixture
def ports() -> tuple[int, int]:
    while True:  # an admin port whose neighbour is free too (worker 1 takes admin + 1)
        port, admin = free_port(), free_port()
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", admin + 1))
            if port not in (admin, admin + 1):
                return port, admin
        except OSError:
            pass
        finally:
            probe.close()


def one_request(method: str, url: str, **kw: Any) -> httpx.Response:
    """On a connection of its own (the kernel picks the worker per connection)."""
    with httpx.Client(timeout=10) as c:
        return c.request(method, url, **kw)


@pytest.mark.timeout(150)
def test_two_workers_share_the_port_restart_reload_and_drain(cluster: DemoCluster, ports: tuple[int, int],
                                                              tmp_path: Path) -> None:
    port, admin = ports
    cfg = tmp_path / "raftlb.yaml"
    with Run(cfg, config_text(cluster, port, admin)) as run:
        run.wait_log(r"worker \d \(pid \d+\) serving", count=2)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: all(status(admin + i)["clusters"]["demo"]["leader"] for i in (0, 1)),
                   message="the workers never saw a leader")
        pids = [status(admin + i)["pid"] for i in (0, 1)]
        assert [status(admin + i)["worker"] for i in (0, 1)] == [{"index": 0, "count": 2},
                                                                 {"index": 1, "count": 2}]
        assert len(set(pids)) == 2 and run.proc.pid not in pids

        # Writes and fenced reads on fresh connections: both workers serve, and a read carrying the index of
        # a write (made through whichever worker) never sees older state.
        for k in range(60):
            w = one_request("PUT", f"{base}/kv/w{k}", content=f"v{k}".encode())
            assert w.status_code == 200, w.text
            r = one_request("GET", f"{base}/kv/w{k}", headers={"X-Raft-Min-Index": w.headers["x-raft-index"]})
            assert (r.status_code, r.text) == (200, f"v{k}")
        served = [requests_served(admin + i) for i in (0, 1)]
        assert sum(served) == 120 and min(served) > 0, f"requests per worker: {served}"

        # A worker killed outright: the other one serves every request meanwhile; it comes back.
        os.kill(pids[1], signal.SIGKILL)
        run.wait_log(r"worker 1 \(pid \d+\) exited with code -9 after [\d.]+s; starting it again")
        for k in range(20):
            assert one_request("GET", f"{base}/kv/w{k}").status_code == 200
        run.wait_log(r"worker 1 \(pid \d+\) serving", count=2)
        new_pid = wait_until(lambda: status(admin + 1)["pid"])
        assert new_pid != pids[1] and status(admin)["pid"] == pids[0]

        # SIGHUP to raftlb: both workers re-read the file. POST /v1/reload on one: the other follows.
        cfg.write_text(config_text(cluster, port, admin, extra="    response_timeout: 7s\n"))
        run.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: all(status(admin + i)["reloads"] == 1 for i in (0, 1)),
                   message=f"SIGHUP did not reach both workers:\n{run.log()}")
        # (the number of workers is set at start: a reload says so and keeps it)
        cfg.write_text(config_text(cluster, port, admin, workers=3, extra="    response_timeout: 8s\n"))
        r = httpx.post(f"http://127.0.0.1:{admin}/v1/reload", timeout=10)
        assert r.status_code == 200, r.text
        assert "workers: 3 needs a restart; kept 2" in r.json()["changes"], r.text
        wait_until(lambda: status(admin + 1)["reloads"] == 2,
                   message=f"a reload through worker 0's admin did not reach worker 1:\n{run.log()}")
        assert status(admin)["reloads"] == 2  # (once each: no echo back to the one that asked)
        assert status(admin + 1)["worker"]["count"] == 2
        with pytest.raises(httpx.ConnectError):
            status(admin + 2)
        # A file that would give each worker a port of its own (port 0, valid for one worker) is refused.
        cfg.write_text(config_text(cluster, 0, admin, workers=1))
        r = httpx.post(f"http://127.0.0.1:{admin + 1}/v1/reload", timeout=10)
        assert r.status_code == 422 and r.json()["error"] == "invalid_config", r.text
        assert "listener main has port 0 (any free port), which 2 workers cannot share" in r.json()["detail"]
        # A worker started again with that file in place starts with the config read at start instead.
        os.kill(status(admin + 1)["pid"], signal.SIGKILL)
        run.wait_log(r"raftlb\[w1\]: config file not usable, starting with the one read at start: "
                     r"listener main has port 0")
        run.wait_log(r"worker 1 \(pid \d+\) serving", count=3)
        listeners = wait_until(lambda: status(admin + 1)["listeners"])
        assert [entry["address"] for entry in listeners] == [f"127.0.0.1:{port}"]
        # ... and with a file that moves the admin listener, on its running admin port, as a reload would.
        cfg.write_text(config_text(cluster, port, admin + 7))
        os.kill(status(admin + 1)["pid"], signal.SIGKILL)
        run.wait_log(r"worker 1 \(pid \d+\) serving", count=4)
        run.wait_log(r"raftlb\.server\[w1\]: admin on 127\.0\.0\.1:" + str(admin + 1), count=4)
        assert wait_until(lambda: status(admin + 1)["worker"]) == {"index": 1, "count": 2}
        # A second raftlb on the same port (its admin off, so nothing else collides) does not join the first
        # one's workers through SO_REUSEPORT: it stops, exit 1.
        other = config_text(cluster, port, admin).replace(f"admin: {{address: '127.0.0.1:{admin}'}}",
                                                          "admin: {enabled: false}")
        with Run(tmp_path / "other.yaml", other) as second:
            assert second.proc.wait(30) == 1, second.log()
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in second.log()
            assert "started" not in second.log()
        assert one_request("GET", f"{base}/kv/w1").status_code == 200
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(20) == 0, run.log()
        assert not any(alive(pid) for pid in (pids[0], new_pid))
        assert run.log().rstrip().endswith("raftlb.workers: stopped")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_taken_by_another_program_stops_raftlb_with_exit_1_and_says_why(
        cluster: DemoCluster, ports: tuple[int, int], tmp_path: Path, workers: int) -> None:
    port, admin = ports
    cfg = tmp_path / "raftlb.yaml"
    with held_port(port), Run(cfg, config_text(cluster, port, admin, workers=workers)) as run:
        assert run.proc.wait(30) == 1
        log = run.log()
        assert f"cannot start: {cfg}: listeners[0].address: cannot listen on 127.0.0.1:{port}: " \
               "Address already in use" in log, log
        assert "Traceback" not in log, log
        assert "started" not in log, log  # (with workers: checked before any is started)


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_start_stops_the_others_with_exit_1(cluster: DemoCluster, ports: tuple[int, int],
                                                                tmp_path: Path) -> None:
    port, admin = ports
    cfg = tmp_path / "raftlb.yaml"
    with held_port(admin + 1), Run(cfg, config_text(cluster, port, admin)) as run:  # (worker 1's admin port)
        assert run.proc.wait(30) == 1, run.log()
        log = run.log()
        assert f"raftlb.server[w1]: cannot start: {cfg}: admin.address: cannot listen on " \
               f"127.0.0.1:{admin + 1}: Address already in use" in log, log
        assert "worker 1 exited with code 1 before it was serving: stopping" in log, log
        pids = [int(p) for p in re.findall(r"started 2 workers: (\d+) (\d+)", log)[0]]
        assert not any(alive(pid) for pid in pids)
        assert log.rstrip().endswith("stopped: a worker could not start")
        assert "Traceback" not in log, log


@pytest.mark.timeout(60)
def test_workers_stop_when_the_supervisor_is_killed(cluster: DemoCluster, ports: tuple[int, int],
                                                   tmp_path: Path) -> None:
    port, admin = ports
    cfg = tmp_path / "raftlb.yaml"
    with Run(cfg, config_text(cluster, port, admin)) as run:
        run.wait_log(r"worker \d \(pid \d+\) serving", count=2)
        pids = [status(admin + i)["pid"] for i in (0, 1)]
        run.proc.kill()
        run.proc.wait(10)
        wait_until(lambda: not any(alive(pid) for pid in pids), timeout=20,
                   message=f"workers outlived their supervisor:\n{run.log()}")
        with pytest.raises(httpx.ConnectError):
            one_request("GET", f"http://127.0.0.1:{port}/kv/x")


@pytest.mark.timeout(60)
def test_sigterm_while_the_workers_start_stops_them_cleanly(cluster: DemoCluster, ports: tuple[int, int],
                                                          tmp_path: Path) -> None:
    port, admin = ports
    cfg = tmp_path / "raftlb.yaml"
    with Run(cfg, config_text(cluster, port, admin)) as run:
        run.wait_log(r"started 2 workers")
        run.proc.send_signal(signal.SIGTERM)  # (before they bound their listeners, most of the time)
        assert run.proc.wait(30) == 0, run.log()
        assert run.log().rstrip().endswith("raftlb.workers: stopped"), run.log()
        assert "exited with code" not in run.log()
        # each worker started, then drained (the stop it was told while starting was kept for then)
        for i in (0, 1):
            assert f"raftlb.server[w{i}]: stopping: draining in-flight requests" in run.log(), run.log()
