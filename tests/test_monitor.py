"""`loraengine monitor`: the server's answers (in-process, starlette's test client) and
the page itself in a real headless Chromium (Playwright), both fed by the event stream
of a real training run."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import loraengine
from loraengine.cli.main import cli
from loraengine.testing.models import save_tiny_unet_data, tiny_unet_train_config
from loraengine.tools.monitor.logic import STATIC, Serving, make_app, read_events


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_unet_dir) -> Path:
    """A finished 6-step run with validation and preview grids every 3 steps."""
    root = tmp_path_factory.mktemp("monitor_run")
    data = save_tiny_unet_data(root)
    cfg = tiny_unet_train_config(tiny_unet_dir, data, {
        "training": {"steps": 6},
        "data": {"validation": {"latents": str(data[0]), "conditioning": str(data[1])}},
        "validation": {"every": 3},
        "output": {"dir": str(root / "out"), "name": "test", "plot": False,
                   "samples": {"every": 3, "steps": 2, "count": 2}}})
    loraengine.train(cfg)
    return root / "out"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def client(run_dir):
    from starlette.testclient import TestClient

    with TestClient(make_app(run_dir / "test.events.jsonl")) as c:
        yield c


# -- the server ---------------------------------------------------------------------------

def test_the_events_endpoint_returns_the_stream_parsed_and_continues_from_an_offset(
        client, run_dir):
    stream = run_dir / "test.events.jsonl"
    body = client.get("/api/events").json()
    assert body["events"] == _lines(stream) and body["exists"] and not body["reset"]
    assert body["next"] == stream.stat().st_size and body["file"] == "test.events.jsonl"
    steps = [e for e in body["events"] if e["event"] == "step"]
    loss = json.loads((run_dir / "test.loss.json").read_text())
    assert [e["loss"] for e in steps] == loss["loss"]
    assert [e["val_loss"] for e in steps if "val_loss" in e] == loss["val_loss"]
    # from the end: nothing new
    again = client.get(f"/api/events?since={body['next']}").json()
    assert again["events"] == [] and again["next"] == body["next"]
    assert client.get("/api/events?since=x").status_code == 400


def test_a_line_being_written_waits_and_a_rewritten_file_starts_over(tmp_path):
    from starlette.testclient import TestClient

    stream = tmp_path / "r.events.jsonl"
    stream.write_text('{"event": "step", "step": 1, "loss": 0.5}\n{"event": "st')
    first = read_events(stream)
    assert [e["step"] for e in first.events] == [1]
    with stream.open("a") as fh:
        fh.write('ep", "step": 2, "loss": 0.25}\nnot json\n')
    second = read_events(stream, first.next_offset)
    assert [e["step"] for e in second.events] == [2] and not second.reset
    stream.write_text('{"event": "train_start", "total_steps": 3}\n')  # a new run
    third = read_events(stream, second.next_offset)
    assert third.reset and third.offset == 0 and third.events[0]["total_steps"] == 3
    with TestClient(make_app(tmp_path / "later.events.jsonl")) as c:  # not written yet
        assert c.get("/api/events").json() | {"file": None} == {
            "events": [], "offset": 0, "next": 0, "reset": False, "exists": False, "file": None}


def test_the_page_and_its_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="loss-chart"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        res = client.get(f"/static/{name}")
        assert res.status_code == 200 and kind in res.headers["content-type"]
        assert res.text == (STATIC / name).read_text()
    # nothing is fetched from another host: the only absolute URL is SVG's namespace
    for path in STATIC.iterdir():
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)


def test_preview_grids_are_served_and_nothing_else(client, run_dir, tmp_path):
    grid = run_dir / "test.samples" / "step_6.png"
    res = client.get("/api/file", params={"path": str(grid)})
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    assert res.content == grid.read_bytes()
    outside = tmp_path / "outside.png"
    outside.write_bytes(grid.read_bytes())
    for path in (str(outside), str(run_dir / "test.safetensors"),
                 str(run_dir / "test.samples" / ".." / ".." / outside.name), "/etc/passwd"):
        assert client.get("/api/file", params={"path": path}).status_code == 404, path


def _one_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_an_unknown_run_dir_is_one_line_and_exit_2(tmp_path):
    line = _one_error(CliRunner().invoke(cli, ["monitor", str(tmp_path / "nope")]))
    assert "RUN_DIR" in line and "nope" in line
    line = _one_error(CliRunner().invoke(cli, ["monitor", str(tmp_path)]))
    assert "no *.events.jsonl" in line and str(tmp_path) in line


# -- the page in a browser ----------------------------------------------------------------

def _browser():
    """Playwright's Chromium launcher on the system's chromium, or a skip (a failure
    with LORAENGINE_REQUIRE_BROWSER=1)."""
    required = os.environ.get("LORAENGINE_REQUIRE_BROWSER") == "1"
    exe = os.environ.get("LORAENGINE_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install playwright)"
    if reason is None and exe is None:
        reason = "no chromium executable (apt-get install chromium)"
    if reason is not None:
        if required:
            pytest.fail(f"LORAENGINE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return exe


def _curve(page, cls):
    """The chart polyline's points as (x, y) pixel pairs."""
    points = page.get_attribute(f"#loss-chart polyline.{cls}", "points")
    return [tuple(map(float, p.split(","))) for p in points.split()]


