"""`make bench-readscale`: consistent reads from three capacity-limited nodes, through raftlb and HAProxy.

    .venv/bin/python bench/readscale.py [--rate 500] [--duration 10] [--clients 64] [--json ...]

Three bench/capnode.py processes, each serving at most --rate reads per second (a token bucket; requests
beyond it queue, like a saturated server on its own machine): n1 leads at term 1, n2 and n3 follow its log
and apply each entry 5 ms after receiving it; all three announce their applied index every 50 ms
(raft-announce/1). Writes go to the leader and are not rate-limited.

The load is raftlb.tools.loadgen (`raftlb bench`): --clients keep-alive clients, each
writing its own keys (PUT) and reading them back (GET; --read-ratio of the requests), carrying the
highest X-Raft-Index it has seen as X-Raft-Min-Index, and checking every read
for read-your-writes, monotonic reads and stale indexes; after the run
every key is read back from the leader (lost writes). Paths, one run each, --duration seconds:

  haproxy-leader           HAProxy (Debian package, installed when missing), `option httpchk GET /raft/status`
                           + `http-check expect rstring "role": ?"leader"`: everything goes to the leader,
                           which is what a proxy that knows nothing of Raft indexes must do to keep reads
                           consistent
  raftlb-leader            raftlb, reads with `X-Raft-Consistency: leader` (policy leader)
  raftlb-fenced            raftlb, route policy fenced with prefer_followers: false: any node whose applied
                           index has reached the client's token, the least loaded (no bias for or against
                           the leader)
  raftlb-fenced-default    raftlb, route policy fenced, no placement setting: prefer_followers: true with
                           leader_read_margin 16: followers first, the leader when every follower at the
                           token has 16 more requests outstanding than it
  raftlb-fenced-followers  raftlb, route policy fenced with leader_read_margin: never (the default before
                           issue 17): the leader only when no follower has reached the token (within 50 ms)

Everything runs twice (--announce-applied): first with nodes that announce every 50 ms tick and also as
soon as their applied index moves (at most every 5 ms), then with tick-only announcements like the demo node.

Targets: fenced reads through raftlb >= 2.5x the consistent-read throughput of leader-only reads (the
better of haproxy-leader and raftlb-leader) with prefer_followers: false (issue 7), >= 2.8x with the default
placement (issue 17); 0 consistency violations. The
verdict is printed for every phase; the exit status is 1 when the first phase misses the target or any run
of any phase has a consistency violation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from procs import Procs, ensure_tools, free_port, http_get, raise_exit, run_async, tool, wait_port, wait_until

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(1, str(ROOT))

from raftlb.tools.bench_check import BenchReport  # noqa: E402
from raftlb.tools.loadgen import BenchOptions, run_bench  # noqa: E402

NODES = ("n1", "n2", "n3")  # n1 leads
MODES = {
    "haproxy-leader": "HAProxy, leader only (httpchk role leader)",
    "raftlb-leader": "raftlb, policy leader",
    "raftlb-fenced": "raftlb, fenced, prefer_followers: false",
    "raftlb-fenced-default": "raftlb, fenced, default (prefer_followers: true, leader_read_margin: 16)",
    "raftlb-fenced-followers": "raftlb, fenced, leader_read_margin: never (followers only)",
}


def raftlb_config(node_ports: dict[str, int], ports: dict[str, int], admin_port: int) -> dict[str, Any]:
    """One cluster (and listener) per placement: `spread` (prefer_followers: false), `default` (no placement
    setting at all), `followers` (leader_read_margin: never)."""
    def cluster(name: str, route_extra: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name, "kind": "native", "liveness_timeout": "600ms",
            "nodes": [{"id": n, "url": f"http://127.0.0.1:{p}"} for n, p in node_ports.items()],
            "routes": [{"methods": ["GET", "HEAD"], "path": "^/kv/", "kind": "read", "policy": "fenced",
                        **route_extra}],
            **extra,
        }

    return {
        "listeners": [{"name": name, "address": f"127.0.0.1:{port}", "cluster": name}
                      for name, port in ports.items()],
        "admin": {"address": f"127.0.0.1:{admin_port}"},
        "logging": {"level": "warning"},
        "clusters": [cluster("spread", {"prefer_followers": False}, {}), cluster("default", {}, {}),
                     cluster("followers", {}, {"leader_read_margin": "never"})],
    }


def haproxy_config(node_ports: dict[str, int], port: int) -> str:
    servers = "\n".join(f"    server {n} 127.0.0.1:{p} check" for n, p in node_ports.items())
    return f"""# HAProxy with a leader-only health check: every request goes to the leader.
global
    nbthread 1
    maxconn 2000

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch

