"""What the conformance suites report on a broken plugin: each defect found by the
check that is there for it, as an ``AssertionError`` naming the record, the case and
the check — never a raw exception from inside the suite or the plugin. (That the
built-ins pass every check is ``test_adapter_conformance.py`` and
``test_conformance_suites.py``.)"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from pydantic import Field

from loraengine import (
    AdapterSpec,
    LossSpec,
    MemoryStrategySpec,
    OptimizerSpec,
    PluginOptions,
)
from loraengine.core.adapter import AdapterLayer, layer_op
from loraengine.core.errors import PluginError
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.adapters import lora
from loraengine.testing.conformance import (
    CHECKS,
    adapter_cases,
    run_adapter_conformance,
    run_check,
)
from loraengine.testing.harness import registered
from loraengine.testing.loss_conformance import loss_cases, run_loss_check, run_loss_conformance
from loraengine.testing.memory_conformance import run_memory_check, run_memory_conformance
from loraengine.testing.optimizer_conformance import (
    run_optimizer_check,
    run_optimizer_conformance,
)
from loraengine.testing.suite import Checks, options_problems

LINEAR = adapter_cases()[0]


def _fails(match: str, run, *args, **kwargs) -> AssertionError:
    """``run(*args, **kwargs)`` raises an ``AssertionError`` whose message matches."""
    with pytest.raises(AssertionError, match=match) as info:
        run(*args, **kwargs)
    return info.value


# -- adapters: broken records ------------------------------------------------------------

class _UnregisteredGain(lora.LoRALayer):
    """A per-output gain kept as a plain tensor attribute: it requires a gradient, but
    the optimizer (given ``parameters()``) never sees it."""

    def __init__(self, base, rank, alpha, generator=None):
        super().__init__(base, rank, alpha, False, generator)
        self.gain = torch.ones(base.weight.shape[0]).requires_grad_(True)

    def delta_weight(self):
        dw = super().delta_weight()
        return dw * self.gain.reshape(-1, *[1] * (dw.ndim - 1))


class _PlainTensors(AdapterLayer):
    """LoRA whose factors are plain tensors: no registered parameter at all."""

    def __init__(self, base, rank, alpha, generator=None, requires_grad=False):
        super().__init__(base, rank, alpha)
        w = base.weight
        self.down = torch.randn((rank, w[0].numel()), generator=generator) * 0.1
        self.up = torch.zeros((w.shape[0], rank))
        self.down.requires_grad_(requires_grad)
        self.up.requires_grad_(requires_grad)

    def delta_weight(self):
        shape = self.base.weight.shape
        return (self.up @ self.down).reshape(shape) * (self.scale * self.multiplier)

    def file_tensors(self):
        return {"plain.down": self.down, "plain.up": self.up, "alpha": torch.tensor(self.alpha)}


class _GradBuffer(lora.LoRALayer):
    def __init__(self, base, rank, alpha, generator=None):
        super().__init__(base, rank, alpha, False, generator)
        self.register_buffer("offset", torch.zeros(3, requires_grad=True))


def _cut(out: torch.Tensor) -> torch.Tensor:
    """One output channel dropped: the wrong shape."""
    return out[:, :-1]


class _WrongShape(lora.LoRALayer):
    def bypass(self, x, base_out):
        return _cut(super().bypass(x, base_out))

    def forward(self, x):
        base = self.base
        return self.bypass(x, layer_op(base, x, base.weight, base.bias))


class _NoFile(lora.LoRALayer):
    file_tensors = AdapterLayer.file_tensors


class _ListFile(lora.LoRALayer):
    def file_tensors(self):
        return list(super().file_tensors().values())


def _spec(name: str, layer_cls=None, *, create=None, load=None, **fields) -> AdapterSpec:
    """LoRA with ``layer_cls`` (or ``create``/``load``) swapped in."""
    def make(base, rank, alpha, options, generator):
        if layer_cls is None:
            return lora.create(base, rank, alpha, options, generator)
        return layer_cls(base, rank, alpha, generator=generator)

    def rebuild(base, tensors, options):
        layer = lora.load(base, tensors, options)
        if layer_cls is None:
            return layer
        fixed = layer_cls(base, layer.rank, layer.alpha)
        fixed.load_state_dict(layer.state_dict(), strict=False)
        return fixed

    return replace(lora.SPEC, name=name, create=create or make, load=load or rebuild,
                   **fields)


def test_options_and_parameters_are_the_first_adapter_checks():
    assert CHECKS[:3] == ("options", "parameters", "zero_init")


def test_an_unregistered_tensor_that_requires_grad_is_named():
    spec = _spec("gain_attr", _UnregisteredGain)
    _fails(r"^\[parameters\] gain_attr\{.*\} on linear: gain requires a gradient but is not "
           r"a registered nn\.Parameter: the optimizer never receives it, so it never "
           r"trains", run_adapter_conformance, spec)


def test_a_buffer_that_requires_grad_is_named():
    _fails(r"\[parameters\] grad_buffer.* offset \(a buffer\) requires a gradient",
           run_check, _spec("grad_buffer", _GradBuffer), LINEAR, "parameters")


def test_an_adapter_without_parameters_is_diagnosed_first():
    spec = AdapterSpec("plain", create=lambda b, r, a, o, g: _PlainTensors(b, r, a, g),
                       load=lambda b, t, o: _PlainTensors(b, 4, 3.0),
                       owns_keys=lambda keys: "plain.down" in keys)
    # before this check, the first to fail was paths_agree ("the adapter has no effect")
    _fails(r"^\[parameters\] plain on linear: the adapter has no trainable parameters "
           r"\(no registered nn\.Parameter with requires_grad=True\): training would have "
           r"nothing to optimise$",
           run_adapter_conformance, spec)


def test_plain_tensors_that_require_grad_are_named_with_the_missing_parameters():
    spec = AdapterSpec(
        "plain_grad", create=lambda b, r, a, o, g: _PlainTensors(b, r, a, g, True),
        load=lambda b, t, o: _PlainTensors(b, 4, 3.0), owns_keys=lambda keys: True)
    _fails(r"\[parameters\] plain_grad on linear: the adapter has no trainable parameters"
           r".*; down, up require a gradient but are not registered nn\.Parameters",
           run_check, spec, LINEAR, "parameters")


@pytest.mark.parametrize("check", ["zero_init", "paths_agree", "low_precision"])
def test_an_output_of_the_wrong_shape_is_an_assertion(check):
    spec = _spec("short", _WrongShape)
    error = _fails(rf"^\[{check}\] short\{{.*\}} on linear: .*output shape \[3, 15\] != "
                   rf".* shape \[3, 16\]", run_check, spec, LINEAR, check)
    assert error.__cause__ is None  # found by the check, not caught from torch


def test_a_wrong_shape_fails_the_whole_suite_at_zero_init():
    _fails(r"^\[zero_init\] short.* on linear: bypass output shape \[3, 15\] != the base "
           r"layer's output shape \[3, 16\]$", run_adapter_conformance,
           _spec("short", _WrongShape))


@pytest.mark.parametrize("check", ["file_roundtrip", "low_precision"])
def test_an_adapter_without_file_tensors_is_an_assertion(check):
    _fails(rf"^\[{check}\] no_file\{{.*\}} on linear: _NoFile does not implement "
           rf"file_tensors\(\)", run_check, _spec("no_file", _NoFile), LINEAR, check)


def test_file_tensors_of_the_wrong_kind_is_an_assertion():
    _fails(r"\[file_roundtrip\] list_file.*: file_tensors\(\) returned list, not a mapping",
           run_check, _spec("list_file", _ListFile), LINEAR, "file_roundtrip")


def _refuses(base, rank, alpha, options, generator):
    raise ValueError("rank too large for this layer")


def test_create_raising_is_an_assertion_naming_create():
    error = _fails(r"^\[parameters\] refuses\{.*\} on linear: spec\.create\(layer, rank, "
                   r"alpha, options, generator\) raised ValueError: rank too large for this "
                   r"layer \(at test_conformance_diagnostics\.py:\d+ in _refuses\)$",
                   run_adapter_conformance, _spec("refuses", create=_refuses))
    assert isinstance(error.__cause__, ValueError)


def test_create_returning_nothing_is_an_assertion():
    _fails(r"\[zero_init\] nothing.*: spec\.create returned NoneType, not an AdapterLayer",
           run_check, _spec("nothing", create=lambda *a: None), LINEAR, "zero_init")


def test_load_raising_is_an_assertion_naming_load():
    def load(base, tensors, options):
        return tensors["missing.weight"]

    _fails(r"^\[file_roundtrip\] bad_load.*: spec\.load\(layer, tensors, options\) raised "
           r"KeyError: 'missing\.weight'", run_check, _spec("bad_load", load=load), LINEAR,
           "file_roundtrip")


def test_load_that_freezes_the_adapter_fails_file_roundtrip():
    def load(base, tensors, options):
        return lora.load(base, tensors, options).requires_grad_(False)

    _fails(r"\[file_roundtrip\] frozen_load.*: the adapter spec\.load rebuilt: the adapter "
           r"has no trainable parameters", run_check, _spec("frozen_load", load=load),
           LINEAR, "file_roundtrip")


class _RankOption(PluginOptions):
    rank: int = Field(8, ge=1, description="clashes with adapter.rank")


class _NegativeDefault(PluginOptions):
    gain: float = Field(-1.0, gt=0, description="a default outside its own range")


def test_adapter_options_check_finds_a_reserved_key_and_a_bad_default():
    _fails(r"^\[options\] own_rank.* on linear: adapter plugin 'own_rank' defines reserved "
           r"option\(s\) \['rank'\]: the engine refuses the plugin", run_check,
           _spec("own_rank", config_model=_RankOption), LINEAR, "options", options={})
    _fails(r"^\[options\] neg.* on linear: option gain has a default that does not validate "
           r"\(-1\.0\): Input should be greater than 0", run_adapter_conformance,
           _spec("neg", config_model=_NegativeDefault))


# -- the options check of every suite -----------------------------------------------------

class _BelowRange(PluginOptions):
    c: float = Field(-1.0, gt=0, description="must be positive")


class _WrongType(PluginOptions):
    c: float = Field("big", description="a default of the wrong type")  # type: ignore[assignment]


def _scaled(o):
    return lambda p, t: (p - t).abs() * o.c


def test_options_problems_validate_defaults():
    assert options_problems(_BelowRange) == [
        "option c has a default that does not validate (-1.0): Input should be greater than 0"]
    assert options_problems(_WrongType) == [
        "option c has a default that does not validate ('big'): Input should be a valid "
        "number, unable to parse string as a number"]


def test_loss_suite_fails_a_default_outside_its_range_at_options():
    _fails(r"^\[options\] loss 'below' \(\{'c': -1\.0\}\) on image_ddpm: option c has a "
           r"default that does not validate \(-1\.0\): Input should be greater than 0$",
           run_loss_conformance, LossSpec("below", _scaled, _BelowRange))


def test_loss_suite_fails_a_default_of_the_wrong_type_naming_the_field():
    # before, the loss raised TypeError from multiplying by "big" in the elementwise check
    _fails(r"^\[options\] loss 'wrong_type' \(\{'c': 'big'\}\) on image_ddpm: option c has "
           r"a default that does not validate \('big'\)", run_loss_conformance,
           LossSpec("wrong_type", _scaled, _WrongType))


def test_loss_suite_refuses_a_reserved_key():
    class Target(PluginOptions):
        target: str = Field("x0", description="clashes with loss.target")

    _fails(r"\[options\] loss 'own_target'.*loss plugin 'own_target' defines reserved "
           r"option\(s\) \['target'\]", run_loss_conformance,
           LossSpec("own_target", lambda o: lambda p, t: (p - t) ** 2, Target))


class _OwnLr(PluginOptions):
    lr: float = Field(1e-3, gt=0, description="my own lr")


def _sgd(params, lr, o):
    return torch.optim.SGD(params, lr=lr)


def test_optimizer_suite_refuses_an_lr_option_with_the_engines_reason():
    from loraengine.core.config.root import build_config_model

    spec = OptimizerSpec("own_lr", _sgd, _OwnLr)
    error = _fails(r"^\[options\] optimizer 'own_lr' \(lr 0\.05, \{'lr': 0\.001\}\): "
                   r"optimizer plugin 'own_lr' defines reserved option\(s\) \['lr'\]: the "
                   r"engine refuses the plugin", run_optimizer_conformance, spec)
    host = build_plugin_manager(entry_points=False)
    with registered(host, spec), pytest.raises(PluginError) as engine:
        build_config_model(host.registry)
    assert str(engine.value) in str(error)


def test_optimizer_and_memory_suites_validate_defaults():
    class Momentum(PluginOptions):
        momentum: float = Field(1.5, ge=0, lt=1, description="outside its range")

    _fails(r"^\[options\] optimizer 'momentum'.*: option momentum has a default that does "
           r"not validate \(1\.5\): Input should be less than 1", run_optimizer_check,
           OptimizerSpec("momentum", _sgd, Momentum), "options")

    class Switch(PluginOptions):
        my_switch: bool = Field("sometimes", description="not a bool")  # type: ignore[assignment]

    spec = MemoryStrategySpec("odd_switch", Switch, enabled=lambda c: c.memory.my_switch is True,
                              apply=lambda pipe, memory: None)
    _fails(r"^\[options\] memory strategy 'odd_switch'.*: option my_switch has a default "
           r"that does not validate \('sometimes'\)", run_memory_check, spec, "options",
           {"memory": {"my_switch": True}})


# -- exceptions from a plugin's code are assertions too -----------------------------------

def test_a_loss_without_a_factory_is_an_assertion():
    # before: TypeError: 'NoneType' object is not callable, inside the suite
    _fails(r"^\[elementwise\] loss 'no_factory' \(default options\) on image_ddpm: the "
           r"record's factory is None, not a callable factory\(options\)",
           run_loss_conformance, LossSpec("no_factory", None))


@pytest.mark.parametrize(("factory", "match"), [
    (lambda o: None, r"factory\(options\) returned NoneType, not a loss function"),
    (lambda o: 1 / 0, r"factory\(options\) raised ZeroDivisionError: division by zero"),
    (lambda o: lambda p, t: p.view(-1, 7), r"the loss raised RuntimeError: shape"),
], ids=["returns_none", "raises", "loss_raises"])
def test_a_broken_loss_factory_or_loss_is_an_assertion(factory, match):
    spec = LossSpec("broken", factory)
    for case in loss_cases(spec):
        _fails(rf"^\[elementwise\] loss 'broken' \(default options\) on {case}: {match}",
               run_loss_check, spec, case, "elementwise")


class _StepRaises(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("state broken")


@pytest.mark.parametrize(("spec", "check", "match"), [
    (OptimizerSpec("no_factory", None), "builds", r"the record's factory is None"),
    (OptimizerSpec("refuses", lambda p, lr, o: torch.optim.Adam(p, lr, betas=(2.0, 0.9))),
     "builds", r"factory\(params, lr, options\) raised ValueError: Invalid beta parameter"),
    (OptimizerSpec("step_raises", lambda p, lr, o: _StepRaises(p, lr)), "descends",
     r"optimizer\.step\(\) raised RuntimeError: state broken \(at "
     r"test_conformance_diagnostics\.py:\d+ in step\)"),
], ids=lambda v: v.name if isinstance(v, OptimizerSpec) else None)
def test_a_raising_optimizer_is_an_assertion(spec, check, match):
    error = _fails(rf"^\[{check}\] optimizer '{spec.name}' \(lr 0\.05, default options\): "
                   rf"{match}", run_optimizer_conformance, spec)
    assert error.__cause__ is not None or spec.factory is None


def test_options_that_cannot_be_resolved_are_an_assertion_naming_the_field():
    class Required(PluginOptions):
        momentum: float = Field(ge=0)

    _fails(r"^\[options\] optimizer 'required' \(lr 0\.05\): setting up the check raised "
           r"ValidationError: .*momentum Field required", run_optimizer_conformance,
           OptimizerSpec("required", _sgd, Required))


class _Switch(PluginOptions):
    boom: bool = False


def _boom(pipe, memory):
    raise RuntimeError("cannot install")


def test_a_raising_memory_strategy_is_an_assertion():
    spec = MemoryStrategySpec("boom", _Switch, enabled=lambda c: c.memory.boom, apply=_boom)
    error = _fails(r"^\[same_training\] memory strategy 'boom' \(enabled by .*\): .*cannot "
                   r"install", run_memory_conformance, spec, {"memory": {"boom": True}},
                   checks=["options", "switch", "same_training"])
    assert error.__cause__ is not None


def test_a_bare_assert_in_a_loss_is_reported_with_the_check():
    def factory(o):
        def loss(p, t):
            assert p.ndim == 3, "only 3-D"
            return (p - t) ** 2

        return loss

    error = _fails(r"^\[elementwise\] loss 'asserts' \(default options\) on image_ddpm: the "
                   r"loss raised AssertionError: only 3-D", run_loss_conformance,
                   LossSpec("asserts", factory))
    assert type(error.__cause__) is AssertionError


def test_checks_turn_other_exceptions_into_assertions_chained_to_them():
    table: Checks[object] = Checks()

    @table("explodes")
    def _explodes(c):
        raise KeyError("x")

    with pytest.raises(AssertionError, match=re.escape("[explodes] here: the check raised "
                                                       "KeyError: 'x'")) as info:
        table.run("explodes", object, "here")
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ValueError, match="unknown conformance check"):
        table.run("missing", object, "here")  # a caller's mistake stays what it is
