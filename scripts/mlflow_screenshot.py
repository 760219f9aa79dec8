"""Screenshot MLflow's runs table and compare-runs page (the pictures in the README and docs).

Starts a throwaway ``mlflow server`` on 127.0.0.1 over the repository's database, finds the
experiment and its runs through the REST API and, in headless Chromium (driven over the DevTools
protocol with the standard library only):

1. opens the experiment's runs in the model-training view,
   ``#/experiments/<id>/runs?workflowType=machine_learning`` (what the export stage links to),
   with the headline metric columns shown (test_*, best_val_loss, params, latency_ms, train_s,
   co2_g: the UI shows no metric column until one is chosen, so the script chooses them the
   way the UI remembers a choice) and the runs sorted by the first one, best first;
   saves ``--runs-out`` (docs/mlflow_runs.png);
2. opens ``#/compare-runs?runs=[...]&experiments=[...]`` for the newest ``--runs`` runs, tidies
   it (closes the Assistant panel, plots the learning rate against test metrics, shows only the
   params, metrics and tags that differ) and saves ``--out`` (docs/mlflow_compare.png);
   skipped with a note when the experiment has fewer than 2 runs.

From the repository root, after `dvc repro` (both pictures, from ./mlflow.db, into docs/):

    python scripts/mlflow_screenshot.py

Options: ``--tracking-uri sqlite:////abs/path/mlflow.db`` (default: this repository's
mlflow.db), ``--only runs|compare``, ``--runs-out docs/mlflow_runs.png``,
``--out docs/mlflow_compare.png``, ``--experiment visionpipe-classification``, ``--runs 2``,
``--columns 'test_*,best_val_loss,params,latency_ms,train_s,co2_g'`` (default: the task's
headline test metrics, ranking one first, then these),
``--plot-metrics test.accuracy,test.loss``, ``--timeout 90``.

Needs Debian's Chromium (``apt-get install -y chromium``); nothing outside 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1400, 1000
RUNS_WIDTH = 2000  # wide enough for the run, Created, seven metrics, Dataset, Duration, Models


def _headline_tests() -> str:
    """Every task's headline test metrics as logged (test_<name>), each task's ranking one
    first (visionpipe.headline); a pattern when the package is not importable."""
    try:
        from visionpipe.headline import TEST_METRICS
    except ImportError:
        return "test_*"
    return ",".join(f"test_{name}" for names in TEST_METRICS.values() for name in names)


# The runs table's headline columns (logged by visionpipe/tracking/stage_logs.py): names or
# shell-style patterns, kept where the experiment's runs have them, in this order.
COLUMNS = f"{_headline_tests()},best_val_loss,params,latency_ms,train_s,co2_g"
# Where MLflow 3.17's UI remembers an experiment page's state (chosen columns, their order):
# its LocalStorageUtils store "ExperimentPage" keyed by the sorted experiment ids as JSON.
UI_STATE_KEY = "MLflowLocalStorage-1.1-ExperimentPage-%s-ReactComponentState"
# ...and that its Assistant panel is closed (it opens itself on a first visit).
ASSISTANT_CLOSED = {"mlflow.assistant.panelOpen_v1": "false",
                    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}

# True once the page shows every one of these texts (run names, column headers).
SHOWS_JS = """((texts) => {
  const text = document.body ? document.body.innerText : '';
  return texts.every(t => text.includes(t)) && !!document.querySelector('main');
})(%s)"""

# True once the compare page shows every run id and its tables.
READY_JS = """((ids) => {
  const text = document.body ? document.body.innerText : '';
  return ids.every(id => text.includes(id)) && text.includes('Parameters') &&
         text.includes('Metrics') && !!document.querySelector('main');
})(%s)"""

# The metrics table is two virtualized grids (names, values) scrolled in step. Put the row
# named %s first in both; true once both already stood there (so a lagging sync is caught).
SCROLL_METRICS_JS = """((name) => {
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')].slice(-2);
  if (grids.length < 2) return false;
  const row = [...grids[0].querySelectorAll('[style*="top"]')]
    .find(e => e.innerText.trim() === name);
  const top = row ? Math.min(parseFloat(row.style.top),
                             grids[1].scrollHeight - grids[1].clientHeight) : 1e9;
  const done = !!row && grids.every(g => Math.abs(g.scrollTop - top) < 1);
  for (const g of grids) g.scrollTop = top;
  return done;
})(%s)"""

# True when the metric names and their values are scrolled alike (or there is no table).
METRICS_ALIGNED_JS = """(() => {
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')].slice(-2);
  return grids.length < 2 || Math.abs(grids[0].scrollTop - grids[1].scrollTop) < 1;
})()"""

# Where the page's content ends (the app fills the window below it with blank space).
CONTENT_BOTTOM_JS = """Math.ceil(Math.max(...[...document.querySelectorAll('main *')]
  .filter(e => e.childElementCount === 0 && e.getBoundingClientRect().height > 0)
  .map(e => e.getBoundingClientRect().bottom)))"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, ValueError):
            result = None
        if result:
            return result
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def http_json(url: str, body: dict | None = None, timeout: float = 10) -> Any:
    """GET (or POST ``body`` to) a local URL and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


@contextmanager
def process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group; always terminate it (then kill) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            yield proc
        finally:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                if proc.poll() is not None:
                    break
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass


def newest_runs(base: str, experiment: str, count: int) -> tuple[str, list[dict]]:
    """The experiment's id and its ``count`` newest runs, newest first."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        exp = http_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"mlflow_screenshot: no experiment named {experiment!r}") from exc
    found = http_json(f"{base}/api/2.0/mlflow/runs/search",
                      {"experiment_ids": [exp["experiment_id"]], "max_results": count,
                       "order_by": ["attributes.start_time DESC"]})
    runs = found.get("runs", [])
    if not runs:
        raise SystemExit(f"mlflow_screenshot: {experiment!r} has no runs (run the pipeline "
                         "first)")
    return exp["experiment_id"], runs


