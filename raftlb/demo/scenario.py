"""`raftlb demo`: a real 3-node Raft cluster, raftlb in front, the leader killed under load, and a report.

Timeline (for the default 12 s of load):
  0 s   steady writes (PUT, one key per write) and reads through raftlb
  3 s   SIGKILL the leader; writes are held by raftlb until the survivors elect a new one
  7 s   restart the old leader; it replays its journal and rejoins as a follower
 12 s   stop the load, read back every acknowledged write through raftlb, print the report

Exit code 0 only if no acknowledged write was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from raftlb.config.load import load_config
from raftlb.config.model import Config
from raftlb.demo.cluster import DemoCluster
from raftlb.errors import ConfigError

WRITERS = 4
READERS = 4
RECENT_KEYS = 64  # readers pick among the latest acknowledged writes


@dataclass
class Tally:
    """What the clients saw."""

    writes_ok: int = 0
    write_errors: dict[str, int] = field(default_factory=dict)
    reads_found: int = 0  # 200: the key and its value
    reads_not_found: int = 0  # 404: counted apart, a read of a key that exists should not get one
    read_errors: dict[str, int] = field(default_factory=dict)
    reads_by_node: dict[str, int] = field(default_factory=dict)  # 200s and 404s, by the node that answered
    acked: dict[str, str] = field(default_factory=dict)  # key -> value of every acknowledged write
    acked_index: dict[str, int] = field(default_factory=dict)  # key -> X-Raft-Index of its write
    write_done_at: list[float] = field(default_factory=list)
    slowest_write: float = 0.0
    events: list[str] = field(default_factory=list)
    leaders: list[tuple[str, int]] = field(default_factory=list)  # (leader, term) as raftlb saw them


DEMO_CONFIG = "demo.yaml"  # package data of raftlb.demo; configs/demo.yaml in the repository links to it


class Demo:
    def __init__(self, config_path: str, duration: float, out: Any = sys.stdout) -> None:
        self.config_path = config_path
        self.config: Config = load_config(config_path)
        self.cluster_cfg = self.config.clusters[0]
        listener = self.config.listeners[0]
        self.proxy_url = f"http://{listener.host}:{listener.port}"
        self.admin_url = f"http://{self.config.admin.host}:{self.config.admin.port}"
        self.duration = duration
        self.out = out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.tally = Tally()
        self.cluster: DemoCluster | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.t0 = 0.0
        self.stop_load = asyncio.Event()
        self.admin_view: dict[str, Any] = {}

    # -- output -------------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.t0:6.2f}s" if self.t0 else "  ---  "
        line = f"[{stamp}] {text}"
        if self.tty:
            self.out.write("\r\033[K" + line + "\n")
        else:
            self.out.write(line + "\n")
        self.out.flush()
        self.tally.events.append(line)

    def progress(self) -> None:
        t = self.tally
        view = self.admin_view
        stats = view.get("stats", {})
        line = (f"writes {t.writes_ok} ok {sum(t.write_errors.values())} err | reads {t.reads_found} found "
                f"{t.reads_not_found} not found "
                f"{sum(t.read_errors.values())} err | leader {view.get('leader')} term {view.get('term')} "
                f"| held now {stats.get('held_now', 0)}, released {stats.get('released', 0)}")
        if self.tty:
            self.out.write("\r\033[K" + line)
            self.out.flush()

    # -- processes ----------------------------------------------------------------------------------------

    def start_cluster(self) -> None:
        nodes = self.cluster_cfg.nodes
        http_ports = [n.port for n in nodes]
        raft_ports = [p + 100 for p in http_ports]
        self.say(f"starting {len(nodes)} demo nodes (PySyncObj Raft) on ports {http_ports}")
        self.cluster = DemoCluster(len(nodes), http_ports=http_ports, raft_ports=raft_ports,
                                   log_level="warning")
        self.cluster.start(timeout=20)
        self.say(f"cluster up: leader {self.cluster.leader()} at term {self.cluster.term()}")

    async def start_proxy(self) -> None:
        self.say(f"starting raftlb: {self.proxy_url} (admin {self.admin_url}), config {self.config_path}")
        log = open(self.cluster_log_dir() / "raftlb.log", "ab")  # noqa: SIM115 - owned by the child
        cmd = [sys.executable, "-m", "raftlb", "run", "-c", self.config_path]
        self.proxy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      start_new_session=True)
        log.close()
        async with httpx.AsyncClient(timeout=1.0) as c:
            deadline = time.monotonic() + 15
            while True:
                if self.proxy.poll() is not None:
                    raise RuntimeError(f"raftlb exited with {self.proxy.returncode}; see "
                                       f"{self.cluster_log_dir() / 'raftlb.log'}")
                try:
                    if (await c.get(self.admin_url + "/readyz?leader=1")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("raftlb did not become ready within 15 s")
                await asyncio.sleep(0.05)
        await self.refresh_view()
        self.say(f"raftlb ready: it sees leader {self.admin_view.get('leader')} at term "
                 f"{self.admin_view.get('term')}")

    def cluster_log_dir(self) -> Path:
        assert self.cluster is not None
        return self.cluster.data_dir

    def stop_all(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(5)
        if self.cluster is not None:
            self.cluster.stop()

    # -- load ---------------------------------------------------------------------------------------------

    async def writer(self, c: httpx.AsyncClient, w: int) -> None:
        t = self.tally
        i = 0
        while not self.stop_load.is_set():
            key, value = f"demo-w{w}-{i}", f"v{i}-{time.time_ns()}"
            start = time.monotonic()
            try:
                r = await c.put(f"/kv/{key}", content=value.encode())
                status = str(r.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            now = time.monotonic()
            if status == "200":
                t.writes_ok += 1
                t.acked[key] = value
                if (index := r.headers.get("x-raft-index", "")).isdigit():
                    t.acked_index[key] = int(index)
                t.write_done_at.append(now)
                t.slowest_write = max(t.slowest_write, now - start)
            else:
                t.write_errors[status] = t.write_errors.get(status, 0) + 1
                await asyncio.sleep(0.05)
            i += 1

    async def reader(self, c: httpx.AsyncClient, r_id: int) -> None:
        """Reads of keys whose write was acknowledged, among the latest ones. Each carries the highest index
        this reader has seen, and at least its key's write index (X-Raft-Min-Index): raftlb serves it from
        any node that has applied that, so it finds the value and never goes back in time, followers
        included."""
        t = self.tally
        rng = random.Random(r_id)
        token = 0
        while not self.stop_load.is_set():
            if not t.acked:
                await asyncio.sleep(0.02)  # nothing written yet
                continue
            recent = list(itertools.islice(reversed(t.acked), RECENT_KEYS))
            key = rng.choice(recent)
            token = max(token, t.acked_index.get(key, 0))
            try:
                r = await c.get(f"/kv/{key}", headers={"X-Raft-Min-Index": str(token)})
                status = r.status_code
                index = r.headers.get("x-raft-index", "")
                if index.isdigit():
                    token = max(token, int(index))
                if status in (200, 404):
                    if status == 200:
                        t.reads_found += 1
                    else:
                        t.reads_not_found += 1
                    node = r.headers.get("x-raft-node", "?")
                    t.reads_by_node[node] = t.reads_by_node.get(node, 0) + 1
                else:
                    t.read_errors[str(status)] = t.read_errors.get(str(status), 0) + 1
            except httpx.HTTPError as exc:
                t.read_errors[type(exc).__name__] = t.read_errors.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.005)

    async def refresh_view(self) -> None:
        try:
            async with httpx.AsyncClient(timeout=0.5) as c:
                doc = (await c.get(self.admin_url + "/v1/clusters")).json()
            self.admin_view = doc["clusters"][self.cluster_cfg.name]
        except (httpx.HTTPError, ValueError, KeyError):
            return
        pair = (str(self.admin_view.get("leader")), int(self.admin_view.get("term") or 0))
        if not self.tally.leaders or self.tally.leaders[-1] != pair:
            self.tally.leaders.append(pair)

    async def watch(self) -> None:
        """Narrate what raftlb sees: leader changes, holds and releases."""
        last_leader = self.admin_view.get("leader")
        last_term = self.admin_view.get("term")
        held_reported = 0
        while not self.stop_load.is_set():
            await self.refresh_view()
            view = self.admin_view
            stats = view.get("stats", {})
            if stats.get("held_now", 0) > held_reported:
                held_reported = stats["held_now"]
                self.say(f"raftlb is holding {held_reported} write(s) while the cluster has no leader")
            leader, term = view.get("leader"), view.get("term")
            if (leader, term) != (last_leader, last_term):
                if leader is None and last_leader is None:
                    self.say(f"raftlb: election in progress at term {term}")
                elif leader is None:
                    self.say(f"raftlb: leader {last_leader} lost (term {term}); holding writes")
                else:
                    self.say(f"raftlb: new leader {leader} at term {term} (was {last_leader} at term "
                             f"{last_term}); released {stats.get('released', 0)} held write(s) so far")
                    held_reported = 0
                last_leader, last_term = leader, term
            self.progress()
            await asyncio.sleep(0.05)

    async def script(self) -> None:
        """The failover scenario."""
        assert self.cluster is not None
        cluster = self.cluster
        await asyncio.sleep(self.duration * 0.25)
        victim = await asyncio.to_thread(cluster.leader)
        if victim is None:
            self.say("no leader to kill?")
            return
        term_before = await asyncio.to_thread(cluster.term)
        self.say(f"SIGKILL leader {victim} (term {term_before}) under load")
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, victim)
        new = await asyncio.to_thread(cluster.wait_for_leader, 15.0, min_term=term_before + 1,
                                      exclude=[victim])
        self.say(f"cluster elected {new} at term {await asyncio.to_thread(cluster.term)} "
                 f"{time.monotonic() - killed_at:.2f} s after the kill")
        await asyncio.sleep(max(0.0, self.duration * 0.6 - (time.monotonic() - self.t0)))
        self.say(f"restarting {victim} (same data dir: it replays its journal)")
        await asyncio.to_thread(cluster.restart, victim)

        def rejoined() -> dict[str, Any] | None:
            st = cluster.status(victim)
            return st if st is not None and st.get("role") == "follower" and st.get("leader") else None

        st = await asyncio.to_thread(cluster.wait_for, rejoined, 15.0, f"{victim} to rejoin")
        self.say(f"{victim} rejoined as a follower of {st['leader']} at term {st['term']}")

    async def verify(self, c: httpx.AsyncClient) -> int:
        """Read back every acknowledged write through raftlb (leader reads); return how many are lost."""
        lost = 0
        sem = asyncio.Semaphore(16)

        async def check(key: str, value: str) -> None:
            nonlocal lost
            async with sem:
                for _ in range(5):
                    try:
                        r = await c.get(f"/kv/{key}", headers={"X-Raft-Consistency": "leader"})
                        break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.2)
                else:
                    lost += 1
                    return
                if r.status_code != 200 or r.text != value:
                    lost += 1

        await asyncio.gather(*(check(k, v) for k, v in self.tally.acked.items()))
        return lost

    # -- main ---------------------------------------------------------------------------------------------

    async def run(self, keep: bool) -> int:
        self.t0 = time.monotonic()
        await asyncio.to_thread(self.start_cluster)
        await self.start_proxy()
        limits = httpx.Limits(max_connections=WRITERS + READERS + 4)
        async with httpx.AsyncClient(base_url=self.proxy_url, timeout=15.0, limits=limits) as c:
            self.say(f"load: {WRITERS} writers and {READERS} readers for {self.duration:g} s")
            load = [asyncio.create_task(self.writer(c, i)) for i in range(WRITERS)]
            load += [asyncio.create_task(self.reader(c, i)) for i in range(READERS)]
            watcher = asyncio.create_task(self.watch())
            script = asyncio.create_task(self.script())
            await asyncio.sleep(self.duration)
            try:
                await asyncio.wait_for(script, 20)
            finally:
                self.stop_load.set()
                await asyncio.gather(*load, watcher, return_exceptions=True)
            if self.tty:
                self.out.write("\n")
            self.say(f"load stopped; reading back {len(self.tally.acked)} acknowledged writes")
            lost = await self.verify(c)
        await self.refresh_view()
        self.report(lost)
        if keep:
            await self.keep_running()
        return 0 if lost == 0 else 1

    def report(self, lost: int) -> None:
        t = self.tally
        stats = self.admin_view.get("stats", {})
        done = sorted(t.write_done_at)
        gap = max((b - a for a, b in zip(done, done[1:], strict=False)), default=0.0)
        changes = " -> ".join(f"{leader}@{term}" for leader, term in t.leaders)
        reads = t.reads_found + t.reads_not_found + sum(t.read_errors.values())
        requests = t.writes_ok + sum(t.write_errors.values()) + reads
        rows = [
            ("requests", f"{requests}"),
            ("writes acknowledged", f"{t.writes_ok}"),
            ("write errors", f"{sum(t.write_errors.values())} {t.write_errors or ''}".strip()),
            ("reads", f"{reads} of acknowledged keys"),
            ("  found (200)", f"{t.reads_found}"),
            ("  not found (404)", f"{t.reads_not_found}"),
            ("  errors", f"{sum(t.read_errors.values())} {t.read_errors or ''}".strip()),
            ("longest write gap",
             f"{gap * 1000:.0f} ms (slowest single write {t.slowest_write * 1000:.0f} ms)"),
            ("leader changes (raftlb)", changes),
            ("writes held / released / expired",
             f"{stats.get('held', 0)} / {stats.get('released', 0)} / {stats.get('expired', 0)}"),
            ("re-sends", f"{stats.get('resends', {})}"),
            ("reads answered per node", ", ".join(f"{n}: {c}" for n, c in sorted(t.reads_by_node.items()))),
            ("acknowledged writes lost", f"{lost}"),
        ]
        width = max(len(k) for k, _ in rows)
        self.out.write("\n== raftlb demo report " + "=" * 50 + "\n")
        for k, v in rows:
            self.out.write(f"  {k:<{width}}  {v}\n")
        verdict = "PASS: every acknowledged write survived the failover" if lost == 0 else \
            f"FAIL: {lost} acknowledged write(s) lost"
        self.out.write(f"\n  {verdict}\n")
        self.out.flush()

    async def keep_running(self) -> None:
        """Leave everything running until Ctrl-C or SIGTERM: say who leads and how to look, watch the nodes,
        and take `restart ID` on stdin (the nodes are this process's children: one started by hand from
        `ps` would stop at once, as its parent is not this process)."""
        assert self.cluster is not None and self.proxy is not None
        cluster = self.cluster
        leader = await asyncio.to_thread(cluster.leader)
        term = await asyncio.to_thread(cluster.term)
        pids = ", ".join(f"{n}={cluster.pid(n)}" for n in cluster.nodes)
        victim = cluster.pid(leader) if leader else "<leader pid>"
        self.out.write(f"""
