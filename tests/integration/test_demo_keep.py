"""`raftlb demo --keep` on the real demo cluster: it says who leads, raftlb's pid, the status page and the
`raftlb status` command, notices a killed node and starts it again on `restart ID` typed on its stdin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from raftlb.demo.scenario import DEMO_CONFIG
from tests.support.output import Output
from tests.support.tools import demo_node_ports, free_port

pytestmark = pytest.mark.integration

PACKAGE_CONFIG = Path(__file__).resolve().parents[2] / "raftlb" / "demo" / DEMO_CONFIG


@pytest.mark.timeout(240)
def test_keep_shows_where_to_look_and_restarts_a_killed_node(tmp_path: Path) -> None:
    doc = yaml.safe_load(PACKAGE_CONFIG.read_text())
    doc["listeners"][0]["address"] = f"127.0.0.1:{free_port()}"
    admin = f"127.0.0.1:{free_port()}"
    doc["admin"]["address"] = admin
    ports = demo_node_ports()
    for node, port in zip(doc["clusters"][0]["nodes"], ports, strict=True):
        node["url"] = f"http://127.0.0.1:{port}"
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([sys.executable, "-m", "raftlb", "demo", "--keep", "--duration", "3", "--config",
                             str(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    out = Output(proc.stdout)
    try:
        # The report counts reads of acknowledged keys: every one found (each carries its write's index).
        found = int(out.wait(r"^ +found \(200\) +(\d+)$", 150)[1])
        not_found = int(out.wait(r"^ +not found \(404\) +(\d+)$", 5)[1])
        assert found > 0 and not_found == 0, (found, not_found)
        out.wait(r"PASS: every acknowledged write survived", 30)
        leader = out.wait(r"leader now +(n\d) at term \d+; nodes \(pids\): (.*)$", 30)
        pids = dict(pair.split("=") for pair in leader[2].split(", "))
        raftlb_pid = int(out.wait(r"raftlb +pid (\d+), ", 5)[1])
        out.wait(rf"status page +http://{admin}/$", 5)
        out.wait(rf"raftlb status --admin http://{admin} --watch", 5)
        out.wait(r"Type `restart ID`", 5)
        assert set(pids) == {"n1", "n2", "n3"}
        os.kill(raftlb_pid, 0)  # raftlb's pid, alive
        # The README's bench example, with the demo's listener (this test's port), runs and passes.
        listener = doc["listeners"][0]["address"]
        bench = subprocess.run([sys.executable, "-m", "raftlb", "bench", "--url", f"http://{listener}",
                                "--consistency", "fenced", "--duration", "2"],
                               capture_output=True, text=True, timeout=90)
        assert bench.returncode == 0 and "PASS: no violations" in bench.stdout, bench.stdout + bench.stderr

        victim = leader[1]
        os.kill(int(pids[victim]), signal.SIGKILL)
        out.wait(rf"{victim} \(pid {pids[victim]}\) exited with -9: type `restart {victim}`", 30)
        assert proc.stdin is not None
        proc.stdin.write(f"restart {victim}\n")
        proc.stdin.flush()
        new_pid = out.wait(rf"{victim} restarted \(pid (\d+),", 60)[1]
        assert new_pid != pids[victim]
        port = ports[int(victim[1:]) - 1]
        deadline = time.monotonic() + 30
        while True:  # it rejoins: a follower or the leader again, at a term
            status = httpx.get(f"http://127.0.0.1:{port}/raft/status", timeout=2).json()
            if status.get("leader"):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdin is not None:
            proc.stdin.close()
        out.thread.join(10)  # it reads to the end of the output before the pipe is closed
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0, "\n".join(out.seen[-40:])


@pytest.mark.parametrize("pdeathsig", [True, False])
def test_a_node_started_by_hand_with_a_demo_parent_pid_says_how_to_restart_it(tmp_path: Path,
                                                                              pdeathsig: bool) -> None:
    """The command line of a demo node copied from `ps` names the demo as parent: the node stops, and says
    how to restart a node instead (not just `parent ... is gone`)."""
    http_port, raft_port = free_port(), free_port()
    not_my_parent = os.getppid()  # alive, but the parent of this test, not of the node
    cmd = [sys.executable, "-m", "raftlb.demo.node", "--id", "n1", "--http", f"127.0.0.1:{http_port}",
           "--raft", f"127.0.0.1:{raft_port}", "--data-dir", str(tmp_path),
           "--parent-pid", str(not_my_parent)]
    proc = subprocess.run(cmd + (["--pdeathsig"] if pdeathsig else []), capture_output=True, text=True,
                          timeout=60)
    assert "type `restart ID` in the terminal of `raftlb demo --keep`" in proc.stderr, proc.stderr
