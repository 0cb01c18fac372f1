"""The conformance suites for optimizers, losses and memory strategies
(``loraengine.testing``): every built-in passes them, and each check fails on a plugin
with the defect it is there to catch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import BaseModel, Field
from torch import nn

from loraengine import LossSpec, MemoryStrategySpec, OptimizerSpec, PluginOptions
from loraengine.plugins import build_plugin_manager
from loraengine.testing.loss_conformance import (
    LOSS_CHECKS,
    loss_cases,
    run_loss_check,
    run_loss_conformance,
)
from loraengine.testing.memory_conformance import (
    MEMORY_CHECKS,
    run_memory_check,
    run_memory_conformance,
)
from loraengine.testing.optimizer_conformance import (
    OPTIMIZER_CHECKS,
    run_optimizer_check,
    run_optimizer_conformance,
)

REGISTRY = build_plugin_manager(entry_points=False).registry

#: Learning rates for the least-squares problem where the default (5e-2) does not suit.
OPTIMIZER_LR = {"prodigy": 1.0}

#: How each built-in memory strategy is switched on, and the tolerances it needs.
MEMORY_ENABLE: dict[str, tuple[dict, dict]] = {
    "bypass_mode": ({"memory": {"bypass_mode": True}}, {}),
    "gradient_checkpointing": ({"memory": {"gradient_checkpointing": True}}, {}),
    "offloading": ({"memory": {"offloading": True}}, {}),
    # lossy: int8 weights round to 1/127 of each row's largest magnitude
    "quantized_base": ({"model": {"quantize": "int8"}, "memory": {"bypass_mode": True}},
                       {"rtol": 1e-2, "restore_rtol": 1e-2}),
}


# -- the built-ins pass ----------------------------------------------------------------

@pytest.mark.parametrize("name", REGISTRY.names("optimizer"))
def test_builtin_optimizer_conforms(name):
    spec = REGISTRY.get("optimizer", name)
    if name == "adamw8bit" and not torch.cuda.is_available():
        pytest.skip("adamw8bit keeps its states on a CUDA GPU")
    report = run_optimizer_conformance(spec, lr=OPTIMIZER_LR.get(name, 5e-2))
    assert [c for _, c in report.passed] == list(OPTIMIZER_CHECKS)


@pytest.mark.parametrize("name", REGISTRY.names("loss"))
def test_builtin_loss_conforms(name):
    spec = REGISTRY.get("loss", name)
    report = run_loss_conformance(spec)
    assert len(report.passed) == len(loss_cases(spec)) * len(LOSS_CHECKS)


def test_every_builtin_memory_strategy_has_an_enabling_overlay():
    assert set(REGISTRY.names("memory")) <= set(MEMORY_ENABLE)


@pytest.mark.parametrize("name", sorted(MEMORY_ENABLE))
def test_builtin_memory_strategy_conforms(name):
    if name not in REGISTRY.names("memory"):
        pytest.skip(f"{name} is not a built-in here")
    enable, tolerances = MEMORY_ENABLE[name]
    report = run_memory_conformance(REGISTRY.get("memory", name), enable, **tolerances)
    assert [c for _, c in report.passed] == list(MEMORY_CHECKS)


def test_quantized_base_fails_same_training_at_a_tolerance_below_its_rounding():
    enable, _ = MEMORY_ENABLE["quantized_base"]
    with pytest.raises(AssertionError, match=r"\[same_training\]"):
        run_memory_check(REGISTRY.get("memory", "quantized_base"), "same_training", enable,
                         rtol=1e-6)


# -- optimizers with a defect ----------------------------------------------------------

class _PlainSGD(torch.optim.Optimizer):
    """SGD with switchable defects."""

    def __init__(self, params, lr, *, noisy=False, decay_all=False, momentum_outside=False):
        super().__init__(params, {"lr": lr})
        self.noisy, self.decay_all, self.momentum_outside = noisy, decay_all, momentum_outside
        self.outside: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    if self.decay_all:
                        p.mul_(0.99)
                    continue
                update = p.grad
                if self.momentum_outside:  # state kept where state_dict() cannot see it
                    buf = self.outside.setdefault(id(p), torch.zeros_like(p))
                    buf.mul_(0.9).add_(p.grad)
                    update = buf
                if self.noisy:
                    update = update + 1e-3 * torch.randn_like(p)
                p.add_(update, alpha=-group["lr"])


def _opt(name: str, **defects: Any) -> OptimizerSpec:
    return OptimizerSpec(name, lambda params, lr, o: _PlainSGD(params, lr, **defects))


def test_plain_sgd_passes_the_optimizer_suite():
    run_optimizer_conformance(_opt("plain"))


@pytest.mark.parametrize(("spec", "check"), [
    (_opt("noisy", noisy=True), "deterministic"),
    (_opt("decay_all", decay_all=True), "skips_missing_grads"),
    (_opt("momentum_outside", momentum_outside=True), "state_roundtrip"),
    (OptimizerSpec("fixed_lr", lambda params, lr, o: _PlainSGD(params, 0.01)), "builds"),
    (OptimizerSpec("extra_param", lambda params, lr, o: _PlainSGD(
        [*params, nn.Parameter(torch.zeros(1))], lr)), "builds"),
    (OptimizerSpec("not_an_optimizer", lambda params, lr, o: object()), "builds"),
    (OptimizerSpec("diverges", lambda params, lr, o: _PlainSGD(params, -lr)), "descends"),
], ids=lambda v: v if isinstance(v, str) else v.name)
def test_optimizer_suite_catches_the_defect(spec, check):
    with pytest.raises(AssertionError, match=rf"\[{check}\] optimizer '{spec.name}'"):
        run_optimizer_check(spec, check)


class _Loose(BaseModel):  # unknown keys are ignored: a typo would pass unseen
    momentum: float = 0.0


class _Required(PluginOptions):
    momentum: float = Field(ge=0)


@pytest.mark.parametrize("model", [_Loose, _Required])
def test_optimizer_suite_checks_the_options_model(model):
    spec = OptimizerSpec("opts", lambda params, lr, o: _PlainSGD(params, lr), model)
    with pytest.raises(AssertionError, match=r"\[options\]"):
        run_optimizer_check(spec, "options", options=model.model_construct(momentum=0.0))


# -- losses with a defect --------------------------------------------------------------

@pytest.mark.parametrize(("fn", "check"), [
    (lambda p, t: ((p - t) ** 2).mean(), "elementwise"),
    (lambda p, t: (p - t) ** 2 - ((p - t) ** 2).mean(dim=0, keepdim=True), "per_sample"),
    (lambda p, t: p - t, "minimum_at_target"),
    (lambda p, t: ((p - t) ** 2).detach(), "gradient"),
    (lambda p, t: (p - t) ** 2 + 1e-3 * torch.rand_like(p), "deterministic"),
    (lambda p, t: torch.log((p - t) ** 2), "minimum_at_target"),
], ids=["reduces", "mixes_the_batch", "signed", "detached", "random", "infinite"])
def test_loss_suite_catches_the_defect(fn, check):
    spec = LossSpec("defective", lambda o: fn)
    with pytest.raises(AssertionError, match=rf"\[{check}\] loss 'defective'"):
        for case in loss_cases(spec):
            run_loss_check(spec, case, check)


def test_timestep_aware_loss_is_called_with_timesteps_under_both_schedules():
    seen = []

    def factory(o):
        def loss(p, t, steps, schedule):
            seen.append((steps.shape[0], schedule.is_flow))
            return (p - t) ** 2

        return loss

    spec = LossSpec("ts", factory, timestep_aware=True)
    run_loss_conformance(spec, checks=["elementwise"])
    assert {flow for _, flow in seen} == {False, True}
    assert all(n == b for (n, _), b in zip(seen, (4, 3, 4), strict=True))


# -- memory strategies with a defect ---------------------------------------------------

class _Switch(PluginOptions):
    leaky: bool = False


def _memory(apply, enabled=lambda c: c.memory.leaky) -> MemoryStrategySpec:
    return MemoryStrategySpec("leaky", _Switch, enabled=enabled, apply=apply)


def _hook_without_undo(pipe, memory):
    pipe.model.conv_in.register_forward_hook(lambda m, a, out: out)


def _unfreeze(pipe, memory):
    pipe.model.conv_out.bias.requires_grad_(True)


def _scale_output(pipe, memory):
    handle = pipe.model.conv_out.register_forward_hook(lambda m, a, out: out * 1.1)
    return handle.remove


def _noop(pipe, memory):
    return None


def test_a_harmless_strategy_passes_the_memory_suite():
    run_memory_conformance(_memory(_noop), {"memory": {"leaky": True}})


@pytest.mark.parametrize(("spec", "check"), [
    (_memory(_hook_without_undo), "restores"),
    (_memory(_unfreeze), "frozen_base"),
    (_memory(_scale_output), "same_training"),
    (_memory(_noop, enabled=lambda c: True), "switch"),
], ids=["leaves_a_hook", "unfreezes_the_base", "changes_the_math", "always_on"])
def test_memory_suite_catches_the_defect(spec, check):
    with pytest.raises(AssertionError, match=rf"\[{check}\] memory strategy 'leaky'"):
        run_memory_check(spec, check, {"memory": {"leaky": True}})


def test_memory_suite_registers_a_third_party_strategy_only_for_the_run():
    host = build_plugin_manager(entry_points=False)
    run_memory_conformance(_memory(_noop), {"memory": {"leaky": True}}, host=host,
                           checks=["switch"])
    assert "leaky" not in host.registry.names("memory")
