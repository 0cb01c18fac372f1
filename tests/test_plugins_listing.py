"""``loraengine plugins`` with plugins that are broken: an entry point that fails to
import, and a registration hook that raises or returns the wrong thing. The listing
shows each of them with its error and still exits 0; ``--strict`` makes them errors."""

from __future__ import annotations

import json
import sys
import textwrap
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

from loraengine import LossSpec, OptimizerSpec, hookimpl
from loraengine.cli.main import cli
from loraengine.core.errors import ConfigError, PluginFailed
from loraengine.plugins import build_plugin_manager
from loraengine.testing.harness import one_error_line

BROKEN = REPO / "tests" / "plugins" / "broken_site"
HEALTHY_KEYS = {"category", "name", "plugin", "distribution", "version"}

#: An installed plugin whose loss hook raises; its optimizer hook is fine.
RAISING = textwrap.dedent('''
    from loraengine import OptimizerSpec, hookimpl


    @hookimpl
    def loraengine_optimizers():
        return [OptimizerSpec("le_raising_sgd", lambda params, lr, options: None)]


    @hookimpl
    def loraengine_losses():
        raise RuntimeError("no losses today")
''')


@pytest.fixture
def broken_site(monkeypatch):
    monkeypatch.syspath_prepend(str(BROKEN))


@pytest.fixture
def raising_site(tmp_path: Path, monkeypatch):
    site = tmp_path / "site"
    info = site / "le_raising-2.0.dist-info"
    info.mkdir(parents=True)
    (site / "le_raising.py").write_text(RAISING)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: le-raising\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[loraengine]\nle_raising = le_raising\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    sys.modules.pop("le_raising", None)


def _records(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_lists_an_entry_point_that_failed_to_load(broken_site):
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    records = _records(result)
    broken = [r for r in records if r["plugin"] == "le_broken"]
    assert len(broken) == 1, records[-3:]
    rec = broken[0]
    assert (rec["category"], rec["name"], rec["distribution"], rec["version"]) == \
        (None, None, "le-broken", "0.3.0")
    assert rec["error"] == ("plugin 'le_broken' from distribution 'le-broken' failed to load: "
                            "ModuleNotFoundError: No module named 'le_broken_missing_module'")
    # the healthy records keep their shape
    healthy = [r for r in records if r["plugin"] != "le_broken"]
    assert healthy and all(set(r) == HEALTHY_KEYS for r in healthy)
    assert "failed: plugin 'le_broken' from distribution 'le-broken'" in result.stderr


def test_plain_listing_names_the_entry_point_that_failed_to_load(broken_site):
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "adamw" in result.stdout
    assert "failed: plugin 'le_broken' from distribution 'le-broken' failed to load: " \
           "ModuleNotFoundError" in result.stderr


def test_json_lists_a_plugin_whose_hook_raises_and_exits_0(raising_site):
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    records = _records(result)
    mine = [r for r in records if r["plugin"] == "le_raising"]
    # its optimizer is listed as usual; its loss hook is one record with the error
    assert mine == [
        {"category": "optimizer", "name": "le_raising_sgd", "plugin": "le_raising",
         "distribution": "le-raising", "version": "2.0"},
        {"category": "loss", "name": None, "plugin": "le_raising", "distribution": "le-raising",
         "version": "2.0", "error": "plugin 'le_raising' (distribution 'le-raising') failed in "
         "loraengine_losses: RuntimeError: no losses today"}]
    assert {("loss", "mse"), ("optimizer", "adamw")} <= {(r["category"], r["name"])
                                                         for r in records}
    assert result.stderr.strip() == ("failed: plugin 'le_raising' (distribution 'le-raising') "
                                     "failed in loraengine_losses: RuntimeError: no losses today")


def test_plain_listing_shows_a_plugin_whose_hook_raises_and_exits_0(raising_site):
    result = CliRunner().invoke(cli, ["plugins"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "le_raising_sgd" in result.stdout and "smooth_l1" in result.stdout
    assert "failed: plugin 'le_raising' (distribution 'le-raising') failed in " \
           "loraengine_losses: RuntimeError: no losses today" in result.stderr


def test_strict_listing_with_a_raising_hook_is_an_error(raising_site):
    err = one_error_line(CliRunner().invoke(cli, ["--strict", "plugins", "--json"]), 1)
    assert err == ("error: plugin 'le_raising' (distribution 'le-raising') failed in "
                   "loraengine_losses: RuntimeError: no losses today")


def _plugin(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


def test_survey_turns_each_failing_hook_into_a_failure_and_keeps_the_rest():
    def engine_error():
        raise ConfigError("refused on purpose")

    plugins = [
        _plugin("wrong_type", loraengine_losses=lambda: [OptimizerSpec("x", lambda p, lr, o: 0)]),
        _plugin("not_a_list", loraengine_losses=lambda: 5),
        _plugin("engine_error", loraengine_losses=engine_error),
        _plugin("fine", loraengine_losses=lambda: [LossSpec("fine_loss", lambda o: None)]),
    ]
    host = build_plugin_manager(entry_points=False, extra=plugins)
    registry, failures = host.survey()
    assert "fine_loss" in registry.names("loss") and "mse" in registry.names("loss")
    by_plugin = {f.plugin: f for f in failures}
    assert len(failures) == 3 and set(by_plugin) == {"wrong_type", "not_a_list", "engine_error"}
    assert all((f.category, f.hook) == ("loss", "loraengine_losses") for f in failures)
    assert by_plugin["wrong_type"].error == ("plugin 'wrong_type' returned OptimizerSpec from "
                                             "loraengine_losses; expected LossSpec")
    assert by_plugin["not_a_list"].error.startswith(
        "plugin 'not_a_list' (distribution 'unknown') failed in loraengine_losses: TypeError")
    assert by_plugin["engine_error"].error == (
        "plugin 'engine_error' (distribution 'unknown') failed in loraengine_losses: "
        "ConfigError: refused on purpose")


def test_a_hook_returning_no_list_is_blamed_on_its_plugin():
    """The registry runs use: a hook returning a number names the plugin (it was an
    unexpected TypeError from inside the engine)."""
    host = build_plugin_manager(entry_points=False,
                                extra=[_plugin("not_a_list", loraengine_losses=lambda: 5)])
    with pytest.raises(PluginFailed, match=r"plugin 'not_a_list' .* loraengine_losses: "
                                           r"TypeError"):
        host.registry  # noqa: B018
