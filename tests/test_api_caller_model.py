"""``loraengine.train`` leaves the caller's model as it came: dtype, values, grad flags,
buffers and train/eval mode, after a run and after a run that fails (issue 15, item 3);
and ``TrainResult`` prints short (item 9)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import loraengine
from loraengine.core.errors import LoraEngineError, PluginFailed
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.testing.harness import registered, tiny_data, tiny_train_config
from loraengine.testing.models import TinyDenoiser


class Denoiser(TinyDenoiser):
    """TinyDenoiser with a buffer-holding norm and dropout, so mode and buffers matter."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(super().forward(x, t, cond)))


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: (p.dtype, p.device, p.requires_grad, p.detach().clone())
                   for n, p in model.named_parameters()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
        "buffers": {n: (b.dtype, b.clone()) for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def _forward(model: nn.Module) -> torch.Tensor:
    data = tiny_data(n=4, seed=3)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # dropout off, running stats read, so the comparison is exact
    try:
        with torch.no_grad():
            return model(data.latents, torch.full((4,), 321), data.conditioning)
    finally:
        for m, mode in modes:
            m.training = mode


def _assert_as_it_came(model: nn.Module, before: dict[str, Any], out: torch.Tensor) -> None:
    after = _snapshot(model)
    assert after["ids"] == before["ids"]
    assert after["modes"] == before["modes"]
    for name, (dtype, device, grad, value) in before["params"].items():
        p = after["params"][name]
        assert (p[0], p[1], p[2]) == (dtype, device, grad), name
        assert torch.equal(p[3], value), name
    for name, (dtype, value) in before["buffers"].items():
        assert after["buffers"][name][0] == dtype, name
        assert torch.equal(after["buffers"][name][1], value), name
    assert torch.equal(_forward(model), out)  # bitwise
    assert not any(p.grad is not None for p in model.parameters())


def _caller_model() -> nn.Module:
    model = Denoiser().float().train()
    model.drop.eval()  # a mixed-mode model: each module keeps its own mode
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.mark.parametrize("overlay", [
    {"training": {"dtype": "bf16"}, "adapter": {"dtype": "bf16"}},  # the node's defaults
    {"training": {"dtype": "fp32"}},
    {"training": {"dtype": "bf16"}, "memory": {"gradient_checkpointing": True}},
    {"training": {"dtype": "bf16"}, "memory": {"offloading": True}},
    {"training": {"dtype": "fp32"}, "model": {"quantize": "int8"},
     "memory": {"bypass_mode": True}},
], ids=["bf16", "fp32", "bf16-checkpointing", "bf16-offload", "int8-base"])
def test_train_leaves_the_callers_model_as_it_came(host, overlay):
    model = _caller_model()
    before, out = _snapshot(model), _forward(model)
    data = tiny_data()
    result = loraengine.train(tiny_train_config(overlay), model=model, latents=data.latents,
                              conditioning=data.conditioning, host=host)
    assert result.steps == 2
    _assert_as_it_came(model, before, out)
    loss = model(data.latents[:2], torch.tensor([10, 20]), data.conditioning[:2]).square().mean()
    loss.backward()  # the caller can train it again: grads flow to its own parameters
    assert all(p.grad is not None for p in model.parameters())


class _FailsOnStep:
    @hookimpl
    def loraengine_on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        raise RuntimeError("stop here")


def test_train_leaves_the_callers_model_as_it_came_when_the_run_raises(host):
    model = _caller_model()
    before, out = _snapshot(model), _forward(model)
    data = tiny_data()
    with registered(host, _FailsOnStep(), name="fails_on_step"), \
            pytest.raises(PluginFailed, match="fails_on_step.*stop here"):
        loraengine.train(tiny_train_config({"training": {"dtype": "bf16"}}), model=model,
                         latents=data.latents, conditioning=data.conditioning, host=host)
    _assert_as_it_came(model, before, out)


def test_train_leaves_the_callers_model_as_it_came_when_the_build_fails(host):
    model = _caller_model()
    before, out = _snapshot(model), _forward(model)
    data = tiny_data()
    with pytest.raises(LoraEngineError):
        loraengine.train(tiny_train_config({"training": {"dtype": "bf16"},
                                            "adapter": {"include": ["no_such_layer"]}}),
                         model=model, latents=data.latents, conditioning=data.conditioning,
                         host=host)
    _assert_as_it_came(model, before, out)


def test_train_result_prints_short(host):
    data = tiny_data()
    result = loraengine.train(tiny_train_config(), model=TinyDenoiser(), latents=data.latents,
                              conditioning=data.conditioning, host=host)
    text = repr(result)
    assert len(text) < 300, text
    assert text.startswith("TrainResult(steps=2, trained=2, loss=")
    assert f"tensors={len(result.lora)}" in text
    assert "tensor(" not in text
