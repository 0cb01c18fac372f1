"""The torch optimizers (adamw, adam, sgd, rmsprop) and the plain losses (mse, l1,
huber, smooth_l1) each lower the training loss on the quickstart data (measured on a
fixed evaluation batch: same samples, noise, timesteps).

An optimizer and a loss are separate plugins that meet only through the loss value the
step backpropagates, so each optimizer runs with the default loss (mse) and each other
loss with the default optimizer (adamw): every optimizer's and every loss's code runs
in a training that must lower the loss, in 7 runs rather than the 16 of every pair.
Each run is 10 steps: every pair's evaluation loss is then at least 6 % lower (measured:
l1 the least, 0.938 of the start; rmsprop 0.613), twice the 3 % asked."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.seeding import make_generator
from loraengine.core.train.loop import Trainer

QS = REPO / "examples" / "quickstart"
LR = {"adamw": 2e-3, "adam": 2e-3, "rmsprop": 1e-3, "sgd": 0.5}


def eval_loss(trainer: Trainer) -> float:
    """The loss on all 8 samples with fixed noise/timesteps, without training."""
    saved = trainer.noise_gen
    trainer.noise_gen = make_generator(99, "eval")
    with torch.no_grad():
        value = float(trainer.micro_step(torch.arange(len(trainer.pipe.dataset))))
    trainer.noise_gen = saved
    return value


OPTIMIZERS = ["adamw", "adam", "sgd", "rmsprop"]
LOSSES = ["mse", "l1", "huber", "smooth_l1"]
PAIRS = [(o, "mse") for o in OPTIMIZERS] + [("adamw", loss) for loss in LOSSES[1:]]


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "loss"), PAIRS, ids=[f"{o}-{m}" for o, m in PAIRS])
def test_optimizer_and_loss_lower_the_loss(host, optimizer, loss):
    cfg = parse_config({
        "model": {"family": "diffusers", "path": str(QS / "model")},
        "data": {"latents": str(QS / "latents.safetensors"),
                 "conditioning": str(QS / "conditioning.safetensors")},
        "training": {"steps": 10, "batch_size": 4, "dtype": "fp32", "seed": 1},
        "optimizer": {"name": optimizer, "lr": LR[optimizer]},
        "loss": {"name": loss},
        "adapter": {"rank": 4, "dtype": "fp32"},
        "memory": {"gradient_checkpointing": False},
    }, host.registry)
    pipe = build_pipeline(cfg, host)
    trainer = Trainer(pipe, write_files=False)
    before = eval_loss(trainer)
    trainer.run()
    after = eval_loss(trainer)
    pipe.close()
    assert after < 0.97 * before, (before, after)
