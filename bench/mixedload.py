"""Writes and fenced reads together on the demo cluster: what read placement costs the writes.

    .venv/bin/python bench/mixedload.py [--clients 32] [--read-ratio 0.8] [--duration 5] [--rounds 8]
                                           [--margin N]

A 3-node demo cluster (raftlb.demo.cluster.DemoCluster: PySyncObj Raft, one process per node) and one raftlb
with two clusters over the same three nodes, each behind its own listener, reads routed `policy: fenced`:

  default    no placement setting: prefer_followers: true, leader_read_margin 16 (followers first; the
             leader takes a read when every follower at the index has 16 more requests outstanding)
  followers  leader_read_margin: never: the leader serves a read only when no follower has its index

The load is raftlb.tools.loadgen (`raftlb bench`): --clients keep-alive clients writing their own keys (PUT,
to the leader) and reading them back with their token (X-Raft-Min-Index), every read checked for
read-your-writes and monotonic reads. The two placements alternate, --rounds times each (followers,
default, default, followers, ...), on the same cluster (after a 3 s warm-up run that is not counted), so
that drift in the machine's load hits both alike; the figures are the medians.

Target (issue 17): write p99 through raftlb with the default placement within 1.1x of followers-only.
Exit status 1 when it is missed or any run has a consistency violation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from procs import Procs, free_port, http_get, raise_exit, run_async, wait_port, wait_until

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(1, str(ROOT))

from raftlb.demo.cluster import DemoCluster  # noqa: E402
from raftlb.tools.bench_check import BenchReport  # noqa: E402
from raftlb.tools.loadgen import BenchOptions, run_bench  # noqa: E402

PLACEMENTS = {
    "followers": "leader_read_margin: never (followers only)",
    "default": "default (prefer_followers: true, leader_read_margin: 16)",
}


def raftlb_config(nodes: dict[str, str], ports: dict[str, int], admin_port: int,
                  margin: int | None = None) -> dict[str, Any]:
    def cluster(name: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": name, "kind": "native", "liveness_timeout": "600ms", "hold": {"timeout": "5s"},
            "nodes": [{"id": n, "url": url} for n, url in nodes.items()],
            "routes": [{"methods": ["GET", "HEAD"], "path": "^/kv", "kind": "read", "policy": "fenced"}],
        }
        if name == "followers":
            doc["leader_read_margin"] = "never"
        elif margin is not None:  # --margin: another margin than the default on the default path
            doc["leader_read_margin"] = margin
        return doc

    return {
        "listeners": [{"name": n, "address": f"127.0.0.1:{p}", "cluster": n} for n, p in ports.items()],
        "admin": {"address": f"127.0.0.1:{admin_port}"},
        "logging": {"level": "warning"},
        "clusters": [cluster(n) for n in ports],
    }


def row(placement: str, leader: str, report: BenchReport) -> dict[str, Any]:
    reads, writes = report.latency_ms["read"], report.latency_ms["write"]
    n_reads = int(reads["count"])
    return {
        "placement": placement, "duration_s": report.duration_s,
        "writes_per_s": report.writes / report.duration_s, "reads_per_s": n_reads / report.duration_s,
        "write_p50_ms": writes["p50"], "write_p99_ms": writes["p99"],
        "read_p50_ms": reads["p50"], "read_p99_ms": reads["p99"],
        "leader_read_share": report.reads_by_node.get(leader, 0) / n_reads if n_reads else 0.0,
        "violations": report.violation_count, "errors": report.error_count,
    }


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
    return {"placement": rows[0]["placement"], "runs": len(rows),
            **{k: statistics.median(r[k] for r in rows) for k in keys},
            "violations": sum(r["violations"] for r in rows), "errors": sum(r["errors"] for r in rows)}


def table(medians: list[dict[str, Any]], labels: dict[str, str]) -> str:
    out = ["| placement | writes/s | write p50 (ms) | write p99 (ms) | reads/s | read p99 (ms) "
           "| leader's share of reads | violations | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for m in medians:
        out.append(f"| {labels[m['placement']]} | {m['writes_per_s']:,.0f} | {m['write_p50_ms']:.1f} | "
                   f"{m['write_p99_ms']:.1f} | {m['reads_per_s']:,.0f} | {m['read_p99_ms']:.1f} | "
                   f"{m['leader_read_share']:.1%} | {m['violations']} | {m['errors']} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--read-ratio", type=float, default=0.8, help="share of reads in the load (default 0.8)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--rounds", type=int, default=8, help="runs of each placement, alternating (default 8)")
    p.add_argument("--margin", type=int, default=None,
                   help="leader_read_margin on the default path (default: raftlb's default)")
    p.add_argument("--json", default=str(HERE / "results" / "mixedload.json"),
                   help="where the JSON copy goes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_exit)
    load0 = os.getloadavg()
    print(f"bench: {os.cpu_count()} cores, load average {load0[0]:.2f}; demo cluster, "
          f"{args.clients} clients, read ratio {args.read_ratio:g}, {args.duration:g} s per run, "
          f"{args.rounds} rounds", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="raftlb-mixedload-"))
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PLACEMENTS}
    try:
        with DemoCluster(3, data_dir=workdir / "demo", log_level="warning") as cluster, \
                Procs(workdir) as procs:
            leader = cluster.wait_for_leader(20.0)
            nodes = {n: cluster.url(n) for n in cluster.nodes}
            ports = {p: free_port() for p in PLACEMENTS}
            admin = free_port()
            cfg = workdir / "raftlb.yaml"
            cfg.write_text(yaml.safe_dump(raftlb_config(nodes, ports, admin, args.margin), sort_keys=False))
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            raftlb = procs.start("raftlb", [sys.executable, "-m", "raftlb", "run", "-c", str(cfg)], env=env)
            wait_port(ports["default"], raftlb)
            wait_until(lambda: http_get(admin, "/readyz?leader=1")[0] == 200, "raftlb to see the leader")
            # A discarded warm-up run: the first seconds of a fresh cluster (connections, journals) would
            # otherwise count against whichever placement runs first.
            warm = BenchOptions(urls=(f"http://127.0.0.1:{ports['default']}",), clients=args.clients,
                                duration=min(3.0, args.duration), read_ratio=args.read_ratio,
                                run_id=f"mixed-warmup-{os.getpid()}")
            run_async(run_bench(warm))
            for i in range(args.rounds):
                # ABBA: the order flips every round, so a trend in the machine's load favours neither.
                for placement, port in list(ports.items())[::1 if i % 2 == 0 else -1]:
                    opts = BenchOptions(urls=(f"http://127.0.0.1:{port}",), clients=args.clients,
                                        duration=args.duration, read_ratio=args.read_ratio,
                                        run_id=f"mixed-{placement}-{os.getpid()}-{i}")
                    report: BenchReport = run_async(run_bench(opts))
                    raftlb.check_alive()
                    if cluster.leader() != leader:
                        sys.exit(f"bench: the leader changed ({leader} -> {cluster.leader()}): rerun")
                    r = row(placement, leader, report)
                    runs[placement].append(r)
                    print(f"  {placement:<10} writes {r['writes_per_s']:6,.0f}/s "
                          f"p50 {r['write_p50_ms']:6.1f} ms p99 {r['write_p99_ms']:6.1f} ms   "
                          f"reads {r['reads_per_s']:6,.0f}/s "
                          f"p99 {r['read_p99_ms']:6.1f} ms   leader's share of reads "
                          f"{r['leader_read_share']:.1%}   violations {r['violations']}  "
                          f"errors {r['errors']}",
                          flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = [median_row(runs[p]) for p in PLACEMENTS]
    load1 = os.getloadavg()
    print(f"\nMedians of {args.rounds} runs each ({args.clients} clients, read ratio {args.read_ratio:g}, "
          f"{args.duration:g} s per run; load average {load0[0]:.2f} before, {load1[0]:.2f} after):\n")
    labels = dict(PLACEMENTS)
    if args.margin is not None:
        labels["default"] = f"prefer_followers: true, leader_read_margin: {args.margin}"
    print(table(medians, labels))
    followers, default = medians
    ratio = default["write_p99_ms"] / followers["write_p99_ms"] if followers["write_p99_ms"] else float("inf")
    ok = ratio <= 1.1
    clean = all(m["violations"] == 0 for m in medians)
    print(f"\ntarget (issue 17):\n  [{'PASS' if ok else 'FAIL'}] write p99 with the default placement "
          f"{default['write_p99_ms']:.1f} ms = {ratio:.2f}x followers-only "
          f"{followers['write_p99_ms']:.1f} ms "
          f"(target <= 1.1x); consistency violations {sum(m['violations'] for m in medians)} (target 0)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "settings": {k: v for k, v in vars(args).items() if k != "json"},
           "runs": runs, "medians": medians, "write_p99_ratio": ratio}
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nbench: JSON in {args.json}")
    return 0 if ok and clean else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        sys.exit(130)
