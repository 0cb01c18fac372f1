"""Training you can trust: exact resume after a crash, corrupt checkpoints, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.train import checkpoints as ckpt
from loraengine.core.train.loop import Trainer

HELPER = REPO / "tests" / "helpers" / "crash_train.py"


def write_cfg(tmp_path, unet_config, name, **output):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 6
    cfg["output"] = {"dir": str(tmp_path / name), "name": "run", "plot": False, **output}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_helper(cfg, point: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(HELPER), str(cfg), point], env=env,
                          capture_output=True, text=True, timeout=300).returncode


def tensors(path):
    return load_file(str(path))


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bitwise_identical(tmp_path, unet_config):
    plain = write_cfg(tmp_path, unet_config, "plain")
    assert run_helper(plain, "none:0") == 0
    crashy = write_cfg(tmp_path, unet_config, "crashy", save_every=1, keep_last=3)
    # killed right after step 2 (before its checkpoint); inside the next save (step 2's
    # again, after its first file sync); right after step 5; then a clean finish
    assert run_helper(crashy, "step:2") == -signal.SIGKILL
    assert run_helper(crashy, "save:2") == -signal.SIGKILL
    leftovers = sorted(p.name for p in (tmp_path / "crashy" / "run.checkpoints").iterdir())
    assert leftovers[0].startswith(".step_00000002.")  # the half-written one, never used
    assert leftovers[1:] == ["step_00000001"]
    assert run_helper(crashy, "step:5") == -signal.SIGKILL
    assert run_helper(crashy, "none:0") == 0
    a = tensors(tmp_path / "plain" / "run.safetensors")
    b = tensors(tmp_path / "crashy" / "run.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((tmp_path / "plain" / "run.loss.json").read_text())
    lb = json.loads((tmp_path / "crashy" / "run.loss.json").read_text())
    assert la == lb
    kept = [s for s, _ in ckpt.list_checkpoints(tmp_path / "crashy" / "run.checkpoints")]
    assert kept == [4, 5, 6]


def pipeline_for(host, unet_config, tmp_path, **output):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 4
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False, **output}
    return build_pipeline(parse_config(cfg, host.registry), host)


def test_corrupt_checkpoint_is_reported_and_the_previous_one_used(host, unet_config, tmp_path):
    pipe = pipeline_for(host, unet_config, tmp_path, save_every=1)
    Trainer(pipe).run()
    pipe.close()
    folder = tmp_path / "out" / "run.checkpoints"
    latest = folder / "step_00000004" / "adapter.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    pipe = pipeline_for(host, unet_config, tmp_path, save_every=1)
    trainer = Trainer(pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used = trainer.resume("latest")
    pipe.close()
    assert used == folder / "step_00000003"
    assert trainer.start_step == 3
    msgs = [str(w.message) for w in caught]
    assert any("step_00000004" in m and "adapter.safetensors" in m and "corrupted" in m
               for m in msgs), msgs


def test_resume_of_a_finished_run_changes_nothing(host, unet_config, tmp_path):
    pipe = pipeline_for(host, unet_config, tmp_path, save_every=2)
    first = Trainer(pipe).run()
    pipe.close()
    pipe = pipeline_for(host, unet_config, tmp_path, save_every=2)
    trainer = Trainer(pipe)
    trainer.resume("latest")
    again = trainer.run()
    pipe.close()
    assert again.loss_map == first.loss_map
    assert all(torch.equal(first.lora[k], again.lora[k]) for k in first.lora)


@pytest.mark.slow
def test_sigint_finishes_the_step_saves_and_exits_130(tmp_path, unet_config):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 400
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "loraengine.cli.main", "train", str(path),
                             "-q", "--events", str(events)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if events.exists() and events.read_text().count('"step"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT: stopped after step" in err and "--resume latest" in err
    done = [s for s, _ in ckpt.list_checkpoints(tmp_path / "out" / "run.checkpoints")]
    assert len(done) == 1
    lora = tmp_path / "out" / "run.safetensors"
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as fh:
        assert int(fh.metadata()["loraengine.steps"]) == done[0]


def test_resume_with_a_changed_config_warns_naming_the_keys(host, unet_config, tmp_path):
    pipe = pipeline_for(host, unet_config, tmp_path, save_every=2)
    Trainer(pipe).run()
    pipe.close()
    changed = json.loads(json.dumps(unet_config))
    changed["optimizer"] = {"name": "adamw", "lr": 0.01}
    pipe = pipeline_for(host, changed, tmp_path, save_every=2)
    trainer = Trainer(pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.resume("latest")
    pipe.close()
    msgs = " ".join(str(w.message) for w in caught)
    assert "changed config" in msgs and "optimizer.lr: 0.0005 -> 0.01" in msgs
    assert "training.steps" not in msgs
