"""The report page in headless Chromium (Debian's `chromium`, which `make test` installs as root): it renders,
every image loads, nothing is logged as an error, the tables sort, and a screenshot is kept for inspection
under reports/test-screenshots/."""

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from normbench.report import render_report
from test_report import write_tables

websocket = pytest.importorskip("websocket")
CHROMIUM = shutil.which("chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "reports" / "test-screenshots"
# The flags that keep a headless Chromium off the network: this machine has none.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0"]


class DevTools:
    """A page of a Chromium instance driven over the DevTools protocol; events are kept in `events`."""

    def __init__(self, socket_url: str) -> None:
        self.socket = websocket.create_connection(socket_url, timeout=60)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == call_id:
                assert "error" not in message, message
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(json.loads(self.socket.recv()))


@pytest.fixture
def page():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it as root)")
    # Chromium's helper processes outlive its main one and keep writing the profile: they run in a session of
    # their own, ended as a group.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text().strip():
                assert time.monotonic() < deadline and browser.poll() is None, "chromium did not start"
                time.sleep(0.2)
            port = port_file.read_text().split()[0]
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
            devtools = DevTools(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
            yield devtools
            devtools.socket.close()
        finally:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()


def natural_key(text: str) -> list:
    """The page's natural order: the numbers inside a text compare as numbers."""
    return [(0, float(piece), "") if piece[0].isdigit() else (1, 0.0, piece)
            for piece in re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?|\D+", text, re.IGNORECASE)]


def test_report_renders_in_chromium_with_every_image_and_no_errors(page, tmp_path):
    write_tables(tmp_path)
    out = tmp_path / "report.html"
    config = {"studies": {"lr": {"description": "A <b>study</b>", "report": {"target_acc": 0.5, "stable_acc": 0.5},
                                 "claims": ["C3"]}}}
    render_report(tmp_path, config, out, tmp_path / "figures")

    for domain in ("Page", "Runtime", "Log"):
        page.call(f"{domain}.enable")
    page.call("Emulation.setDeviceMetricsOverride", width=1200, height=900, deviceScaleFactor=1, mobile=False)
    page.call("Page.navigate", url=out.as_uri())
    page.wait_for("Page.loadEventFired")

    def evaluate(expression: str):
        return page.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"]["value"]

    images = evaluate("[...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(images) == 3 and all(complete and width > 0 for complete, width in images)
    assert evaluate("document.querySelector('#claims tbody tr').textContent").count("C1") == 1
    assert evaluate("document.querySelectorAll('#claims tbody tr').length") == 17  # C1..C16, C2 in two rows
    # Clicking the first header of a cell table sorts its rows by that column, descending on a second click.
    order = ("(() => { const t = document.querySelector('#study-lr table.sortable'); t.tHead.rows[0].cells[0].click();"
             " t.tHead.rows[0].cells[0].click(); return [...t.tBodies[0].rows].map(r => r.cells[0].textContent); })()")
    cells = evaluate(order)
    assert cells == sorted(cells, key=natural_key, reverse=True) and len(cells) == 12
    assert cells.index("norm~none/lr~0.1/seed~1") < cells.index("norm~none/lr~0.01/seed~1")  # 0.1 > 0.01

    errors = [e for e in page.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []

    size = page.call("Page.getLayoutMetrics")["cssContentSize"]
    shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                     clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (SCREENSHOTS / "report.png").write_bytes(png)


def test_the_comparison_page_renders_in_chromium_and_flags_what_differs(page, tmp_path):
    from test_compare import finished_run

    from normbench.report.compare import render_compare

    out = tmp_path / "compare.html"
    render_compare([finished_run("cpu", "supported", 0.01, 0.01), finished_run("gpu", "inconclusive", 0.02, 0.01, 1)],
                   out)
    for domain in ("Page", "Runtime", "Log"):
        page.call(f"{domain}.enable")
    page.call("Page.navigate", url=out.as_uri())
    page.wait_for("Page.loadEventFired")

    def evaluate(expression: str):
        return page.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"]["value"]

    assert evaluate("document.querySelectorAll('#claims tr.differs').length") == 2  # C6, in both runs' rows
    assert evaluate("document.querySelectorAll('#cells tbody tr').length") == 2
    assert evaluate("[...document.querySelectorAll('#cells .flag')].map(f => f.textContent)") == ["slower", "slower"]
    sort = ("(() => { const t = document.querySelector('#cells table.sortable'); t.tHead.rows[0].cells[1].click();"
            " t.tHead.rows[0].cells[1].click(); return [...t.tBodies[0].rows].map(r => r.cells[1].textContent); })()")
    assert evaluate(sort) == ["norm~gn", "norm~bn"]
    errors = [e for e in page.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
