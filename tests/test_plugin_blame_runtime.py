"""A plugin whose factory succeeds but whose product misbehaves once training runs: a
loss, optimizer, learning-rate schedule, timestep sampler, loss weighting or recipe
hook that raises or returns what its contract does not allow, an adapter layer that
cannot learn, an options default its own field refuses. Each stops the run with one
line naming the plugin, its distribution and what was called (exit 1), instead of an
engine "bug" (exit 70) or a run that trains silently on nonsense."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import the_error_line
from pydantic import Field

from loraengine import (
    LossSpec,
    LossWeightingSpec,
    LRSchedulerSpec,
    OptimizerSpec,
    PluginOptions,
    Recipe,
    RecipeSpec,
    TimestepSamplerSpec,
)
from loraengine.cli.main import cli
from loraengine.core.errors import PluginFailed
from loraengine.plugins import build_plugin_manager
from loraengine.testing.harness import make_plugin, train_tiny

PLUGIN, DIST = "runtime_plugin", "loraengine-runtime"


def host_with(*specs: Any) -> Any:
    """The built-ins plus ``specs``, registered as an installed distribution's are."""
    host = build_plugin_manager(entry_points=False)
    host.register(make_plugin(*specs, name=PLUGIN), name=PLUGIN, distribution=DIST,
                  version="0.1")
    return host


def failure(specs: list[Any], overlay: dict[str, Any], what: str, *needles: str) -> str:
    """Train the tiny model with ``specs`` installed; the ``PluginFailed`` names the
    plugin, its distribution and ``what`` was called, and its line has ``needles``."""
    with pytest.raises(PluginFailed) as err:
        train_tiny(host_with(*specs), overlay)
    e = err.value
    assert (e.plugin, e.distribution, e.what) == (PLUGIN, DIST, what), str(e)
    assert e.exit_code == 1
    line = str(e)
    assert "\n" not in line
    assert line.startswith(f"plugin {PLUGIN!r} (distribution {DIST!r}) failed in {what}: ")
    for needle in needles:
        assert needle in line, line
    return line


