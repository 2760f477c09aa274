"""The commands in README.md and docs/ run as written against `raftlb demo --keep`.

Convention: a ```sh block whose first line starts with `# against raftlb demo --keep` is run, command by
command, in one bash (so a variable set by one command is there for the next), in the repository's
directory; transcripts (```console) run their `$ ` lines the same way. Every other shell command in README.md
and docs/ must be in NOT_RUN with the reason it is not run, so a new command cannot escape the check, and an
exclusion that no longer matches a command fails too.

What is checked: exit status 0 (with `pipefail`); for `curl`, the HTTP status of the answer, 2xx unless the
line's comment starts with the status it expects (`# 400 bad_consistency`). A `curl` whose status cannot be
seen (no `-i`, or piped away) must use `-f`. Streaming commands (STREAMING) run for a few seconds: they must
print something and not fail.

The demo runs on free ports (another demo may hold 8080/9090 on a shared machine): the commands' `:8080`
and `:9090` are mapped to them, and `raftlb status` without `--admin` gets the demo's admin URL. The leader's
pid, which the demo prints in its `kill -9 PID` line, is in `$LEADER_PID`, as the README's tour says.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.output import Output
from tests.support.tools import demo_node_ports, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MARKER = "# against raftlb demo --keep"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands not run, by prefix (the command as written, continuation lines joined with spaces): why not.
NOT_RUN: dict[str, str] = {
    "make demo": "creates .venv and runs the whole demo (the test starts the demo itself)",
    "make test": "the whole test suite",
    "make bench": "benchmarks: minutes, install Debian packages as root",
    ".venv/bin/python bench/": "benchmarks: minutes, install Debian packages as root",
    ".venv/bin/pytest": "test runs (docs/faults.md)",
    "raftlb demo --keep": "the test starts it (on free ports)",
    "pip install": "installs into the environment",
    "raftlb run -c configs/demo.yaml": "serves on the demo's ports, which the running demo holds",
    "raftlb run -c configs/etcd.yaml": "needs a 3-member etcd cluster",
    "curl -si localhost:8379/": "needs the etcd cluster behind configs/etcd.yaml",
    "raftlb announce ": "a sidecar for an etcd member: needs etcd",
    "etcdctl ": "needs the etcd cluster behind configs/etcd.yaml (tests/integration/test_etcd_grpc_proxy.py "
                "runs etcdctl through raftlb against a real etcd)",
    "raftlb bench --url http://127.0.0.1:8080 --consistency fenced --duration 30":
        "30 s of load; the README's tour runs the same check for 5 s",
    "raftlb bench --url http://127.0.0.1:8080 --consistency any --no-token":
        "a control run expected to find violations, which depends on timing",
    "raftlb bench --url http://127.0.0.1:8080   ": "10 s of load; the README's tour runs it for 5 s",
    "raftlb bench --url http://127.0.0.1:8080 --http2": "10 s of HTTP/2 load; tests/integration/"
                                                         "test_bench_cli.py runs --http2 --streams 4",
    "docker ": "builds or runs a container image",
    "kubectl ": "needs a Kubernetes cluster",
}
# Commands that run until stopped: run for STREAM_SECONDS, then stopped.
STREAMING = ("curl -N ", "raftlb status --watch")
STREAM_SECONDS = 3.0
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class Command:
    """One shell command of a doc: where it is, as written, and whether its block is marked to run."""

    file: str
    line: int
    text: str
    runnable: bool

    @property
    def expect_status(self) -> int | None:
        """The HTTP status a line's comment says the command gets (`# 400 ...`), if any."""
        m = re.search(r"\s#\s*(\d{3})\b", self.text)
        return int(m[1]) if m else None


def extract(path: Path) -> list[Command]:
    """Every command of the file's sh/bash/console blocks."""
    commands: list[Command] = []
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        fence = re.match(r"```(sh|bash|shell|console)\s*$", lines[i])
        i += 1
        if not fence:
            continue
        body: list[tuple[int, str]] = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        # A transcript that starts the demo is run against it too.
        runnable = bool(body) and (body[0][1].startswith(MARKER) or
                                   fence[1] == "console" and body[0][1].startswith("$ raftlb demo --keep"))
        pending: tuple[int, str] | None = None
        for number, raw in body:
            if fence[1] == "console":
                if not raw.startswith("$ "):
                    continue
                raw = raw[2:]
            if pending is not None:
                number, raw = pending[0], pending[1] + " " + raw.strip()
                pending = None
            if raw.rstrip().endswith("\\"):
                pending = (number, raw.rstrip()[:-1].rstrip())
                continue
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            commands.append(Command(str(path.relative_to(ROOT)), number, raw.strip(), runnable))
    return commands


def all_commands() -> list[Command]:
    return [c for path in DOC_FILES for c in extract(path)]


def excluded(command: Command) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.text.startswith(prefix)), None)


def test_every_shell_command_of_the_docs_is_run_or_excluded_with_a_reason() -> None:
    commands = all_commands()
    loose = [f"{c.file}:{c.line}: {c.text}" for c in commands if not c.runnable and excluded(c) is None]
    assert not loose, "commands neither in a block marked to run nor in NOT_RUN:\n" + "\n".join(loose)
    stale = [p for p in NOT_RUN if not any(c.text.startswith(p) for c in commands)]
    assert not stale, f"NOT_RUN entries matching no command: {stale}"
    run = [c for c in commands if c.runnable and excluded(c) is None]
    tour = [c for c in run if c.file == "README.md"]
    assert len(tour) >= 8 and any(c.text.startswith("kill -9") for c in tour), tour
    for c in run:
        if c.text.startswith("curl") and not c.text.startswith(STREAMING):
            flags = " ".join(w for w in c.text.split("|")[0].split() if w.startswith("-") and not
                             w.startswith("--"))
            shows_status = "i" in flags and "|" not in c.text or "grep -i -e ^http" in c.text
            assert shows_status or "f" in flags, f"{c.file}:{c.line}: its status cannot be checked: {c.text}"


