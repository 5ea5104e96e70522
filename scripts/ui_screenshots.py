"""Screenshots of a study in the MLflow UI for the README, taken in headless Chromium from a
clean profile (no banner, no pop-up), driven over the DevTools protocol on a pipe.

Run (with `make ui`, or `mlflow ui --backend-store-uri ...`, serving the study):
    .venv/bin/python scripts/ui_screenshots.py STUDY [--ui http://127.0.0.1:5000] [--out docs]
Writes docs/ui-runs.png, ui-run-curves.png, ui-report.png and ui-cells-compared.png (the
report's test-accuracy figure as MLflow shows it: its own bar charts start at 0), and
prints the first words of each page so that what it shows is checked, not assumed.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from mnist_study.tracking.names import VIEW_TAG, ui_link

WIDTH, HEIGHT = 1600, 1000


class Browser:
    """Chromium with --remote-debugging-pipe: commands on fd 3, answers on fd 4, each a
    JSON message ending in a NUL byte."""

    def __init__(self) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        child_r, self.write_fd = os.pipe()
        self.read_fd, child_w = os.pipe()
        # The child's ends above the low numbers, so that moving them to 3 and 4 in the
        # child cannot overwrite one with the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 20) for fd in (child_r, child_w)]
        os.close(child_r), os.close(child_w)

        def to_3_and_4() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile}", f"--window-size={WIDTH},{HEIGHT}",
             "--hide-scrollbars", "about:blank"],
            pass_fds=(3, 4), preexec_fn=to_3_and_4,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for fd in high:
            os.close(fd)
        self.next_id, self.buffer = 0, b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True, width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip

    def call(self, method: str, session: bool = False, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                self.buffer += os.read(self.read_fd, 1 << 20)
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           awaitPromise=True, returnByValue=True)  # fmt: skip
        return result.get("result", {}).get("value")

    def open(self, url: str, settle_s: float = 8) -> str:
        self.call("Page.navigate", session=True, url=url)
        time.sleep(settle_s)  # the UI renders after its API calls answer
        self.js(CLOSE_ASSISTANT)
        time.sleep(1)
        return self.js("document.body.innerText") or ""

    def shot(self, path: Path) -> None:
        png = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(png))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# MLflow 3.17 opens its Assistant panel beside every page; its Close button shuts it.
CLOSE_ASSISTANT = """(() => {
  const close = document.querySelector('button[aria-label="Close"]');
  if (close) close.click();
  return Boolean(close);
})()"""

SCROLL_TO = """(() => {{
  const want = {text!r};
  const hit = [...document.querySelectorAll('span, div, h2, h3')]
    .find(e => e.innerText && e.innerText.trim().startsWith(want) && e.children.length < 3);
  if (!hit) return 'no ' + want;
  hit.scrollIntoView({{block: 'start'}}); return 'scrolled to ' + want;
}})()"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study")
    parser.add_argument("--ui", default="http://127.0.0.1:5000")
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.study)
    final = client.search_runs([exp.experiment_id], "tags.role = 'final'", max_results=1)[0]
    report = client.search_runs([exp.experiment_id], "tags.role = 'report'", max_results=1)
    runs = ui_link(exp.experiment_id, ui=args.ui, view=VIEW_TAG in exp.tags)  # as `make ui` prints
    browser = Browser()
    try:
        pages = [
            ("ui-runs.png", runs, None),
            (
                "ui-run-curves.png",
                ui_link(exp.experiment_id, f"runs/{final.info.run_id}/model-metrics", args.ui),
                None,
            ),
        ]
        if report:
            run_page = ui_link(exp.experiment_id, f"runs/{report[0].info.run_id}", args.ui)
            figure = ui_link(
                exp.experiment_id, f"runs/{report[0].info.run_id}/artifacts/test_acc.png", args.ui
            )
            pages += [("ui-report.png", run_page, None), ("ui-cells-compared.png", figure, None)]
        for name, url, scroll in pages:
            text = browser.open(url)
            if scroll:
                print("  ", browser.js(SCROLL_TO.format(text=scroll)))
                time.sleep(2)
            browser.shot(args.out / name)
            print(f"{args.out / name}: {url}\n   shows: {' '.join(text.split())[:300]}")
    finally:
        browser.close()


if __name__ == "__main__":
    main()
