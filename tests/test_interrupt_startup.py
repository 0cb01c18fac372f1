"""Ctrl-C before the first step (while Python imports the engine, while the model
loads): exit 130, one line, no traceback, and the outputs of an earlier run untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO

SLOW_LOAD = REPO / "tests" / "helpers" / "slow_load_cli.py"


def _setup(tmp_path, unet_config):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 400
    out = tmp_path / "out"
    cfg["output"] = {"dir": str(out), "name": "run", "plot": False, "save_every": 1}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out.mkdir()
    (out / "run.safetensors").write_bytes(b"an earlier run's file")
    return path, out


def _snapshot(out):
    return {p.relative_to(out): p.read_bytes() if p.is_file() else None
            for p in out.rglob("*")}


def _check(proc, out, before):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    assert _snapshot(out) == before  # nothing new, nothing changed, nothing half-written


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_ctrl_c_while_the_model_loads_is_one_line_and_writes_nothing(tmp_path, unet_config):
    config, out = _setup(tmp_path, unet_config)
    before = _snapshot(out)
    marker = tmp_path / "loading"
    proc = subprocess.Popen([sys.executable, str(SLOW_LOAD), str(marker), "train",
                             str(config)], cwd=tmp_path, env=_env(),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _check(proc, out, before)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_ctrl_c_while_the_engine_is_imported_is_one_line(tmp_path, unet_config, delay):
    """Early enough that no step can have run (importing torch and the engine alone
    takes longer); whatever phase it lands in, the answer is one line."""
    config, out = _setup(tmp_path, unet_config)
    before = _snapshot(out)
    proc = subprocess.Popen([sys.executable, "-m", "loraengine.cli.main", "train",
                             str(config)], cwd=tmp_path, env=_env(),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _check(proc, out, before)