def stop(proc: subprocess.Popen[str], out: Output | None, grace: float = 30) -> None:
    """SIGTERM the process group this test started (its leader's pid), then SIGKILL; bounded waits."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    for pipe in (proc.stdin,):
        if pipe is not None:
            pipe.close()
    if out is not None:
        out.thread.join(10)
    if proc.stdout is not None:
        proc.stdout.close()


def localize(text: str, ports: dict[str, int], admin_url: str) -> str:
    """The command on the demo's free ports."""
    text = re.sub(r":(8080|9090)\b", lambda m: f":{ports[m[1]]}", text)
    if re.match(r"raftlb status\b", text) and "--admin" not in text:
        text = text.replace("raftlb status", f"raftlb status --admin {admin_url}", 1)
    return text


def check_status(command: Command, output: list[str]) -> str | None:
    """What is wrong with a curl command's answer, if anything."""
    if not command.text.startswith("curl"):
        return None
    statuses = [int(m[1]) for line in output if (m := re.match(r"HTTP/[\d.]+ (\d{3})", line))]
    statuses = [s for s in statuses if s >= 200]
    if not statuses:
        return None  # -f: the exit status says it
    want = command.expect_status
    got = statuses[0]
    if want is not None:
        return None if got == want else f"status {got}, the doc says {want}"
    return None if 200 <= got < 300 else f"status {got}, expected 2xx"


@pytest.mark.timeout(600)
def test_readme_and_docs_commands_run_against_raftlb_demo_keep(tmp_path: Path) -> None:
    commands = [c for c in all_commands() if c.runnable and excluded(c) is None]
    # The demo's config as shipped, on free ports.
    doc = yaml.safe_load((ROOT / "raftlb" / "demo" / "demo.yaml").read_text())
    ports = {"8080": free_port(), "9090": free_port()}
    doc["listeners"][0]["address"] = f"127.0.0.1:{ports['8080']}"
    doc["admin"]["address"] = f"127.0.0.1:{ports['9090']}"
    admin_url = f"http://127.0.0.1:{ports['9090']}"
    for node, port in zip(doc["clusters"][0]["nodes"], demo_node_ports(), strict=True):
        node["url"] = f"http://127.0.0.1:{port}"
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(doc))

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    demo = subprocess.Popen([sys.executable, "-m", "raftlb", "demo", "--keep", "--duration", "3", "--config",
                             str(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env, cwd=ROOT)
    assert demo.stdout is not None
    demo_out = Output(demo.stdout)
    shell: subprocess.Popen[str] | None = None
    shell_out: Output | None = None
    failures: list[str] = []
    try:
        demo_out.until(r"PASS: every acknowledged write survived", 180)
        leader_pid = demo_out.until(r"kill -9 (\d+) ", 30)[0][1]
        demo_out.until(r"Type `restart ID`", 10)
        env["LEADER_PID"] = leader_pid
        shell = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True, env=env, cwd=ROOT)
        assert shell.stdout is not None
        shell_out = Output(shell.stdout)
        assert shell.stdin is not None
        shell.stdin.write("set -o pipefail\n")
        readme_done = False
        for n, command in enumerate(commands):
            if command.file != "README.md" and not readme_done:
                readme_done = True
                # The README's tour killed the leader; start it again as the README says.
                assert demo.stdin is not None
                demo.stdin.write("restart\n")
                demo.stdin.flush()
                demo_out.until(r"restarted \(pid \d+", 60)
            text = localize(command.text, ports, admin_url)
            where = f"{command.file}:{command.line}: {command.text}"
            if command.text.startswith(STREAMING):
                failures += run_streaming(text, where, env)
                continue
            # The marker on a line of its own even after an answer without a final newline.
            shell.stdin.write(f"{{ {text}\n}} </dev/null\nprintf '\\n__rc_{n}=%d\\n' $?\n")
            shell.stdin.flush()
            m, output = shell_out.until(rf"^__rc_{n}=(\d+)$", COMMAND_TIMEOUT)
            if m[1] != "0":
                failures.append(f"{where}\n  exit {m[1]}:\n    " + "\n    ".join(output[-20:]))
            elif (problem := check_status(command, output)) is not None:
                failures.append(f"{where}\n  {problem}:\n    " + "\n    ".join(output[:12]))
        assert readme_done, "no docs command ran"
    finally:
        if shell is not None:
            stop(shell, shell_out, grace=5)
        stop(demo, demo_out)
    assert not failures, "commands that fail as written:\n" + "\n".join(failures)
    assert demo.returncode == 0, "\n".join(demo_out.seen[-40:])


def run_streaming(text: str, where: str, env: dict[str, str]) -> list[str]:
    """Run a command that streams until stopped for a few seconds: it prints and does not fail."""
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", text], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    out = Output(proc.stdout)
    try:
        proc.wait(STREAM_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    code = proc.poll()
    stop(proc, out, grace=5)
    printed: list[str] = []
    while True:  # the reader thread has finished: everything it read is queued
        try:
            line = out.lines.get_nowait()
        except queue.Empty:
            break
        if line is not None and line.strip():
            printed.append(line)
    if code not in (None, 0):
        return [f"{where}\n  exited {code} before it was stopped:\n    " + "\n    ".join(printed[-20:])]
    if not printed:
        return [f"{where}\n  printed nothing in {STREAM_SECONDS} s"]
    return []
