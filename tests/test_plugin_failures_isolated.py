"""An installed plugin that is broken at load time stops only the configs that use it.

Each case is a package installed through a ``.dist-info`` folder whose plugin fails
as the engine loads it: a registration hook that raises or returns the wrong thing, a
record whose name a built-in or another package provides too, an options model with a
reserved name, a hook pluggy refuses. A config that does not use it validates and
trains, with one warning naming the plugin and its distribution; a config that names
its record is told why the record is missing; ``--strict`` makes it an error."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from loraengine.cli.main import cli
from loraengine.core.errors import ConfigError, PluginError
from loraengine.core.plugins.host import PluginLoadWarning
from loraengine.plugins import build_plugin_manager
from loraengine.testing.harness import one_error_line

PLUGIN, DIST = "le_fail", "le-fail"


@dataclass(frozen=True)
class Case:
    """``sources``: module source by plugin (entry point and module) name, each in a
    distribution named like it with ``-`` for ``_``; ``overlay``: a config using the
    broken record; ``warning``: the whole warning; ``note``: what the error of that
    config says about it; ``strict``: what the ``--strict`` error says (either of two
    where two installed plugins clash: it names them in the order they were found)."""

    sources: dict[str, str]
    overlay: dict[str, Any]
    warning: str
    note: str
    strict: str | tuple[str, ...]
    listed: list[str] = field(default_factory=lambda: [PLUGIN])


def _src(text: str) -> str:
    return "from loraengine import LossSpec, OptimizerSpec, PluginOptions, hookimpl\n" + \
        textwrap.dedent(text)


_LOSS = "lambda options: (lambda pred, target: (pred - target) ** 2)"
_RAISED = ("plugin 'le_fail' (distribution 'le-fail') failed in loraengine_losses: TypeError: "
           "LossSpec.__init__() missing 1 required positional argument: 'factory'")
_DICT = "plugin 'le_fail' (distribution 'le-fail') returned dict from loraengine_losses; " \
    "expected LossSpec"
_BARE = ("plugin 'le_fail' (distribution 'le-fail') returned a bare LossSpec from "
         "loraengine_losses; expected a list of LossSpec")
_WRONG = ("plugin 'le_fail' (distribution 'le-fail') returned LossSpec from "
          "loraengine_optimizers; expected OptimizerSpec")
_TWICE = ("loss 'le_twice' is left out: plugin 'le_one' (distribution 'le-one') and plugin "
          "'le_two' (distribution 'le-two') both provide it; uninstall one to use the other")
_RESERVED = ("optimizer 'le_fail_opt' of plugin 'le_fail' (distribution 'le-fail') {} it "
             "defines reserved option(s) ['lr'], keys the optimizer section has already")
_MISSPELT = ("plugin 'le_fail' from distribution 'le-fail' failed to load: "
             "PluginValidationError: unknown hook 'loraengine_loss' in plugin 'le_fail' "
             "(did you mean 'loraengine_losses'?)")
_ARGUMENT = ("plugin 'le_fail' from distribution 'le-fail' failed to load: "
             "PluginValidationError: Plugin 'le_fail' for hook 'loraengine_losses'; "
             "hookimpl definition: loraengine_losses(config); Argument(s) {'config'} are "
             "declared in the hookimpl but can not be found in the hookspec")
_BYPASS = ("memory 'le_fail_bypass' of plugin 'le_fail' (distribution 'le-fail') is left "
           "out: it defines memory option(s) ['bypass_mode'], which memory 'bypass_mode' "
           "defines already")

CASES: dict[str, Case] = {
    # a. registration hooks that fail
    "hook raises": Case(
        {PLUGIN: _src('''
            @hookimpl
            def loraengine_losses():
                return [LossSpec("le_fail_loss")]  # the factory is missing
        ''')},
        {"loss": {"name": "le_fail_loss"}}, f"{_RAISED}; its loss records are left out",
        _RAISED, _RAISED),
    "hook returns a dict": Case(
        {PLUGIN: _src(f'''
            @hookimpl
            def loraengine_losses():
                return [{{"name": "le_fail_loss", "factory": {_LOSS}}}]
        ''')},
        {"loss": {"name": "le_fail_loss"}}, f"{_DICT}; its loss records are left out", _DICT,
        _DICT),
    "hook returns a bare record": Case(
        {PLUGIN: _src(f'''
            @hookimpl
            def loraengine_losses():
                return LossSpec("le_fail_loss", {_LOSS})
        ''')},
        {"loss": {"name": "le_fail_loss"}}, f"{_BARE}; its loss records are left out", _BARE,
        _BARE),
    "hook returns another category's record": Case(
        {PLUGIN: _src(f'''
            @hookimpl
            def loraengine_optimizers():
                return [LossSpec("le_fail_loss", {_LOSS})]
        ''')},
        {"loss": {"name": "le_fail_loss"}}, f"{_WRONG}; its optimizer records are left out",
        _WRONG, _WRONG),
    # b. names provided twice
    "a built-in's name": Case(
        {PLUGIN: _src(f'''
            @hookimpl
            def loraengine_losses():
                return [LossSpec("mse", {_LOSS}), LossSpec("le_fail_loss", {_LOSS})]
        ''')},
        {}, "loss 'mse' of plugin 'le_fail' (distribution 'le-fail') is left out: plugin "
        "'loraengine.plugins.losses' (distribution 'loraengine') provides that name already",
        "", "conflicting plugins: loss 'mse' is provided by both plugin 'le_fail' "
        "(le-fail) and plugin 'loraengine.plugins.losses' (loraengine)"),
    "two installed plugins' name": Case(
        {name: _src(f'''
            @hookimpl
            def loraengine_losses():
                return [LossSpec("le_twice", {_LOSS})]
        ''') for name in ("le_one", "le_two")},
        {"loss": {"name": "le_twice"}}, _TWICE, _TWICE,
        tuple(f"conflicting plugins: loss 'le_twice' is provided by both plugin {a!r} "
              f"({a.replace('_', '-')}) and plugin {b!r} ({b.replace('_', '-')})"
              for a, b in (("le_one", "le_two"), ("le_two", "le_one"))),
        listed=["le_one", "le_two"]),
    # c. option names the config reserves
    "a reserved option": Case(
        {PLUGIN: _src('''
            import torch

            class Options(PluginOptions):
                lr: float = 1e-3

            @hookimpl
            def loraengine_optimizers():
                return [OptimizerSpec("le_fail_opt",
                                      lambda params, lr, options: torch.optim.SGD(params, lr),
                                      Options)]
        ''')},
        {"optimizer": {"name": "le_fail_opt"}}, _RESERVED.format("is left out:"),
        _RESERVED.format("is left out:"), _RESERVED.format("cannot be used:")),
    "a memory option a built-in has": Case(
        {PLUGIN: _src('''
            from loraengine import MemoryStrategySpec

            class Options(PluginOptions):
                bypass_mode: bool = False

            @hookimpl
            def loraengine_memory_strategies():
                return [MemoryStrategySpec("le_fail_bypass", Options, enabled=lambda c: False,
                                           apply=lambda ctx, memory: None)]
        ''')},
        {}, _BYPASS, "", _BYPASS.replace("is left out:", "cannot be used:")),
    # d. hooks pluggy refuses
    "a misspelt hook": Case(
        {PLUGIN: _src(f'''
            @hookimpl
            def loraengine_loss():
                return [LossSpec("le_fail_loss", {_LOSS})]
        ''')},
        {"loss": {"name": "le_fail_loss"}}, _MISSPELT, _MISSPELT, _MISSPELT),
    "an argument the hook does not have": Case(
        {PLUGIN: _src(f'''
            @hookimpl
            def loraengine_losses(config):
                return [LossSpec("le_fail_loss", {_LOSS})]
        ''')},
        {"loss": {"name": "le_fail_loss"}}, _ARGUMENT, _ARGUMENT, _ARGUMENT),
}


def _install(site: Path, sources: dict[str, str]) -> None:
    for name, source in sources.items():
        dist = name.replace("_", "-")
        info = site / f"{name}-0.1.dist-info"
        info.mkdir(parents=True)
        (site / f"{name}.py").write_text(source)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[loraengine]\n{name} = {name}\n")


@pytest.fixture(params=list(CASES))
def case(request, tmp_path: Path, monkeypatch) -> Any:
    """The case, its package installed for the test."""
    chosen = CASES[request.param]
    _install(tmp_path / "site", chosen.sources)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield chosen
    for name in chosen.sources:
        sys.modules.pop(name, None)


def _config(tmp_path: Path, unet_config: dict[str, Any], overlay: dict[str, Any]) -> Path:
    path = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**unet_config, **overlay}))
    return path


def _warnings(output: str) -> list[str]:
    return [line.removeprefix("warning: ") for line in output.splitlines()
            if line.startswith("warning: ")]


def test_a_config_not_using_it_validates_with_one_warning(case, tmp_path, unet_config):
    result = CliRunner().invoke(cli, ["validate", str(_config(tmp_path, unet_config, {}))])
    assert result.exit_code == 0, result.output
    assert _warnings(result.stderr) == [case.warning]
    assert result.stdout.strip().endswith(": ok")


def test_a_config_not_using_it_trains(case, tmp_path, unet_config):
    unet_config["training"]["steps"] = 1
    result = CliRunner().invoke(cli, ["train", "-q", str(_config(tmp_path, unet_config, {}))])
    assert result.exit_code == 0, result.output
    assert case.warning in _warnings(result.stderr)
    assert (tmp_path / "out" / "test.safetensors").exists()


def test_a_config_naming_its_record_says_why_it_is_missing(case, tmp_path, unet_config):
    if not case.note:
        pytest.skip("no config names it (a built-in of that name is used, or a memory "
                    "strategy, which configs do not name)")
    path = _config(tmp_path, unet_config, case.overlay)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "unknown " in errors[0] and f"(note: {case.note})" in errors[0], errors[0]


def test_strict_is_one_error_naming_it(case, tmp_path, unet_config):
    path = _config(tmp_path, unet_config, {})
    err = one_error_line(CliRunner().invoke(cli, ["--strict", "validate", str(path)]), 1)
    strict = case.strict if isinstance(case.strict, tuple) else (case.strict,)
    assert err.removeprefix("error: ") in strict, err


def test_the_listing_shows_it_as_failed_and_exits_0(case):
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    failed = [r for r in records if "error" in r]
    assert sorted(r["plugin"] for r in failed) == case.listed, failed
    assert {("loss", "huber"), ("optimizer", "adamw")} <= {(r["category"], r["name"])
                                                           for r in records}
    assert all(f"failed: {r['error']}" in result.stderr for r in failed)


def test_the_built_in_record_is_kept_in_a_clash(tmp_path, monkeypatch):
    _install(tmp_path, CASES["a built-in's name"].sources)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            registry = build_plugin_manager().registry
    finally:
        sys.modules.pop(PLUGIN, None)
    assert registry.entries["loss"]["mse"].plugin == "loraengine.plugins.losses"
    assert registry.entries["loss"]["le_fail_loss"].plugin == PLUGIN  # its other record
    assert [str(w.message) for w in caught if w.category is PluginLoadWarning] == \
        [CASES["a built-in's name"].warning]


def test_a_failure_is_reported_once_however_often_the_registry_is_made(tmp_path, monkeypatch):
    _install(tmp_path, CASES["hook raises"].sources)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        host = build_plugin_manager()
    finally:
        sys.modules.pop(PLUGIN, None)
    reported: list[str] = []
    host.report = reported.append
    first = host.registry
    host.register(type("Quiet", (), {})(), name="quiet")  # a new registry is made
    assert host.registry is not first and "le_fail_loss" not in host.registry.names("loss")
    assert reported == [CASES["hook raises"].warning]
    assert [(f.plugin, f.distribution, f.category) for f in host.dropped] == \
        [(PLUGIN, DIST, "loss")]


def test_a_clash_is_noted_for_its_name_only(tmp_path, monkeypatch):
    _install(tmp_path, CASES["two installed plugins' name"].sources)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        host = build_plugin_manager()
        host.report = lambda message: None
        registry = host.registry
    finally:
        for name in ("le_one", "le_two"):
            sys.modules.pop(name, None)
    with pytest.raises(ConfigError, match="both provide it"):
        registry.get("loss", "le_twice")
    assert "note" not in registry.unknown("loss", "le_thrice")
    assert "le_twice" not in registry.names("loss")


def test_a_plugin_given_by_the_caller_is_still_an_error():
    """Only installed plugins are left out: one handed to the host by its caller is
    what the caller asked for, and its failure stops the run as before."""
    from loraengine.testing.harness import make_plugin

    broken = make_plugin(name="given", loraengine_losses=lambda: [{"name": "x"}])
    host = build_plugin_manager(entry_points=False, extra=[broken])
    with pytest.raises(PluginError, match="plugin 'given' returned dict"):
        host.registry  # noqa: B018


def test_a_refused_plugin_given_by_the_caller_is_an_error_naming_it():
    from loraengine.testing.harness import make_plugin

    typo = make_plugin(name="typo", loraengine_optimisers=lambda: [])
    with pytest.raises(PluginError, match=r"plugin 'typo' .*unknown hook "
                                          r"'loraengine_optimisers' .*'loraengine_optimizers'"):
        build_plugin_manager(entry_points=False, extra=[typo])
