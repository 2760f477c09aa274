"""A child process's output, read line by line on a thread, waited on with a bound."""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Iterable


class Output:
    """A process's output (its stdout as text), line by line, from a thread."""

    def __init__(self, stream: Iterable[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []

        def pump() -> None:
            for line in stream:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def until(self, pattern: str, timeout: float) -> tuple[re.Match[str], list[str]]:
        """Lines up to the first matching `pattern` (which is returned with them)."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m, got
            got.append(line)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n" +
                             "\n".join(self.seen[-60:]))

    def wait(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line matching `pattern` (the lines before it are skipped)."""
        return self.until(pattern, timeout)[0]