def runs_url(base: str, experiment_id: str, order_by: str | None) -> str:
    """The experiment's runs table in the model-training view (MLflow 3.17's UI otherwise
    opens in its GenAI view), sorted by ``order_by`` (a column id), highest first."""
    url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if order_by:
        url += "&" + urllib.parse.urlencode({"orderByKey": order_by, "orderByAsc": "false"})
    return url


def headline_columns(runs: list[dict], patterns: list[str]) -> list[str]:
    """The metric names of ``runs`` matching ``patterns``, pattern by pattern."""
    names = sorted({m["key"] for r in runs for m in r["data"].get("metrics", [])})
    chosen: list[str] = []
    for pattern in patterns:
        chosen += [n for n in names if fnmatch.fnmatchcase(n, pattern) and n not in chosen]
    return chosen


def best_run(runs: list[dict], columns: list[str]) -> str:
    """The name of the run the table shows first: highest ``columns[0]``, else the newest."""
    def value(run: dict) -> float:
        found = [m["value"] for m in run["data"].get("metrics", []) if m["key"] == columns[0]]
        return found[0] if found else float("-inf")

    return (max(runs, key=value) if columns else runs[0])["info"]["run_name"]


def metric_column(name: str) -> str:
    """The UI's id of a metric column (makeCanonicalSortKey: metrics.`name`)."""
    return f"metrics.`{name}`"


def compare_url(base: str, run_ids: list[str], experiment_id: str) -> str:
    """MLflow 3's compare-runs page (a hash route of the single-page app), in the
    model-training view like the runs table."""
    runs = urllib.parse.quote(json.dumps(run_ids, separators=(",", ":")))
    exps = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}&workflowType=machine_learning"


class DevTools:
    """The smallest Chrome DevTools Protocol client: one WebSocket, one call at a time."""

    def __init__(self, ws_url: str, timeout: float = 30):
        url = urllib.parse.urlsplit(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("DevTools closed the WebSocket handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the WebSocket: {head[:80]!r}")
        self.last_id = 0

    def _exact(self, size: int) -> bytes:
        """Exactly ``size`` bytes from the socket."""
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the WebSocket")
            data += chunk
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        """Send one masked frame (clients must mask)."""
        size = len(payload)
        head = bytes([0x80 | opcode])
        if size < 126:
            head += bytes([0x80 | size])
        elif size < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", size)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", size)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _receive(self) -> dict:
        """The next JSON message, joining fragments and answering pings."""
        message = b""
        while True:
            first, second = self._exact(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack(">H", self._exact(2))[0]
            elif size == 127:
                size = struct.unpack(">Q", self._exact(8))[0]
            payload = self._exact(size)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return json.loads(message)

    def call(self, method: str, **params: Any) -> dict:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self.last_id += 1
        self._send(0x1, json.dumps({"id": self.last_id, "method": method,
                                    "params": params}).encode())
        while True:
            reply = self._receive()
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        return result.get("result", {}).get("value")

    def click(self, element: str) -> None:
        """Click, with the real mouse, the element a JavaScript expression finds."""
        where = self.evaluate(f"(() => {{ const e = {element}; if (!e) return null; "
                              "e.scrollIntoView({block: 'center'}); "
                              "const r = e.getBoundingClientRect(); "
                              "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not where:
            raise RuntimeError(f"nothing to click: {element}")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=where[0], y=where[1],
                      button="left", clickCount=1)

    def press(self, key: str, code: int) -> None:
        """Press and release one key (Enter 13, Escape 27)."""
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key,
                      windowsVirtualKeyCode=code)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def tidy(tab: DevTools, plot_metrics: list[str]) -> None:
    """Close the Assistant, plot the chosen metrics, show only what differs between runs."""
    tab.evaluate("document.querySelector('button[aria-label=Close]')?.click()")
    metrics = "document.querySelectorAll('.du-bois-light-select')[1]"
    while tab.evaluate(f"!!{metrics}.querySelector('.du-bois-light-select-selection-item')"):
        tab.click(f"{metrics}.querySelector('.du-bois-light-select-selection-item-remove')")
        time.sleep(0.3)
    for name in plot_metrics:
        tab.click(f"{metrics}.querySelector('.du-bois-light-select-selector')")
        time.sleep(0.3)
        tab.call("Input.insertText", text=name)
        time.sleep(0.3)
        tab.press("Enter", 13)
    tab.press("Escape", 27)
    tab.click("document.querySelector('main h2')")  # clicking away drops the select's focus
    for table in ("Parameters", "Metrics", "Tags"):
        tab.evaluate(f"document.querySelector('[aria-label=\"{table} - Show diff only\"]')"
                     "?.click()")