def broke(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the plugin broke")


# -- the loss function ----------------------------------------------------------------

def loss(fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> LossSpec[Any]:
    return LossSpec("odd_loss", lambda options: fn)


@pytest.mark.parametrize("fn, needle", [
    (lambda p, t: ((p - t) ** 2).mean(), "returned shape [] for a prediction of shape "
                                        "[2, 4, 8, 8]"),
    (lambda p, t: ((p - t) ** 2).mean(dim=1), "returned shape [2, 8, 8] for a prediction "
                                              "of shape [2, 4, 8, 8]"),
    (lambda p, t: None, "returned None, not a tensor"),
    (lambda p, t: float(((p - t) ** 2).mean().detach()), "returned a float, not a tensor"),
    (lambda p, t: ((p - t) ** 2).detach(), "no gradient flows back through"),
    (broke, "RuntimeError: the plugin broke"),
], ids=["mean", "wrong-shape", "none", "float", "detached", "raises"])
def test_a_loss_function_breaking_its_contract_is_named(fn, needle):
    failure([loss(fn)], {"loss": {"name": "odd_loss"}}, "loss 'odd_loss' function", needle)


def test_a_loss_factory_returning_no_function_is_named():
    failure([LossSpec("odd_loss", lambda options: None)], {"loss": {"name": "odd_loss"}},
            "loss 'odd_loss' factory", "returned None, not a function")


# -- the optimizer ----------------------------------------------------------------------

class _FailingSGD(torch.optim.SGD):
    fails = "step"

    def step(self, closure: Any = None) -> Any:
        if self.fails == "step":
            raise RuntimeError("the plugin broke")
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.fails == "zero_grad":
            raise RuntimeError("the plugin broke")
        super().zero_grad(set_to_none)


@pytest.mark.parametrize("fails", ["step", "zero_grad"])
def test_an_optimizer_failing_in_a_step_is_named(fails):
    def make(params: Any, lr: float, options: Any) -> torch.optim.Optimizer:
        opt = _FailingSGD(params, lr=lr)
        opt.fails = fails
        return opt

    failure([OptimizerSpec("odd_opt", make)], {"optimizer": {"name": "odd_opt"}},
            f"optimizer 'odd_opt' {fails}", "RuntimeError: the plugin broke")


@pytest.mark.parametrize("made, needle", [
    (lambda params, lr: None, "returned None, which has no usable step, zero_grad or "
                              "param_groups"),
    (lambda params, lr: lambda: None, "returned a function"),
], ids=["none", "function"])
def test_an_optimizer_factory_returning_no_optimizer_is_named_not_the_schedule(made, needle):
    spec = OptimizerSpec("odd_opt", lambda params, lr, options: made(params, lr))
    line = failure([spec], {"optimizer": {"name": "odd_opt"}}, "optimizer 'odd_opt' factory",
                   needle)
    assert "constant" not in line  # the built-in schedule made over it is not blamed


# -- the learning-rate schedule ---------------------------------------------------------

def test_a_schedule_factory_returning_a_function_is_named():
    spec = LRSchedulerSpec("odd_sched", lambda opt, total, options: (lambda step: 1.0))
    failure([spec], {"lr_scheduler": {"name": "odd_sched"}}, "lr_scheduler 'odd_sched' factory",
            "returned a function, which has no step()", "LambdaLR")


def test_a_schedule_whose_lambda_raises_in_a_step_is_named():
    def make(opt: Any, total: int, options: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s - 1))

    failure([LRSchedulerSpec("odd_sched", make)], {"lr_scheduler": {"name": "odd_sched"}},
            "lr_scheduler 'odd_sched' step", "ZeroDivisionError")


# -- the timestep sampler ---------------------------------------------------------------

def sampler(draw: Callable[[torch.Generator], Any]) -> TimestepSamplerSpec[Any]:
    return TimestepSamplerSpec("odd_ts", lambda options, schedule: draw)


DDPM = {"timestep_sampler": {"name": "odd_ts"}}
FLOW = {**DDPM, "model": {"family": "module", "prediction_type": "flow"}}


@pytest.mark.parametrize("draw, overlay, needle", [
    (lambda g: float(torch.rand((), generator=g)), DDPM, "returned a float ("),
    (lambda g: torch.tensor(5000), DDPM, "drew 5000, outside the schedule: a timestep here is "
                                         "an integer step in [0, 999] for this 1000-step DDPM"),
    (lambda g: torch.tensor(-1), DDPM, "drew -1, outside the schedule"),
    (lambda g: torch.tensor(float("nan")), FLOW, "drew nan, outside the schedule"),
    (lambda g: torch.rand((), generator=g), DDPM, "not an integer step"),
    (lambda g: torch.randint(0, 1000, (), generator=g) + 2, FLOW,
     "outside the schedule: a timestep here is sigma in [0, 1]"),
    (lambda g: torch.rand((1,), generator=g), FLOW, "returned a tensor of shape [1]; "
                                                    "draw(generator) returns one timestep, "
                                                    "a 0-dim tensor"),
    (broke, DDPM, "RuntimeError: the plugin broke"),
], ids=["float", "too-large", "negative", "nan", "sigma-on-ddpm", "steps-on-flow",
        "not-0-dim", "raises"])
def test_a_timestep_sampler_drawing_outside_its_contract_is_named(draw, overlay, needle):
    failure([sampler(draw)], overlay, "timestep_sampler 'odd_ts' draw", needle)


def test_a_sampler_keeping_to_the_contract_still_trains():
    # fractional-free floats on a DDPM schedule are integer steps too
    result = train_tiny(host_with(sampler(
        lambda g: torch.randint(0, 1000, (), generator=g).double())), DDPM)
    assert result.steps == 2


# -- the loss weighting -----------------------------------------------------------------

@pytest.mark.parametrize("weights, needle", [
    (lambda t: torch.ones(t.shape[0], 1), "returned shape [2, 1] for 2 timesteps"),
    (lambda t: 1.0, "returned a float for 2 timesteps"),
    (broke, "RuntimeError: the plugin broke"),
], ids=["column", "float", "raises"])
def test_a_loss_weighting_breaking_its_contract_is_named(weights, needle):
    spec = LossWeightingSpec("odd_w", lambda options, schedule, target: weights)
    failure([spec], {"loss_weighting": {"name": "odd_w"}}, "loss_weighting 'odd_w' weights",
            needle)


# -- recipes --------------------------------------------------------------------------

class _FailingRecipe(Recipe):
    def __init__(self, fails: str):
        self.fails = fails

    def perturb_noise(self, noise_xt: torch.Tensor, noise_target: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fails == "perturb_noise":
            raise RuntimeError("the plugin broke")
        return noise_xt, noise_target

    def after_optimizer_step(self) -> None:
        if self.fails == "after_optimizer_step":
            raise RuntimeError("the plugin broke")


class _NoOptions(PluginOptions):
    pass


@pytest.mark.parametrize("fails", ["perturb_noise", "after_optimizer_step"])
def test_a_recipe_hook_that_raises_is_named(fails):
    spec = RecipeSpec("odd_recipe", _NoOptions, enabled=lambda c: True,
                      build=lambda config, pipe: _FailingRecipe(fails))
    failure([spec], {}, f"recipe 'odd_recipe' {fails}", "RuntimeError: the plugin broke")


def test_a_recipe_build_returning_none_is_named():
    spec = RecipeSpec("odd_recipe", _NoOptions, enabled=lambda c: True,
                      build=lambda config, pipe: None)
    failure([spec], {}, "recipe 'odd_recipe' build", "returned None, which has no "
            "perturb_noise")


# -- adapters ---------------------------------------------------------------------------

def adapter(change: Callable[[Any], None]) -> Any:
    """The built-in LoRA as another plugin's algorithm, each layer it makes changed."""
    lora = build_plugin_manager(entry_points=False).registry.get("adapter", "lora")

    def create(base: Any, rank: int, alpha: float, options: Any, generator: Any) -> Any:
        layer = lora.create(base, rank, alpha, options, generator)
        change(layer)
        return layer

    return dataclasses.replace(lora, name="odd_adapter", create=create)


def _frozen(layer: Any) -> None:
    layer.requires_grad_(False)


def _plain_gain(layer: Any) -> None:
    layer.gain = torch.ones(3).requires_grad_(True)  # not an nn.Parameter


@pytest.mark.parametrize("change, needle", [
    (_frozen, "has no trainable parameter"),
    (_plain_gain, "holds tensor 'gain' with requires_grad=True as a plain attribute, not "
                  "an nn.Parameter"),
], ids=["no-parameters", "plain-tensor"])
def test_an_adapter_layer_that_cannot_learn_is_named_not_the_optimizer(change, needle):
    line = failure([adapter(change)], {"adapter": {"algorithm": "odd_adapter"}},
                   "adapter 'odd_adapter' create", needle, "for layer ")
    assert "adamw" not in line


# -- options defaults -------------------------------------------------------------------

class _NegativeDefault(PluginOptions):
    c: float = Field(-1.0, gt=0, description="must be positive")


class _WrongTypeDefault(PluginOptions):
    c: float = Field("big", description="not a number")  # type: ignore[assignment]


@pytest.mark.parametrize("options, needle", [
    (_NegativeDefault, "option 'c' defaults to -1.0, which its own field refuses: Input "
                       "should be greater than 0"),
    (_WrongTypeDefault, "option 'c' defaults to 'big', which its own field refuses"),
], ids=["breaks-constraint", "wrong-type"])
def test_an_options_default_its_own_field_refuses_is_named(options, needle):
    spec = LossSpec("odd_loss", lambda o: (lambda p, t: (p - t).abs() * o.c), options)
    line = failure([spec], {"loss": {"name": "odd_loss"}}, "loss 'odd_loss' options", needle,
                   "loss.c")
    assert "setting loss.c in the config" in line


def test_an_options_default_set_in_the_config_is_not_checked():
    spec = LossSpec("odd_loss", lambda o: (lambda p, t: (p - t).abs() * o.c), _NegativeDefault)
    assert train_tiny(host_with(spec), {"loss": {"name": "odd_loss", "c": 0.5}}).steps == 2


def test_validate_names_an_options_default_its_own_field_refuses(cli_validate):
    spec = LossSpec("odd_loss", lambda o: (lambda p, t: (p - t).abs() * o.c), _NegativeDefault)
    result = cli_validate([spec], {"loss": {"name": "odd_loss"}})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if "odd_loss" in line]
    assert len(lines) == 1 and "failed in loss 'odd_loss' options" in lines[0], result.output
    assert "option 'c' defaults to -1.0, which its own field refuses" in lines[0]
    assert "Traceback" not in result.output


# -- through the command line -------------------------------------------------------------

def _cli(monkeypatch, tmp_path, unet_config, *command: str) -> Callable[..., Any]:
    """``loraengine COMMAND`` on a tiny UNet config with ``specs`` installed."""
    def run(specs: list[Any], overlay: dict[str, Any]) -> Any:
        import loraengine.cli.common as common

        host = host_with(*specs)
        monkeypatch.setattr(common, "build_plugin_manager", lambda strict=False: host)
        cfg = {**unet_config, **overlay,
               "output": {"dir": str(tmp_path / "out"), "name": "run", "plot": False}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return CliRunner().invoke(cli, [*command, str(path)])

    return run


@pytest.fixture
def cli_validate(monkeypatch, tmp_path, unet_config):
    return _cli(monkeypatch, tmp_path, unet_config, "validate")


@pytest.fixture
def cli_train(monkeypatch, tmp_path, unet_config):
    return _cli(monkeypatch, tmp_path, unet_config, "train", "-q")


CLI_CASES: dict[str, tuple[Callable[[], list[Any]], dict[str, Any], str]] = {
    "loss shape": (lambda: [loss(lambda p, t: ((p - t) ** 2).mean(dim=1))],
                   {"loss": {"name": "odd_loss"}}, "loss 'odd_loss' function"),
    "timestep range": (lambda: [sampler(lambda g: torch.tensor(5000))],
                       {"timestep_sampler": {"name": "odd_ts"}},
                       "timestep_sampler 'odd_ts' draw"),
    "optimizer none": (lambda: [OptimizerSpec("odd_opt", lambda params, lr, o: None)],
                       {"optimizer": {"name": "odd_opt"}}, "optimizer 'odd_opt' factory"),
    "adapter frozen": (lambda: [adapter(_frozen)], {"adapter": {"algorithm": "odd_adapter"}},
                       "adapter 'odd_adapter' create"),
    "options default": (lambda: [LossSpec("odd_loss", lambda o: (lambda p, t: p - t),
                                          _NegativeDefault)],
                        {"loss": {"name": "odd_loss"}}, "loss 'odd_loss' options"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_command_line_prints_one_line_and_exits_1(cli_train, case):
    specs, overlay, what = CLI_CASES[case]
    result = cli_train(specs(), overlay)
    assert result.exit_code == 1, (result.exit_code, result.output)
    line = the_error_line(result.stderr)
    assert line.startswith(f"error: plugin {PLUGIN!r} (distribution {DIST!r}) failed in "
                           f"{what}: "), line
    assert "a bug in loraengine" not in line
