"""Every hook of core/plugins/hookspecs.py, implemented the way a third-party package would and
driven through the engine: the record a registration hook returns is validated in the
config and used in training; the lifecycle hooks are called in order with what they
promise; ``loraengine_register_commands`` adds a working subcommand.

(tests/test_docs_meta.py checks that each hook is named by at least one test.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file

from loraengine import (
    ExporterSpec,
    LoggerSpec,
    LossSpec,
    LossWeightingSpec,
    LRSchedulerSpec,
    MemoryStrategySpec,
    ModelFamilySpec,
    NoOptions,
    PluginOptions,
    RecipeSpec,
    TimestepSamplerSpec,
    hookimpl,
)
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError, PluginError, PluginFailed
from loraengine.testing.harness import make_plugin, tiny_data, tiny_train_config, train_tiny

# -- registration hooks ------------------------------------------------------------------

def test_loraengine_adapters_record_trains_and_names_the_file(builtin_host, tmp_path):
    lora = builtin_host.registry.get("adapter", "lora")
    mine = dataclasses.replace(lora, name="hook_lora")
    builtin_host.register(make_plugin(name="hooks_adapter", loraengine_adapters=lambda: [mine]))
    result = train_tiny(builtin_host, {"adapter": {"algorithm": "hook_lora"},
                                       "output": {"dir": str(tmp_path), "plot": False}},
                        write_files=True)
    from safetensors import safe_open

    with safe_open(str(result.path), "pt") as f:
        assert f.metadata()["loraengine.algorithm"] == "hook_lora"
    assert any(k.endswith("lora_up.weight") for k in result.lora)


class CountOptions(PluginOptions):
    count_forwards: bool = Field(False, description="Count the model's forward calls.")


def test_loraengine_memory_strategies_record_joins_memory_and_is_undone(builtin_host):
    calls: list[int] = []

    def apply(pipe, memory):
        handle = pipe.model.register_forward_pre_hook(lambda m, a: calls.append(1))
        return handle.remove

    spec = MemoryStrategySpec("hook_counter", CountOptions,
                              enabled=lambda c: c.memory.count_forwards, apply=apply)
    builtin_host.register(make_plugin(name="hooks_memory",
                                      loraengine_memory_strategies=lambda: [spec]))
    from loraengine.testing.models import TinyDenoiser

    model = TinyDenoiser()
    train_tiny(builtin_host, {"memory": {"count_forwards": True}}, model=model)
    assert len(calls) == 2  # two steps, one micro-batch each
    assert not model._forward_pre_hooks  # the undo ran when the pipeline closed
    with pytest.raises(ConfigError, match="memory.count_forwardz: unknown key"):
        train_tiny(builtin_host, {"memory": {"count_forwardz": True}})


class TraceOptions(PluginOptions):
    trace_model: bool = Field(False, description="Record which model was traced.")


def test_a_memory_strategy_adds_keys_to_another_section_with_one_owner(builtin_host):
    """``MemoryStrategySpec.extends``: the strategy's key sits in the ``model`` section
    of every family (as the built-in quantized base's ``model.quantize`` does), and a
    key another strategy already added is refused naming both."""
    seen: list[bool] = []

    def apply(ctx, memory):
        seen.append(ctx.config.model.trace_model)

    spec = MemoryStrategySpec("model_tracer", NoOptions, enabled=lambda c: True,
                              apply=apply, extends={"model": TraceOptions})
    builtin_host.register(make_plugin(name="hooks_extends",
                                      loraengine_memory_strategies=lambda: [spec]))
    train_tiny(builtin_host, {"model": {"trace_model": True}})
    assert seen == [True]
    with pytest.raises(ConfigError, match="model.trace_modell: unknown key"):
        train_tiny(builtin_host, {"model": {"trace_modell": True}})


def test_a_section_key_added_twice_names_both_owners():
    from loraengine.plugins import build_plugin_manager
    from loraengine.plugins.memory.quantize import QuantizeOptions

    again = MemoryStrategySpec("second_quantizer", NoOptions, enabled=lambda c: False,
                               apply=lambda ctx, memory: None,
                               extends={"model": QuantizeOptions})
    host = build_plugin_manager(entry_points=False, extra=[make_plugin(
        name="hooks_clash", loraengine_memory_strategies=lambda: [again])])
    with pytest.raises(PluginError, match="model option 'quantize' is defined by both "
                       "memory strategy 'quantized_base' and memory strategy "
                       "'second_quantizer'"):
        parse_config({"model": {"family": "module"}}, host.registry)


class SizeOptions(PluginOptions):
    hidden: int = Field(16, ge=4, description="Width of the denoiser.")


def test_loraengine_models_record_loads_the_model_named_in_the_config(builtin_host):
    from loraengine.core.model import LoadedModel
    from loraengine.core.schedule import NoiseSchedule
    from loraengine.testing.models import TinyDenoiser

    built: list[int] = []

    def load(options, context):
        built.append(options.hidden)
        module = TinyDenoiser(hidden=options.hidden)
        return LoadedModel(module=module, predict=lambda m, x, t, c: m(x, t, c["cond"]),
                           schedule=NoiseSchedule.ddpm(), blocks=list(module.blocks))

    spec = ModelFamilySpec("hook_family", load, SizeOptions)
    builtin_host.register(make_plugin(name="hooks_model", loraengine_models=lambda: [spec]))
    data = tiny_data()
    import loraengine

    result = loraengine.train(tiny_train_config({"model": {"family": "hook_family",
                                                           "hidden": 8}}),
                              latents=data.latents, conditioning=data.conditioning,
                              host=builtin_host)
    assert built == [8] and result.steps == 2
    assert tuple(result.lora["lora_unet_conv_in.lora_up.weight"].shape[:1]) == (8,)


def test_loraengine_lr_schedulers_record_sets_each_steps_rate(builtin_host):
    def halving(optimizer, total_steps, options):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)

    spec = LRSchedulerSpec("hook_halving", halving)
    builtin_host.register(make_plugin(name="hooks_sched", loraengine_lr_schedulers=lambda: [spec]))
    result = train_tiny(builtin_host, {"lr_scheduler": {"name": "hook_halving"},
                                       "training": {"steps": 3}, "optimizer": {"lr": 0.01}})
    assert result.loss_map["lr"] == pytest.approx([0.01, 0.005, 0.0025])


def _flat_to_file(modules):
    return {f"flat::{path}::{param}": t for path, params in modules.items()
            for param, t in params.items()}


def _flat_from_file(tensors, module_paths):
    if not any(k.startswith("flat::") for k in tensors):
        return None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        _, path, param = key.split("::")
        grouped.setdefault(path, {})[param] = tensor
    return grouped


def test_loraengine_exporters_record_writes_and_reads_its_key_format(builtin_host, tmp_path):
    spec = ExporterSpec("hook_flat", _flat_to_file, _flat_from_file)
    builtin_host.register(make_plugin(name="hooks_export", loraengine_exporters=lambda: [spec]))
    first = train_tiny(builtin_host, {"adapter": {"exporter": "hook_flat"},
                                      "output": {"dir": str(tmp_path), "name": "a",
                                                 "plot": False}}, write_files=True)
    keys = set(load_file(str(first.path)))
    assert keys and all(k.startswith("flat::") for k in keys)
    # adapter.existing reads it back through from_file and continues the step count
    second = train_tiny(builtin_host, {"adapter": {"existing": str(first.path)},
                                       "training": {"steps": 1}})
    assert second.steps == 3


def test_loraengine_timestep_samplers_and_loss_weightings_records_are_used(builtin_host):
    seen: list[torch.Tensor] = []

    def sampler(options, schedule):
        return lambda generator: torch.tensor(999)

    def loss(options):
        def fn(pred, target, t, schedule):
            seen.append(t.clone())
            return (pred - target) ** 2
        return fn

    def weighting(options, schedule, loss_target):
        return lambda t: torch.zeros(t.shape[0])

    builtin_host.register(make_plugin(
        name="hooks_recipes",
        loraengine_timestep_samplers=lambda: [TimestepSamplerSpec("hook_late", sampler)],
        loraengine_loss_weightings=lambda: [LossWeightingSpec("hook_zero", weighting)],
        loraengine_losses=lambda: [LossSpec("hook_seen", loss, timestep_aware=True)]))
    result = train_tiny(builtin_host, {"timestep_sampler": {"name": "hook_late"},
                                       "loss_weighting": {"name": "hook_zero"},
                                       "loss": {"name": "hook_seen"},
                                       "optimizer": {"name": "sgd"}})
    assert seen and all(bool((t == 999).all()) for t in seen)
    assert result.loss_map["loss"] == [0.0, 0.0]  # every sample weighted 0
    ups = [v for k, v in result.lora.items() if k.endswith("lora_up.weight")]
    assert all(not v.any() for v in ups)  # zero loss, zero gradient: up stays at 0


class TallyOptions(PluginOptions):
    hook_tally: bool = Field(False, description="Count optimizer steps.")


def test_loraengine_recipes_record_joins_recipe_and_is_called_each_step(builtin_host):
    from loraengine.core.recipe import Recipe

    tallies: list[Any] = []

    class Tally(Recipe):
        name = "hook_tally"

        def __init__(self):
            self.steps = 0
            tallies.append(self)

        def after_optimizer_step(self):
            self.steps += 1

    spec = RecipeSpec("hook_tally", TallyOptions, enabled=lambda c: c.recipe.hook_tally,
                      build=lambda config, pipe: Tally())
    builtin_host.register(make_plugin(name="hooks_recipe", loraengine_recipes=lambda: [spec]))
    train_tiny(builtin_host, {"recipe": {"hook_tally": True}, "training": {"steps": 3}})
    assert [t.steps for t in tallies] == [3]
    train_tiny(builtin_host, {})
    assert len(tallies) == 1  # off by default: not built


# -- lifecycle hooks ---------------------------------------------------------------------

def test_lifecycle_hooks_are_called_in_order_with_their_arguments(builtin_host, tmp_path):
    events: list[tuple] = []

    def loraengine_on_train_start(run):
        events.append(("start", run.total_steps, run.start_step, str(run.output_dir)))

    def loraengine_on_step_end(run, step, metrics):
        events.append(("step", step, sorted(metrics)))

    def loraengine_on_save(run, path, kind):
        events.append(("save", kind, path))

    def loraengine_on_train_end(run, result):
        events.append(("end", result))

    builtin_host.register(make_plugin(
        name="hooks_lifecycle", loraengine_on_train_start=loraengine_on_train_start,
        loraengine_on_step_end=loraengine_on_step_end, loraengine_on_save=loraengine_on_save,
        loraengine_on_train_end=loraengine_on_train_end))
    result = train_tiny(builtin_host, {"output": {"dir": str(tmp_path), "name": "life"}},
                        write_files=True)
    assert events[0] == ("start", 2, 0, str(tmp_path))
    assert events[1] == ("step", 1, ["loss", "lr", "skipped"])
    assert events[2] == ("step", 2, ["loss", "lr", "skipped"])
    saves = [e for e in events if e[0] == "save"]
    assert {kind for _, kind, _ in saves} >= {"lora", "loss_map", "plot"}
    for _, _, path in saves:
        assert (tmp_path / path).exists()
    assert str(result.path) in [p for _, _, p in saves]
    assert events[-1] == ("end", result)
    assert max(i for i, e in enumerate(events) if e[0] == "save") < len(events) - 1


def test_loraengine_loggers_a_named_logger_gets_one_object_per_run_and_its_hooks(
        builtin_host, tmp_path):
    made: list[Any] = []

    class Recorder:
        def __init__(self):
            self.seen: list[tuple] = []
            made.append(self)

        @hookimpl
        def loraengine_on_train_start(self, run):
            self.seen.append(("start", run.config.output.name))

        @hookimpl
        def loraengine_on_step_end(self, run, step, metrics):
            self.seen.append(("step", step, metrics["loss"]))

        @hookimpl
        def loraengine_on_train_end(self, run, result):
            self.seen.append(("end", result.steps))

    wanted = {"missing": None}
    spec = LoggerSpec("recorder", factory=Recorder, missing=lambda: wanted["missing"])
    builtin_host.register(make_plugin(name="hooks_logger", loraengine_loggers=lambda: [spec]))
    assert "recorder" in builtin_host.registry.names("logger")
    for name in ("one", "two"):
        result = train_tiny(builtin_host, {"output": {"dir": str(tmp_path), "name": name,
                                                      "loggers": ["recorder"]}},
                            write_files=True)
    first, second = made
    assert first.seen[0] == ("start", "one") and second.seen[0] == ("start", "two")
    assert [e[2] for e in second.seen if e[0] == "step"] == result.loss_map["loss"]
    assert first.seen[-1] == ("end", 2) and len(first.seen) == 4  # its own run only
    train_tiny(builtin_host, {"output": {"dir": str(tmp_path), "name": "off", "loggers": []}},
               write_files=True)
    assert len(made) == 2  # a logger not named is never made
    wanted["missing"] = "the recorder package: pip install recorder"
    with pytest.raises(ConfigError, match=r"output\.loggers\.0: logger 'recorder' needs the "
                       r"recorder package: pip install recorder"):
        parse_config({"output": {"loggers": ["recorder"]}}, builtin_host.registry)
    with pytest.raises(ConfigError, match=r"unknown logger 'recorde'; installed: .*recorder"):
        parse_config({"output": {"loggers": ["recorde"]}}, builtin_host.registry)


def test_loraengine_register_commands_adds_a_working_subcommand(builtin_host, monkeypatch,
                                                                capsys):
    from loraengine.cli import main as cli_main

    @click.command("hook-hello")
    @click.argument("who")
    def hello(who):
        click.echo(f"hello {who}")

    builtin_host.register(make_plugin(name="hooks_cli",
                                      loraengine_register_commands=lambda cli: cli.add_command(hello)))
    monkeypatch.setattr(cli_main, "build_plugin_manager", lambda: builtin_host)
    monkeypatch.setattr("sys.argv", ["loraengine", "hook-hello", "world"])
    try:
        with pytest.raises(SystemExit) as done:
            cli_main.main()
        assert done.value.code == 0
        assert capsys.readouterr().out == "hello world\n"
    finally:
        cli_main.cli.commands.pop("hook-hello", None)


def test_a_hook_returning_nothing_is_allowed(builtin_host):
    builtin_host.register(make_plugin(name="hooks_none", loraengine_losses=lambda: None))
    assert "mse" in builtin_host.registry.names("loss")


def test_a_failing_on_save_hook_does_not_cost_the_loss_map(builtin_host, tmp_path):
    def loraengine_on_save(run, path, kind):
        if kind == "lora":
            raise RuntimeError("upload failed")

    builtin_host.register(make_plugin(name="hooks_failing_save", loraengine_on_save=loraengine_on_save))
    # the hook's error reaches the caller as a PluginFailed naming the plugin, with the
    # plugin's own exception chained
    with pytest.raises(PluginFailed, match="hooks_failing_save.*upload failed") as err:
        train_tiny(builtin_host, {"output": {"dir": str(tmp_path), "name": "kept",
                                             "plot": False}}, write_files=True)
    assert isinstance(err.value.__cause__, RuntimeError)
    assert (tmp_path / "kept.safetensors").exists()
    assert (tmp_path / "kept.loss.json").exists()