@contextmanager
def browser(workdir: Path, timeout: float) -> Iterator[DevTools]:
    """Headless Chromium with one tab, driven over the DevTools protocol."""
    profile = workdir / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
           "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
           f"--window-size={WIDTH},{HEIGHT}", "about:blank"]
    with process(cmd, workdir / "chromium.log"):
        active = profile / "DevToolsActivePort"
        port = int(wait_for(lambda: active.read_text().split()[0], timeout, "Chromium"))
        page = wait_for(lambda: [t for t in http_json(f"http://127.0.0.1:{port}/json/list")
                                 if t["type"] == "page"], timeout, "a Chromium tab")[0]
        tab = DevTools(page["webSocketDebuggerUrl"], timeout=timeout)
        try:
            yield tab
        finally:
            tab.close()


def capture(tab: DevTools, width: int, height: int) -> bytes:
    """A PNG of the page's content, from the top to where the content ends."""
    bottom = min(tab.evaluate(CONTENT_BOTTOM_JS) + 24, height)
    png = tab.call("Page.captureScreenshot", format="png",
                   clip={"x": 0, "y": 0, "width": width, "height": bottom, "scale": 1})["data"]
    return base64.b64decode(png)


def save(out: Path, png: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    print(f"wrote {out} ({len(png) // 1024} KB)")


def screenshot_runs(tab: DevTools, base: str, experiment_id: str, first_run: str,
                    columns: list[str], rows: int, out: Path, timeout: float) -> None:
    """The experiment's runs table with ``columns`` (metric names) first, best run first."""
    height = min(1000, max(450, 330 + 36 * rows))  # the table's rows, little blank below
    tab.call("Emulation.setDeviceMetricsOverride", width=RUNS_WIDTH, height=height,
             deviceScaleFactor=1, mobile=False)
    # The UI shows the columns its saved page state names: write that state on the app's own
    # origin before the runs page loads, as choosing them under "Columns" would.
    tab.call("Page.navigate", url=f"{base}/")
    wait_for(lambda: tab.evaluate("document.readyState === 'complete'"), timeout, "the app")
    metrics = [metric_column(c) for c in columns]
    state = {"selectedColumns": ["attributes.`Dataset`", "attributes.`Duration`",
                                 "attributes.`Models`", *metrics],
             "columnOrder": metrics}
    saved = {UI_STATE_KEY % json.dumps([experiment_id]): json.dumps(state), **ASSISTANT_CLOSED}
    for key, value in saved.items():
        tab.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
    url = runs_url(base, experiment_id, metrics[0] if metrics else None)
    print(f"runs table\n  {url}")
    tab.call("Page.navigate", url=url)
    wait_for(lambda: tab.evaluate(SHOWS_JS % json.dumps([first_run, "Duration", *columns[:1]])),
             timeout, "the runs table")
    time.sleep(2)
    if not tab.evaluate(SHOWS_JS % json.dumps(columns)):
        print("mlflow_screenshot: warning: not every column fits the picture; widen "
              "RUNS_WIDTH or pass fewer --columns", file=sys.stderr)
    png = tab.call("Page.captureScreenshot", format="png",
                   clip={"x": 0, "y": 0, "width": RUNS_WIDTH, "height": height, "scale": 1})
    save(out, base64.b64decode(png["data"]))


def screenshot_compare(tab: DevTools, url: str, run_ids: list[str], out: Path, timeout: float,
                       plot_metrics: list[str]) -> None:
    """The compare page of ``run_ids``, tidied, as a PNG of all its content."""
    tab.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
             deviceScaleFactor=1, mobile=False)
    tab.call("Page.navigate", url=url)
    ready = READY_JS % json.dumps(run_ids)
    wait_for(lambda: tab.evaluate(ready), timeout, "the compare page to render")
    try:
        tidy(tab, plot_metrics)
    except (RuntimeError, TimeoutError, TypeError) as exc:
        print(f"mlflow_screenshot: warning: could not tidy the page ({exc}); "
              "keeping it as rendered", file=sys.stderr)
    # The app scrolls inside <main>: make the window tall enough to show all of it
    # (the blank space below the content is cropped away).
    height = tab.evaluate("document.querySelector('main').scrollHeight") + 200
    tab.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height,
             deviceScaleFactor=1, mobile=False)
    time.sleep(2)
    if plot_metrics:  # show the plotted metric's rows of the metrics table
        first = json.dumps(plot_metrics[0])
        try:
            wait_for(lambda: tab.evaluate(SCROLL_METRICS_JS % first), 10, first)
        except TimeoutError as exc:
            print(f"mlflow_screenshot: warning: {exc}", file=sys.stderr)
    time.sleep(1)
    if not tab.evaluate(METRICS_ALIGNED_JS):
        raise RuntimeError("metric names and values are scrolled apart")
    save(out, capture(tab, WIDTH, height))


