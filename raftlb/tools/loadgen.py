"""`raftlb bench`: a load generator and consistency checker for a Raft cluster behind raftlb.

Each of N clients owns a few keys (`bench-<run>-c<i>-k<j>`) and, over one keep-alive connection per URL,
either writes the next integer value of one of them (`PUT`, body = the value as decimal text) or reads one
back (`GET`). It remembers the highest `X-Raft-Index` any response carried and sends it on every request as
`X-Raft-Min-Index` (the client contract, docs/headers.md), alternating between the given raftlb URLs, so the
token travels with the client and not with a proxy. Every read is judged by the client's `ClientChecker`
(bench_check.py: the rules); after the load, every key is read back from the leader.

With `http2`, each connection is HTTP/2 (bench_http.Http2Connection) and carries `streams` request loops at
once, one stream each; every loop is a client of its own to the checker (its own keys and token), so
`clients * streams` loops share `clients` connections per URL.

    report = await run_bench(BenchOptions(urls=("http://127.0.0.1:8080",), duration=5))
    print(report.violations, report.throughput, report.exit_code)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from raftlb.tools.bench_check import (
    VIOLATION_KINDS,
    BenchProgress,
    BenchReport,
    ClientChecker,
    Tally,
    Violation,
    latency_summary,
)
from raftlb.tools.bench_http import (
    BenchConnection,
    Http2Connection,
    HttpConnection,
    HttpResponse,
    Target,
    TransportError,
    client_tls,
)

__all__ = ["VIOLATION_KINDS", "BenchOptions", "BenchProgress", "BenchReport", "ClientChecker", "Violation",
           "run_bench", "unreachable", "CONSISTENCY_LEVELS"]

CONSISTENCY_LEVELS = ("leader", "fenced", "bounded", "any", "linearizable")
REQUESTS_ONLY_CAP = 600.0  # a run bounded by --requests alone still stops after this many seconds
PROGRESS_INTERVAL = 0.25
ERROR_BACKOFF = 0.05  # after a transport error, so a dead URL does not turn the clients into a busy loop


@dataclass(frozen=True)
class BenchOptions:
    """One run. `duration` and `requests` bound it (whichever comes first); neither means 10 s."""

    urls: tuple[str, ...]
    clients: int = 16
    duration: float | None = None
    requests: int | None = None
    read_ratio: float = 0.8
    keys_per_client: int = 8
    consistency: str | None = None
    send_token: bool = True
    path_prefix: str = "/kv/"
    timeout: float = 5.0
    max_error_rate: float = 0.01
    verify: bool = True
    run_id: str = ""
    seed: int | None = None
    http2: bool = False
    streams: int = 1  # request loops per connection: concurrent streams, HTTP/2 only
    cafile: str | None = None  # trust only this CA for https:// URLs (default: the system's store)

    def validate(self) -> None:
        """Raise ValueError naming the option at fault."""
        if not self.urls:
            raise ValueError("--url: at least one raftlb URL is needed")
        for url in self.urls:
            Target.parse(url)
        checks = [
            (self.clients >= 1, f"--clients: must be >= 1, got {self.clients}"),
            (self.duration is None or self.duration > 0, f"--duration: must be > 0, got {self.duration}"),
            (self.requests is None or self.requests >= 1, f"--requests: must be >= 1, got {self.requests}"),
            (0.0 <= self.read_ratio <= 1.0, f"--read-ratio: must be within [0, 1], got {self.read_ratio}"),
            (self.keys_per_client >= 1, f"--keys-per-client: must be >= 1, got {self.keys_per_client}"),
            (self.consistency is None or self.consistency in CONSISTENCY_LEVELS,
             f"--consistency: one of {', '.join(CONSISTENCY_LEVELS)}, got {self.consistency!r}"),
            (self.path_prefix.startswith("/"),
             f"--path-prefix: must start with '/', got {self.path_prefix!r}"),
            (self.timeout > 0, f"--timeout: must be > 0, got {self.timeout}"),
            (self.streams >= 1, f"--streams: must be >= 1, got {self.streams}"),
            (self.streams == 1 or self.http2,
             f"--streams {self.streams} needs --http2 (an HTTP/1.1 connection carries one request at a "
             "time)"),
            (0.0 <= self.max_error_rate <= 1.0,
             f"--max-error-rate: must be within [0, 1], got {self.max_error_rate}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def protocol(self) -> str:
        return "http2" if self.http2 else "http1"

    def connection(self, target: Target, tls: ssl.SSLContext | None = None) -> BenchConnection:
        """A new (not yet open) connection to `target` in this run's protocol; `tls` for https:// URLs
        (default: one made from `cafile`)."""
        if target.tls and tls is None:
            tls = self.tls()
        return Http2Connection(target, tls) if self.http2 else HttpConnection(target, tls)

    def tls(self) -> ssl.SSLContext:
        """The TLS context for https:// URLs, offering this run's protocol by ALPN."""
        return client_tls(self.cafile, "h2" if self.http2 else "http/1.1")

    def time_limit(self) -> float:
        if self.duration is not None:
            return self.duration
        return REQUESTS_ONLY_CAP if self.requests is not None else 10.0


