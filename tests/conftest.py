"""Shared fixtures and the event loop the tests run on. The helpers behind them (a running Server, waits,
raw exchanges, demo clusters) live in tests/support/harness.py, which test modules import directly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import uvloop

from raftlb.config.model import LimitsConfig
from raftlb.demo.cluster import DemoCluster
from tests.support.harness import running_demo_cluster


@pytest.fixture
def limits() -> LimitsConfig:
    return replace(LimitsConfig(), header_timeout=1.0, body_timeout=1.0, idle_timeout=5.0)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, the loop `raftlb run` uses in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def demo_cluster() -> Iterator[DemoCluster]:
    with running_demo_cluster() as cluster:
        yield cluster
