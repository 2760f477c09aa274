"""`make bench-h2`: HTTP/2 through raftlb against HTTP/2 through HAProxy, on this machine.

    .venv/bin/python bench/h2bench.py [--upstream http2|http1] [--loads 8x1,64x1,32x10] [--rounds 3]
                                      [--duration 6] [--quick] [--profile FILE] [--json PATH]

The HTTP/2 sibling of `make bench` (bench/run.py), built from the same pieces and measured the same way:
  - nginx, the backend: one process, `return 200` with a 100-byte body (bench/nginx.conf.tmpl), on two
    ports: HTTP/1.1, and h2c with prior knowledge;
  - bench/announcer.py announces the nginx node as leader, so raftlb routes to it;
  - HAProxy: `nbthread 1`, `bind ... proto h2` (h2c from the clients), `server ... proto h2` (h2c to nginx);
  - raftlb: one cluster of one node (the nginx), GETs routed as leader reads (bench/raftlb.yaml.tmpl); h2c
    from the clients, and to nginx over `--upstream`: `http2` (the default: the cluster gets
    `upstream_protocol: http2`, h2c to nginx's h2c port) or `http1` (HTTP/1.1 to nginx's other port);
  - load: h2load (Debian's nghttp2-client), one thread; a load `CxM` is C connections with up to M
    concurrent streams each ("direct" is h2load straight to nginx's h2c port).
The proxy under test runs alone on core 1, h2load, nginx and the announcer on core 0 (bench/run.py's
options --proxy-core, --client-core, --max-foreign, --retries, --quiet-timeout, --python, --raftlb-src,
--keep-tmp, --warmup and --targets apply here too). Every round runs every load against every target, the
target order rotating from round to round so that drift on the machine falls on each target alike.
Reported per target and load, as medians over rounds: req/s, p50 and p99 latency (from h2load's per-request
log, --log-file: h2load itself prints no percentiles), CPU µs per request of the proxy (utime + stime from
/proc over the run, divided by the requests h2load completed), peak RSS. Then raftlb/HAProxy, and the
issue-14 target (raftlb >= 0.5x HAProxy's req/s at every load): the exit status is 1 when it is missed.

`--quick`: 1 round of 2 s, a smoke run. `--profile FILE`: instead of the rounds, run raftlb under cProfile
for one run at the first load, write the profile to FILE and print where raftlb's time went (cProfile slows
raftlb down, so that run's req/s is not a measurement).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import pstats
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from string import Template
from typing import Any

from procs import (
    CLK_TCK,
    Proc,
    Procs,
    ensure_tools,
    free_port,
    machine_busy_ticks,
    net_counters,
    raise_exit,
    tool,
    wait_port,
    wait_until,
)
from report import TARGETS, Check, medians, table
from run import BODY, Bench
from run import parse_args as run_parse_args

HERE = Path(__file__).resolve().parent
LOADS = "8x1,64x1,32x10"
INSTALL_HINT = ("bench: h2load not found. It is in Debian's nghttp2-client package:\n"
                "    sudo apt-get install -y nghttp2-client")
TARGET_RATIO = 0.5  # issue 14: raftlb's req/s at least half HAProxy's


# -- h2load: command line and output (pure) -----------------------------------------------------------------

def parse_load(label: str) -> tuple[int, int]:
    """"32x10" -> (32 connections, 10 concurrent streams on each)."""
    m = re.fullmatch(r"(\d+)x(\d+)", label.strip())
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ValueError(f"a load is CLIENTSxSTREAMS, e.g. 8x1 or 32x10; got {label!r}")
    return int(m[1]), int(m[2])


def h2load_argv(url: str, label: str, duration: float, log_file: Path) -> list[str]:
    """h2load for one timed run: one thread, h2c with prior knowledge (an http:// URL), per-request log."""
    clients, streams = parse_load(label)
    return [tool("h2load"), "-t1", f"-c{clients}", f"-m{streams}", f"-D{max(1, round(duration * 1000))}ms",
            f"--log-file={log_file}", url]


def parse_h2load(stdout: str) -> dict[str, Any]:
    """The figures h2load prints at the end of a run: wall time, request counts, statuses, data bytes."""
    out: dict[str, Any] = {}
    if m := re.search(r"^finished in ([\d.]+)(ms|s|us)\b", stdout, re.M):
        out["seconds"] = float(m[1]) / {"s": 1, "ms": 1e3, "us": 1e6}[m[2]]
    if m := re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                      r"(\d+) errored, (\d+) timeout", stdout, re.M):
        for key, value in zip(("total", "started", "done", "succeeded", "failed", "errored", "timeout"),
                              m.groups(), strict=True):
            out[key] = int(value)
    if m := re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout, re.M):
        out["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups()), strict=True))
    if m := re.search(r"^traffic: .*?(\d+)\) data", stdout, re.M):
        out["data_bytes"] = int(m[1])
    missing = {"seconds", "done", "status"} - out.keys()
    if missing:
        raise ValueError(f"h2load printed no {', '.join(sorted(missing))}:\n{stdout[-2000:]}")
    return out


def latencies(log_text: str) -> dict[str, float]:
    """Percentiles (nearest rank) of h2load's --log-file rows, `start_us <TAB> status <TAB> duration_us`, over
    the streams that ended with a status (-1: failed); in µs, as bench/run.py reports wrk's."""
    durations: list[int] = []
    for line in log_text.splitlines():
        cols = line.split("\t")
        if len(cols) >= 3 and cols[1] != "-1":
            durations.append(int(cols[2]))
    if not durations:
        return {k: 0.0 for k in ("p50_us", "p90_us", "p99_us", "p999_us", "mean_us", "max_us")}
    durations.sort()

    def rank(q: float) -> float:
        return float(durations[max(0, math.ceil(q * len(durations)) - 1)])

    return {"p50_us": rank(0.50), "p90_us": rank(0.90), "p99_us": rank(0.99), "p999_us": rank(0.999),
            "mean_us": statistics.fmean(durations), "max_us": float(durations[-1])}


def h2_ok(port: int, body: str | None = None) -> bool:
    """One h2c GET with h2load (readiness): True when it answered 2xx (and with `body`'s length of data)."""
    try:
        out = subprocess.run([tool("h2load"), "-n1", "-c1", f"http://127.0.0.1:{port}/"], capture_output=True,
                             text=True, timeout=10)
        r = parse_h2load(out.stdout)
    except (subprocess.TimeoutExpired, ValueError):
        return False
    return r["status"]["2xx"] == 1 and (body is None or r.get("data_bytes") == len(body.encode()))


# -- configs: bench/run.py's templates, edited for HTTP/2 ---------------------------------------------------

def nginx_version() -> tuple[int, ...]:
    out = subprocess.run([tool("nginx"), "-v"], capture_output=True, text=True)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    return tuple(int(v) for v in m.groups()) if m else (0, 0, 0)


def _edit(text: str, old: str, new: str) -> str:
    """Replace one line of a rendered template, failing loudly if the template changed under us."""
    if text.count(old) != 1:
        raise RuntimeError(f"bench: expected one {old.strip()!r} in a template of bench/run.py")
    return text.replace(old, new)


def render(name: str, dest: Path, edits: list[tuple[str, str]], **values: object) -> Path:
    text = Template((HERE / name).read_text()).substitute({k: str(v) for k, v in values.items()})
    for old, new in edits:
        text = _edit(text, old, new)
    dest.write_text(text)
    return dest


def nginx_h2c_listen(h1_port: int, h2_port: int, version: tuple[int, ...]) -> tuple[str, str]:
    """The edit that adds an h2c (prior knowledge) port beside the HTTP/1.1 one. nginx before 1.25.1 has
    `listen ... http2` (such a cleartext port speaks HTTP/2 only); later ones `http2 on;` per server."""
    old = f"        listen 127.0.0.1:{h1_port} backlog=4096;\n"
    if version >= (1, 25, 1):
        return old, f"{old}        listen 127.0.0.1:{h2_port} backlog=4096;\n        http2 on;\n"
    return old, f"{old}        listen 127.0.0.1:{h2_port} http2 backlog=4096;\n"


def haproxy_h2_edits(port: int, backend_port: int) -> list[tuple[str, str]]:
    """h2c on both sides: `proto h2` on the bind line (prior knowledge) and on the server line."""
    bind, server = f"    bind 127.0.0.1:{port}", f"    server n1 127.0.0.1:{backend_port}"
    return [(f"{bind}\n", f"{bind} proto h2\n"), (f"{server}\n", f"{server} proto h2\n")]


def raftlb_upstream_edits(upstream: str) -> list[tuple[str, str]]:
    """`upstream_protocol: http2` in the cluster for h2c to the node; nothing for http1 (the default), so
    that a raftlb without the key still runs."""
    if upstream == "http1":
        return []
    return [("    kind: native\n", f"    kind: native\n    upstream_protocol: {upstream}\n")]


# -- the running setup ---------------------------------------------------------------------------------------

class H2Bench(Bench):
    """bench/run.py's setup with HTTP/2 on the client side of both proxies and on HAProxy's (and, with
    `--upstream http2`, raftlb's) side to nginx; one run is one h2load run instead of one wrk run."""

    def start(self) -> None:
        a = self.args
        h1_port, h2_port, ann_port, ha_port, rl_port = (free_port() for _ in range(5))
        conf = render("nginx.conf.tmpl", self.dir / "nginx.conf", [nginx_h2c_listen(h1_port, h2_port,
                                                                                     nginx_version())],
                      dir=self.dir, port=h1_port, body=BODY)
        self.backend = self.procs.start("nginx", [tool("nginx"), "-e", str(self.dir / "nginx-error.log"),
                                                  "-p", str(self.dir), "-c", str(conf)], a.client_core)
        wait_port(h2_port, self.backend)
        self.announcer = self.procs.start("announcer", [sys.executable, str(HERE / "announcer.py"),
                                                        "--port", str(ann_port)], a.client_core)
        wait_port(ann_port, self.announcer)

        cfg = render("haproxy.cfg.tmpl", self.dir / "haproxy.cfg", haproxy_h2_edits(ha_port, h2_port),
                     port=ha_port, backend_port=h2_port, threads=a.workers)
        self.targets["haproxy"] = self.procs.start("haproxy", [tool("haproxy"), "-db", "-f", str(cfg)],
                                                   self.proxy_cpus)
        node_port = h2_port if a.upstream == "http2" else h1_port
        cfg = render("raftlb.yaml.tmpl", self.dir / "raftlb.yaml", raftlb_upstream_edits(a.upstream),
                     port=rl_port, admin_port=free_port(), backend_port=node_port, announce_port=ann_port,
                     max_idle=a.max_idle, workers=a.workers)
        profile = ["-m", "cProfile", "-o", str(Path(a.profile).resolve())] if a.profile else []
        self.targets["raftlb"] = self.procs.start(
            "raftlb", [self.python, *profile, "-m", "raftlb", "run", "-c", str(cfg)], self.proxy_cpus,
            env=self.env)
        self.targets["direct"] = self.backend
        self.ports = {"direct": h2_port, "haproxy": ha_port, "raftlb": rl_port}
        wait_port(ha_port, self.targets["haproxy"])
        try:
            wait_port(rl_port, self.targets["raftlb"])
        except RuntimeError as exc:
            if "upstream_protocol" in str(exc):
                raise RuntimeError(f"{exc}\nbench: this raftlb does not know `upstream_protocol` yet: "
                                   "run with --upstream http1 (make bench-h2 UPSTREAM=http1)") from exc
            raise
        for name, port in self.ports.items():
            # raftlb answers 503 until the announcer's first event names the leader.
            wait_until(lambda port=port: h2_ok(port, BODY), f"{name} to answer an h2c GET with the body")  # type: ignore[misc]

    # bench/run.py's `wrk()` waits for a quiet machine and repeats disturbed runs around this one run.
    def _wrk_once(self, target: str, conc: Any, duration: float, rnd: int, reset_rss: bool) -> dict[str, Any]:
        proc, backend, announcer = self.targets[target], self.backend, self.announcer
        assert backend is not None and announcer is not None
        ours = [proc, announcer] if proc is backend else [proc, backend, announcer]
        log_file = self.dir / "h2load.log"
        argv = [tool("taskset"), "-c", str(self.args.client_core),
                *h2load_argv(f"http://127.0.0.1:{self.ports[target]}/", conc, duration, log_file)]
        exact_peak = proc.reset_peak_rss() if reset_rss else False
        cpu0 = [p.cpu().seconds for p in ours]
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        net0, busy0, t0 = net_counters(), machine_busy_ticks(), time.monotonic()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
        busy1, wall, net1 = machine_busy_ticks(), time.monotonic() - t0, net_counters()
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = [p.cpu().seconds - c for p, c in zip(ours, cpu0, strict=True)]
        proc.check_alive()
        if out.returncode != 0:
            raise RuntimeError(f"h2load failed ({out.returncode}):\n{out.stdout[-2000:]}\n"
                               f"{out.stderr[-2000:]}")
        h = parse_h2load(out.stdout)
        lat = latencies(log_file.read_text())
        log_file.unlink()
        n = max(h["done"], 1)
        loadgen_cpu = sum(getattr(kids1, f) - getattr(kids0, f) for f in ("ru_utime", "ru_stime"))
        backend_cpu = cpu[0] if proc is backend else cpu[1]
        errors = h["failed"] + h["errored"] + h["timeout"] + h["status"]["4xx"] + h["status"]["5xx"]
        return {
            "target": target, "concurrency": conc, "round": rnd, "upstream": self.args.upstream,
            "rps": h["done"] / h["seconds"], "requests": h["done"], "errors": errors, "h2load": h, **lat,
            "cpu_us_per_req": cpu[0] / n * 1e6, "backend_cpu_us_per_req": backend_cpu / n * 1e6,
            "h2load_cpu_us_per_req": loadgen_cpu / n * 1e6,
            "peak_rss_mib": proc.peak_rss_mib(), "peak_rss_exact": exact_peak,
            "client_core_busy": (loadgen_cpu + backend_cpu) / wall,
            "proxy_core_busy": cpu[0] / wall if proc is not backend else 0.0,
            "net": {k: net1[k] - net0[k] for k in net1},
            "foreign_cores": max(0.0, (busy1 - busy0) / CLK_TCK - loadgen_cpu - sum(cpu)) / wall,
        }

    def profile(self, label: str) -> str:
        """One run against raftlb (under cProfile), then stop raftlb so that the profile is written; the
        functions that took the most time, as text."""
        a = self.args
        r = self.wrk("raftlb", label, a.duration, 0, True, False)
        print(f"  profiled run {label}: {r['rps']:,.0f} req/s under cProfile (not a measurement)", flush=True)
        raftlb: Proc = self.targets.pop("raftlb")
        self.procs.stop(raftlb)
        wait_until(lambda: Path(a.profile).exists(), "raftlb to write its profile")
        with open(os.devnull, "w") as devnull:
            stats = pstats.Stats(a.profile, stream=devnull)
        total = stats.total_tt  # type: ignore[attr-defined]
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
        per_req = 1e6 / max(r["requests"], 1)
        groups: dict[str, float] = {}
        for (file, _line, func), (_cc, _calls, tottime, _cum, _callers) in rows:
            key = profile_group(file, func)
            groups[key] = groups.get(key, 0.0) + tottime
        lines = [f"raftlb under cProfile, {r['requests']:,} requests at {label}: {total:.2f} s of profiled "
                 f"time, {total * per_req:.0f} µs per request; own time by package:"]
        lines += [f"  {t / total:6.1%}  {t * per_req:6.1f} µs/req  {name}"
                  for name, t in sorted(groups.items(), key=lambda kv: kv[1], reverse=True)[:15]]
        lines.append("functions, by own time:")
        for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in rows[:a.profile_top]:
            where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
            lines.append(f"  {tottime / total:6.1%}  {tottime * per_req:6.1f} µs/req  "
                         f"{calls * per_req / 1e6:6.2f} calls/req  cum {cumtime / total:6.1%}  "
                         f"{func}  {where}")
        return "\n".join(lines)


def profile_group(file: str, func: str) -> str:
    """Where a profiled function belongs: a raftlb module, a library (h2, hpack...), the standard library, or
    the event loop itself (uvloop's C code and the system calls it makes, which cProfile cannot see into,
    count as the own time of asyncio's `run`)."""
    path = Path(file)
    if file == "~":
        return "C built-ins called from Python"
    if "raftlb" in path.parts:
        return "raftlb/" + "/".join(path.parts[path.parts.index("raftlb") + 1:])
    if "site-packages" in path.parts:
        return path.parts[path.parts.index("site-packages") + 1].removesuffix(".py")
    if func == "run" and path.name == "runners.py":
        return "event loop (uvloop, C) and system calls"
    return f"stdlib {path.name}"


# -- the run -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--upstream", choices=("http2", "http1"), default="http2",
                   help="raftlb to nginx: h2c (the cluster gets `upstream_protocol: http2`) or HTTP/1.1 "
                        "(default http2)")
    p.add_argument("--loads", default=LOADS,
                   help=f"h2load connections x streams per connection, comma-separated (default {LOADS})")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 2 s, 1 s warm-up")
    p.add_argument("--profile", metavar="FILE",
                   help="run raftlb under cProfile for one run at the first load, write FILE, print the top")
    p.add_argument("--profile-top", type=int, default=25, help="functions printed with --profile (25)")
    p.add_argument("--json", default=str(HERE / "results" / "h2-latest.json"),
                   help="where the JSON copy goes")
    ours, rest = p.parse_known_args(argv)
    # Everything else is bench/run.py's (rounds, duration, cores, retries, --python, --raftlb-src...).
    args = run_parse_args([*rest, "--hold", "0", "--json", ours.json])
    for key, value in vars(ours).items():
        setattr(args, key, value)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 1.0
    args.load_list = [f"{c}x{m}" for c, m in map(parse_load, args.loads.split(","))]
    return args