def key_name(run_id: str, client: int, key: int) -> str:
    return f"bench-{run_id}-c{client}-k{key}"


# -- the run ----------------------------------------------------------------------------------------------

class Bench:
    """One run: the clients, their shared tally, and the clock."""

    def __init__(self, options: BenchOptions, stop: asyncio.Event) -> None:
        self.options = options
        self.run_id = options.run_id or secrets.token_hex(4)
        self.targets = [Target.parse(u) for u in options.urls]
        self.stop = stop  # the caller's: an interruption
        self.halt = asyncio.Event()  # the clients': stop after the request in flight
        self.verified_keys = 0
        self.tally = Tally()
        self.tickets = options.requests
        self.t0 = 0.0
        keys = range(options.keys_per_client)
        loops = options.clients * options.streams  # each a client to the checker
        self.checkers = [ClientChecker(i, [key_name(self.run_id, i, j) for j in keys]) for i in range(loops)]
        tls = options.tls() if any(t.tls for t in self.targets) else None
        self.connections = [[options.connection(t, tls) for t in self.targets]
                            for _ in range(options.clients)]
        seed = options.seed if options.seed is not None else secrets.randbits(32)
        self.rngs = [random.Random(f"{seed}-{i}") for i in range(loops)]

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _take_ticket(self) -> bool:
        if self.tickets is None:
            return True
        if self.tickets <= 0:
            return False
        self.tickets -= 1
        if self.tickets == 0:
            self.halt.set()
        return True

    async def client(self, i: int) -> None:
        """Request loop `i`: on stream `i % streams` of client `i // streams`'s connections."""
        checker, rng, conns = self.checkers[i], self.rngs[i], self.connections[i // self.options.streams]
        keys = list(checker.keys)
        n = i  # clients start on different URLs
        try:
            while not self.halt.is_set() and self._take_ticket():
                conn = conns[n % len(conns)]
                n += 1
                key = rng.choice(keys)
                if rng.random() < self.options.read_ratio:
                    ok = await self.read(checker, conn, key)
                else:
                    ok = await self.write(checker, conn, key)
                if not ok:
                    await asyncio.sleep(ERROR_BACKOFF)
        except Exception:
            self.halt.set()
            raise

    def _headers(self, checker: ClientChecker,
                 consistency: str | None) -> tuple[list[tuple[str, str]], int | None]:
        """The request headers, and the token they carry (None: none sent)."""
        headers, token = [], None
        if self.options.send_token and checker.token:
            token = checker.token
            headers.append(("X-Raft-Min-Index", str(token)))
        if consistency is not None:
            headers.append(("X-Raft-Consistency", consistency))
        return headers, token

    async def _exchange(self, conn: BenchConnection, method: str, key: str, headers: list[tuple[str, str]],
                        body: bytes = b"") -> HttpResponse | str:
        """One request: the response, or the kind of transport failure (`timeout`, `connection_reset`...)."""
        try:
            async with asyncio.timeout(self.options.timeout):
                return await conn.request(method, self.options.path_prefix + key, headers, body)
        except TransportError as exc:
            return exc.kind
        except TimeoutError:
            return "timeout"

    async def read(self, checker: ClientChecker, conn: BenchConnection, key: str) -> bool:
        headers, token = self._headers(checker, self.options.consistency)
        start = time.monotonic()
        r = await self._exchange(conn, "GET", key, headers)
        if isinstance(r, str):
            self.tally.error("read", r)
            return False
        index = r.header_int("x-raft-index")
        checker.observe_index(index)
        if r.status not in (200, 404):
            self.tally.error("read", r.error_kind())
            return False
        node = r.headers.get("x-raft-node")
        self.tally.success("read", time.monotonic() - start, node)
        v = checker.check_read(key, r.status, r.body, node=node, index=index, token=token, at=self.elapsed())
        if v is not None:
            self.tally.violation(v)
        return True

    async def write(self, checker: ClientChecker, conn: BenchConnection, key: str) -> bool:
        headers, _ = self._headers(checker, None)
        value = checker.next_write(key)
        start = time.monotonic()
        r = await self._exchange(conn, "PUT", key, headers, str(value).encode())
        if isinstance(r, str):
            self.tally.error("write", r)
            return False
        checker.observe_index(r.header_int("x-raft-index"))
        if not 200 <= r.status < 300:
            self.tally.error("write", r.error_kind())
            return False
        checker.write_acknowledged(key, value)
        self.tally.success("write", time.monotonic() - start, r.headers.get("x-raft-node"))
        return True

    async def verify_client(self, i: int) -> None:
        """Read every key this client wrote back from the leader (an acknowledged value must be there),
        counting them in `verified_keys`. Each key gets two tries."""
        checker, conn = self.checkers[i], self.connections[i // self.options.streams][0]
        for key, state in checker.keys.items():
            if state.attempted == 0:
                continue
            for attempt in range(2):
                r = await self._exchange(conn, "GET", key, self._headers(checker, "leader")[0])
                if not isinstance(r, str) and r.status in (200, 404):
                    v = checker.check_final(key, r.status, r.body, node=r.headers.get("x-raft-node"),
                                            index=r.header_int("x-raft-index"), at=self.elapsed())
                    if v is not None:
                        self.tally.violation(v)
                    self.verified_keys += 1
                    break
                if attempt == 0:
                    await asyncio.sleep(0.2)

    async def run(self, on_progress: Callable[[BenchProgress], None] | None) -> BenchReport:
        """Lifecycle: 1. start the clients; 2. halt them at the time limit, at the request budget or when
        `stop` is set; 3. give in-flight requests one timeout to finish, cancel the rest; 4. report;
        5. read every key back from the leader (skipped when interrupted, cut short by `stop`)."""
        self.t0 = time.monotonic()
        tasks = [asyncio.create_task(self.client(i), name=f"bench-client-{i}")
                 for i in range(len(self.checkers))]
        halted = asyncio.create_task(self.halt.wait(), name="bench-halt")
        stopped = asyncio.create_task(self.stop.wait(), name="bench-stop")
        limit = self.options.time_limit()
        try:
            while not (halted.done() or stopped.done()) and (left := limit - self.elapsed()) > 0:
                await asyncio.wait([halted, stopped], timeout=min(PROGRESS_INTERVAL, left),
                                   return_when=asyncio.FIRST_COMPLETED)
                if on_progress is not None:
                    on_progress(self.tally.progress(self.elapsed()))
            interrupted = self.stop.is_set()
            self.halt.set()
            stopped_at = self.elapsed()
            _, pending = await asyncio.wait(tasks, timeout=self.options.timeout + 0.5)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for t in tasks:
                if not t.cancelled() and (exc := t.exception()) is not None:
                    raise exc
            # Requests in flight at the stop still count: the run lasted until the last one ended.
            duration = max(stopped_at, self.tally.last_done - self.t0)
            report = self.report(duration, interrupted)
            if self.options.verify and not interrupted:
                attempted = sum(1 for c in self.checkers for s in c.keys.values() if s.attempted)
                verify = asyncio.gather(*(self.verify_client(i) for i in range(len(tasks))))
                waits: list[asyncio.Future[Any]] = [verify, stopped]
                await asyncio.wait(waits, timeout=2 * self.options.timeout + 5,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not verify.done():
                    verify.cancel()
                    report.interrupted = self.stop.is_set()
                with contextlib.suppress(asyncio.CancelledError):
                    await verify
                report.verified_keys = self.verified_keys
                report.unverified_keys = attempted - report.verified_keys
                self._fill_violations(report)
            return report
        finally:
            halted.cancel()
            stopped.cancel()
            for t in tasks:
                t.cancel()
            for conns in self.connections:
                for conn in conns:
                    conn.close()

    def report(self, duration: float, interrupted: bool) -> BenchReport:
        t, o = self.tally, self.options
        errors = {op: dict(sorted(t.errors[op].items())) for op in ("read", "write")}
        report = BenchReport(
            run_id=self.run_id, urls=list(o.urls), clients=o.clients, consistency=o.consistency,
            token=o.send_token, protocol=o.protocol, streams=o.streams, duration_s=round(duration, 3),
            requests=t.requests,
            reads=len(t.latencies["read"]) + sum(errors["read"].values()),
            writes=len(t.latencies["write"]) + sum(errors["write"].values()),
            throughput=round(t.requests / duration, 1) if duration > 0 else 0.0,
            latency_ms={op: latency_summary(t.latencies[op]) for op in ("read", "write")},
            errors=errors, max_error_rate=o.max_error_rate,
            reads_by_node=dict(sorted(t.by_node["read"].items())),
            writes_by_node=dict(sorted(t.by_node["write"].items())), interrupted=interrupted)
        report.error_rate = round(report.error_count / t.requests, 6) if t.requests else 0.0
        self._fill_violations(report)
        return report

    def _fill_violations(self, report: BenchReport) -> None:
        report.violations = dict(self.tally.violations)
        report.examples = [asdict(v) | {"text": v.describe()} for v in self.tally.examples]


async def unreachable(options: BenchOptions) -> list[str]:
    """Connect once to each URL before the load: `URL: reason` for each that cannot be reached (refused,
    unknown host, no answer within the timeout, a TLS failure; with `http2`, a server that does not answer
    the HTTP/2 preface with its SETTINGS). A run against a dead URL would only count errors."""

    async def probe(target: Target) -> str | None:
        conn = options.connection(target)
        try:
            async with asyncio.timeout(options.timeout):
                await conn.connect()
        except TimeoutError:
            return f"{target.url}: no connection within {options.timeout:g} s"
        except TransportError as exc:
            return f"{target.url}: {exc.detail or exc.kind}"
        finally:
            conn.close()
        return None

    problems = await asyncio.gather(*(probe(Target.parse(u)) for u in options.urls))
    return [p for p in problems if p is not None]


async def run_bench(options: BenchOptions, *, stop: asyncio.Event | None = None,
                    on_progress: Callable[[BenchProgress], None] | None = None) -> BenchReport:
    """Run the load and the checks; return the report. Setting `stop` ends the run early (the report is
    then partial, `interrupted` is true and the final read-back is skipped). ValueError for bad options."""
    options.validate()
    return await Bench(options, stop or asyncio.Event()).run(on_progress)
