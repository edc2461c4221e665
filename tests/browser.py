"""Headless Debian chromium driven over its DevTools protocol (a websocket), for the page tests and
bench/screenshot_report.py: open a file, read what the console reported, evaluate JavaScript, take
a screenshot."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import websocket

CHROMIUM_PACKAGE = "chromium"  # the Debian package
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0",
)


def find_chromium() -> str | None:
    """Debian's chromium, on PATH or where the package puts it."""
    return shutil.which("chromium") or shutil.which("chromium", path="/usr/bin")


class Chromium:
    """One headless chromium with a fresh profile and one tab; `close()` (or `contextlib.closing`)
    stops it with every process it started."""

    def __init__(self, executable: str, width: int = 1280, height: int = 900, timeout: float = 30):
        self.executable, self.timeout = executable, timeout
        self.console_errors: list[str] = []
        self._ids = itertools.count(1)
        self._events: set[str] = set()  # the events seen since the last `open`
        self._socket = None
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True)
        self._process = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            self._socket = websocket.create_connection(self._browser_endpoint(), timeout=self.timeout, suppress_origin=True)
            target = self._call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self._call(f"{domain}.enable", session=True)
        except BaseException:
            self.close()
            raise

    def open(self, url: str) -> None:
        """Loads `url` and waits for its load event (every image loaded or failed)."""
        self.console_errors.clear()
        self._events.clear()
        navigation = self._call("Page.navigate", session=True, url=url)
        if "errorText" in navigation:
            raise RuntimeError(f"cannot open {url}: {navigation['errorText']}")
        while "Page.loadEventFired" not in self._events:
            self._receive()

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page."""
        result = self._call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot_png(self) -> bytes:
        """The whole page, not only the window."""
        size = self._call("Page.getLayoutMetrics", session=True)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = self._call("Page.captureScreenshot", session=True, format="png", clip=clip, captureBeyondViewport=True)["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        try:
            os.killpg(self._process.pid, signal.SIGTERM)  # the browser and the helpers it started
        except ProcessLookupError:
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._profile.cleanup()

    def _browser_endpoint(self) -> str:
        """The browser's websocket, from the port file chromium writes into its profile."""
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.executable} did not open its DevTools port (exit code {self._process.poll()})")
            time.sleep(0.05)
        port, path = port_file.read_text().split()
        return f"ws://127.0.0.1:{port}{path}"

    def _call(self, method: str, session: bool = False, **params) -> dict:
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        self._socket.send(json.dumps(message))
        while True:
            reply = self._receive()
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _receive(self) -> dict:
        """The next message, noting events and the console's errors on the way."""
        message = json.loads(self._socket.recv())
        method, params = message.get("method"), message.get("params", {})
        if method is not None:
            self._events.add(method)
        if method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.console_errors.append(f"{entry['text']} ({entry.get('url', '')})")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.console_errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(params["exceptionDetails"]["text"])
        return message
