"""The `workers: N` supervisor with stand-in workers (real forked processes, no raftlb server in them):
restarts with back-off, a worker failing at its first start stopping all, signals passed on, a reload
asked by one worker sent to the others, a worker that ignores SIGTERM killed after the drain. The same with
raftlb in the workers, on a real cluster: tests/integration/test_workers.py. Config:
tests/config/test_config.py."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = """
import logging, os, signal, sys, time
from raftlb.workers import Supervisor, WorkerInfo
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
OUT = sys.argv[1]

def note(text):
    with open(OUT, "a") as f:
        f.write(text + "\\n")

{body}

sys.exit(Supervisor({count}, worker_main, drain_timeout={drain}, kill_after={kill_after}).run())
"""


class Sup:
    def __init__(self, tmp_path: Path, body: str, count: int = 2, drain: float = 1.0,
                 kill_after: float = 10.0) -> None:
        self.out = tmp_path / "notes.txt"
        self.out.write_text("")
        script = SCRIPT.format(body=textwrap.dedent(body), count=count, drain=drain, kill_after=kill_after)
        self.proc = subprocess.Popen([sys.executable, "-c", script, str(self.out)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def notes(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait_notes(self, pred: object, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not pred(self.notes()):  # type: ignore[operator]
            assert self.proc.poll() is None, f"supervisor exited {self.proc.returncode}: {self.stderr()}"
            assert time.monotonic() < deadline, f"notes: {self.notes()}"
            time.sleep(0.02)
        return self.notes()

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read() if self.proc.poll() is not None else "(running)"

    def finish(self, timeout: float = 20.0) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


SERVE = """
def worker_main(w):
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGHUP, lambda *a: note(f"hup {w.index}"))
    note(f"start {w.index} {os.getpid()} restarted={w.restarted}")
    time.sleep(0.3)  # starting: a SIGHUP meanwhile is kept for when it serves
    note(f"ready {w.index}")
    w.ready(1.0)
    while not stop:
        time.sleep(0.01)
    note(f"drained {w.index}")
    return 0
