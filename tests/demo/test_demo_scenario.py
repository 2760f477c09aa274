"""The `raftlb demo` clients and report, without a cluster: the reader against a scripted KV (httpx mock)."""

from __future__ import annotations

import asyncio
import importlib.resources
import io

import httpx

from raftlb.demo.scenario import DEMO_CONFIG, Demo


def demo(out: io.StringIO | None = None) -> Demo:
    with importlib.resources.as_file(importlib.resources.files("raftlb.demo").joinpath(DEMO_CONFIG)) as path:
        return Demo(str(path), 1.0, out=out or io.StringIO())


async def test_the_reader_reads_acknowledged_keys_with_their_write_index_and_counts_found() -> None:
    d = demo()
    store = {f"demo-w0-{i}": f"v{i}" for i in range(100)}
    d.tally.acked.update(store)
    d.tally.acked_index.update({key: 1000 + i for i, key in enumerate(store)})
    asked: list[tuple[str, int]] = []

    def kv(request: httpx.Request) -> httpx.Response:
        key = request.url.path.removeprefix("/kv/")
        asked.append((key, int(request.headers["x-raft-min-index"])))
        if len(asked) >= 50:
            d.stop_load.set()
        headers = {"x-raft-index": "1100", "x-raft-node": "n2"}
        if key not in store:
            return httpx.Response(404, json={"error": "not_found"}, headers=headers)
        return httpx.Response(200, content=store[key].encode(), headers=headers)

    async with httpx.AsyncClient(transport=httpx.MockTransport(kv), base_url="http://raftlb") as c:
        await asyncio.wait_for(d.reader(c, 0), 30)
    assert len(asked) >= 50
    assert all(key in store and token >= d.tally.acked_index[key] for key, token in asked)
    t = d.tally
    assert (t.reads_found, t.reads_not_found, t.read_errors) == (len(asked), 0, {})
    assert t.reads_by_node == {"n2": len(asked)}


async def test_the_reader_waits_for_a_first_acknowledged_write() -> None:
    d = demo()
    asked: list[str] = []

    def kv(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(kv), base_url="http://raftlb") as c:
        task = asyncio.create_task(d.reader(c, 0))
        await asyncio.sleep(0.1)
        d.stop_load.set()
        await asyncio.wait_for(task, 30)
    assert asked == [] and d.tally.reads_not_found == 0


def test_the_report_counts_found_not_found_and_errors_apart() -> None:
    out = io.StringIO()
    d = demo(out)
    t = d.tally
    t.writes_ok, t.reads_found, t.reads_not_found, t.read_errors = 10, 7, 2, {"503": 1}
    t.reads_by_node = {"n1": 5, "n2": 4}
    d.report(lost=0)
    rows = dict(line.strip().split("  ", 1) for line in out.getvalue().splitlines()
                if line.startswith("  ") and "  " in line.strip())
    rows = {k: v.strip() for k, v in rows.items()}
    assert rows["requests"] == "20"
    assert rows["reads"] == "10 of acknowledged keys"
    assert (rows["found (200)"], rows["not found (404)"], rows["errors"]) == ("7", "2", "1 {'503': 1}")
    assert rows["reads answered per node"] == "n1: 5, n2: 4"
    assert "reads served" not in out.getvalue()
