"""A plain (non-editable) install into a fresh venv, run from a directory outside the repository: the wheel
carries what `raftlb demo` needs, the runtime install says how to get the demo extra, and with it the demo
passes. Needs PyPI for the build backend and the dependencies (skipped, with the reason, when unreachable)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.tools import demo_node_ports, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    # Nothing from this checkout or the test venv may leak in: no PYTHONPATH, no VIRTUAL_ENV.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def pip(venv: Path, *args: str, cwd: Path) -> None:
    out = run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args], cwd, 600)
    if out.returncode != 0:
        if "NewConnectionError" in out.stderr or "No matching distribution" in out.stderr:
            pytest.skip(f"PyPI unreachable: {out.stderr[-300:]}")
        raise AssertionError(f"pip {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


@pytest.mark.timeout(900)
def test_raftlb_demo_from_a_wheel_in_a_fresh_venv_outside_the_repository(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)], elsewhere, 120).returncode == 0
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    pip(venv, "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT), cwd=elsewhere)
    [wheel] = (tmp_path / "dist").glob("raftlb-*.whl")
    raftlb, python = str(venv / "bin" / "raftlb"), str(venv / "bin" / "python")

    # The runtime alone: no PySyncObj, and `raftlb demo` says which extra brings it.
    pip(venv, "install", "-q", str(wheel), cwd=elsewhere)
    out = run([raftlb, "demo"], elsewhere, 60)
    assert out.returncode == 2 and "pip install 'raftlb[demo]'" in out.stderr, out.stderr
    # The packaged demo config is found from here, a directory with no configs/.
    script = ("import raftlb, raftlb.demo.scenario as s, importlib.resources as r; "
              "print(raftlb.__file__); print(r.files('raftlb.demo').joinpath(s.DEMO_CONFIG))")
    where = run([python, "-c", script], elsewhere, 60)
    assert where.returncode == 0, where.stderr
    package, config = where.stdout.split()
    assert Path(package).is_relative_to(venv) and Path(config).is_relative_to(venv)
    assert run([raftlb, "check", "-c", config], elsewhere, 60).returncode == 0

    pip(venv, "install", "-q", f"raftlb[demo] @ {wheel.as_uri()}", cwd=elsewhere)
    # The shipped config as it is, on ports free on this machine (the defaults, 8080 and 9090, may be taken).
    doc = yaml.safe_load(Path(config).read_text())
    doc["listeners"][0]["address"] = f"127.0.0.1:{free_port()}"
    doc["admin"]["address"] = f"127.0.0.1:{free_port()}"
    for node, port in zip(doc["clusters"][0]["nodes"], demo_node_ports(), strict=True):
        node["url"] = f"http://127.0.0.1:{port}"
    (elsewhere / "demo.yaml").write_text(yaml.safe_dump(doc))
    out = run([raftlb, "demo", "--duration", "4", "--config", "demo.yaml"], elsewhere, 180)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "PASS: every acknowledged write survived the failover" in out.stdout
    assert "SIGKILL leader" in out.stdout and "rejoined as a follower" in out.stdout
