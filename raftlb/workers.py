"""`workers: N`: N raftlb processes on one machine, to use more than one core.

Each worker is a whole raftlb: its own subscriptions, leader table, pools and admin listener. They bind the
same listener ports with SO_REUSEPORT, so the kernel spreads new client connections across them; worker i
serves the admin API on admin port + i. Fenced reads stay consistent across workers for the same reason they
do across replicas (the client carries its index); a Raft session's writes are ordered by the worker that
receives them, so a session's requests must share a connection (as across replicas).

The supervisor (the `raftlb run` process) forks the workers before any event loop or thread exists and then
only watches them:
- a worker that stops after it was serving is started again (0.5 s, doubling while it keeps dying soon
  after its start, up to 10 s); one that fails before it serves, at the first start, stops all: exit 1;
- SIGTERM/SIGINT: passed to every worker, which drains as a single raftlb does (one still starting stops as
  soon as it has started); exit 0 when every worker running then exited 0; a worker still running its
  `drain_timeout` (as it last reported it) + 10 s later is killed;
- SIGHUP: passed to every worker (each re-reads the config file; one still starting gets it once it
  serves); `POST /v1/reload` on one worker's admin reloads that worker and then asks the supervisor to send
  SIGHUP to the others.

Each worker tells the supervisor over its own pipe, one line a message: `R` once its listeners are bound,
`H` to reload the others, `D <seconds>` its drain timeout (at start and after each reload).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("raftlb.workers")

RESPAWN_MIN = 0.5
RESPAWN_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that ran this long before it stopped is restarted at RESPAWN_MIN again
KILL_AFTER_DRAIN = 10.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1

_stop_requested = False  # in a worker: SIGTERM/SIGINT came before its loop took the signals over


def stop_requested() -> bool:
    """In a worker: whether it was told to stop while it was starting (Server.run stops right after)."""
    return _stop_requested


def _request_stop(signum: int, frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def taken_address(host: str, port: int) -> str | None:
    """Why a socket without SO_REUSEPORT cannot bind host:port (None: it can): another program has it,
    raftlb workers included, whose SO_REUSEPORT would otherwise let a second raftlb share their port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return str(exc)
    for family, kind, proto, _, addr in dict.fromkeys(infos):  # (every address the server binds)
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT leftovers are fine)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # (as the server binds it)
            try:
                sock.bind(addr)
            except OSError as exc:
                return os.strerror(exc.errno) if exc.errno else str(exc)
    return None


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker process knows of its place: `index` of `count`, and its pipe to the supervisor."""

    index: int
    count: int
    notify_fd: int
    restarted: bool = False  # a run after one that served (it re-reads the config file)

    def tell(self, line: str) -> None:
        with contextlib.suppress(OSError):  # (the supervisor is gone: the worker is stopping anyway)
            os.write(self.notify_fd, line.encode() + b"\n")

    def ready(self, drain_timeout: float) -> None:
        self.tell(f"D {drain_timeout!r}")
        self.tell("R")

    def reloaded(self, drain_timeout: float) -> None:
        self.tell(f"D {drain_timeout!r}")

    def reload_others(self) -> None:
        self.tell("H")


@dataclass
class _Slot:
    index: int
    pid: int = 0
    fd: int = -1  # the read end of the worker's pipe
    buffer: bytes = b""  # a message line not complete yet
    started: float = 0.0
    ready: bool = False  # this run of the worker has bound its listeners
    served: bool = False  # some run of it has (one that fails at its first start stops raftlb)
    reload_pending: bool = False  # SIGHUP came while it was starting: sent once it serves
    drain_timeout: float | None = None  # as the worker last reported it
    delay: float = 0.0  # the last wait before a restart (0: none since it last ran STABLE_AFTER)
    respawn_at: float | None = None
    exit_code: int | None = None
    stopped_by_us: bool = False  # it was running when the supervisor began to stop


WorkerMain = Callable[[WorkerInfo], int]


class Supervisor:
    """Starts `count` workers running `worker_main` and keeps them running until told to stop."""

    def __init__(self, count: int, worker_main: WorkerMain, drain_timeout: float,
                 kill_after: float = KILL_AFTER_DRAIN) -> None:
        self.count = count
        self.worker_main = worker_main
        self.drain_timeout = drain_timeout  # until the workers report their own
        self.kill_after = kill_after  # past the drain timeout, before a worker still running is killed
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping = False
        self.stop_started = self.stop_deadline = 0.0
        self.failed = False
        self._pending: list[int] = []  # signals received, in order
        self._wake_r, self._wake_w = -1, -1

    # -- the supervisor's loop ------------------------------------------------------------------------------

    def run(self) -> int:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        try:
            for slot in self.slots:
                self._spawn(slot)
            log.info("started %d workers: %s", self.count, " ".join(str(s.pid) for s in self.slots))
            while not self.stopping or any(s.pid for s in self.slots):
                self._wait()
                self._handle_signals()
                self._reap()
                self._respawn_due()
                if self.stopping and time.monotonic() > self.stop_deadline:
                    for slot in self.slots:
                        if slot.pid:
                            log.error("worker %d (pid %d) still running after the drain: killed", slot.index,
                                      slot.pid)
                            self._kill(slot, signal.SIGKILL)
                    self.stop_deadline = float("inf")
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            for fd in (self._wake_r, self._wake_w, *(s.fd for s in self.slots if s.fd >= 0)):
                os.close(fd)
        if self.failed:
            log.error("stopped: a worker could not start")
            return 1
        # Whether the stop was clean: the workers running when it began. (A crash before it was logged then.)
        bad = [s for s in self.slots if s.stopped_by_us and s.exit_code != 0]
        for slot in bad:
            log.error("worker %d exited with code %s", slot.index, slot.exit_code)
        log.info("stopped")
        return 1 if bad else 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending.append(signum)

    def _wait(self) -> None:
        now = time.monotonic()
        timeouts = [s.respawn_at - now for s in self.slots if s.respawn_at is not None]
        if self.stopping:
            timeouts.append(self.stop_deadline - now)
        timeout = 0.0 if self._pending else max(0.0, min([1.0, *timeouts]))
        fds = [self._wake_r, *(s.fd for s in self.slots if s.fd >= 0)]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        for fd in readable:
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 512)
            else:
                self._read(next(s for s in self.slots if s.fd == fd))

    def _read(self, slot: _Slot) -> None:
        """What the worker said over its pipe (see the module doc); EOF once it exited."""
        if slot.fd < 0:
            return
        try:
            data = os.read(slot.fd, 4096)
        except BlockingIOError:
            return
        if not data:
            os.close(slot.fd)
            slot.fd, slot.buffer = -1, b""
            return
        *lines, slot.buffer = (slot.buffer + data).split(b"\n")
        for line in lines:
            self._message(slot, line.decode("ascii", "replace"))

    def _message(self, slot: _Slot, line: str) -> None:
        if line.startswith("D "):
            with contextlib.suppress(ValueError):
                slot.drain_timeout = float(line[2:])
                if self.stopping:  # (a report that came after the stop began may lengthen it)
                    self.stop_deadline = max(self.stop_deadline,
                                             self.stop_started + slot.drain_timeout + self.kill_after)
        elif line == "R" and not slot.ready:
            slot.ready = slot.served = True
            log.info("worker %d (pid %d) serving", slot.index, slot.pid)
            if slot.reload_pending and not self.stopping:
                self._kill(slot, signal.SIGHUP)
            slot.reload_pending = False
        elif line == "H" and not self.stopping:
            others = [s for s in self.slots if s is not slot and s.pid]
            log.info("worker %d reloaded through its admin API: reloading the other %d", slot.index,
                     len(others))
            for other in others:
                self._reload(other)

    def _reload(self, slot: _Slot) -> None:
        if slot.ready:
            self._kill(slot, signal.SIGHUP)
        else:  # (its loop does not handle SIGHUP yet)
            slot.reload_pending = True

    def _handle_signals(self) -> None:
        pending, self._pending = self._pending, []
        for sig in pending:
            if sig in _STOP_SIGNALS:
                if not self.stopping:
                    reported = [s.drain_timeout for s in self.slots if s.pid and s.drain_timeout is not None]
                    drain = max(reported) if reported else self.drain_timeout
                    log.info("stopping: %d workers drain (up to %gs)", sum(1 for s in self.slots if s.pid),
                             drain)
                    self.stopping = True
                    self.stop_started = time.monotonic()
                    self.stop_deadline = self.stop_started + drain + self.kill_after
                    for slot in self.slots:
                        slot.stopped_by_us = bool(slot.pid)
                for slot in self.slots:
                    slot.respawn_at = None
                    if slot.pid:
                        self._kill(slot, signal.SIGTERM)
            elif sig == signal.SIGHUP and not self.stopping:
                log.info("SIGHUP: reloading %d workers", sum(1 for s in self.slots if s.pid))
                for slot in self.slots:
                    if slot.pid:
                        self._reload(slot)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._read(slot)  # (what it wrote just before it died)
            code = os.waitstatus_to_exitcode(status)
            slot.pid, slot.exit_code, slot.ready = 0, code, False
            if self.stopping:
                continue
            lived = time.monotonic() - slot.started
            if not slot.served:
                log.error("worker %d exited with code %s before it was serving: stopping", slot.index, code)
                self.failed = True
                self._pending.append(signal.SIGTERM)
                continue
            stable = lived >= STABLE_AFTER or not slot.delay
            slot.delay = RESPAWN_MIN if stable else min(slot.delay * 2, RESPAWN_MAX)
            slot.respawn_at = time.monotonic() + slot.delay
            log.error("worker %d (pid %d) exited with code %s after %.1fs; starting it again in %gs",
                      slot.index, pid, code, lived, slot.delay)

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.respawn_at is not None and slot.respawn_at <= now and not self.stopping:
                slot.respawn_at = None
                self._spawn(slot)

    @staticmethod
    def _kill(slot: _Slot, sig: int) -> None:
        if slot.pid > 0:  # (never 0: that would signal the whole process group)
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, sig)

    # -- starting a worker -------------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        if slot.fd >= 0:
            os.close(slot.fd)
            slot.fd, slot.buffer = -1, b""
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        # Signals wait until each side has its own handlers: none is lost in the child's first instants
        # (where it would run the supervisor's handler, on the child's copy of the supervisor).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_fd)
                self._child_setup(parent)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                code = self.worker_main(WorkerInfo(slot.index, self.count, write_fd, slot.served))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                log.exception("worker %d failed", slot.index)
            finally:
                logging.shutdown()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        slot.pid, slot.fd, slot.started, slot.exit_code = pid, read_fd, time.monotonic(), None
        slot.ready = slot.stopped_by_us = False
        slot.drain_timeout = None

    def _child_setup(self, parent: int) -> None:
        """In a new worker (signals still blocked): none of the supervisor's signal plumbing or pipes; a stop
        asked for while it starts is remembered; SIGHUP waits for its loop; it dies with the supervisor."""
        global _stop_requested
        _stop_requested = False
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for sig in _STOP_SIGNALS:
            signal.signal(sig, _request_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (the supervisor sends it only once the worker serves)
        for fd in (self._wake_r, self._wake_w, *(s.fd for s in self.slots if s.fd >= 0)):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl
            raise SystemExit(1)
