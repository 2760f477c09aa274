"""`raftlb status --watch` while raftlb goes away and comes back (the admin answers scripted)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from raftlb import status_cli

DOC: dict[str, Any] = {"version": "test", "uptime_s": 5, "clusters": {"demo": {
    "leader": "n1", "term": 3, "leader_source": "announce", "stats": {}, "nodes": {}}}}


def scripted(monkeypatch: pytest.MonkeyPatch, answers: list[str]) -> None:
    """`fetch` answers "up" (a document) or "down" (connection refused) in turn; the watch loop's sleep
    ends the run (Ctrl-C) after the last answer."""
    it: Iterator[str] = iter(answers)
    left = [len(answers)]

    def fetch(admin: str, timeout: float = 3.0) -> dict[str, Any]:
        if next(it) == "down":
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return DOC

    def sleep(seconds: float) -> None:
        left[0] -= 1
        if left[0] == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_cli, "fetch", fetch)
    monkeypatch.setattr(status_cli.time, "sleep", sleep)


def test_watch_shows_one_line_while_raftlb_is_unreachable_and_recovers(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    scripted(monkeypatch, ["up", "down", "down", "down", "down", "up", "down", "up"])
    out = io.StringIO()
    assert status_cli.main("http://127.0.0.1:9", watch=True, interval=0, out=out) == 0
    text = out.getvalue() + capsys.readouterr().err
    lines = text.splitlines()
    down = [line for line in lines if "unreachable" in line or "cannot read" in line]
    assert len(down) == 2, text  # one per outage, not one per second
    assert down[0].startswith("raftlb status: http://127.0.0.1:9 unreachable since ")
    assert down[0].endswith(": [Errno 111] Connection refused")
    assert lines.count("raftlb status: http://127.0.0.1:9 answers again") == 2
    assert sum(line.startswith("raftlb test at http://127.0.0.1:9") for line in lines) == 3  # the table


def test_without_watch_an_unreachable_admin_is_an_error_and_exit_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    scripted(monkeypatch, ["down"])
    out = io.StringIO()
    assert status_cli.main("http://127.0.0.1:9", out=out) == 2
    assert out.getvalue() == ""
    assert capsys.readouterr().err.startswith("raftlb status: cannot read http://127.0.0.1:9/v1/clusters: ")