def artifact_root(tracking_uri: str) -> Path:
    """mlartifacts/ next to a sqlite database (the repo's layout), else this repo's."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
    return REPO / "mlartifacts"


def healthy(proc: subprocess.Popen, base: str, log: Path) -> bool:
    """True once the server answers /health; stops everything if the server died."""
    if proc.poll() is not None:
        sys.stderr.write(log.read_text(errors="replace")[-2000:])
        raise SystemExit(f"mlflow_screenshot: mlflow server exited with {proc.returncode}")
    with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
        return resp.status == 200


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, serve MLflow, screenshot the runs table and the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'mlflow.db'}")
    parser.add_argument("--runs-out", type=Path, default=REPO / "docs" / "mlflow_runs.png",
                        help="the runs table's picture")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow_compare.png",
                        help="the compare page's picture")
    parser.add_argument("--only", choices=("runs", "compare"),
                        help="take only this picture (default: both)")
    parser.add_argument("--experiment", default="visionpipe-classification")
    parser.add_argument("--runs", type=int, default=2, help="how many of the newest runs to "
                        "compare")
    parser.add_argument("--columns", default=COLUMNS,
                        help="comma-separated metric names (shell patterns) shown as columns "
                             "of the runs table, the first one sorting it")
    parser.add_argument("--plot-metrics", default="test.accuracy,test.loss",
                        help="comma-separated metrics for the parallel coordinates plot")
    parser.add_argument("--timeout", type=float, default=90, help="seconds for each wait")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"mlflow_screenshot: {CHROMIUM} not found; install Chromium with "
              "`sudo apt-get install -y chromium`", file=sys.stderr)
        return 2
    database = args.tracking_uri.removeprefix("sqlite:///")
    if args.tracking_uri.startswith("sqlite:///") and not Path(database).is_file():
        print(f"mlflow_screenshot: no MLflow database at {database} (run the pipeline first)",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-screenshot-"))
    log = workdir / "mlflow.log"
    server = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
              "--port", str(port), "--workers", "1", "--backend-store-uri", args.tracking_uri,
              "--default-artifact-root", str(artifact_root(args.tracking_uri))]
    try:
        with process(server, log) as proc:
            wait_for(lambda: healthy(proc, base, log), args.timeout, "mlflow server")
            experiment_id, newest = newest_runs(base, args.experiment, max(args.runs, 1000))
            with browser(workdir, args.timeout) as tab:
                if args.only in (None, "runs"):
                    columns = headline_columns(newest, [c.strip() for c in
                                                        args.columns.split(",") if c.strip()])
                    if not columns:
                        print("mlflow_screenshot: warning: the runs have none of the metrics "
                              f"{args.columns}", file=sys.stderr)
                    screenshot_runs(tab, base, experiment_id, best_run(newest, columns),
                                    columns, len(newest), args.runs_out.resolve(), args.timeout)
                if args.only in (None, "compare"):
                    run_ids = [run["info"]["run_id"] for run in newest[:args.runs]]
                    if len(run_ids) < 2:
                        print(f"mlflow_screenshot: {args.experiment!r} has 1 run; comparing "
                              "needs at least 2: no compare picture", file=sys.stderr)
                    else:
                        url = compare_url(base, run_ids, experiment_id)
                        print(f"comparing {', '.join(run_ids)}\n  {url}")
                        screenshot_compare(tab, url, run_ids, args.out.resolve(),
                                           args.timeout,
                                           [m for m in args.plot_metrics.split(",") if m])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
