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
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.train import checkpoints as ckpt
from loraengine.core.train.loop import Trainer
from loraengine.core.train.signals import TrainingInterrupted

HELPER = REPO / "tests" / "helpers" / "kill_server.py"


def write_cfg(tmp_path, unet_config, name, **output):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 6
    cfg["output"] = {"dir": str(tmp_path / name), "name": "run", "plot": False, **output}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def serve(cfg, points: list[str]) -> tuple[list[int], list[list[str]], str]:
    """Run ``train CFG --resume latest`` once per point, each a fork of one process
    that imported everything once (``tests/helpers/kill_server.py``): the wait status of
    each run, the names in CFG's checkpoint folder after it, and the stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(HELPER), str(cfg), *points], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"set-up and each run, seconds: {report['seconds']}")
    return report["statuses"], report["listings"], done.stderr


def tensors(path):
    return load_file(str(path))


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bitwise_identical(tmp_path, unet_config):
    plain = write_cfg(tmp_path, unet_config, "plain")
    crashy = write_cfg(tmp_path, unet_config, "crashy", save_every=1, keep_last=3)
    # killed inside the first save (step 1's, after its first file sync), before any
    # checkpoint is whole; right after step 2 (before its checkpoint); inside the next
    # save (step 2's again); right after step 5; then a clean finish
    points = ["save:2", "step:2", "save:2", "step:5", "none"]
    statuses, listings, err = serve(crashy, [f"plain:{plain}", *points])
    why = f"statuses {statuses}, listings {listings}\n{err[-3000:]}"
    assert statuses == [0] + [-signal.SIGKILL] * 4 + [0], why
    first_save, step_2, second_save, step_5 = listings[1:5]
    assert len(first_save) == 1 and first_save[0].startswith(".step_00000001."), why
    # the next run removed the half-written folder and started over from step 1
    assert step_2 == ["step_00000001"], why
    assert len(second_save) == 2 and second_save[0].startswith(".step_00000002."), why
    assert second_save[1:] == ["step_00000001"], why  # the half-written one, never used
    assert step_5 == ["step_00000002", "step_00000003", "step_00000004"], why
    a = tensors(tmp_path / "plain" / "run.safetensors")
    b = tensors(tmp_path / "crashy" / "run.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((tmp_path / "plain" / "run.loss.json").read_text())
    lb = json.loads((tmp_path / "crashy" / "run.loss.json").read_text())
    assert la == lb
    folder = tmp_path / "crashy" / "run.checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [4, 5, 6]
    # a run after kills inside saves leaves no temporary file
    out = tmp_path / "crashy"
    hidden = [p for p in [*out.iterdir(), *folder.iterdir()] if p.name.startswith(".")]
    assert hidden == [], why


def pipeline_for(host, unet_config, tmp_path, **output):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 4
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False, **output}
    return build_pipeline(parse_config(cfg, host.registry), host)


@pytest.mark.slow
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
    # the LoRA so far is written beside the final one, named for its step
    assert not (tmp_path / "out" / "run.safetensors").exists()
    lora = tmp_path / "out" / f"run.step_{done[0]:06d}.safetensors"
    assert str(lora) in err
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as fh:
        assert int(fh.metadata()["loraengine.steps"]) == done[0]


class _InterruptAt:
    """A lifecycle plugin that sends this process SIGINT at the end of one step, as a
    Ctrl-C in the terminal would."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def loraengine_on_step_end(self, run, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _finished_run(host, unet_config, tmp_path, plot: bool) -> dict:
    """A finished 3-step run ``run`` in ``tmp_path/out``; returns its config."""
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 3
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": plot}
    pipe = build_pipeline(parse_config(cfg, host.registry), host)
    Trainer(pipe).run()
    pipe.close()
    return cfg


def _interrupted_at_2(host, cfg: dict) -> pytest.ExceptionInfo:
    """The same run again, 50 steps of another seed, stopped by Ctrl-C at step 2."""
    cfg["training"]["steps"] = 50
    cfg["training"]["seed"] = cfg["training"].get("seed", 0) + 1
    host.register(_InterruptAt(2), name="test.interrupt")
    pipe = build_pipeline(parse_config(cfg, host.registry), host)
    try:
        with pytest.raises(TrainingInterrupted) as caught:
            Trainer(pipe).run()
    finally:
        pipe.close()
        host.unregister("test.interrupt")
    return caught


