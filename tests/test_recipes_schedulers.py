"""LR schedules pinned against their formulas at chosen steps, warmup in steps or as a
ratio, option validation, and max_grad_norm clipping."""

from __future__ import annotations

import math

import pytest
import torch

import loraengine
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents


def lrs(host, options: dict, total: int, base: float = 0.1) -> list[float]:
    """The learning rate of each of ``total`` optimizer steps."""
    cfg = parse_config({"model": {"family": "module"}, "lr_scheduler": options},
                       host.registry)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base)
    spec = host.registry.get("lr_scheduler", options["name"])
    sched = spec.factory(opt, total, cfg.lr_scheduler)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_is_the_nodes_schedule_and_warms_up_linearly(host):
    assert lrs(host, {"name": "constant"}, 5) == pytest.approx([0.1] * 5)
    # (s + 1) / W for the first W steps, then the full rate
    assert lrs(host, {"name": "constant", "warmup_steps": 4}, 6) == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_linear_decay_after_warmup(host):
    got = lrs(host, {"name": "linear", "warmup_steps": 2}, 10)
    # p = (s - 2) / 8: s=2 -> 1, s=6 -> 1/2, s=9 -> 1/8
    assert got[0] == pytest.approx(0.05) and got[1] == pytest.approx(0.1)
    assert got[2] == pytest.approx(0.1)
    assert got[6] == pytest.approx(0.05)
    assert got[9] == pytest.approx(0.1 / 8)


def test_cosine_with_floor(host):
    got = lrs(host, {"name": "cosine", "min_lr_ratio": 0.2}, 8)
    for s in (0, 2, 4, 7):
        p = s / 8
        want = 0.1 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p)))
        assert got[s] == pytest.approx(want), s
    assert got[4] == pytest.approx(0.1 * (0.2 + 0.8 * 0.5))  # half way: half of the span


def test_cosine_with_restarts_returns_to_full_rate(host):
    got = lrs(host, {"name": "cosine_with_restarts", "cycles": 2}, 8)
    # two cycles of 4 steps: 1, cos-half at step 2, restart at step 4
    assert got[0] == pytest.approx(0.1)
    assert got[2] == pytest.approx(0.05)
    assert got[4] == pytest.approx(0.1)
    assert got[3] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert got[7] == pytest.approx(got[3])


def test_polynomial_power_and_floor(host):
    got = lrs(host, {"name": "polynomial", "power": 2.0, "min_lr_ratio": 0.1,
                     "warmup_steps": 2}, 10)
    assert got[6] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5**2))
    assert got[8] == pytest.approx(0.1 * (0.1 + 0.9 * 0.25**2))


def test_warmup_ratio_rounds_up(host):
    got = lrs(host, {"name": "linear", "warmup_ratio": 0.25}, 10)  # W = ceil(2.5) = 3
    assert got[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert got[3] == pytest.approx(0.1)
    assert got[5] == pytest.approx(0.1 * (1 - 2 / 7))


def test_warmup_steps_and_ratio_are_exclusive(host):
    with pytest.raises(ConfigError, match="warmup_steps or warmup_ratio"):
        parse_config({"model": {"family": "module"}, "lr_scheduler": {
            "name": "cosine", "warmup_steps": 2, "warmup_ratio": 0.1}}, host.registry)


@pytest.mark.parametrize("section", [
    {"name": "cosine", "cycles": 2},           # an option of another schedule
    {"name": "constant", "min_lr_ratio": 0.1},
    {"name": "polynomial", "powr": 2},
])
def test_unknown_scheduler_option_is_an_error(host, section):
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"family": "module"}, "lr_scheduler": section}, host.registry)
    bad = next(k for k in section if k != "name")
    assert f"lr_scheduler.{bad}: unknown key" in str(err.value)


def test_training_records_the_scheduled_lr(tmp_path):
    result = loraengine.train(
        {"model": {"family": "module"},
         "training": {"steps": 5, "batch_size": 1, "dtype": "fp32"},
         "optimizer": {"name": "adamw", "lr": 0.01},
         "lr_scheduler": {"name": "linear", "warmup_steps": 1},
         "adapter": {"rank": 2, "dtype": "fp32"},
         "memory": {"gradient_checkpointing": False}},
        model=TinyDenoiser(), latents=tiny_latents(), conditioning=tiny_conditioning())
    assert result.loss_map["lr"] == pytest.approx([0.01, 0.01, 0.0075, 0.005, 0.0025])


def _one_sgd_step(max_grad_norm: float | None) -> tuple[float, float]:
    """(norm of the first step's parameter change, lr) for plain SGD."""
    from loraengine.core.build import build_pipeline
    from loraengine.core.train.loop import Trainer

    host = loraengine.build_plugin_manager()
    cfg = parse_config({
        "model": {"family": "module"},
        "training": {"steps": 1, "batch_size": 2, "dtype": "fp32",
                     "max_grad_norm": max_grad_norm},
        "optimizer": {"name": "sgd", "lr": 0.5},
        "adapter": {"rank": 2, "dtype": "fp32"},
        "memory": {"gradient_checkpointing": False}}, host.registry)
    pipe = build_pipeline(cfg, host, model=TinyDenoiser(), latents=tiny_latents(),
                          conditioning=tiny_conditioning())
    before = [p.detach().clone() for p in pipe.trainable_parameters()]
    Trainer(pipe, write_files=False).step()
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                           for p, b in zip(pipe.trainable_parameters(), before, strict=True)))
    pipe.close()
    return float(moved), 0.5


def test_max_grad_norm_clips_the_global_gradient_norm():
    free, lr = _one_sgd_step(None)
    clipped, _ = _one_sgd_step(1e-3)
    assert free > 10 * lr * 1e-3  # the raw gradient is well above the limit
    # SGD moves by lr * g, and the clipped g has global norm max_grad_norm
    assert clipped == pytest.approx(lr * 1e-3, rel=1e-3)
