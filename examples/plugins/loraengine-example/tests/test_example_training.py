"""Installed, the plugin is found through its entry point and trains with loraengine."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("loraengine_example", reason="pip install -e examples/plugins/loraengine-example")

import loraengine_example

PROVIDED = {("adapter", "lora_fa"), ("optimizer", "adabelief"), ("loss", "log_cosh")}

CONFIG = {"adapter": {"algorithm": "lora_fa", "rank": 2},
          "optimizer": {"name": "adabelief", "lr": 1e-2},
          "loss": {"name": "log_cosh", "delta": 0.5}}


def test_entry_point_registers_every_record_with_its_distribution(loraengine_host):
    found = {(p.category, p.name): p for p in loraengine_host.registry.all()}
    for key in PROVIDED:
        record = found[key]
        assert record.plugin == "loraengine_example"
        assert record.distribution == "loraengine-example"
        assert record.version == loraengine_example.__version__


def test_specs_are_the_ones_the_hooks_return():
    assert loraengine_example.loraengine_adapters() == [loraengine_example.SPECS[0]]
    assert loraengine_example.loraengine_optimizers() == [loraengine_example.SPECS[1]]
    assert loraengine_example.loraengine_losses() == [loraengine_example.SPECS[2]]


def test_trains_with_all_three_and_keeps_down_frozen(train_tiny):
    one = train_tiny({**CONFIG, "training": {"steps": 1}})
    three = train_tiny({**CONFIG, "training": {"steps": 3}})
    downs = [k for k in one.lora if k.endswith("lora_down.weight")]
    ups = [k for k in one.lora if k.endswith("lora_up.weight")]
    assert downs and len(downs) == len(ups)
    assert all(torch.equal(one.lora[k], three.lora[k]) for k in downs)
    assert any(not torch.equal(one.lora[k], three.lora[k]) for k in ups)
    assert all(torch.isfinite(torch.tensor(three.loss_map["loss"])))


def test_plugin_options_are_validated(train_tiny):
    from loraengine.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"loss.delta"):
        train_tiny({"loss": {"name": "log_cosh", "delta": -1}})
    with pytest.raises(ConfigError, match=r"adapter.train_up: unknown key"):
        train_tiny({"adapter": {"algorithm": "lora_fa", "train_up": True}})
