"""Headless Chromium from a clean profile, driven over the DevTools protocol, so that a
test can click through a page as a person does and read what it renders."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One tab. `open(url)`, `click(text)`, `text()`, `url()`; `wait_for(words)` polls the
    rendered text, since MLflow's pages render after their requests answer."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen(
            [
                CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1600,1000",
                "--remote-debugging-port=0", "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        active = profile / "DevToolsActivePort"  # Chromium writes its port here
        deadline = time.time() + 60
        while not (active.exists() and active.read_text().count("\n") >= 1):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not start")
            time.sleep(0.2)
        port = active.read_text().split()[0]
        tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10))
        page = next(t for t in tabs if t["type"] == "page")
        self.loop = asyncio.new_event_loop()
        self.session = self.loop.run_until_complete(self._session())
        self.ws = self.loop.run_until_complete(
            self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        )
        self.ids = 0

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    async def _call(self, method: str, params: dict) -> dict:
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive(timeout=60)).data)
            if message.get("id") == self.ids:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def call(self, method: str, **params) -> dict:
        return self.loop.run_until_complete(self._call(method, params))

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def url(self) -> str:
        return self.eval("location.href")

    def wait_for(self, *words: str, timeout: float = 60) -> str:
        """The page's text once it holds every one of `words`; fails naming the missing."""
        deadline = time.time() + timeout
        while True:
            text = self.text()
            missing = [w for w in words if w not in text]
            if not missing:
                return text
            if time.time() > deadline:
                raise AssertionError(f"{self.url()} lacks {missing}; it shows: {text[:1500]}")
            time.sleep(0.5)

    def click(self, text: str, tag: str = "a", timeout: float = 30) -> None:
        """Click the innermost `tag` element (any with "*") whose visible text is `text`
        with the mouse, as a person would, once the page shows one."""
        script = f"""(() => {{
            const el = [...document.querySelectorAll({json.dumps(tag)})]
                .findLast(e => (e.innerText || "").trim() === {json.dumps(text)});
            if (!el) return null;
            el.scrollIntoView({{block: "center"}});
            const r = el.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()"""
        deadline = time.time() + timeout
        while (at := self.eval(script)) is None:
            if time.time() > deadline:
                raise AssertionError(f"no <{tag}> reading {text!r} on {self.url()}")
            time.sleep(0.5)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent", type=kind, x=at[0], y=at[1], button="left",
                clickCount=0 if kind == "mouseMoved" else 1,
            )  # fmt: skip

    def press(self, key: str, code: int) -> None:
        """A key pressed and released, as a keyboard sends it to the focused element."""
        for kind, text in (("keyDown", {"Enter": "\r"}.get(key, "")), ("keyUp", "")):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key,
                      windowsVirtualKeyCode=code, text=text)  # fmt: skip

    def local_storage(self) -> dict:
        return self.eval("Object.fromEntries(Object.entries(localStorage))")

    def close(self) -> None:
        if hasattr(self, "ws"):
            self.loop.run_until_complete(self.ws.close())
            self.loop.run_until_complete(self.session.close())
            self.loop.close()
        self.proc.kill()
        self.proc.wait()
