"""Make docs/monitor.png: the `loraengine monitor` page of the quickstart run, as
headless Chromium (Playwright) renders it.

    python docs/make_monitor_screenshot.py [--chromium /usr/bin/chromium]

Trains examples/quickstart.yaml on the shipped tiny pipeline (``family: sd15``, so the
preview grids are decoded by the pipeline's own VAE into 128×128 images; with the
example's ``family: diffusers`` the UNet is loaded alone and the grids would show raw
latents), with its latents as a validation set and preview grids every 15 steps, into a
temporary folder, serves the page for that run's event stream cut
after step 45 of 60 (the page as it looks while the run goes on: progress, rate, ETA)
and saves the screenshot. About a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml

import loraengine
from loraengine.tools.monitor.logic import Serving

REPO = Path(__file__).resolve().parents[1]
CUT_AFTER = 45


def train_quickstart(out: Path) -> Path:
    example = REPO / "examples" / "quickstart.yaml"
    cfg = yaml.safe_load(example.read_text())
    here = example.parent
    cfg["model"]["path"] = str(here / cfg["model"]["path"])
    cfg["model"]["family"] = "sd15"  # the whole pipeline: previews decoded by its VAE
    for key in ("latents", "conditioning"):
        cfg["data"][key] = str(here / cfg["data"][key])
    cfg["data"]["validation"] = {"latents": cfg["data"]["latents"],
                                 "conditioning": cfg["data"]["conditioning"]}
    cfg["validation"] = {"every": 5}
    cfg["training"]["threads"] = 1
    cfg["output"].update(dir=str(out), samples={"every": 15, "steps": 10, "count": 4,
                                                "per_prompt": 2, "compare": False})
    loraengine.train(cfg)
    return out / f"{cfg['output']['name']}.events.jsonl"


def partial_stream(events: Path, step: int) -> Path:
    """The stream as it stood when ``step`` had just been logged."""
    lines = events.read_text().splitlines(keepends=True)
    keep: list[str] = []
    for line in lines:
        if f'"step": {step + 1},' in line:
            break
        keep.append(line)
    live = events.with_name("live.events.jsonl")
    live.write_text("".join(keep))
    return live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "monitor.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        live = partial_stream(train_quickstart(Path(tmp) / "run"), CUT_AFTER)
        with Serving(live) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.goto(url)
            page.wait_for_selector(f"#loss-chart polyline.loss[data-count='{CUT_AFTER}']")
            page.wait_for_function("document.getElementById('sample').naturalWidth > 0")
            time.sleep(0.5)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