"""


def test_signals_reach_every_worker_and_sigterm_drains_all_with_exit_0(tmp_path: Path) -> None:
    sup = Sup(tmp_path, SERVE)
    try:
        sup.wait_notes(lambda n: sum(x.startswith("start") for x in n) == 2)
        sup.proc.send_signal(signal.SIGHUP)  # while they start
        notes = sup.wait_notes(lambda n: {"hup 0", "hup 1"} <= set(n))
        for i in (0, 1):  # each got it once it served, not before (where it could have been lost)
            assert notes.index(f"ready {i}") < notes.index(f"hup {i}"), notes
        sup.proc.send_signal(signal.SIGTERM)
        code, err = sup.finish()
        assert code == 0, err
        assert {"drained 0", "drained 1"} <= set(sup.notes())
        assert "stopped" in err.splitlines()[-1]
    finally:
        sup.close()


def test_a_reload_asked_by_one_worker_is_sent_to_the_others_only(tmp_path: Path) -> None:
    body = SERVE.replace("    w.ready(1.0)\n", "    w.ready(1.0)\n    if w.index == 0:\n"
                                                "        time.sleep(0.5)\n        w.reload_others()\n")
    sup = Sup(tmp_path, body, count=3)
    try:
        notes = sup.wait_notes(lambda n: {"hup 1", "hup 2"} <= set(n))
        time.sleep(0.3)
        assert "hup 0" not in sup.notes(), notes
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.finish()[0] == 0
    finally:
        sup.close()


def test_a_worker_that_dies_after_serving_is_started_again_with_back_off(tmp_path: Path) -> None:
    body = """
    def worker_main(w):
        runs = sum(line.startswith(f"start {w.index}") for line in open(OUT))
        note(f"start {w.index} {time.monotonic()} restarted={w.restarted}")
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        w.ready(1.0)
        if w.index == 1 and runs < 3:
            time.sleep(0.05)
            return 3  # dies soon after each of its first three starts
        note(f"serving {w.index}")
        while True:
            time.sleep(0.01)
    """
    sup = Sup(tmp_path, body)
    try:
        notes = sup.wait_notes(lambda n: "serving 1" in n, timeout=15)
        starts = [float(x.split()[2]) for x in notes if x.startswith("start 1")]
        assert len(starts) == 4
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        # 0.5 s, then doubling while it keeps dying soon after its start (plus its own 50 ms and start-up).
        # (Lower bounds only, and growth: a loaded machine can only make the gaps longer.)
        for gap, wait in zip(gaps, (0.5, 1.0, 2.0), strict=True):
            assert wait <= gap, gaps
        assert gaps == sorted(gaps), gaps
        assert [x.split()[-1] for x in notes if x.startswith("start 1")] == [
            "restarted=False", "restarted=True", "restarted=True", "restarted=True"]
        assert sum(x.startswith("start 0") for x in notes) == 1  # the healthy one is left alone
        sup.proc.send_signal(signal.SIGTERM)
        code, err = sup.finish()
        assert code == 0, err  # (the stop was clean: the crashes were logged when they happened)
        assert re.search(r"worker 1 \(pid \d+\) exited with code 3 after [\d.]+s; starting it again in 0.5s",
                         err), err
        assert "starting it again in 1s" in err and "starting it again in 2s" in err, err
    finally:
        sup.close()


def test_a_worker_that_fails_at_its_first_start_stops_all_with_exit_1(tmp_path: Path) -> None:
    body = """
    def worker_main(w):
        if w.index == 1:
            while "ready 0" not in open(OUT).read():  # (fails once the other one serves)
                time.sleep(0.01)
            raise OSError(98, "Address already in use")
        signal.signal(signal.SIGTERM, lambda *a: (note("term 0"), sys.exit(0)))
        w.ready(1.0)
        note("ready 0")
        while True:
            time.sleep(0.01)
    """
    sup = Sup(tmp_path, body)
    try:
        code, err = sup.finish()
        assert code == 1, err
        assert "worker 1 failed" in err and "Address already in use" in err  # (its traceback, logged)
        assert "worker 1 exited with code 1 before it was serving: stopping" in err
        assert sup.notes() == ["ready 0", "term 0"]  # the other one was told to stop, not started again
    finally:
        sup.close()


@pytest.mark.timeout(30)
def test_a_worker_still_running_after_its_reported_drain_timeout_is_killed(tmp_path: Path) -> None:
    body = """
    def worker_main(w):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stuck drain
        w.ready(1.5)  # (as a reload that raised drain_timeout would report it)
        note(f"start {w.index} {os.getpid()}")
        while True:
            time.sleep(0.01)
    """
    sup = Sup(tmp_path, body, count=1, drain=0.2, kill_after=0.3)
    try:
        notes = sup.wait_notes(lambda n: len(n) == 1)
        time.sleep(0.2)  # (its report reaches the supervisor)
        t0 = time.monotonic()
        sup.proc.send_signal(signal.SIGTERM)
        code, err = sup.finish()
        took = time.monotonic() - t0
        assert 1.5 + 0.3 <= took < 10, took  # its drain timeout, not the one read at start (0.2 s)
        assert code == 1, err
        pid = notes[0].split()[2]
        assert "stopping: 1 workers drain (up to 1.5s)" in err, err
        assert f"worker 0 (pid {pid}) still running after the drain: killed" in err
        assert "worker 0 exited with code -9" in err
    finally:
        sup.close()


def test_worker_log_lines_name_the_worker(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from raftlb.config.model import LoggingConfig
    from raftlb.ops import logs

    root, access = logging.getLogger("raftlb"), logging.getLogger("raftlb.access")
    saved = (root.handlers[:], root.level, root.propagate, access.disabled)
    monkeypatch.setattr(logs, "_worker", None)
    try:
        logs.setup_logging(LoggingConfig(format="json"), worker=3)
        logging.getLogger("raftlb.server").warning("hello")
        logs.setup_logging(LoggingConfig(format="text"))  # (a reload: the worker stays named)
        logging.getLogger("raftlb.server").warning("again")
    finally:
        root.handlers[:], root.level, root.propagate, access.disabled = saved
    first, second = capsys.readouterr().err.splitlines()
    doc = json.loads(first)
    assert (doc["worker"], doc["logger"], doc["msg"]) == (3, "raftlb.server", "hello")
    assert second.endswith("WARNING raftlb.server[w3]: again"), second


def test_the_preflight_finds_a_port_held_with_so_reuseport_and_leaves_other_addresses_alone() -> None:
    import socket

    from raftlb.workers import taken_address

    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another raftlb's workers hold it
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        assert taken_address("127.0.0.1", port) == "Address already in use"
        assert taken_address("127.0.0.2", port) is None  # (another address, same port: free)
        probe = socket.socket(socket.AF_INET6)
        try:
            probe.bind(("::1", 0))
            ipv6 = True
        except OSError:
            ipv6 = False
        finally:
            probe.close()
        if ipv6:  # the server binds "::" IPv6-only (uvloop), so 127.0.0.1:port does not stand in its way
            assert taken_address("::", port) is None
    finally:
        held.close()
    assert taken_address("127.0.0.1", port) is None
