"""Warnings about input that can come in floods (bad announcements, lying nodes): once a burst, not a line
per event."""

from __future__ import annotations

import logging
import time
from typing import Any

LOG_INTERVAL = 5.0  # at most one warning per key in this window


class BurstLog:
    """Logs at WARNING at most once per `interval` per key, saying how many were held back meanwhile."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (last warning, warnings held back since)

    def warning(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        """`msg % (*args, more)`: `msg` must end with a `%s` for the held-back count (empty when none)."""
        now = time.monotonic()
        last, held = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self._seen[key] = (last, held + 1)
            return
        self._seen[key] = (now, 0)
        more = f" (and {held} more in {now - last:.0f}s)" if held else ""
        self.logger.warning(msg, *args, more, exc_info=exc_info)
