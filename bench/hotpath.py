"""The data path's own cost per request, without sockets: one keep-alive client connection and pooled
upstream connections with fake transports, a request in, the node's answer in, the client's bytes out.

    .venv/bin/python bench/hotpath.py [--case leader-get|write|fenced] [--n 50000] [--metrics] [--calls]
                                      [--opcodes]
    .venv/bin/python bench/hotpath.py --callgrind [--case ...]   # instructions per request (all cases
                                                                 # without --case); needs valgrind

Cases: `leader-get` is `make bench`'s request (a GET routed `kind: read, policy: leader`); `write` a POST
with a 32-byte body to the leader; `fenced` a GET with `X-Raft-Min-Index` on a `policy: fenced` route, in a
three-node cluster whose followers have announced that index (the read goes to a follower at once).

Prints µs per request (best of 5 batches); with --calls, the Python function calls per request by
function; with --opcodes, the bytecodes executed per request by function (what the interpreter spends
its instructions on). Useful to see what a change to the per-request path costs before `make bench`
measures it for real (that one includes the system calls, which this leaves out).

`--callgrind` runs this script twice under `valgrind --tool=callgrind` (with the metrics observer, as
`raftlb run` has it), with two request counts, and prints the difference in instructions divided by the
difference in requests: the per-request cost, without start-up. Unlike times, it does not move with the
machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# RAFTLB_SRC: measure the raftlb package in another directory (a patched copy) instead of this tree's.
sys.path.insert(0, os.environ.get("RAFTLB_SRC") or str(Path(__file__).resolve().parent.parent))

from raftlb.config.load import parse_config  # noqa: E402
from raftlb.core.leader_table import Announcement  # noqa: E402
from raftlb.http.server import HttpConnection, HttpServer  # noqa: E402
from raftlb.ops.metrics import Metrics  # noqa: E402
from raftlb.proxy.cluster import ClusterProxy  # noqa: E402
from raftlb.proxy.pool import UpstreamConn  # noqa: E402

CONFIG = """
listeners: [{name: bench, address: "127.0.0.1:1"}]
clusters:
  - name: bench
    liveness_timeout: 1h            # no announcer here: the announcements below stay current
    nodes: [{id: n1, url: "http://127.0.0.1:2"}%(more)s]
    routes: [{methods: [GET, HEAD], kind: read, policy: %(policy)s}]
