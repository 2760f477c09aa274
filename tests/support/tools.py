"""Helpers for tests that drive real external programs (Chromium, Prometheus): find them, install them.

`ensure_debian_package("prometheus", "prometheus")` returns the binary's path, installing the Debian package
with apt-get when the binary is missing and the tests run as root (as CI does). Measured on the CI machine
(Debian 12, a warm mirror): `prometheus` ~15 s, `chromium` ~40 s, once; later calls find the binary at once.
When it cannot be installed, `require_debian_package` skips the test with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

_updated = False
_failures: dict[str, str] = {}


def _apt(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=timeout, env=env)


def ensure_debian_package(package: str, binary: str, *, timeout: float = 420.0) -> str:
    """The path of `binary`, installing Debian `package` if it is absent. RuntimeError says why it cannot."""
    global _updated
    found = shutil.which(binary)
    if found:
        return found
    if package in _failures:
        raise RuntimeError(_failures[package])
    try:
        if os.geteuid() != 0:
            raise RuntimeError(f"{binary} is not installed and installing Debian {package} needs root")
        if shutil.which("apt-get") is None:
            raise RuntimeError(f"{binary} is not installed and there is no apt-get to install {package}")
        t0 = time.monotonic()
        if not _updated:
            done = _apt("update", "-q", timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"apt-get update failed: {done.stderr.strip()[-500:]}")
            _updated = True
        done = _apt("install", "-y", "-q", "--no-install-recommends", package, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get install {package} failed: {done.stderr.strip()[-500:]}")
        found = shutil.which(binary)
        if not found:
            raise RuntimeError(f"Debian {package} installed, but there is no {binary} on PATH")
        print(f"installed Debian {package} in {time.monotonic() - t0:.1f}s")
        return found
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        _failures[package] = str(exc)
        raise RuntimeError(str(exc)) from exc


def require_debian_package(package: str, binary: str) -> str:
    """Like `ensure_debian_package`, but skips the calling test with the reason when it cannot install."""
    try:
        return ensure_debian_package(package, binary)
    except RuntimeError as exc:
        pytest.skip(f"needs {binary} (Debian {package}): {exc}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for programs that cannot report the port they bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def demo_node_ports() -> list[int]:
    """Three free HTTP ports whose Raft ports (+100, as `raftlb demo` takes them) are free too."""
    ports: list[int] = []
    while len(ports) < 3:
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 100))
        except OSError:
            continue
        if port not in ports and port + 100 not in ports:
            ports.append(port)
    return ports
