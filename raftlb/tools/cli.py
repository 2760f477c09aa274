"""Command line: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from raftlb import __version__
from raftlb.tools.loop import run_async

DESCRIPTION = """\
raftlb: a leader-aware load balancer for Raft clusters.

It subscribes to every node's heartbeats and term announcements, keeps a term-fenced leader table,
sends writes to the leader (holding them through an election), and spreads reads across nodes.
"""

EPILOG = """\
commands:
  run -c FILE        serve: listeners, admin, subscriptions (SIGTERM drains, SIGHUP reloads)
  check -c FILE      validate a config file and exit (0 valid, 2 invalid)
  status             the leader table of a running raftlb, read from its admin listener
  demo [--keep]      start a 3-node Raft demo cluster and raftlb, kill the leader under load, report
                     (needs the demo extra: pip install 'raftlb[demo]')
  demo-node ...      run one node of the embedded demo cluster (see `raftlb demo-node --help`)
  announce ...       sidecar: poll one node's status API, serve raft-announce/1 (`raftlb announce --help`)
  bench --url URL    load and consistency check through raftlb (see `raftlb bench --help`)

examples:
  raftlb check -c configs/example.yaml
  raftlb run -c configs/demo.yaml
  raftlb status --admin http://127.0.0.1:9090 --watch
"""


# Each command imports what it runs inside its function: `raftlb --help`, `raftlb check` and `raftlb status`
# start without loading the data path (and `demo` without PySyncObj until it is known to be installed).


def _cmd_run(args: argparse.Namespace) -> int:
    from raftlb.config.load import load_config
    from raftlb.config.model import shared_port_problem
    from raftlb.errors import ConfigError
    from raftlb.ops.logs import setup_logging
    from raftlb.server import Server

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"raftlb: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging)
    if config.workers == 1:
        return run_async(lambda: Server(config).run())
    from raftlb.workers import Supervisor, WorkerInfo, taken_address

    # The workers bind with SO_REUSEPORT, which would let them join another raftlb already on the port.
    for i, lc in enumerate(config.listeners):
        if reason := taken_address(lc.host, lc.port):
            logging.getLogger("raftlb.server").error(
                "cannot start: %s: listeners[%d].address: cannot listen on %s:%d: %s", config.source, i,
                lc.host, lc.port, reason)
            return 1

    def worker_main(worker: WorkerInfo) -> int:
        cfg, problem = config, None
        if worker.restarted:
            # A worker started again reads the file, as its siblings did on each reload since the start.
            try:
                cfg = load_config(args.config)
                problem = shared_port_problem(cfg, config.workers)
            except ConfigError as exc:
                problem = str(exc)
            # As a reload would: the admin address and TLS, and the number of workers, are the running ones.
            admin = dataclasses.replace(config.admin, token=cfg.admin.token)
            cfg = config if problem else dataclasses.replace(cfg, admin=admin, workers=config.workers)
        setup_logging(cfg.logging, worker=worker.index)
        if problem:
            logging.getLogger("raftlb").error(
                "config file not usable, starting with the one read at start: %s", problem)
        return run_async(lambda: Server(cfg, worker=worker).run())

    return Supervisor(config.workers, worker_main, config.drain_timeout).run()


def _cmd_check(args: argparse.Namespace) -> int:
    from raftlb.config.load import check_main

    return check_main(args.config)


def _cmd_status(args: argparse.Namespace) -> int:
    from raftlb.tools.status import main as status_main

    return status_main(args.admin, watch=args.watch, as_json=args.json, interval=args.interval)


DEMO_EXTRA = "pip install 'raftlb[demo]'"


def _demo_extra_missing(command: str) -> bool:
    """The demo cluster's Raft (PySyncObj) is the `demo` extra, not a runtime dependency: say so."""
    try:
        import pysyncobj  # noqa: F401
    except ImportError:
        print(f"raftlb {command}: the embedded demo cluster needs PySyncObj, which is not installed; "
              f"install the demo extra: {DEMO_EXTRA}", file=sys.stderr)
        return True
    return False


def _cmd_demo(args: argparse.Namespace) -> int:
    if _demo_extra_missing("demo"):
        return 2
    from raftlb.demo.scenario import main as demo_main

    return demo_main(keep=args.keep, duration=args.duration, config=args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raftlb", usage="%(prog)s [-h] [--version] COMMAND ...",
                                     description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"raftlb {__version__}")
    # The commands are listed once, in the epilog (with their arguments): not again by argparse.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)

    p = sub.add_parser("run", description=(
        "Run the proxy until SIGTERM (drains first); SIGHUP reloads the config file. With `workers: N` in "
        "the file, this process supervises N raftlb workers sharing the listener ports (worker i serves "
        "the admin API on its port + i); exit status 1 when a listener or admin port cannot be bound."))
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check", description="Validate a config and exit.")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("status", description=(
        "Read the leader table from a running raftlb's admin listener. Exit code: 0 every cluster has a "
        "leader, 1 one has none (or draining), 2 unreachable."))
    p.add_argument("--admin", default="http://127.0.0.1:9090", help="admin URL (default: %(default)s)")
    p.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws (default: 1)")
    p.add_argument("--json", action="store_true", help="print the admin's JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("demo", description=(
        "Start three demo nodes and raftlb, write and read through it, kill the leader, restart it, and "
        "report what every client saw."))
    p.add_argument("--keep", action="store_true", help="leave cluster and proxy running until Ctrl-C")
    p.add_argument("--duration", type=float, default=12.0, help="seconds of load in the scenario")
    p.add_argument("-c", "--config", help="raftlb config for the demo: its first listener and cluster, whose "
                                          "nodes' ports (and those + 100 for Raft) the demo nodes take "
                                          "(default: the demo.yaml shipped in the package)")
    p.set_defaults(func=_cmd_demo)

    sub.add_parser("demo-node", add_help=False)
    sub.add_parser("announce", add_help=False)
    sub.add_parser("bench", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo-node":
        if _demo_extra_missing("demo-node"):
            return 2
        from raftlb.demo.node import main as node_main

        return node_main(argv[1:])
    if argv and argv[0] == "announce":
        from raftlb.tools.announce import main as announce_main

        return announce_main(argv[1:])
    if argv and argv[0] == "bench":
        from raftlb.tools.bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result
