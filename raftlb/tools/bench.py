"""`raftlb bench`: argument parsing, the progress line and the report table (the work: tools/loadgen.py)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from typing import Any, TextIO

from raftlb.tools.loadgen import (
    CONSISTENCY_LEVELS,
    BenchOptions,
    BenchProgress,
    BenchReport,
    run_bench,
    unreachable,
)

EXIT_USAGE = 2

DESCRIPTION = """\
Load generator and consistency checker for a Raft cluster behind raftlb.

N clients each write their own keys with increasing integer values (PUT) and read them back (GET), sending
the highest X-Raft-Index they have seen as X-Raft-Min-Index. Every read is checked: read-your-writes,
monotonic reads, the index against the token; after the load every key is read back from the leader
(nothing acknowledged may be lost). HTTP/1.1 by default; --http2 speaks HTTP/2 (h2c with prior knowledge on
http:// URLs, ALPN h2 on https:// URLs), and --streams runs several request loops per connection.
"""

EPILOG = """\
exit status: 0 no violations and errors within --max-error-rate; 1 violations or too many errors; 2 usage,
or a URL that cannot be reached at the start (each URL is connected to once before the load).

examples (against `raftlb demo --keep`, which serves http://127.0.0.1:8080):
  raftlb bench --url http://127.0.0.1:8080 --duration 10
  raftlb bench --url http://127.0.0.1:8080 --consistency fenced --duration 30
  # two raftlb replicas: each client alternates between them, its token going along
  raftlb bench --url http://127.0.0.1:8080 --url http://127.0.0.1:8081 --consistency fenced
  # a control run: unfenced reads, no token, each client reading right after its own writes: expect violations
  raftlb bench --url http://127.0.0.1:8080 --consistency any --no-token --keys-per-client 1 --read-ratio 0.5
  # HTTP/2 with prior knowledge: 8 connections, each carrying 4 concurrent streams (32 request loops)
  raftlb bench --url http://127.0.0.1:8080 --http2 --clients 8 --streams 4
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftlb bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", action="append", default=[], metavar="URL",
                   help="raftlb base URL, e.g. http://127.0.0.1:8080; repeat it and each client alternates "
                        "between the URLs request by request (its token goes along)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients, one connection each (16)")
    p.add_argument("--http2", action="store_true",
                   help="speak HTTP/2: with prior knowledge (h2c) on http:// URLs, ALPN h2 on https:// URLs")
    p.add_argument("--streams", type=int, default=1, metavar="K",
                   help="with --http2: K concurrent request loops on each client's connection, one stream "
                        "each and each with its own keys and token (1)")
    p.add_argument("--cacert", metavar="FILE",
                   help="for https:// URLs: trust the CA certificates in FILE (default: the system's)")
    stop = p.add_argument_group("length (whichever ends first; neither: 10 s)")
    stop.add_argument("--duration", type=float, metavar="S", help="seconds of load")
    stop.add_argument("--requests", type=int, metavar="N", help="total requests over all clients")
    p.add_argument("--read-ratio", type=float, default=0.8, help="share of requests that are reads (0.8)")
    p.add_argument("--keys-per-client", type=int, default=8, help="keys each client owns (8)")
    p.add_argument("--consistency", choices=CONSISTENCY_LEVELS,
                   help="send X-Raft-Consistency on reads (default: the route's policy)")
    p.add_argument("--no-token", action="store_true",
                   help="do not send X-Raft-Min-Index (a control run: shows what the token prevents)")
    p.add_argument("--path-prefix", default="/kv/", help="key path prefix under the URL (/kv/)")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout in seconds (5)")
    p.add_argument("--max-error-rate", type=float, default=0.01,
                   help="fail when more than this share of requests fail (0.01)")
    p.add_argument("--no-verify", action="store_true", help="skip reading every key back after the load")
    p.add_argument("--seed", type=int, help="random seed for the request mix (default: random)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE ('-': stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress line and no table (the exit code tells)")
    return p


def options_from(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        urls=tuple(args.url), clients=args.clients, duration=args.duration, requests=args.requests,
        read_ratio=args.read_ratio, keys_per_client=args.keys_per_client, consistency=args.consistency,
        send_token=not args.no_token, path_prefix=args.path_prefix, timeout=args.timeout,
        max_error_rate=args.max_error_rate, verify=not args.no_verify, seed=args.seed, http2=args.http2,
        streams=args.streams, cafile=args.cacert)


class ProgressLine:
    """`\\r`-rewritten status line on a terminal: elapsed, recent req/s, errors, violations."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.last: BenchProgress | None = None
        self.shown = False

    def __call__(self, p: BenchProgress) -> None:
        prev = self.last or BenchProgress(0.0, 0, 0, 0)
        dt = p.elapsed - prev.elapsed
        rate = (p.requests - prev.requests) / dt if dt > 0 else 0.0
        self.last = p
        self.out.write(f"\r\033[K{p.elapsed:6.1f}s  {rate:8.0f} req/s  {p.requests} requests  "
                       f"errors {p.errors}  violations {p.violations}")
        self.out.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            self.out.write("\r\033[K")
            self.out.flush()


def format_report(r: BenchReport) -> str:
    """The report as an aligned table."""

    def lat(op: str) -> str:
        s = r.latency_ms.get(op, {})
        return (f"p50 {s.get('p50', 0):.1f}  p90 {s.get('p90', 0):.1f}  p99 {s.get('p99', 0):.1f}  "
                f"max {s.get('max', 0):.1f} ms")

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"

    def share(d: dict[str, int]) -> str:
        total = sum(d.values())
        return ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in d.items()) if total else "-"

    target = ", ".join(r.urls)
    mode = f"consistency {r.consistency or '(route policy)'}, token {'on' if r.token else 'off'}"
    loops = f"{r.clients} clients" + (f" x {r.streams} streams" if r.streams > 1 else "")
    protocol = "http2 (HTTP/2)" if r.protocol == "http2" else "http1 (HTTP/1.1)"
    if r.protocol == "http2":
        protocol += f", {r.streams} stream{'s' if r.streams > 1 else ''} per connection"
    rows: list[tuple[str, str]] = [
        ("target", target),
        ("protocol", protocol),
        ("mode", f"{loops}, {mode}"),
        ("duration", f"{r.duration_s:.2f} s" + (" (interrupted)" if r.interrupted else "")),
        ("requests", f"{r.requests} ({r.reads} reads, {r.writes} writes)"),
        ("throughput", f"{r.throughput:.0f} req/s"),
        ("read latency", lat("read")),
        ("write latency", lat("write")),
        ("read errors", counts(r.errors.get("read", {}))),
        ("write errors", counts(r.errors.get("write", {}))),
        ("error rate", f"{r.error_rate:.2%} (max {r.max_error_rate:.2%})"),
        ("reads per node", share(r.reads_by_node)),
        ("writes per node", share(r.writes_by_node)),
        ("keys read back", f"{r.verified_keys} ({r.unverified_keys} could not be read)"
         if r.verified_keys or r.unverified_keys else "skipped"),
    ]
    rows += [(f"violations: {k}", str(n)) for k, n in r.violations.items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"== raftlb bench {r.run_id} " + "=" * 50]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if r.examples:
        lines.append("")
        lines.append("  first violations:")
        lines += [f"    {ex['text']}" for ex in r.examples]
    failures = r.failures()
    lines.append("")
    lines.append("  PASS: no violations" if not failures else "  FAIL: " + "; ".join(failures))
    return "\n".join(lines) + "\n"


def _run(options: BenchOptions, progress: ProgressLine | None) -> BenchReport | list[str]:
    """Run on uvloop when installed; the first Ctrl-C ends the run early (partial report), a second one
    aborts. The URLs that cannot be reached at the start, instead of a report, when there are any."""

    async def main() -> BenchReport | list[str]:
        if problems := await unreachable(options):
            return problems
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = threading.current_thread() is threading.main_thread()

        def on_sigint() -> None:
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C raises KeyboardInterrupt

        if handled:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            return await run_bench(options, stop=stop, on_progress=progress)
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)

    runner_kw: dict[str, Any] = {}
    try:
        import uvloop

        runner_kw["loop_factory"] = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(**runner_kw) as runner:
        return runner.run(main())


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        return int(exc.code or 0)
    options = options_from(args)
    try:
        options.validate()
    except ValueError as exc:
        print(f"raftlb bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    tty = not args.quiet and hasattr(out, "isatty") and out.isatty()
    progress = ProgressLine(out) if tty else None
    try:
        report = _run(options, progress)
    except KeyboardInterrupt:
        print("\nraftlb bench: aborted", file=sys.stderr)
        return 130
    finally:
        if progress is not None:
            progress.end()
    if isinstance(report, list):
        for problem in report:
            print(f"raftlb bench: cannot connect to {problem}", file=sys.stderr)
        print("raftlb bench: nothing run (is raftlb listening there? `raftlb demo --keep` serves "
              "http://127.0.0.1:8080)", file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet:
        out.write(format_report(report))
        out.flush()
    if args.json == "-":
        out.write(report.to_json() + "\n")
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json() + "\n")
    return report.exit_code
