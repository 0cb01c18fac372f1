"""The plugin host: built-ins, entry points found through dist-info, clashes, failures."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
from click.testing import CliRunner
from conftest import REPO

from loraengine import OptimizerSpec, hookimpl
from loraengine.cli.main import cli
from loraengine.core.errors import PluginError
from loraengine.core.plugins.host import PluginLoadWarning
from loraengine.plugins import build_plugin_manager

SITE = REPO / "tests" / "plugins" / "site"
BROKEN = REPO / "tests" / "plugins" / "broken_site"


@pytest.fixture
def extra_site(monkeypatch):
    monkeypatch.syspath_prepend(str(SITE))
    yield
    sys.modules.pop("le_extra", None)


@pytest.fixture
def broken_site(monkeypatch):
    monkeypatch.syspath_prepend(str(BROKEN))


def test_plugins_json_lists_builtins_with_provider():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    by_key = {(r["category"], r["name"]): r for r in records}
    for cat, name, module in [("optimizer", "adamw", "optimizers"), ("optimizer", "adam", "optimizers"),
                              ("optimizer", "sgd", "optimizers"), ("optimizer", "rmsprop", "optimizers"),
                              ("loss", "mse", "losses"), ("loss", "l1", "losses"),
                              ("loss", "huber", "losses"), ("loss", "smooth_l1", "losses"),
                              ("adapter", "lora", "adapters")]:
        rec = by_key[(cat, name)]
        assert rec["plugin"] == f"loraengine.plugins.{module}"
        assert rec["distribution"] == "loraengine"
        assert set(rec) == {"category", "name", "plugin", "distribution", "version"}


def test_plugins_table_is_printed():
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert "adamw" in result.output and "smooth_l1" in result.output


def test_entry_point_plugin_is_registered_with_its_distribution(extra_site):
    host = build_plugin_manager()
    rec = host.registry.entries["optimizer"]["signsgd"]
    assert (rec.plugin, rec.distribution, rec.version) == ("le_extra", "le-extra", "1.2.0")
    assert "charbonnier" in host.registry.names("loss")


def test_config_naming_external_plugins_trains(extra_site, unet_config):
    import loraengine

    unet_config["optimizer"] = {"name": "signsgd", "lr": 1e-3, "momentum": 0.5}
    unet_config["loss"] = {"name": "charbonnier", "eps": 0.01}
    unet_config["training"]["steps"] = 2
    result = loraengine.train(unet_config)
    assert len(result.loss_map["loss"]) == 2
    assert result.path is not None and result.path.exists()


def test_external_plugin_options_are_validated(extra_site, unet_config):
    from loraengine.core.config.root import parse_config
    from loraengine.core.errors import ConfigError

    host = build_plugin_manager()
    unet_config["optimizer"] = {"name": "signsgd", "momentum": 2.0}
    with pytest.raises(ConfigError, match=r"optimizer.momentum: .*less than 1"):
        parse_config(unet_config, host.registry)


def test_broken_plugin_is_a_warning_naming_its_distribution(broken_site):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host = build_plugin_manager()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert any("le-broken" in m and "le_broken" in m for m in messages), messages
    assert "adamw" in host.registry.names("optimizer")  # the tool still works


def test_broken_plugin_with_strict_is_an_error(broken_site):
    with pytest.raises(PluginError, match="le-broken"):
        build_plugin_manager(strict=True)


def test_broken_plugin_cli_warns_and_strict_fails(broken_site):
    runner = CliRunner()
    ok = runner.invoke(cli, ["plugins", "--json"])
    assert ok.exit_code == 0
    assert "le-broken" in ok.stderr
    strict = runner.invoke(cli, ["--strict", "plugins"])
    assert strict.exit_code == 1
    assert "error: plugin 'le_broken' from distribution 'le-broken' failed to load" in strict.stderr


def test_config_using_a_missing_plugin_mentions_the_broken_one(broken_site, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {family: diffusers, path: x}\noptimizer: {name: fancy}\n")
    result = CliRunner().invoke(cli, ["validate", str(cfg)])
    assert result.exit_code == 2
    assert "unknown optimizer 'fancy'" in result.stderr
    assert "le-broken" in result.stderr


def test_a_name_provided_twice_names_both_providers():
    clash = types.ModuleType("clashing_plugin")

    @hookimpl
    def loraengine_optimizers():
        return [OptimizerSpec("adamw", lambda p, lr, o: None)]

    clash.loraengine_optimizers = loraengine_optimizers
    host = build_plugin_manager(entry_points=False, extra=[clash])
    with pytest.raises(PluginError) as err:
        host.registry  # noqa: B018
    msg = str(err.value)
    assert "optimizer 'adamw'" in msg
    assert "loraengine.plugins.optimizers" in msg and "clashing_plugin" in msg


def test_wrong_record_type_is_reported():
    bad = types.ModuleType("bad_records")

    @hookimpl
    def loraengine_losses():
        return [OptimizerSpec("x", lambda p, lr, o: None)]

    bad.loraengine_losses = loraengine_losses
    host = build_plugin_manager(entry_points=False, extra=[bad])
    with pytest.raises(PluginError, match="bad_records.*expected LossSpec"):
        host.registry  # noqa: B018


def test_misspelt_hook_is_caught():
    typo = types.ModuleType("typo_plugin")

    @hookimpl
    def loraengine_optimisers():
        return []

    typo.loraengine_optimisers = loraengine_optimisers
    with pytest.raises(Exception, match="loraengine_optimisers"):
        build_plugin_manager(entry_points=False, extra=[typo])
