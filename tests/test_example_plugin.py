"""The example plugin package (examples/plugins/loraengine-example) installs from its
folder like any package, and loraengine then lists it and trains with it from the
command line. The install goes into a temporary folder, so this holds whether or not
the example is also installed in the running environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from safetensors import safe_open

EXAMPLE = REPO / "examples" / "plugins" / "loraengine-example"
PROVIDED = {("adapter", "lora_fa"), ("optimizer", "adabelief"), ("loss", "log_cosh")}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install`` the example into a fresh folder (no network: no build isolation,
    no dependencies — loraengine and setuptools are already here)."""
    target = tmp_path_factory.mktemp("example_site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MPLBACKEND"] = "Agg"
    return env


def _cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # What the ``loraengine`` console script runs, without depending on where it lives.
    launcher = "import sys; from loraengine.cli.main import main; sys.argv[0] = 'loraengine'; main()"
    return subprocess.run([sys.executable, "-c", launcher, *args],
                          capture_output=True, text=True, env=_env(site), timeout=600,
                          cwd=str(REPO))


def test_install_writes_the_entry_point(installed):
    dist_infos = list(installed.glob("loraengine_example-*.dist-info"))
    assert len(dist_infos) == 1
    entry_points = (dist_infos[0] / "entry_points.txt").read_text()
    assert "[loraengine]" in entry_points
    assert "loraengine_example = loraengine_example" in entry_points
    assert (installed / "loraengine_example" / "adapter.py").exists()


def test_installed_plugin_appears_in_loraengine_plugins(installed):
    proc = _cli(installed, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    records = {(r["category"], r["name"]): r for r in json.loads(proc.stdout)}
    for key in PROVIDED:
        assert records[key]["distribution"] == "loraengine-example", records.get(key)
        assert records[key]["plugin"] == "loraengine_example"
        assert records[key]["version"] == "0.1.0"


def test_installed_plugin_trains_through_loraengine_train(installed, tmp_path):
    proc = _cli(installed, "train", str(EXAMPLE / "example.yaml"),
                "--set", "training.steps=2", "--set", f"output.dir={tmp_path}",
                "--set", "output.plot=false", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lora = tmp_path / "example_lora_fa.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["loraengine.algorithm"] == "lora_fa"
    config = json.loads(meta["loraengine.config"])
    assert config["optimizer"]["name"] == "adabelief"
    assert config["loss"]["name"] == "log_cosh"
    assert any(k.endswith(".lora_down.weight") for k in keys)
    losses = json.loads((tmp_path / "example_lora_fa.loss.json").read_text())["loss"]
    assert len(losses) == 2


def test_example_tests_use_the_conformance_suites():
    """The example's own tests (run in CI) go through the public suites."""
    text = "\n".join(p.read_text() for p in (EXAMPLE / "tests").glob("test_*.py"))
    for suite in ("loraengine.testing.conformance", "loraengine.testing.optimizer_conformance",
                  "loraengine.testing.loss_conformance"):
        assert f"from {suite} import" in text, suite
