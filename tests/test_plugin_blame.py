"""A third-party plugin whose factory, strategy, recipe or lifecycle hook raises: the
run stops with one line naming the plugin, its distribution and what was called (exit
1, no traceback unless ``--debug``), and what is on disk stays consistent."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import the_error_line
from safetensors.torch import load_file

from loraengine import (
    ExporterSpec,
    LossSpec,
    LossWeightingSpec,
    LRSchedulerSpec,
    MemoryStrategySpec,
    ModelFamilySpec,
    NoOptions,
    OptimizerSpec,
    RecipeSpec,
    TimestepSamplerSpec,
)
from loraengine.cli.main import cli
from loraengine.core.errors import ConfigError, PluginFailed
from loraengine.plugins import build_plugin_manager
from loraengine.testing.harness import make_plugin, train_tiny

PLUGIN, DIST = "boom_plugin", "loraengine-boom"


def boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the plugin broke")


def _adapter_spec() -> Any:
    lora = build_plugin_manager(entry_points=False).registry.get("adapter", "lora")
    return dataclasses.replace(lora, name="boom_adapter", create=boom)


#: case -> (the plugin's records and hooks, config overlay, what the line names)
CASES: dict[str, tuple[Callable[[], dict[str, Any]], dict[str, Any], str]] = {
    "optimizer factory": (lambda: {"specs": [OptimizerSpec("boom_opt", boom)]},
                          {"optimizer": {"name": "boom_opt"}}, "optimizer 'boom_opt' factory"),
    "lr_scheduler factory": (lambda: {"specs": [LRSchedulerSpec("boom_sched", boom)]},
                             {"lr_scheduler": {"name": "boom_sched"}},
                             "lr_scheduler 'boom_sched' factory"),
    "loss factory": (lambda: {"specs": [LossSpec("boom_loss", boom)]},
                     {"loss": {"name": "boom_loss"}}, "loss 'boom_loss' factory"),
    "timestep sampler factory": (lambda: {"specs": [TimestepSamplerSpec("boom_ts", boom)]},
                                 {"timestep_sampler": {"name": "boom_ts"}},
                                 "timestep_sampler 'boom_ts' factory"),
    "loss weighting factory": (lambda: {"specs": [LossWeightingSpec("boom_w", boom)]},
                               {"loss_weighting": {"name": "boom_w"}},
                               "loss_weighting 'boom_w' factory"),
    "memory strategy apply": (
        lambda: {"specs": [MemoryStrategySpec("boom_mem", NoOptions, enabled=lambda c: True,
                                              apply=boom)]},
        {}, "memory 'boom_mem' apply"),
    "recipe build": (
        lambda: {"specs": [RecipeSpec("boom_recipe", NoOptions, enabled=lambda c: True,
                                      build=boom)]},
        {}, "recipe 'boom_recipe' build"),
    "memory strategy enabled": (
        lambda: {"specs": [MemoryStrategySpec("boom_mem", NoOptions, enabled=boom,
                                              apply=lambda ctx, memory: None)]},
        {}, "memory 'boom_mem' enabled"),
    "recipe enabled": (
        lambda: {"specs": [RecipeSpec("boom_recipe", NoOptions, enabled=boom, build=boom)]},
        {}, "recipe 'boom_recipe' enabled"),
    "adapter create": (lambda: {"specs": [_adapter_spec()]},
                       {"adapter": {"algorithm": "boom_adapter"}},
                       "adapter 'boom_adapter' create"),
    "exporter to_file": (lambda: {"specs": [ExporterSpec("boom_keys", boom, boom)]},
                         {"adapter": {"exporter": "boom_keys"}},
                         "exporter 'boom_keys' to_file"),
    "registration hook": (lambda: {"hooks": {"loraengine_optimizers": boom}}, {},
                          "loraengine_optimizers"),
    "on_train_start": (lambda: {"hooks": {"loraengine_on_train_start": lambda run: boom()}},
                       {}, "loraengine_on_train_start"),
    "on_step_end": (lambda: {"hooks": {"loraengine_on_step_end":
                                       lambda run, step, metrics: boom() if step == 2 else None}},
                    {}, "loraengine_on_step_end"),
}


def host_with(plugin: Any) -> Any:
    """The built-ins plus ``plugin``, registered as an installed distribution's is."""
    host = build_plugin_manager(entry_points=False)
    host.register(plugin, name=PLUGIN, distribution=DIST, version="0.1")
    return host


def plugin_of(parts: dict[str, Any]) -> Any:
    return make_plugin(*parts.get("specs", ()), name=PLUGIN, **parts.get("hooks", {}))


