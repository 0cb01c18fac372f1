"""What a resume may change besides the learning rate: the LR schedule (it rules from
the resumed step, as if it had ruled from step 1) and, with ``--reset-optimizer``, the
optimizer (a fresh state)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import yaml
from click.testing import CliRunner

from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.files import read_metadata
from loraengine.core.train.loop import Trainer

LR = 0.0005


def _cfg(unet_config, tmp_path, steps, **sections):
    cfg = json.loads(json.dumps(unet_config))
    cfg["training"]["steps"] = steps
    cfg["optimizer"] = {"name": "adamw", "lr": LR}
    cfg["output"] = {"dir": str(tmp_path / "out"), "name": "run", "plot": False,
                     "save_every": 2}
    for section, keys in sections.items():
        cfg[section] = {**cfg.get(section, {}), **keys}
    return cfg


def _train(host, cfg, resume=False, reset=False):
    pipe = build_pipeline(parse_config(cfg, host.registry), host)
    try:
        trainer = Trainer(pipe)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if resume:
                trainer.resume("latest", reset_optimizer=reset)
        result = trainer.run()
    finally:
        pipe.close()
    return trainer, result, [str(w.message) for w in caught]


def _cosine(step0, total, floor=0.0):
    """The rate of 0-based step ``step0`` of a cosine decay without warmup."""
    return LR * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step0 / total)))


def test_a_changed_schedule_rules_from_the_resumed_step_and_is_recorded(host, unet_config,
                                                                        tmp_path):
    _train(host, _cfg(unet_config, tmp_path, 6, lr_scheduler={"name": "constant"}))
    # the first run ended at step 6 with checkpoints at 2, 4, 6; resume at 4 with cosine
    # over 8 steps (a changed option too: its floor)
    (tmp_path / "out" / "run.checkpoints" / "step_00000006").rename(
        tmp_path / "out" / "gone")
    cosine = {"name": "cosine", "min_lr_ratio": 0.1}
    trainer, result, msgs = _train(host, _cfg(unet_config, tmp_path, 8,
                                              lr_scheduler=cosine), resume=True)
    lrs = result.loss_map["lr"]
    assert lrs[:4] == pytest.approx([LR] * 4, rel=1e-12)
    # steps 5..8 get the cosine's rate at their own position, the first one included
    assert lrs[4:] == pytest.approx([_cosine(s, 8, 0.1) for s in range(4, 8)], rel=1e-12)
    text = " ".join(msgs)
    assert "lr_scheduler.name: 'constant' -> 'cosine' (in effect from step 5)" in text
    meta = read_metadata(tmp_path / "out" / "run.safetensors")
    changes = json.loads(meta["loraengine.schedule_changes"])
    assert len(changes) == 1 and changes[0][0] == 5
    assert changes[0][1]["name"] == "constant" and changes[0][2]["name"] == "cosine"
    assert changes[0][2]["min_lr_ratio"] == 0.1


@pytest.mark.slow
def test_more_steps_on_resume_stretch_the_schedule_from_the_resumed_step(host, unet_config,
                                                                         tmp_path):
    _train(host, _cfg(unet_config, tmp_path, 4, lr_scheduler={"name": "cosine"}))
    _, result, _ = _train(host, _cfg(unet_config, tmp_path, 8,
                                     lr_scheduler={"name": "cosine"}), resume=True)
    lrs = result.loss_map["lr"]
    assert lrs[:4] == pytest.approx([_cosine(s, 4) for s in range(4)], rel=1e-12)
    assert lrs[4:] == pytest.approx([_cosine(s, 8) for s in range(4, 8)], rel=1e-12)
    meta = read_metadata(tmp_path / "out" / "run.safetensors")
    assert "loraengine.schedule_changes" not in meta  # the schedule itself is the same


def test_an_unchanged_resume_keeps_the_checkpoints_schedule(host, unet_config, tmp_path):
    cfg = _cfg(unet_config, tmp_path, 6, lr_scheduler={"name": "linear"})
    _, whole, _ = _train(host, cfg)
    (tmp_path / "out" / "run.checkpoints" / "step_00000006").rename(
        tmp_path / "out" / "gone")
    _, again, _ = _train(host, cfg, resume=True)
    assert again.loss_map == whole.loss_map
    assert "loraengine.schedule_changes" not in read_metadata(
        tmp_path / "out" / "run.safetensors")


def _write(tmp_path, cfg):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # 1.5–3.4 s: the full suite runs it
def test_reset_optimizer_starts_a_fresh_state_says_so_and_is_recorded(host, unet_config,
                                                                      tmp_path):
    _train(host, _cfg(unet_config, tmp_path, 4))
    cfg = _cfg(unet_config, tmp_path, 6)
    path = _write(tmp_path, cfg)
    bare = CliRunner().invoke(cli, ["train", str(path), "-q", "--resume",
                                    "--set", "optimizer.name=sgd"])
    assert bare.exit_code == 2 and "Traceback" not in bare.output
    errors = [x for x in bare.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "--reset-optimizer" in errors[0], bare.output

    before = (tmp_path / "out" / "run.safetensors").read_bytes()
    assert before  # the first run's LoRA; the refused resume left it as it was
    done = CliRunner().invoke(cli, ["train", str(path), "-q", "--resume",
                                    "--reset-optimizer", "--set", "optimizer.name=sgd",
                                    "--set", "optimizer.lr=0.002"])
    assert done.exit_code == 0, done.output
    assert "Traceback" not in done.output
    fresh = [x for x in done.output.splitlines() if "fresh optimizer state" in x]
    assert len(fresh) == 1 and "'adamw' -> 'sgd'" in fresh[0] and "from step 5" in fresh[0]
    meta = read_metadata(tmp_path / "out" / "run.safetensors")
    assert json.loads(meta["loraengine.optimizer_resets"]) == [[5, "adamw", "sgd"]]
    assert json.loads(meta["loraengine.lr_changes"]) == [[5, LR, 0.002]]
    loss = json.loads((tmp_path / "out" / "run.loss.json").read_text())
    assert loss["lr"][:4] == pytest.approx([LR] * 4) and loss["lr"][4:] == [0.002, 0.002]


def test_reset_optimizer_leaves_no_state_of_the_old_optimizer(host, unet_config, tmp_path):
    _train(host, _cfg(unet_config, tmp_path, 4))
    cfg = _cfg(unet_config, tmp_path, 6, optimizer={"name": "sgd", "lr": LR})
    pipe = build_pipeline(parse_config(cfg, host.registry), host)
    try:
        trainer = Trainer(pipe)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            trainer.resume("latest", reset_optimizer=True)
        assert trainer.start_step == 4
        assert len(trainer.pipe.optimizer.state) == 0  # nothing of adamw's moments
        assert all(g["lr"] == pytest.approx(LR) for g in trainer.pipe.optimizer.param_groups)
        assert all("exp_avg" not in s for s in trainer.pipe.optimizer.state.values())
    finally:
        pipe.close()


def test_reset_optimizer_without_resume_is_one_line(tmp_path, unet_config):
    path = _write(tmp_path, _cfg(unet_config, tmp_path, 2))
    result = CliRunner().invoke(cli, ["train", str(path), "-q", "--reset-optimizer"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "error: --reset-optimizer: only with --resume (a new run's optimizer state is "
        "fresh already)"]
    assert not (tmp_path / "out").exists()
