"""Processes for the benchmark: start them pinned to a core, wait until they serve, read their /proc
counters, and stop every one of them however the run ends."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
DEBIAN_TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "taskset": "util-linux"}


def ensure_tools(*tools: str) -> None:
    """Install what is missing from Debian (once: `apt-get update`, then one `apt-get install`); by default
    every tool `make bench` uses."""
    wanted = tools or tuple(DEBIAN_TOOLS)
    missing = sorted({DEBIAN_TOOLS[t] for t in wanted if shutil.which(t) is None
                      and not Path("/usr/sbin", t).exists()})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench: missing {', '.join(missing)}; as root: apt-get install -y {' '.join(missing)}")
    print(f"bench: installing {', '.join(missing)} from Debian", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path("/usr/sbin", name))
    if not Path(path).exists():
        sys.exit(f"bench: {name} not found")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: Proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: nothing listens on port {port} after {timeout:g}s")


def http_get(port: int, path: str = "/") -> tuple[int, bytes]:
    """One GET on a fresh connection (readiness checks). Status 0 when the connection fails."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return 0, b""


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def machine_busy_ticks() -> int:
    """CPU ticks spent busy on all cores so far (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]


def net_counters() -> dict[str, int]:
    """Machine-wide kernel counters that explain latency spikes on loopback: TCP retransmissions, packets
    dropped because a CPU's input backlog was full (net.core.netdev_max_backlog), listen queue overflows."""
    out = {"tcp_retrans": 0, "backlog_drops": 0, "listen_overflows": 0}
    rows = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Tcp:")]
    if len(rows) == 2:
        out["tcp_retrans"] = int(dict(zip(rows[0], rows[1], strict=True))["RetransSegs"])
    netstat = Path("/proc/net/netstat").read_text().splitlines()
    rows = [ln.split() for ln in netstat if ln.startswith("TcpExt:")]
    if len(rows) == 2:
        out["listen_overflows"] = int(dict(zip(rows[0], rows[1], strict=True)).get("ListenOverflows", 0))
    for line in Path("/proc/net/softnet_stat").read_text().splitlines():
        out["backlog_drops"] += int(line.split()[1], 16)
    return out


def wait_quiet(max_cores: float, timeout: float, window: float = 0.5) -> float:
    """Wait until the machine as a whole uses less than `max_cores` of CPU over `window` seconds (other
    people's test runs on a shared machine would skew every number). The last load seen, in cores."""
    deadline = time.monotonic() + timeout
    while True:
        before = machine_busy_ticks()
        time.sleep(window)
        load = (machine_busy_ticks() - before) / CLK_TCK / window
        if load < max_cores or time.monotonic() > deadline:
            return load


@dataclass
class CpuSample:
    ticks: int  # utime + stime, all threads

    @property
    def seconds(self) -> float:
        return self.ticks / CLK_TCK


class Proc:
    """A started process we own: its /proc counters, and a stop that cannot be skipped."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.popen.returncode}>"

    def tree(self) -> list[int]:
        """This process and its descendants (raftlb's workers under `workers: N`), whose counters add up."""
        pids, i = [self.pid], 0
        while i < len(pids):
            try:
                for task in Path(f"/proc/{pids[i]}/task").iterdir():
                    pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
            i += 1
        return pids

    def cpu(self) -> CpuSample:
        # Fields after the parenthesised command name: utime and stime are the 12th and 13th.
        ticks = 0
        for pid in self.tree():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            ticks += int(fields[11]) + int(fields[12])
        return CpuSample(ticks)

    def status_kib(self, key: str) -> int:
        """A /proc/PID/status figure in KiB, summed over the process tree (shared pages count in each)."""
        total = 0
        for pid in self.tree():
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            total += next((int(ln.split()[1]) for ln in lines if ln.startswith(key + ":")), 0)
        return total

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0, root or owner), so the next reading is this
        phase's peak. False when the kernel refuses: the peak is then the process's lifetime peak."""
        try:
            for pid in self.tree():
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak_rss_mib(self) -> float:
        return self.status_kib("VmHWM") / 1024

    def rss_mib(self) -> float:
        return self.status_kib("VmRSS") / 1024

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class Procs:
    """Everything a benchmark starts, stopped in reverse order on exit (also on Ctrl-C and errors)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], core: int | str | None = None,
              env: dict[str, str] | None = None) -> Proc:
        """`core`: the CPU (or taskset list, "0,1") to pin the process and its children to."""
        if core is not None:
            argv = [tool("taskset"), "-c", str(core), *argv]
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            # SIGKILLed by the kernel if this script dies without stopping it (kill -9, a crash).
            argv = [setpriv, "--pdeathsig", "KILL", *argv]
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            # A session of its own: Ctrl-C reaches only the bench script, which then stops it in order.
            # The temporary directory as cwd: `python -m` puts the cwd first on sys.path, and the tree
            # to run is chosen by PYTHONPATH.
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=self.workdir, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def raise_exit(signum: int, frame: object) -> None:
    """A SIGTERM handler: unwind like Ctrl-C does, so every started process is stopped."""
    raise SystemExit(128 + signum)


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
