"""`make bench`: raftlb against HAProxy and against no proxy at all, on this machine.

    .venv/bin/python bench/run.py [--rounds 3] [--duration 6] [--json bench/results/latest.json]

What runs, all on 127.0.0.1, free ports, a temporary directory, and all stopped on exit (Ctrl-C too):
  - nginx, the backend: one process, `return 200` with a 100-byte body;
  - bench/announcer.py: announces the nginx node as leader at term 1 every 50 ms;
  - HAProxy: `nbthread 1`, `http-reuse always`, in front of nginx;
  - raftlb: one cluster of one node (the nginx), GETs routed as leader reads, so every request takes the
    leader path that writes take.
Core layout (2 cores): the proxy under test alone on core 1 (`--proxy-core`); wrk (1 thread), nginx, the
announcer and this script on core 0 (`--client-core`). "direct" is wrk straight to nginx.

wrk drives each target in interleaved rounds: every round runs every concurrency against every target, the
target order rotating from round to round. Reported per target and concurrency, as medians over rounds:
req/s, p50 and p99 latency (wrk --latency), CPU µs per request of the proxy (utime+stime from
/proc/<pid>/stat over the run, divided by requests; for "direct", nginx's), and peak RSS (VmHWM, reset before
each run). Then the many-connections phase (bench/hold.py) holds 10,000 keep-alive connections on raftlb and
on HAProxy. The table, the issue-7 targets (PASS/FAIL) and a JSON copy of every run come out at the end; the
exit status is 1 when a target is missed.

`--raftlb-src DIR` runs the raftlb package found in DIR (a scratch copy with a patch) instead of this tree.

`--workers N` runs raftlb with `workers: N` and HAProxy with `nbthread N`, both on the CPUs of
`--proxy-cpus` (default: all of them, so on a 2-core machine they share core 0 with wrk and nginx); CPU time
and RSS are then summed over raftlb's worker processes (RSS counts shared pages once per process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from string import Template
from typing import Any

from hold import Holder
from procs import (
    CLK_TCK,
    Proc,
    Procs,
    ensure_tools,
    free_port,
    http_get,
    machine_busy_ticks,
    net_counters,
    raise_exit,
    run_async,
    tool,
    wait_port,
    wait_quiet,
    wait_until,
)
from report import TARGETS, checks, medians, table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BODY = "x" * 99 + "\n"  # 100 bytes
WRK_ERRORS = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")


def _render(name: str, dest: Path, **values: object) -> Path:
    text = Template((HERE / name).read_text()).substitute({k: str(v) for k, v in values.items()})
    dest.write_text(text)
    return dest


class Bench:
    """The running setup: backend, announcer, both proxies; `wrk()` measures one run."""

    def __init__(self, args: argparse.Namespace, procs: Procs, workdir: Path) -> None:
        self.args = args
        self.procs = procs
        self.dir = workdir
        self.ports: dict[str, int] = {}
        self.targets: dict[str, Proc] = {}
        self.backend: Proc | None = None
        self.announcer: Proc | None = None
        self.lua = HERE / "wrk_report.lua"

    # -- setup --------------------------------------------------------------------------------------------

    def start(self) -> None:
        a = self.args
        nginx_port, ann_port, ha_port, rl_port = (free_port() for _ in range(4))
        conf = _render("nginx.conf.tmpl", self.dir / "nginx.conf", dir=self.dir, port=nginx_port, body=BODY)
        self.backend = self.procs.start("nginx", [tool("nginx"), "-e", str(self.dir / "nginx-error.log"),
                                                  "-p", str(self.dir), "-c", str(conf)], a.client_core)
        wait_port(nginx_port, self.backend)
        self.announcer = self.procs.start("announcer", [sys.executable, str(HERE / "announcer.py"),
                                                        "--port", str(ann_port)], a.client_core)
        wait_port(ann_port, self.announcer)

        cfg = _render("haproxy.cfg.tmpl", self.dir / "haproxy.cfg", port=ha_port, backend_port=nginx_port,
                      threads=a.workers)
        self.targets["haproxy"] = self.procs.start("haproxy", [tool("haproxy"), "-db", "-f", str(cfg)],
                                                   self.proxy_cpus)
        cfg = _render("raftlb.yaml.tmpl", self.dir / "raftlb.yaml", port=rl_port, admin_port=free_port(),
                      backend_port=nginx_port, announce_port=ann_port, max_idle=a.max_idle, workers=a.workers)
        self.targets["raftlb"] = self.procs.start(
            "raftlb", [self.python, "-m", "raftlb", "run", "-c", str(cfg)], self.proxy_cpus, env=self.env)
        self.targets["direct"] = self.backend
        self.ports = {"direct": nginx_port, "haproxy": ha_port, "raftlb": rl_port}
        for name in ("haproxy", "raftlb"):
            port = self.ports[name]
            wait_port(port, self.targets[name])
            wait_until(lambda port=port: http_get(port)[0] == 200, f"{name} to answer 200")  # type: ignore[misc]
        status, body = http_get(rl_port)
        assert status == 200 and body == BODY.encode(), (status, body)

    @property
    def proxy_cpus(self) -> int | str:
        a = self.args
        if a.workers == 1 and a.proxy_cpus is None:
            return int(a.proxy_core)
        return str(a.proxy_cpus or f"0-{(os.cpu_count() or 1) - 1}")

    @property
    def python(self) -> str:
        return str(self.args.python or sys.executable)

    @property
    def env(self) -> dict[str, str]:
        """raftlb's environment: PYTHONPATH names the tree to run when it is not the installed one."""
        a = self.args
        src = a.raftlb_src or (ROOT if a.python else None)
        return {**os.environ, "PYTHONPATH": str(Path(src).resolve())} if src else dict(os.environ)

    def raftlb_origin(self) -> str:
        code = "import raftlb, sys; sys.stdout.write(f'{raftlb.__file__} (Python {sys.version.split()[0]})')"
        return subprocess.run([self.python, "-c", code], env=self.env, cwd=self.dir, capture_output=True,
                              text=True).stdout

    def serve_forever(self) -> int:
        """--serve: leave everything running for manual runs and profilers, until Ctrl-C."""
        for name, port in self.ports.items():
            print(f"bench: {name:<8} http://127.0.0.1:{port}/  pid {self.targets[name].pid}", flush=True)
        print(f"bench: configs and logs in {self.dir}; Ctrl-C stops everything", flush=True)
        try:
            while True:
                time.sleep(1)
                for proc in self.procs.procs:
                    proc.check_alive()
        except KeyboardInterrupt:
            return 0

    # -- one wrk run --------------------------------------------------------------------------------------

    def wrk(self, target: str, conc: int, duration: float, rnd: int = 0, reset_rss: bool = True,
            quiet: bool = True) -> dict[str, Any]:
        """One measured wrk run. With `quiet`, wait for other load on the machine to stop first, and
        repeat a run that other processes disturbed (up to --retries times; the least disturbed is kept)."""
        a = self.args
        best: dict[str, Any] | None = None
        attempts = 1 + (a.retries if quiet else 0)
        for attempt in range(1, attempts + 1):
            if quiet:
                wait_quiet(a.max_foreign, a.quiet_timeout)
            run = self._wrk_once(target, conc, duration, rnd, reset_rss)
            if best is None or run["foreign_cores"] < best["foreign_cores"]:
                best = run
            if run["foreign_cores"] <= a.max_foreign or attempt == attempts:
                break
            print(f"  (c={conc} {target}: other processes used {run['foreign_cores']:.2f} cores; again)",
                  flush=True)
        assert best is not None
        best["disturbed"] = best["foreign_cores"] > a.max_foreign
        return best

    def _wrk_once(self, target: str, conc: int, duration: float, rnd: int, reset_rss: bool) -> dict[str, Any]:
        proc, backend, announcer = self.targets[target], self.backend, self.announcer
        assert backend is not None and announcer is not None
        ours = [proc, announcer] if proc is backend else [proc, backend, announcer]
        url = f"http://127.0.0.1:{self.ports[target]}/"
        argv = [tool("taskset"), "-c", str(self.args.client_core), tool("wrk"), "-t1", f"-c{conc}",
                f"-d{duration:g}s", "--latency", "-s", str(self.lua), url]
        exact_peak = proc.reset_peak_rss() if reset_rss else False
        before = [p.cpu().seconds for p in ours]
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        net0, busy0, t0 = net_counters(), machine_busy_ticks(), time.monotonic()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
        busy1, wall, net1 = machine_busy_ticks(), time.monotonic() - t0, net_counters()
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = [p.cpu().seconds - b for p, b in zip(ours, before, strict=True)]
        proc.check_alive()
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        w = json.loads(lines[-1][6:])
        n = max(w["requests"], 1)
        wrk_cpu = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
        proxy_cpu, backend_cpu = used[0], (used[0] if proc is backend else used[1])
        machine_cpu = (busy1 - busy0) / CLK_TCK
        return {
            "target": target, "concurrency": conc, "round": rnd,
            "rps": w["requests"] / (w["duration_us"] / 1e6),
            "p50_us": w["p50_us"], "p90_us": w["p90_us"], "p99_us": w["p99_us"], "p999_us": w["p999_us"],
            "mean_us": w["mean_us"], "max_us": w["max_us"], "requests": w["requests"],
            "errors": sum(w[k] for k in WRK_ERRORS), "wrk_errors": {k: w[k] for k in WRK_ERRORS},
            "cpu_us_per_req": proxy_cpu / n * 1e6,
            "peak_rss_mib": proc.peak_rss_mib(), "peak_rss_exact": exact_peak,
            # RSS at the end of the run, split: anonymous memory vs pages of mapped files (shared libraries).
            "rss_anon_mib": proc.status_kib("RssAnon") / 1024,
            "rss_file_mib": proc.status_kib("RssFile") / 1024,
            "backend_cpu_us_per_req": backend_cpu / n * 1e6, "wrk_cpu_us_per_req": wrk_cpu / n * 1e6,
            # How busy the client core was: near 1.0 means wrk + nginx, not the proxy, set the pace.
            "client_core_busy": (wrk_cpu + backend_cpu) / wall,
            "proxy_core_busy": proxy_cpu / wall if proc is not backend else 0.0,
            # Machine-wide, so other users' traffic counts too: retransmissions mean tail latency of 200 ms+.
            "net": {k: net1[k] - net0[k] for k in net1},
            # CPU the machine spent beyond our processes (other users, interrupts): should be near 0.
            "foreign_cores": max(0.0, machine_cpu - wrk_cpu - sum(used)) / wall,
        }

    # -- the many-connections phase -----------------------------------------------------------------------

    async def hold(self, target: str) -> dict[str, Any]:
        a = self.args
        proc = self.targets[target]
        proc.reset_peak_rss()
        rss_before = proc.rss_mib()
        holder = Holder(self.ports[target], a.hold, parallel=a.hold_parallel)
        await holder.open()
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        # With all of them open: a short wrk run at c=64 shows what the held connections cost the rest.
        # No waiting for a quiet machine here: raftlb closes connections idle for 60 s (limits.idle_timeout).
        under_hold = await asyncio.to_thread(self.wrk, target, 64, a.duration, 0, False, False)
        await asyncio.sleep(a.hold_seconds)
        await holder.recheck()
        res = holder.result
        out = {
            "requested": a.hold, "connections": res.connections, "kept": res.kept, "errors": res.error_count,
            "error_kinds": res.errors, "open_seconds": round(res.open_seconds, 2), "proxy_fds": fds,
            "rss_before_mib": rss_before, "rss_held_mib": proc.rss_mib(), "peak_rss_mib": proc.peak_rss_mib(),
            "rss_anon_held_mib": proc.status_kib("RssAnon") / 1024,
            "rps_c64_while_held": under_hold["rps"], "p99_us_c64_while_held": under_hold["p99_us"],
            "wrk_errors_while_held": under_hold["errors"],
            "foreign_cores_while_held": under_hold["foreign_cores"],
        }
        await holder.close()
        proc.check_alive()
        return out