The cluster and raftlb keep running (Ctrl-C stops everything).

  leader now     {leader or "(none)"} at term {term}; nodes (pids): {pids}
  raftlb         pid {self.proxy.pid}, {self.proxy_url} (admin {self.admin_url})
  logs           {self.cluster_log_dir()}
  status page    {self.admin_url}/
  leader table   raftlb status --admin {self.admin_url} --watch

Try:

  curl -i -X PUT {self.proxy_url}/kv/hello -d world        # a write: goes to the leader
  curl -i {self.proxy_url}/kv/hello                        # a read
  raftlb bench --url {self.proxy_url} --duration 10           # load and a consistency check
  kill -9 {victim}      # kill the leader: watch writes held and released on the status page

Type `restart ID` and Enter here to start a stopped node again (`restart` alone: every stopped node).
""")
        self.out.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        commands: asyncio.Queue[str] = asyncio.Queue()
        reading = self._read_commands(commands)
        watcher = asyncio.create_task(self._watch_nodes(stop))
        try:
            while not stop.is_set():
                get = asyncio.create_task(commands.get())
                stopped = asyncio.create_task(stop.wait())
                await asyncio.wait([get, stopped], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not get.done():
                    get.cancel()
                    break
                await self.command(get.result())
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if reading:
                loop.remove_reader(sys.stdin.fileno())

    def _read_commands(self, commands: asyncio.Queue[str]) -> bool:
        """Feed stdin's lines to `commands`; False when stdin cannot be watched (closed, a plain file)."""
        loop = asyncio.get_running_loop()
        buffer = bytearray()

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:  # end of input: keep running, without commands
                loop.remove_reader(fd)
                return
            buffer.extend(data)
            while (end := buffer.find(b"\n")) >= 0:
                commands.put_nowait(buffer[:end].decode(errors="replace").strip())
                del buffer[:end + 1]

        try:
            fd = sys.stdin.fileno()
            loop.add_reader(fd, readable)
        except (AttributeError, OSError, ValueError):  # no stdin, or one epoll cannot watch (/dev/null)
            return False
        return True

    async def _watch_nodes(self, stop: asyncio.Event) -> None:
        """Say when a node exits, and how to start it again."""
        assert self.cluster is not None
        cluster = self.cluster
        down: set[str] = set()
        while not stop.is_set():
            for node_id in cluster.nodes:
                if cluster.is_running(node_id):
                    down.discard(node_id)
                elif node_id not in down:
                    down.add(node_id)
                    code = cluster.returncode(node_id)
                    self.say(f"{node_id} (pid {cluster.pid(node_id)}) exited with {code}: type `restart "
                             f"{node_id}` and Enter to start it again")
            await asyncio.sleep(0.2)

    async def command(self, line: str) -> None:
        """One line typed in keep mode: `restart [ID...]`."""
        assert self.cluster is not None
        cluster = self.cluster
        words = line.split()
        if not words:
            return
        if words[0] != "restart" or any(w not in cluster.nodes for w in words[1:]):
            self.say(f"unknown command {line!r}: type `restart ID` (one of {', '.join(cluster.nodes)}) or "
                     "`restart` for every stopped node")
            return
        targets = words[1:] or [n for n in cluster.nodes if not cluster.is_running(n)]
        if not targets:
            self.say("every node is running")
        for node_id in targets:
            if cluster.is_running(node_id):
                self.say(f"{node_id} is running (pid {cluster.pid(node_id)}); `kill -9` it first")
                continue
            try:
                await asyncio.to_thread(cluster.restart, node_id)
            except TimeoutError as exc:
                self.say(f"{node_id} did not answer after its restart: {exc}")
                continue
            self.say(f"{node_id} restarted (pid {cluster.pid(node_id)}, same data dir: it replays its "
                     "journal and rejoins)")


def main(keep: bool = False, duration: float = 12.0, config: str | None = None) -> int:
    """Run the demo with `config`, or with the config shipped inside the package (any working directory)."""
    with contextlib.ExitStack() as stack:
        if config is None:
            # A real file even from a zipped install: `raftlb run -c` in a subprocess reads it.
            resource = importlib.resources.files("raftlb.demo").joinpath(DEMO_CONFIG)
            config = str(stack.enter_context(importlib.resources.as_file(resource)))
        try:
            demo = Demo(config, duration)
        except ConfigError as exc:
            print(f"raftlb demo: config error: {exc}", file=sys.stderr)
            return 2
        return _run(demo, keep)


def _run(demo: Demo, keep: bool) -> int:
    try:
        return asyncio.run(demo.run(keep))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (TimeoutError, RuntimeError) as exc:
        print(f"\nraftlb demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.stop_all()
        if os.environ.get("RAFTLB_DEMO_DEBUG"):
            print(f"logs in {demo.cluster.data_dir if demo.cluster else '-'}", file=sys.stderr)