"""
FOLLOWERS = ', {id: n2, url: "http://127.0.0.1:3"}, {id: n3, url: "http://127.0.0.1:4"}'
BODY = b'{"value": "0123456789abcdef012"}'  # 32 bytes
CASES = {
    # case: (policy, followers, request)
    "leader-get": ("leader", False, b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"),
    "write": ("leader", False, b"POST /v1/kv/key HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)),
    "fenced": ("fenced", True,
               b"GET /v1/kv/key HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Raft-Min-Index: 5\r\n\r\n"),
}
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 12:00:00 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 100)


class FakeTransport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.out = 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out += len(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.out += sum(map(len, parts))

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("closed")

    def abort(self) -> None:
        raise AssertionError("aborted")


def callgrind(case: str, n1: int = 2000, n2: int = 12000) -> None:
    """Instructions per request: two runs under callgrind, the difference over the difference in requests."""
    counts = []
    for n in (n1, n2):
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
               "--case", case, "--n", str(n), "--metrics", "--quiet"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        m = re.search(r"Collected : (\d+)", out)
        assert m is not None, out
        counts.append(int(m.group(1)))
    per = (counts[1] - counts[0]) / (n2 - n1)
    print(f"{case}: {per:,.0f} instructions per request "
          f"(callgrind, {n2} - {n1} requests: {counts[1]:,} - {counts[0]:,})")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), help="default: leader-get (--callgrind: all three)")
    p.add_argument("--n", type=int, default=50000)
    p.add_argument("--calls", action="store_true")
    p.add_argument("--opcodes", action="store_true", help="bytecodes executed per request, by function")
    p.add_argument("--metrics", action="store_true", help="with the metrics observer (as `raftlb run`)")
    p.add_argument("--callgrind", action="store_true", help="instructions per request (runs valgrind)")
    p.add_argument("--quiet", action="store_true", help="run --n requests once, print nothing (callgrind)")
    args = p.parse_args()
    if args.callgrind:
        if shutil.which("valgrind") is None:
            sys.exit("--callgrind needs valgrind (apt-get install valgrind)")
        for case in [args.case] if args.case else list(CASES):
            callgrind(case)
        return
    policy, followers, request = CASES[args.case or "leader-get"]
    cfg = parse_config(CONFIG % {"policy": policy, "more": FOLLOWERS if followers else ""})
    proxy = ClusterProxy(cfg.clusters[0])
    if args.metrics:
        metrics = Metrics(None, process=False)
        proxy.observer = metrics
    now = time.monotonic()
    proxy.on_announcement("n1", Announcement("n1", 1, "leader", "n1", 10, 10, True, 1, 0))
    if followers:
        for nid in ("n2", "n3"):
            proxy.on_announcement(nid, Announcement(nid, 1, "follower", "n1", 10, 10, None, 1, 0))
    assert proxy.table.leader(now) == "n1"
    server = HttpServer(proxy, cfg.limits)
    client = HttpConnection(server)
    client_tr = FakeTransport(("127.0.0.1", 40000))
    client.connection_made(client_tr)  # type: ignore[arg-type]
    ups: list[tuple[UpstreamConn, FakeTransport]] = []
    for pool in proxy.pools.values():
        up = UpstreamConn(pool)
        up_tr = FakeTransport(("127.0.0.1", 2))
        up.connection_made(up_tr)  # type: ignore[arg-type]
        pool.idle.append(up)
        ups.append((up, up_tr))
    target = ups[0][0]

    if followers:
        def one() -> None:
            client.data_received(request)
            for up, _ in ups:  # (the read goes to one of the followers, drawn at random)
                if up.listener is not None:
                    up.data_received(ANSWER)
    else:
        def one() -> None:
            client.data_received(request)
            target.data_received(ANSWER)

    if args.quiet:
        for _ in range(args.n):
            one()
        assert client_tr.out and not client.closed, "the request did not go through"
        return
    for _ in range(2000):
        one()
    assert any(tr.out for _, tr in ups) and client_tr.out and not client.closed, "the request did not go thru"
    if followers:
        assert not ups[0][1].out, "the fenced read went to the leader"
    per_req = client_tr.out / 2000
    best = float("inf")
    for _ in range(5):
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(args.n // 5):
            one()
        best = min(best, (time.perf_counter() - t0) / (args.n // 5))
    print(f"{best * 1e6:.2f} µs per request (best of 5 × {args.n // 5}); {per_req:.0f} bytes to the client "
          f"each; gc counts now {gc.get_count()}")
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    for _ in range(1000):
        one()
    gc.collect()
    print(f"{len(gc.garbage) / 1000:.1f} objects per request left for the cyclic GC")
    gc.set_debug(0)
    gc.garbage.clear()
    if args.calls:
        counts: collections.Counter[str] = collections.Counter()

        def prof(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "call":
                co = frame.f_code
                counts[f"{Path(co.co_filename).name}:{co.co_name}"] += 1
            elif event == "c_call":
                counts[f"C:{getattr(arg, '__qualname__', arg)}"] += 1
        sys.setprofile(prof)
        for _ in range(100):
            one()
        sys.setprofile(None)
        total = sum(counts.values()) / 100
        print(f"{total:.1f} calls per request:")
        for name, n in counts.most_common():
            print(f"  {n / 100:5.1f}  {name}")
    if args.opcodes:
        ops: collections.Counter[str] = collections.Counter()

        def trace(frame, event, arg):  # type: ignore[no-untyped-def]
            frame.f_trace_opcodes = True
            if event == "opcode":
                co = frame.f_code
                ops[f"{Path(co.co_filename).name}:{co.co_name}"] += 1
            return trace
        sys.settrace(trace)
        for _ in range(100):
            one()
        sys.settrace(None)
        total = sum(ops.values()) / 100
        print(f"{total:.0f} bytecodes per request:")
        for name, n in ops.most_common():
            print(f"  {n / 100:6.1f}  {name}")


if __name__ == "__main__":
    asyncio.run(main())