def machine() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    model = "?"
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    try:
        import uvloop

        loop = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop = "asyncio"
    return {
        "nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
        "python": platform.python_version(), "loop": loop, "nginx": first_line([tool("nginx"), "-v"]),
        "haproxy": first_line([tool("haproxy"), "-v"]), "wrk": first_line([tool("wrk"), "-v"]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per wrk run (default 6)")
    p.add_argument("--concurrency", default="8,64,256", help="wrk -c values (default 8,64,256)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target (default 2)")
    p.add_argument("--hold", type=int, default=10_000, help="connections to hold in the last phase (0: skip)")
    p.add_argument("--hold-seconds", type=float, default=3.0, help="idle time before the re-check")
    p.add_argument("--hold-parallel", type=int, default=256, help="requests in flight while opening")
    p.add_argument("--proxy-core", type=int, default=1)
    p.add_argument("--workers", type=int, default=1,
                   help="raftlb `workers: N` and HAProxy `nbthread N` (default 1)")
    p.add_argument("--proxy-cpus", help="taskset CPU list for the proxies (default: --proxy-core with one "
                                        "worker, all CPUs with more)")
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--max-idle", type=int, default=512,
                   help="raftlb pool.max_idle_per_node (default 512, raftlb's own default)")
    p.add_argument("--max-foreign", type=float, default=0.15,
                   help="CPU (in cores) other processes may use during a run before it is repeated")
    p.add_argument("--retries", type=int, default=2, help="repeats of a disturbed run (default 2)")
    p.add_argument("--quiet-timeout", type=float, default=20.0,
                   help="longest wait for the machine to be quiet before a run (default 20 s)")
    p.add_argument("--targets", default=",".join(TARGETS), help="what to measure (default: all three)")
    p.add_argument("--python", help="the interpreter that runs raftlb (default: this one)")
    p.add_argument("--raftlb-src", help="directory holding the raftlb package to run (PYTHONPATH)")
    p.add_argument("--json", default=str(HERE / "results" / "latest.json"), help="where the JSON copy goes")
    p.add_argument("--serve", action="store_true",
                   help="only start everything and print the ports, for manual runs and profilers")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (configs, logs)")
    return p.parse_args(argv)


def _net_note(net: dict[str, int]) -> str:
    return "".join(f"  {k} {v}" for k, v in net.items() if v)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    ensure_tools()
    signal.signal(signal.SIGTERM, raise_exit)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by everything started below
    if args.hold and args.hold + 1000 > hard:
        print(f"bench: RLIMIT_NOFILE hard limit {hard} is too low for --hold {args.hold}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {args.client_core})
    workdir = Path(tempfile.mkdtemp(prefix="raftlb-bench-"))
    info = machine()
    print(f"bench: {info['nproc']} cores, {info['cpu']}; {info['nginx']}; {info['haproxy'][:40]}; "
          f"{info['wrk'][:30]}; Python {info['python']}, {info['loop']}", flush=True)
    runs: list[dict[str, Any]] = []
    hold: dict[str, Any] = {}
    try:
        with Procs(workdir) as procs:
            bench = Bench(args, procs, workdir)
            bench.start()
            info["raftlb"] = bench.raftlb_origin()
            if args.serve:
                return bench.serve_forever()
            print(f"bench: raftlb from {info['raftlb']}; proxies on core {bench.proxy_cpus} ({args.workers} "
                  f"raftlb workers / HAProxy threads), wrk and nginx on core {args.client_core}; "
                  f"{args.rounds} rounds x c={concurrencies} x {args.duration:g}s", flush=True)
            info["workers"] = args.workers
            info["proxy_cpus"] = str(bench.proxy_cpus)
            targets = [t for t in TARGETS if t in args.targets.split(",")]
            for target in targets:
                bench.wrk(target, 64, args.warmup, quiet=False)
            for rnd in range(args.rounds):
                order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                for conc in concurrencies:
                    for target in order:
                        r = bench.wrk(target, conc, args.duration, rnd)
                        runs.append(r)
                        print(f"  round {rnd + 1} c={conc:<4} {target:<8} {r['rps']:>9,.0f} req/s  "
                              f"p50 {r['p50_us']:>6} µs  p99 {r['p99_us']:>6} µs  "
                              f"cpu {r['cpu_us_per_req']:5.1f} µs/req  rss {r['peak_rss_mib']:5.1f} MB  "
                              f"errors {r['errors']}  client core {r['client_core_busy']:.0%}"
                              f"{_net_note(r['net'])}{'  DISTURBED' if r['disturbed'] else ''}", flush=True)
            if args.hold:
                for target in [t for t in ("raftlb", "haproxy") if t in targets]:
                    print(f"bench: holding {args.hold:,} connections on {target}", flush=True)
                    hold[target] = run_async(bench.hold(target))
                    print(f"  {json.dumps(hold[target])}", flush=True)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: configs and logs kept in {workdir}")

    med = medians(runs)
    results = checks(med, hold or None)
    print()
    print(table(med))
    if hold:
        print()
        for target, h in hold.items():
            print(f"{h['kept']:,}/{h['requested']:,} keep-alive connections held on {target}: "
                  f"{h['errors']} errors, peak RSS {h['peak_rss_mib']:.1f} MB (before "
                  f"{h['rss_before_mib']:.1f} MB); c=64 meanwhile {h['rps_c64_while_held']:,.0f} req/s")
    print("\ntargets (issue 7):")
    for c in results:
        print(c.line())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "medians": {str(c): by for c, by in med.items()}, "hold": hold,
        "targets": [{"name": c.name, "pass": c.passed, "measured": c.measured} for c in results],
        "runs": runs,
    }
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nbench: JSON in {args.json}")
    return 0 if all(c.passed for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
