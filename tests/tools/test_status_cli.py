"""`raftlb status --watch` while raftlb goes away and comes back (the admin answers scripted)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from raftlb.tools import status as status_cli

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
    monkeypatch.setattr("raftlb.tools.status.time.sleep", sleep)


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


def _rows(text: str) -> dict[str, list[str]]:
    """The node rows of a rendered table: node id (leader mark stripped) -> its cells."""
    rows = [line.split() for line in text.splitlines() if line.startswith("  n")]
    return {r[0].rstrip("*"): r[1:] for r in rows}


def test_a_dead_ex_leader_reads_down_with_its_role_in_the_past_and_a_live_deposed_one_old_term() -> None:
    # The table once showed a dead ex-leader as ROLE leader, STATE deposed, while the log said it was down.
    from raftlb.ops.admin import Admin
    from tests.support.offline import ann, offline_server

    server = offline_server()
    proxy = server.proxies["c1"]
    proxy.on_announcement("n1", ann("n1", 2, "leader", "n1", applied=10))
    proxy.on_announcement("n2", ann("n2", 3, "leader", "n2", applied=11))
    proxy.on_announcement("n3", ann("n3", 3, "follower", "n2", applied=11))
    rows = _rows(status_cli.render(Admin(server).clusters(), "http://admin"))
    assert rows["n1"][:2] == ["leader", "(old"] and rows["n1"][-2] == "deposed"  # live, at an old term
    assert (rows["n2"][0], rows["n2"][-2]) == ("leader", "live")
    proxy.on_node_down("n1", "refuses connections")
    rows = _rows(status_cli.render(Admin(server).clusters(), "http://admin"))
    assert rows["n1"][:3] == ["was", "leader", "2"] and rows["n1"][-2] == "down"
    assert "deposed" not in rows["n1"]


@pytest.mark.parametrize(("fields", "state", "role"), [
    ({"role": "leader", "live": False, "deposed": True, "down": True}, "down", "was leader"),
    ({"role": "leader", "live": True, "deposed": True, "down": False}, "deposed", "leader (old term)"),
    ({"role": "follower", "live": False, "deposed": False, "down": False}, "down", "was follower"),
    ({"role": None, "live": False, "deposed": False, "down": True}, "down", "-"),
    ({"role": None, "live": False, "deposed": False, "down": False}, "unheard", "-"),
])
def test_an_older_admin_without_state_is_read_down_first(fields: dict[str, Any], state: str,
                                                          role: str) -> None:
    doc = {"version": "old", "clusters": {"c": {"leader": None, "term": 3, "nodes": {"n1": fields}}}}
    line = next(x for x in status_cli.render(doc, "http://admin").splitlines() if x.startswith("  n1"))
    assert f"  {role}  " in line and line.split()[-1] == state