def test_ctrl_c_writes_the_partial_lora_beside_the_final_one(host, unet_config, tmp_path):
    cfg = _finished_run(host, unet_config, tmp_path, plot=False)
    final = tmp_path / "out" / "run.safetensors"
    before = final.read_bytes()
    loss_before = (tmp_path / "out" / "run.loss.json").read_bytes()

    caught = _interrupted_at_2(host, cfg)
    partial = tmp_path / "out" / "run.step_000002.safetensors"
    message = str(caught.value)
    assert f"LoRA so far {partial}" in message and f"{final} is left as it was" in message
    assert final.read_bytes() == before  # the earlier run's LoRA, untouched
    assert (tmp_path / "out" / "run.loss.json").read_bytes() == loss_before
    assert json.loads((tmp_path / "out" / "run.step_000002.loss.json").read_text())
    from safetensors import safe_open

    with safe_open(str(partial), "pt") as fh:
        assert int(fh.metadata()["loraengine.steps"]) == 2
    assert set(load_file(str(partial))) == set(load_file(str(final)))


@pytest.mark.slow  # seconds a run: kept out of the fast default
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
    changes = [str(w.message) for w in caught if "changed config" in str(w.message)]
    assert len(changes) == 1 and "training.steps" not in changes[0]  # it did not change


def _resume_with(host, unet_config, tmp_path, steps=6, **changes):
    """Train 4 steps with a checkpoint every 2, then build the same run with
    ``changes`` (section -> keys) merged in and ``steps`` in all; the trainer is not
    resumed yet."""
    pipe = pipeline_for(host, unet_config, tmp_path, save_every=2)
    first = Trainer(pipe).run()
    pipe.close()
    changed = json.loads(json.dumps(unet_config))
    for section, keys in changes.items():
        changed[section] = {**changed.get(section, {}), **keys}
    cfg = json.loads(json.dumps(changed))
    cfg["training"]["steps"] = steps
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False,
                     "save_every": 2}
    return first, build_pipeline(parse_config(cfg, host.registry), host)


def test_a_changed_lr_rules_from_the_resumed_step_and_is_recorded(host, unet_config,
                                                                   tmp_path):
    first, pipe = _resume_with(host, unet_config, tmp_path, optimizer={"lr": 0.001})
    old = first.loss_map["lr"][0]
    assert old != 0.001
    trainer = Trainer(pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.resume("latest")
    assert trainer.start_step == 4
    assert all(g["lr"] == pytest.approx(0.001) for g in pipe.optimizer.param_groups)
    result = trainer.run()
    pipe.close()
    assert result.loss_map["lr"][:4] == first.loss_map["lr"]
    assert result.loss_map["lr"][4:] == pytest.approx([0.001, 0.001])
    msgs = " ".join(str(w.message) for w in caught)
    assert f"optimizer.lr: {old!r} -> 0.001 (in effect from step 5)" in msgs
    saved = json.loads((tmp_path / "out" / "run.loss.json").read_text())
    assert saved["lr"][4:] == pytest.approx([0.001, 0.001])
    from loraengine.core.files import read_metadata

    meta = read_metadata(tmp_path / "out" / "run.safetensors")
    assert json.loads(meta["loraengine.config"])["optimizer"]["lr"] == 0.001
    assert json.loads(meta["loraengine.lr_changes"]) == [[5, old, 0.001]]


def test_a_changed_optimizer_is_one_line_naming_both(host, unet_config, tmp_path):
    from click.testing import CliRunner

    from loraengine.cli.main import cli

    _, pipe = _resume_with(host, unet_config, tmp_path, optimizer={"name": "sgd"})
    pipe.close()
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = 6
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False,
                     "save_every": 2}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["train", str(path), "-q", "--resume",
                                      "--set", "optimizer.name=sgd"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "optimizer.name" in lines[0] and "'adamw'" in lines[0] \
        and "'sgd'" in lines[0], result.output


def test_a_changed_rank_is_one_line(host, unet_config, tmp_path):
    from loraengine.core.errors import DataError

    _, pipe = _resume_with(host, unet_config, tmp_path, adapter={"rank": 8})
    trainer = Trainer(pipe)
    try:
        with pytest.raises(DataError) as err:
            trainer.resume("latest")
    finally:
        pipe.close()
    message = str(err.value)
    assert "\n" not in message
    assert "step_00000004" in message and "differ in shape" in message
    assert "[4," in message or ", 4]" in message


def test_ctrl_c_draws_the_partial_loss_plot_beside_the_final_one(host, unet_config, tmp_path):
    cfg = _finished_run(host, unet_config, tmp_path, plot=True)
    plot = tmp_path / "out" / "run.loss.png"
    before = plot.read_bytes()

    _interrupted_at_2(host, cfg)
    assert plot.read_bytes() == before  # the finished run's plot, untouched
    partial = tmp_path / "out" / "run.step_000002.loss.png"
    from PIL import Image

    with Image.open(partial) as img:  # a whole PNG, drawn for the stopped run
        img.load()
        assert img.format == "PNG" and img.size[0] > 100