@pytest.fixture
def cli_train(monkeypatch, tmp_path, unet_config):
    """Run ``loraengine train`` on the tiny UNet with ``plugin`` installed; the output
    folder already holds a previous run of the same name."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "prev.safetensors").write_bytes(b"previous good LoRA")
    (out / "prev.loss.json").write_bytes(b'{"loss": [1.0]}')

    def run(plugin: Any, overlay: dict[str, Any], *flags: str, name: str = "prev") -> Any:
        import loraengine.cli.common as common

        host = host_with(plugin)
        monkeypatch.setattr(common, "build_plugin_manager", lambda strict=False: host)
        cfg = {**unet_config, **overlay,
               "output": {"dir": str(out), "name": name, "plot": False}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return CliRunner().invoke(cli, [*flags, "train", "-q", str(path)])

    run.out = out  # type: ignore[attr-defined]
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def assert_only_the_event_log_grew(before, after):
    """Every file as it was, but the run's event log (``<name>.events.jsonl``), which
    every run appends to, the failed one too: its earlier lines are kept as they were."""
    logs = {k for k in before.keys() | after.keys() if str(k).endswith(".events.jsonl")}
    assert {k: v for k, v in after.items() if k not in logs} == {
        k: v for k, v in before.items() if k not in logs}
    for k in logs:
        assert after[k].startswith(before.get(k, b"")), k


def one_line(result: Any, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    line = the_error_line(result.stderr)
    for needle in (f"plugin {PLUGIN!r}", repr(DIST), "RuntimeError: the plugin broke", *needles):
        assert needle in line, line
    return line


@pytest.mark.parametrize("case", list(CASES))
def test_a_raising_plugin_is_one_line_naming_it(cli_train, case):
    parts, overlay, what = CASES[case]
    before = snapshot(cli_train.out)
    one_line(cli_train(plugin_of(parts()), overlay), what)
    # the previous run's files are untouched
    assert_only_the_event_log_grew(before, snapshot(cli_train.out))


@pytest.mark.parametrize("kind", ["lora", "loss_map"])
def test_a_raising_on_save_hook_leaves_lora_and_loss_map_written(cli_train, kind):
    def on_save(run, path, kind):
        if kind == failing:
            boom()

    failing = kind
    plugin = make_plugin(name=PLUGIN, loraengine_on_save=on_save)
    one_line(cli_train(plugin, {}, name="fresh"), "loraengine_on_save")
    out = cli_train.out
    assert set(load_file(str(out / "fresh.safetensors")))  # a complete, readable LoRA
    assert len(json.loads((out / "fresh.loss.json").read_text())["loss"]) == 3
    assert (out / "prev.safetensors").read_bytes() == b"previous good LoRA"


def test_a_raising_on_train_end_hook_comes_after_the_files(cli_train):
    plugin = make_plugin(name=PLUGIN, loraengine_on_train_end=lambda run, result: boom())
    one_line(cli_train(plugin, {}, name="fresh"), "loraengine_on_train_end")
    assert set(load_file(str(cli_train.out / "fresh.safetensors")))
    assert (cli_train.out / "fresh.loss.json").exists()


def test_a_raising_model_family_names_its_load(cli_train, unet_config):
    spec = ModelFamilySpec("boom_model", boom, NoOptions)
    line = one_line(cli_train(make_plugin(spec, name=PLUGIN), {"model": {"family": "boom_model"}}),
                    "model 'boom_model' load")
    assert "boom_model" in line


def test_debug_shows_the_plugins_own_traceback(cli_train):
    parts, overlay, _ = CASES["optimizer factory"]
    result = cli_train(plugin_of(parts()), overlay, "--debug")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "RuntimeError: the plugin broke" in result.stderr
    assert "in boom" in result.stderr  # the plugin's frame is shown


def test_an_engine_error_a_plugin_raises_on_purpose_passes_unchanged():
    def refuse(params, lr, options):
        raise ConfigError("optimizer.name: boom_opt needs at least 2 parameters")

    host = host_with(make_plugin(OptimizerSpec("boom_opt", refuse), name=PLUGIN))
    with pytest.raises(ConfigError, match="needs at least 2 parameters"):
        train_tiny(host, {"optimizer": {"name": "boom_opt"}})


def test_plugin_failed_carries_who_and_what_and_chains_the_original():
    host = host_with(make_plugin(LossSpec("boom_loss", boom), name=PLUGIN))
    with pytest.raises(PluginFailed) as err:
        train_tiny(host, {"loss": {"name": "boom_loss"}})
    e = err.value
    assert (e.plugin, e.distribution, e.what) == (PLUGIN, DIST, "loss 'boom_loss' factory")
    assert isinstance(e.__cause__, RuntimeError) and e.exit_code == 1


def test_the_hook_that_raised_is_found_among_several():
    """Two plugins implement on_step_end; only the second raises and only it is named."""
    seen: list[int] = []
    host = build_plugin_manager(entry_points=False)
    host.register(make_plugin(name="quiet_plugin",
                              loraengine_on_step_end=lambda run, step, metrics: seen.append(step)),
                  name="quiet_plugin", distribution="loraengine-quiet")

    class Loud:
        from loraengine.core.plugins.hookspecs import hookimpl

        @hookimpl
        def loraengine_on_step_end(self, run, step, metrics):
            raise ValueError("loud")

    host.register(Loud(), name="loud_plugin", distribution="loraengine-loud")
    with pytest.raises(PluginFailed, match="'loud_plugin'.*'loraengine-loud'.*ValueError: loud"):
        train_tiny(host, {})