@pytest.mark.slow
def test_the_page_draws_the_curve_and_follows_the_stream_in_chromium(run_dir, tmp_path):
    exe = _browser()
    from playwright.sync_api import sync_playwright

    events = (run_dir / "test.events.jsonl").read_text().splitlines(keepends=True)
    steps = [json.loads(line) for line in events if '"event": "step"' in line]
    # the stream up to step 4, then the rest as the run would have written it
    cut = next(i for i, line in enumerate(events) if '"step": 5' in line)
    live = run_dir / "live.events.jsonl"
    live.write_text("".join(events[:cut]))
    with Serving(live) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            page.wait_for_selector("#loss-chart polyline.loss[data-count='4']", timeout=20000)
            assert page.inner_text("#status") == "running"
            assert page.inner_text("#progress") == "step 4 / 6"
            # the drawn points follow the loss: a higher loss is higher on the page
            ys = [y for _, y in _curve(page, "loss")]
            losses = [s["loss"] for s in steps[:4]]
            assert sorted(range(4), key=lambda i: -ys[i]) == sorted(range(4),
                                                                    key=lambda i: losses[i])
            with live.open("a") as fh:
                fh.write("".join(events[cut:]))
            page.wait_for_selector("#loss-chart polyline.loss[data-count='6']", timeout=20000)
            page.wait_for_function("document.getElementById('status').textContent"
                                   " === 'finished'", timeout=20000)
            xs = [x for x, _ in _curve(page, "loss")]
            assert xs == sorted(xs) and len(set(xs)) == 6
            assert page.get_attribute("#loss-chart polyline.val", "data-count") == "2"
            assert page.get_attribute("#lr-chart polyline.lr", "data-count") == "6"
            assert page.inner_text("#progress") == "step 6 / 6"
            # the newest preview grid, loaded from the server
            page.wait_for_function("document.getElementById('sample').naturalWidth > 0",
                                   timeout=20000)
            src = page.get_attribute("#sample", "src")
            assert "compare.png" in src or "step_6.png" in src
            assert '"steps": 6' in page.text_content("#config")
            # the same name trained again appends a new run: the page shows that one
            with live.open("a") as fh:
                fh.write("".join(events[:next(i for i, line in enumerate(events)
                                               if '"step": 3' in line)]))
            page.wait_for_selector("#loss-chart polyline.loss[data-count='2']", timeout=20000)
            assert page.inner_text("#status") == "running"
            assert page.get_attribute("#sample", "hidden") is not None
        finally:
            browser.close()


def test_a_port_in_use_is_one_line_and_exit_2(run_dir):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        line = _one_error(CliRunner().invoke(cli, ["monitor", str(run_dir), "--port",
                                                   str(port)]))
    assert f"127.0.0.1:{port}" in line and "--port" in line
