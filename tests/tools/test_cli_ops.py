"""What an operator sees from the command line and the log: `raftlb --help`, the start-up line of
`raftlb run`, and a node-down line that names the URL raftlb tried."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from raftlb import __version__
from raftlb.config.model import ClusterConfig, ClusterKind, NodeConfig
from raftlb.server import Server
from raftlb.tools.cli import build_parser
from tests.support.harness import make_config, wait_for

COMMANDS = ("run", "check", "status", "demo", "demo-node", "announce", "bench")


def test_help_lists_each_command_once() -> None:
    text = build_parser().format_help()
    for command in COMMANDS:
        listed = [line for line in text.splitlines() if line.strip().split(" ")[0] == command]
        assert len(listed) == 1, (command, text)
    assert text.startswith("usage: raftlb [-h] [--version] COMMAND ...")


def dead_port() -> int:
    """A port where nothing listens (connects are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster(kind: ClusterKind) -> ClusterConfig:
    port = dead_port()
    url = f"http://127.0.0.1:{port}"
    node = NodeConfig(id="n1", url=url, announce_url=url, host="127.0.0.1", port=port)
    return ClusterConfig(name="c1", kind=kind, nodes=(node,), routes=(),
                         liveness_timeout=0.3)


async def test_run_logs_a_start_up_line_with_version_config_listeners_admin_and_clusters(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="raftlb")
    c = cluster("native")
    server = Server(make_config(c, admin=True))
    task = asyncio.create_task(server.run())
    try:
        await wait_for(lambda: any("started" in r.getMessage() for r in caplog.records), timeout=10)
        line = next(r.getMessage() for r in caplog.records if "started" in r.getMessage())
        listener, admin = server.listeners[0], server.admin
        assert admin is not None
        assert line == (f"raftlb {__version__} started: config -; "
                        f"listeners main 127.0.0.1:{listener.port} -> c1; admin 127.0.0.1:{admin.port}; "
                        f"clusters c1 (native: n1 {c.nodes[0].url})")
    finally:
        server.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


@pytest.mark.parametrize("kind", ["native", "etcd"])
async def test_a_node_down_line_names_the_url_it_tried(kind: ClusterKind,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="raftlb")
    c = cluster(kind)
    server = Server(make_config(c))
    await server.start()
    try:
        await wait_for(lambda: any(": down (" in r.getMessage() for r in caplog.records), timeout=10)
    finally:
        await server.stop()
    (line,) = [r.getMessage() for r in caplog.records if ": down (" in r.getMessage()]
    assert line.startswith("node n1: down (") and c.nodes[0].url in line, line
