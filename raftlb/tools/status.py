"""`raftlb status`: the leader table of a running raftlb, read from its admin listener, as a terminal table.

Exit codes: 0 every cluster has a leader; 1 some cluster has none (or the server is draining); 2 the admin
listener could not be read. `--watch` redraws every `--interval` seconds until Ctrl-C (while raftlb cannot
be read: one line, `unreachable since ...`, and the table again once it answers); `--json` prints the
admin's JSON as is.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

import httpx

EXIT_OK, EXIT_NO_LEADER, EXIT_UNREACHABLE = 0, 1, 2
CLEAR = "\x1b[H\x1b[2J"


def fetch(admin: str, timeout: float = 3.0) -> dict[str, Any]:
    """GET {admin}/v1/clusters. httpx.HTTPError or ValueError when it cannot be read."""
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        r = client.get(admin.rstrip("/") + "/v1/clusters")
        r.raise_for_status()
        doc = r.json()
    if not isinstance(doc, dict) or not isinstance(doc.get("clusters"), dict):
        raise ValueError("not a raftlb admin /v1/clusters answer")
    return doc


def exit_code(doc: dict[str, Any]) -> int:
    leaderless = any(c.get("leader") is None for c in doc["clusters"].values())
    return EXIT_NO_LEADER if doc.get("draining") or leaderless else EXIT_OK


def _num(v: object) -> str:
    return "-" if v is None else str(v)


def _age(v: object) -> str:
    if not isinstance(v, int | float):
        return "never"
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.1f}s"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _state(n: dict[str, Any]) -> str:
    """A node's state from an older raftlb's admin, which has no `state` field: down before deposed."""
    if n.get("live"):
        return "deposed" if n.get("deposed") else "live"
    return "down" if n.get("down") or n.get("role") else "unheard"


def _role(n: dict[str, Any], state: str) -> str:
    """The ROLE cell: a node that is not live shows its last role as a past one ("was leader"), so a dead
    ex-leader never reads as the leader; a live deposed one as "leader (old term)"."""
    role = n.get("role")
    if not role:
        return "-"
    if state == "deposed":
        return f"{role} (old term)"
    return role if state == "live" else f"was {role}"


def render(doc: dict[str, Any], admin: str) -> str:
    """The human-readable view of one /v1/clusters answer."""
    listeners = ", ".join(f"{x['name']} {x['address']}" for x in doc.get("listeners", []))
    state = "DRAINING" if doc.get("draining") else "serving"
    lines = [f"raftlb {doc.get('version', '?')} at {admin}: {state}, up {_age(doc.get('uptime_s'))}"
             + (f"; listeners: {listeners}" if listeners else "")]
    for name, c in doc["clusters"].items():
        leader = c.get("leader")
        stats = c.get("stats", {})
        head = f"leader {leader} ({c.get('leader_source')})" if leader else \
            f"NO LEADER for {_age(c.get('leaderless_s'))}"
        lines += ["", f"cluster {name}: {head}, term {c.get('term')}, held now {stats.get('held_now', 0)}, "
                      f"leader changes {stats.get('leader_changes', 0)}"]
        rows = [["NODE", "ROLE", "TERM", "APPLIED", "COMMIT", "LAG", "HEARD", "STATE", "URL"]]
        for node_id, n in c.get("nodes", {}).items():
            st = n.get("state") or _state(n)
            mark = "*" if node_id == leader else ""
            rows.append([node_id + mark, _role(n, st), _num(n.get("term")),
                         _num(n.get("applied_index")), _num(n.get("commit_index")), _num(n.get("lag")),
                         _age(n.get("age_s")), st, n.get("url") or ""])
        lines += _table(rows)
    return "\n".join(lines) + "\n"


def main(admin: str = "http://127.0.0.1:9090", *, watch: bool = False, as_json: bool = False,
         interval: float = 1.0, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    tty = watch and out.isatty()
    code = EXIT_OK
    down_since: float | None = None  # wall-clock time raftlb stopped answering (watch)
    while True:
        try:
            doc = fetch(admin)
        except (httpx.HTTPError, ValueError) as exc:
            code = EXIT_UNREACHABLE
            if not watch:
                print(f"raftlb status: cannot read {admin}/v1/clusters: {exc}", file=sys.stderr)
                return code
            # One status line for the whole outage: redrawn in place on a terminal, written once otherwise.
            if down_since is None or tty:
                down_since = down_since or time.time()
                since = time.strftime("%H:%M:%S", time.localtime(down_since))
                ago = f" ({_age(time.time() - down_since)} ago)" if tty else ""
                out.write((CLEAR if tty else "") +
                          f"raftlb status: {admin} unreachable since {since}{ago}: {exc}\n")
                out.flush()
        else:
            code = exit_code(doc)
            text = json.dumps(doc, indent=2) + "\n" if as_json else render(doc, admin)
            if down_since is not None and not tty:
                text = f"raftlb status: {admin} answers again\n" + text
            down_since = None
            out.write((CLEAR if tty else "") + text)
            out.flush()
            if not watch:
                return code
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return code
