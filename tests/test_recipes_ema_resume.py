"""The EMA recipe across a resume: stopped after step 2 and resumed from its checkpoint,
a run writes the same EMA file, bit for bit, as one that never stopped (for each of the
constant decay, ``every`` and the warmup)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.train.loop import Trainer
from loraengine.testing.harness import tiny_data, tiny_train_config
from loraengine.testing.models import TinyDenoiser


def _run(host, out: Path, ema: dict, steps: int, resume: bool = False) -> Path:
    """Train the tiny model for ``steps`` with a checkpoint every 2 steps; return the
    EMA file."""
    cfg = tiny_train_config({
        "training": {"steps": steps, "seed": 3}, "optimizer": {"lr": 0.01},
        "recipe": {"ema": ema},
        "output": {"dir": str(out), "name": "run", "plot": False, "save_every": 2}})
    data = tiny_data()
    pipe = build_pipeline(parse_config(cfg, host.registry), host, model=TinyDenoiser(),
                          latents=data.latents, conditioning=data.conditioning)
    try:
        trainer = Trainer(pipe)
        if resume:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # training.steps differs on purpose
                trainer.resume("latest")
        trainer.run()
    finally:
        pipe.close()
    return out / "run.ema.safetensors"


@pytest.mark.parametrize("ema", [{"decay": 0.7}, {"decay": 0.7, "every": 3, "on_cpu": True},
                                 {"decay": 0.99, "warmup": True}], ids=str)
def test_ema_resumes_bitwise(host, tmp_path, ema):
    whole = load_file(str(_run(host, tmp_path / "whole", ema, steps=5)))
    _run(host, tmp_path / "parts", ema, steps=2)
    resumed = load_file(str(_run(host, tmp_path / "parts", ema, steps=5, resume=True)))
    assert whole.keys() == resumed.keys() and whole
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key
