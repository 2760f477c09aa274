"""The event loop the commands run on: uvloop when it is installed, asyncio's own otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run `main()` to completion on uvloop when it is installed; its exit status."""
    try:
        # Optional dependency (not on Windows): imported where it is used, so its absence is caught here.
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    except ImportError:
        return asyncio.run(main())
