"""A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe`, for driving headless Chromium.

`chromium --dump-dom` snapshots a page at its load event, before a live page has fetched anything, and
`--virtual-time-budget` never ends while an EventSource is open. So the status page test drives one page
over CDP instead: the browser reads commands on fd 3 and writes replies and events on fd 4, each a JSON
message ended by NUL (no websocket needed).

    async with Chromium(binary, tmp_path) as browser:
        page = await browser.open("http://127.0.0.1:9090/")
        leader = await page.evaluate("document.querySelector('.leader').dataset.leader")
        png = await page.screenshot()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
)


class CDPError(Exception):
    pass


class _Pipe(asyncio.Protocol):
    def __init__(self, browser: Chromium) -> None:
        self.browser = browser
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\0")) >= 0:
            msg = json.loads(self.buf[:end])
            del self.buf[: end + 1]
            self.browser._dispatch(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.browser._lost(exc)


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Poll `expression` until it is truthy; its value. AssertionError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        value: Any = None
        while loop.time() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"page: {expression} still {value!r} after {timeout}s")

    async def screenshot(self, width: int = 1280) -> bytes:
        """A PNG of the whole page at `width` CSS pixels."""
        metrics = await self.send("Page.getLayoutMetrics")
        height = int(metrics["cssContentSize"]["height"]) + 1
        await self.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(shot["data"])

    async def html(self) -> str:
        value = await self.evaluate("document.documentElement.outerHTML")
        return str(value)


class Chromium:
    """A headless Chromium process driven over its debugging pipe (see the module doc)."""

    def __init__(self, binary: str, workdir: Path, width: int = 1280, height: int = 1000) -> None:
        self.binary = binary
        self.workdir = workdir
        self.size = (width, height)
        self.proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._reader: asyncio.ReadTransport | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 1
        self._log: Any = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        args = [*FLAGS, f"--user-data-dir={profile}", f"--window-size={self.size[0]},{self.size[1]}",
                "--remote-debugging-pipe", "about:blank"]
        # The browser wants the pipe on fds 3 and 4: a tiny Python trampoline moves them there and execs it.
        trampoline = (f"import fcntl, os, sys; a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in "
                      f"({cmd_r}, {res_w})); os.dup2(a, 3); os.dup2(b, 4); "
                      "os.execv(sys.argv[1], sys.argv[1:])")
        self._log = open(self.workdir / "chromium.log", "wb")  # closed in close()
        self.proc = subprocess.Popen([sys.executable, "-c", trampoline, self.binary, *args],
                                     pass_fds=(cmd_r, res_w), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log)
        os.close(cmd_r)
        os.close(res_w)
        commands, replies = os.fdopen(cmd_w, "wb", buffering=0), os.fdopen(res_r, "rb", buffering=0)
        self._writer, _ = await loop.connect_write_pipe(asyncio.Protocol, commands)
        self._reader, _ = await loop.connect_read_pipe(lambda: _Pipe(self), replies)

    async def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
                   timeout: float = 15.0) -> dict[str, Any]:
        assert self._writer is not None, "not started"
        msg_id = self._next
        self._next += 1
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        self._writer.write(json.dumps(msg).encode() + b"\0")
        async with asyncio.timeout(timeout):
            return await fut

    def _dispatch(self, msg: dict[str, Any]) -> None:
        fut = self._pending.pop(msg.get("id", -1), None)
        if fut is None or fut.done():
            return  # an event: nothing here subscribes to any
        if "error" in msg:
            fut.set_exception(CDPError(str(msg["error"])))
        else:
            fut.set_result(msg.get("result", {}))

    def _lost(self, exc: Exception | None) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError(f"browser pipe closed: {exc}"))
        self._pending.clear()

    async def open(self, url: str) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Page.navigate", {"url": url})
        await page.wait_for("document.readyState === 'complete'")
        return page

    async def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(CDPError, TimeoutError, AssertionError):
            await self.send("Browser.close", timeout=5.0)
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 10.0)
        except TimeoutError:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        for transport in (self._writer, self._reader):
            if transport is not None:
                transport.close()
        self._log.close()
        self.proc = None

    async def __aenter__(self) -> Chromium:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