listen leader
    bind 127.0.0.1:{port}
    balance roundrobin
    option httpchk GET /raft/status
    http-check expect rstring '"role": ?"leader"'
    default-server inter 1s fall 2 rise 1
{servers}
"""


def row(mode: str, report: BenchReport) -> dict[str, Any]:
    lat = report.latency_ms["read"]
    ok_reads = int(lat["count"])
    shares = {n: report.reads_by_node.get(n, 0) / ok_reads if ok_reads else 0.0 for n in NODES}
    return {
        "mode": mode, "reads_per_s": ok_reads / report.duration_s if report.duration_s else 0.0,
        "reads": ok_reads, "writes": report.writes, "read_p50_ms": lat["p50"], "read_p99_ms": lat["p99"],
        "share": shares, "other_nodes": {n: c for n, c in report.reads_by_node.items() if n not in NODES},
        "violations": report.violation_count,
        "violation_kinds": {k: v for k, v in report.violations.items() if v},
        "errors": report.error_count, "error_kinds": report.errors, "verified_keys": report.verified_keys,
        "duration_s": report.duration_s,
    }


def table(rows: list[dict[str, Any]], base: float) -> str:
    out = ["| path | reads/s | vs leader-only | read p50 (ms) | read p99 (ms) | reads n1 (leader) / n2 / n3 "
           "| violations | errors |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shares = " / ".join(f"{r['share'][n]:.0%}" for n in NODES)
        out.append(f"| {MODES[r['mode']]} | {r['reads_per_s']:,.0f} | {r['reads_per_s'] / base:.2f}x | "
                   f"{r['read_p50_ms']:.1f} | {r['read_p99_ms']:.1f} | {shares} | {r['violations']} | "
                   f"{r['errors']} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=300.0, help="reads/s each node serves at most (default 300)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per path (default 10)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--read-ratio", type=float, default=0.9, help="share of reads in the load (default 0.9)")
    p.add_argument("--keys-per-client", type=int, default=8)
    p.add_argument("--announce-applied", default="5ms,0", metavar="PERIOD[,PERIOD]",
                   help="one phase per value: nodes also announce a new applied index at once, at most once "
                        "per PERIOD; 0: only every 50 ms tick, as the demo node (default: 5ms,0)")
    p.add_argument("--modes", default=",".join(MODES), help=f"paths to run (default: {','.join(MODES)})")
    p.add_argument("--json", default=str(HERE / "results" / "readscale.json"),
                   help="where the JSON copy goes")
    return p.parse_args(argv)


def announce_label(period: str) -> str:
    return ("nodes announce every 50 ms tick (as the demo node)" if _seconds(period) == 0 else
            f"nodes announce every 50 ms tick and at once when their applied index moves (at most every "
            f"{period})")


def _seconds(text: str) -> float:
    text = text.strip()
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text.removesuffix("s"))


def phase(args: argparse.Namespace, modes: list[str], announce: str, workdir: Path) -> list[dict[str, Any]]:
    """Start the three nodes (announcing as `announce` says), raftlb and HAProxy; run every path; stop."""
    rows: list[dict[str, Any]] = []
    with Procs(workdir) as procs:
        node_ports = {n: free_port() for n in NODES}
        capnode = str(HERE / "capnode.py")
        for n, port in node_ports.items():
            argv = [sys.executable, capnode, "--id", n, "--listen", f"127.0.0.1:{port}",
                    "--rate", f"{args.rate:g}", "--announce-applied", announce]
            if n == "n1":
                argv += ["--role", "leader"]
            else:
                argv += ["--role", "follower", "--leader", "n1", "--leader-url",
                         f"http://127.0.0.1:{node_ports['n1']}"]
            proc = procs.start(f"capnode-{n}", argv)
            wait_port(port, proc)
        ports = {"spread": free_port(), "default": free_port(), "followers": free_port()}
        spread, admin, ha = ports["spread"], free_port(), free_port()
        cfg = workdir / "raftlb.yaml"
        cfg.write_text(yaml.safe_dump(raftlb_config(node_ports, ports, admin), sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        raftlb = procs.start("raftlb", [sys.executable, "-m", "raftlb", "run", "-c", str(cfg)], env=env)
        wait_port(spread, raftlb)
        wait_until(lambda: http_get(admin, "/readyz?leader=1")[0] == 200, "raftlb to see the leader")
        urls = {"raftlb-leader": f"http://127.0.0.1:{spread}", "raftlb-fenced": f"http://127.0.0.1:{spread}",
                "raftlb-fenced-default": f"http://127.0.0.1:{ports['default']}",
                "raftlb-fenced-followers": f"http://127.0.0.1:{ports['followers']}"}
        if "haproxy-leader" in modes:
            hcfg = workdir / "haproxy.cfg"
            hcfg.write_text(haproxy_config(node_ports, ha))
            haproxy = procs.start("haproxy", [tool("haproxy"), "-db", "-f", str(hcfg)])
            wait_port(ha, haproxy)
            time.sleep(2.5)  # the first checks: followers go DOWN after `fall 2` x `inter 1s`
            urls["haproxy-leader"] = f"http://127.0.0.1:{ha}"
        for mode in modes:
            opts = BenchOptions(urls=(urls[mode],), clients=args.clients, duration=args.duration,
                                read_ratio=args.read_ratio, keys_per_client=args.keys_per_client,
                                consistency="leader" if mode == "raftlb-leader" else None,
                                run_id=f"{mode}-{os.getpid()}-{len(rows)}")
            report: BenchReport = run_async(run_bench(opts))
            for p in procs.procs:
                p.check_alive()
            r = row(mode, report)
            r["announce_applied"] = announce
            r["report"] = report.to_dict()
            rows.append(r)
            shares = ", ".join(f"{n} {r['share'][n]:.0%}" for n in NODES)
            print(f"  {mode:<24} {r['reads_per_s']:>7,.0f} reads/s  p50 {r['read_p50_ms']:6.1f} ms  "
                  f"p99 {r['read_p99_ms']:6.1f} ms  reads: {shares}  violations {r['violations']}  "
                  f"errors {r['errors']}  ({r['writes']} writes, {r['verified_keys']} keys read back)",
                  flush=True)
    return rows


def verdict(rows: list[dict[str, Any]], label: str) -> tuple[float, list[tuple[bool, str, str]]]:
    """The leader-only baseline, and (passed, line, "target" | "violations") per check."""
    by_mode = {r["mode"]: r for r in rows}
    leader_only = [by_mode[m]["reads_per_s"] for m in ("haproxy-leader", "raftlb-leader") if m in by_mode]
    base = max(leader_only) if leader_only else (rows[0]["reads_per_s"] if rows else 1.0)
    checks: list[tuple[bool, str, str]] = []
    if "raftlb-fenced" in by_mode and leader_only:
        f = by_mode["raftlb-fenced"]
        ratio = f["reads_per_s"] / base
        ok = ratio >= 2.5 and f["violations"] == 0
        checks.append((ok, f"  [{'PASS' if ok else 'FAIL'}] {label}: fenced reads through raftlb "
                           f"{f['reads_per_s']:,.0f}/s = {ratio:.2f}x leader-only {base:,.0f}/s "
                           f"(target >= 2.5x); "
                           f"consistency violations {f['violations']} (target 0)", "target"))
    if "raftlb-fenced-default" in by_mode and leader_only:
        d = by_mode["raftlb-fenced-default"]
        ratio = d["reads_per_s"] / base
        ok = ratio >= 2.8 and d["violations"] == 0
        checks.append((ok, f"  [{'PASS' if ok else 'FAIL'}] {label}: fenced reads, default placement "
                           f"{d['reads_per_s']:,.0f}/s = {ratio:.2f}x leader-only {base:,.0f}/s "
                           f"(target >= 2.8x, issue 17); "
                           f"consistency violations {d['violations']} (target 0)", "target"))
    for r in rows:
        if r["violations"]:
            checks.append((False, f"  [FAIL] {label}: {r['mode']}: {r['violations']} consistency violations",
                           "violations"))
    return base or 1.0, checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"bench: unknown path(s) {unknown}; choose from {list(MODES)}")
    signal.signal(signal.SIGTERM, raise_exit)
    if "haproxy-leader" in modes:
        ensure_tools("haproxy")
    t0 = time.monotonic()
    load0 = os.getloadavg()
    print(f"bench: {os.cpu_count()} cores, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          f"3 nodes at {args.rate:g} reads/s each; {args.clients} clients, read ratio {args.read_ratio:g}, "
          f"{args.duration:g} s per path", flush=True)
    phases: dict[str, list[dict[str, Any]]] = {}
    for announce in [a for a in args.announce_applied.split(",") if a]:
        print(f"bench: {announce_label(announce)}", flush=True)
        workdir = Path(tempfile.mkdtemp(prefix="raftlb-readscale-"))
        try:
            phases[announce] = phase(args, modes, announce, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    load1 = os.getloadavg()
    print(f"\n3 capacity-limited nodes at {args.rate:g} reads/s each; {args.clients} clients, read ratio "
          f"{args.read_ratio:g}, {args.duration:g} s per path; took {time.monotonic() - t0:.0f} s; "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    checks: list[tuple[bool, str]] = []
    gate: list[bool] = []  # what the exit status follows: the first phase's target, and no violation anywhere
    for i, (announce, rows) in enumerate(phases.items()):
        label = announce_label(announce)
        short = "tick-only announcements" if _seconds(announce) == 0 else f"announce applied <= {announce}"
        base, found = verdict(rows, short)
        checks += [(ok, line) for ok, line, _ in found]
        gate += [ok for ok, _, kind in found if i == 0 or kind == "violations"]
        print(f"\n{label[0].upper()}{label[1:]}:\n")
        print(table(rows, base))
    print("\ntargets (issues 7 and 17):")
    for _, line in checks:
        print(line)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    haproxy_v = None
    if "haproxy-leader" in modes:
        out = subprocess.run([tool("haproxy"), "-v"], capture_output=True, text=True).stdout
        haproxy_v = out.split("\n")[0]
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "settings": {k: v for k, v in vars(args).items() if k != "json"}, "haproxy": haproxy_v,
           "phases": phases, "targets": [{"pass": ok, "text": line.strip()} for ok, line in checks]}
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nbench: JSON in {args.json}")
    return 0 if all(gate) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        sys.exit(130)