def versions() -> dict[str, str]:
    def first_line(*argv: str) -> str:
        out = subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True)
        return ((out.stdout + out.stderr).strip().splitlines() or ["?"])[0]

    return {"h2load": first_line("h2load", "--version"), "nginx": first_line("nginx", "-v"),
            "haproxy": first_line("haproxy", "-v")[:40], "python": platform.python_version(),
            "nproc": str(os.cpu_count()), "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg())}


def target_checks(med: dict[str, dict[str, dict[str, float]]]) -> list[Check]:
    """Issue 14: raftlb's req/s at least TARGET_RATIO of HAProxy's, at each load."""
    out = []
    for label, by in med.items():
        if "raftlb" in by and "haproxy" in by:
            ratio = by["raftlb"]["rps"] / by["haproxy"]["rps"]
            measured = f"{by['raftlb']['rps']:,.0f} vs {by['haproxy']['rps']:,.0f} req/s = {ratio:.2f}x"
            out.append(Check(f"h2 throughput >= {TARGET_RATIO}x HAProxy at {label}", ratio >= TARGET_RATIO,
                             measured))
    return out


def main(argv: list[str] | None = None) -> int:
    if shutil.which("h2load") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    args = parse_args(argv)
    ensure_tools("nginx", "haproxy", "taskset")
    signal.signal(signal.SIGTERM, raise_exit)
    os.sched_setaffinity(0, {args.client_core})
    workdir = Path(tempfile.mkdtemp(prefix="raftlb-h2bench-"))
    info = versions()
    print(f"bench-h2: {info['nproc']} cores, load average {info['loadavg']}; {info['h2load']}; "
          f"{info['nginx']}; {info['haproxy']}; Python {info['python']}; raftlb to nginx over "
          f"{args.upstream}", flush=True)
    runs: list[dict[str, Any]] = []
    try:
        with Procs(workdir) as procs:
            bench = H2Bench(args, procs, workdir)
            bench.start()
            info["raftlb"] = bench.raftlb_origin()
            if args.serve:
                return bench.serve_forever()
            if args.profile:
                print(bench.profile(args.load_list[0]))
                return 0
            print(f"bench-h2: raftlb from {info['raftlb']}; proxies on core {bench.proxy_cpus}, h2load and "
                  f"nginx on core {args.client_core}; {args.rounds} rounds x {args.load_list} x "
                  f"{args.duration:g}s", flush=True)
            targets = [t for t in TARGETS if t in args.targets.split(",")]
            for target in targets:
                bench.wrk(target, args.load_list[-1], args.warmup, quiet=False)
            for rnd in range(args.rounds):
                order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                for label in args.load_list:
                    for target in order:
                        r = bench.wrk(target, label, args.duration, rnd)
                        runs.append(r)
                        print(f"  round {rnd + 1} {label:<6} {target:<8} {r['rps']:>9,.0f} req/s  "
                              f"p50 {r['p50_us']:>6.0f} µs  p99 {r['p99_us']:>6.0f} µs  "
                              f"cpu {r['cpu_us_per_req']:5.1f} µs/req  rss {r['peak_rss_mib']:5.1f} MB  "
                              f"errors {r['errors']}  client core {r['client_core_busy']:.0%}"
                              f"{'  DISTURBED' if r['disturbed'] else ''}", flush=True)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench-h2: configs and logs kept in {workdir}")

    by_load = medians(runs)
    med = {label: by_load[label] for label in args.load_list}
    results = target_checks(med)
    info["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\nHTTP/2 (h2c) from h2load; raftlb to nginx over {args.upstream}, HAProxy to nginx over h2c; "
          f"load = h2load connections x streams; load average at the end {info['loadavg_end']}")
    print(table(med))  # type: ignore[arg-type]
    print("\ntargets (issue 14):")
    for c in results:
        print(c.line())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "json"}, "medians": med,
        "targets": [{"name": c.name, "pass": c.passed, "measured": c.measured} for c in results],
        "runs": runs,
    }
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nbench-h2: JSON in {args.json}")
    return 0 if all(c.passed for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
