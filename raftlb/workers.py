"""`workers: N`: N raftlb processes on one machine, for more than one core.

Each worker is a whole raftlb: its own subscriptions, leader table, pools and admin listener. They bind the
same listener ports with SO_REUSEPORT, so the kernel spreads new client connections across them; worker i
serves the admin API on admin port + i. Fenced reads stay consistent across workers for the same reason they
do across replicas (the client carries its index); a Raft session's writes are ordered by the worker that
receives them, so a session's requests must share a connection (as across replicas).

The supervisor (the `raftlb run` process) forks the workers before any event loop or thread exists and then
only watches them:
- a worker that stops after it was serving is started again (0.5 s, doubling while it keeps dying soon
  after its start, up to 10 s); one that fails before it serves, at the first start, stops all: exit 1;
- SIGTERM/SIGINT: passed to every worker, which drains as a single raftlb does; exit 0 when all exited 0;
  a worker still running `drain_timeout` + 10 s later is killed;
- SIGHUP: passed to every worker (each re-reads the config file); `POST /v1/reload` on one worker's admin
  reloads that worker and then asks the supervisor to send SIGHUP to the others.

Each worker tells the supervisor over its own pipe: `R` once its listeners are bound, `H` to reload the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("raftlb.workers")

RESPAWN_MIN = 0.5
RESPAWN_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that ran this long before it stopped is restarted at RESPAWN_MIN again
KILL_AFTER_DRAIN = 10.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker process knows of its place: `index` of `count`, and its pipe to the supervisor."""

    index: int
    count: int
    notify_fd: int
    restarted: bool = False  # a run after one that served (it re-reads the config file)

    def tell(self, what: bytes) -> None:
        with contextlib.suppress(OSError):  # (the supervisor is gone: the worker is stopping anyway)
            os.write(self.notify_fd, what)

    def ready(self) -> None:
        self.tell(b"R")

    def reload_others(self) -> None:
        self.tell(b"H")


@dataclass
class _Slot:
    index: int
    pid: int = 0
    fd: int = -1  # the read end of the worker's pipe
    started: float = 0.0
    ready: bool = False  # this run of the worker has bound its listeners
    served: bool = False  # some run of it has (one that fails at its first start stops raftlb)
    delay: float = 0.0  # the last wait before a restart (0: none since it last ran STABLE_AFTER)
    respawn_at: float | None = None
    exit_code: int | None = None


WorkerMain = Callable[[WorkerInfo], int]


class Supervisor:
    """Starts `count` workers running `worker_main` and keeps them running until told to stop."""

    def __init__(self, count: int, worker_main: WorkerMain, drain_timeout: float,
                 kill_after: float = KILL_AFTER_DRAIN) -> None:
        self.count = count
        self.worker_main = worker_main
        self.drain_timeout = drain_timeout
        self.kill_after = kill_after  # past the drain timeout, before a worker still running is killed
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping = False
        self.stop_deadline = 0.0
        self.failed = False
        self._pending: list[int] = []  # signals received, in order
        self._wake_r, self._wake_w = -1, -1

    # -- the supervisor's loop ------------------------------------------------------------------------------

    def run(self) -> int:
        self._wake_r, self._wake_w = os.pipe()
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
        bad = [s for s in self.slots if s.exit_code not in (0, None)]
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
        """What the worker said over its pipe: R (serving), H (reload the others); EOF once it exited."""
        if slot.fd < 0:
            return
        try:
            data = os.read(slot.fd, 512)
        except BlockingIOError:
            return
        if not data:
            os.close(slot.fd)
            slot.fd = -1
            return
        if b"R" in data and not slot.ready:
            slot.ready = slot.served = True
            log.info("worker %d (pid %d) serving", slot.index, slot.pid)
        if b"H" in data and not self.stopping:
            others = [s for s in self.slots if s is not slot and s.pid and s.ready]
            log.info("worker %d reloaded through its admin API: reloading the other %d", slot.index,
                     len(others))
            for other in others:
                self._kill(other, signal.SIGHUP)

    def _handle_signals(self) -> None:
        pending, self._pending = self._pending, []
        for sig in pending:
            if sig in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    log.info("stopping: %d workers drain (up to %gs)", self.count, self.drain_timeout)
                    self.stopping = True
                    self.stop_deadline = time.monotonic() + self.drain_timeout + self.kill_after
                for slot in self.slots:
                    slot.respawn_at = None
                    if slot.pid:
                        self._kill(slot, signal.SIGTERM)
            elif sig == signal.SIGHUP and not self.stopping:
                # (a worker still starting reads the file as it starts)
                log.info("SIGHUP: reloading %d workers", sum(1 for s in self.slots if s.pid and s.ready))
                for slot in self.slots:
                    if slot.pid and slot.ready:
                        self._kill(slot, signal.SIGHUP)

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
            self._read(slot)  # (an R it wrote just before it died)
            code = os.waitstatus_to_exitcode(status)
            slot.pid, slot.exit_code = 0, code
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
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.pid, sig)

    # -- starting a worker -------------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        if slot.fd >= 0:
            os.close(slot.fd)
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_fd)
                self._child_setup(parent)
                code = self.worker_main(WorkerInfo(slot.index, self.count, write_fd, slot.served))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", slot.index)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        slot.pid, slot.fd, slot.started, slot.exit_code = pid, read_fd, time.monotonic(), None
        slot.ready = False

    def _child_setup(self, parent: int) -> None:
        """In a new worker: none of the supervisor's signal plumbing or pipes; die with the supervisor."""
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop takes it: not fatal meanwhile
        for fd in (self._wake_r, self._wake_w, *(s.fd for s in self.slots if s.fd >= 0)):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died between fork and prctl
            raise SystemExit(1)
