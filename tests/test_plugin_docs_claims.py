"""What ``docs/plugins.md`` tells plugin authors holds: every record and type it names
imports from ``loraengine``, the ``NoiseSchedule`` members and the fixtures it lists
exist, the tiny-UNet fixtures give what it says, and a module whose keys two
algorithms claim is read as it describes."""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import replace

import pytest
import torch
from conftest import REPO
from torch import nn

import loraengine

PLUGINS_MD = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")


def _section(heading: str) -> str:
    """The text of a ``## heading`` section, up to the next ``## ``."""
    start = PLUGINS_MD.index(f"\n## {heading}\n")
    end = PLUGINS_MD.find("\n## ", start + 1)
    return PLUGINS_MD[start:end if end >= 0 else None]


def _first_column(text: str, header: str) -> list[str]:
    """The first-column cells of the Markdown table whose header row starts with
    ``| header |``."""
    lines = text[text.index(f"| {header} |"):].splitlines()[2:]
    return [line.split("|")[1].strip() for line in lines if line.startswith("|")]


def _records() -> list[str]:
    return re.findall(r"^### (\w+)$", _section("Spec records"), flags=re.MULTILINE)


def _field_types() -> set[str]:
    """Names of classes of ``loraengine.core.plugins.specs`` that the record tables give
    as a field's type (the protocols a plugin implements to fill the field)."""
    from loraengine.core.plugins import specs

    names = set()
    for row in re.findall(r"^\| `\w+` \| `([^`]+)` \|", _section("Spec records"),
                          flags=re.MULTILINE):
        for word in re.findall(r"[A-Za-z_]\w*", row):
            value = getattr(specs, word, None)
            if inspect.isclass(value) and value.__module__ == specs.__name__:
                names.add(word)
    return names


def _told_to_import() -> set[str]:
    """Names the hand-written text imports from ``loraengine`` or spells
    ``loraengine.Name``."""
    names = set()
    imports = re.findall(r"from loraengine import \(([\w ,\n]+)\)", PLUGINS_MD)
    imports += re.findall(r"from loraengine import ([\w ,]+)$", PLUGINS_MD, flags=re.MULTILINE)
    imports += re.findall(r"`from loraengine import ([\w ,]+)`", PLUGINS_MD)
    for group in imports:
        names |= {n.strip() for n in group.split(",") if n.strip()}
    names |= set(re.findall(r"\bloraengine\.([A-Z]\w*)\b(?!\.)", PLUGINS_MD))
    return names


def test_the_docs_name_the_records_and_types_this_test_checks():
    assert {"OptimizerSpec", "SamplerSpec", "LoggerSpec", "PluginOptions"} <= set(_records())
    assert {"ExporterLimits", "SampleFn", "DataEncoder"} <= _field_types()
    assert {"hookimpl", "LossSpec", "NoiseSchedule", "PluginOptions"} <= _told_to_import()


@pytest.mark.parametrize("name", sorted({*_records(), *_field_types(), *_told_to_import()}))
def test_every_name_the_docs_give_imports_from_loraengine(name):
    namespace: dict[str, object] = {}
    exec(f"from loraengine import {name}", namespace)
    assert namespace[name] is getattr(loraengine, name)
    assert name in loraengine.__all__


def test_every_public_name_is_importable_and_listed():
    for name in loraengine.__all__:
        getattr(loraengine, name)
    with pytest.raises(AttributeError):
        loraengine.NotAName  # noqa: B018


def test_the_noise_schedule_members_the_docs_list_exist():
    from loraengine.core.schedule import NoiseSchedule

    text = _section("Timestep samplers, loss weightings and timestep-aware losses")
    members = [name for cell in _first_column(text, "member")
               for name in re.findall(r"`(\w+)", cell)]
    assert len(members) >= 10
    ddpm, flow = NoiseSchedule.ddpm(), NoiseSchedule.flow(3.0)
    for name in members:
        assert hasattr(ddpm, name) and hasattr(flow, name), name
    assert loraengine.NoiseSchedule is NoiseSchedule


def test_the_fixtures_the_docs_list_are_the_plugins_fixtures():
    plugin = importlib.import_module("loraengine.testing.pytest_plugin")
    listed = [name for cell in _first_column(_section("Testing a plugin"), "fixture")
              for name in re.findall(r"`(\w+)`", cell)]
    assert {"tiny_unet_files", "tiny_unet_train_config"} <= set(listed)
    for name in listed:
        assert name in vars(plugin), name


def test_tiny_unet_fixtures_give_what_the_docs_say(tiny_unet_dir, tiny_unet_files,
                                                   tiny_unet_train_config, tmp_path,
                                                   loraengine_host):
    from safetensors.torch import load_file

    from loraengine.core.config.root import parse_config

    lat, cond = tiny_unet_files
    assert lat.parent == tmp_path and cond.parent == tmp_path
    assert load_file(str(lat))["latents"].shape == (6, 4, 8, 8)
    assert load_file(str(cond))["cond"].shape == (6, 3, 16)
    config = tiny_unet_train_config
    assert config["model"]["path"] == str(tiny_unet_dir)
    assert config["data"] == {"latents": str(lat), "conditioning": str(cond)}
    parsed = parse_config(config, loraengine_host.registry)
    assert (parsed.training.steps, parsed.training.batch_size) == (3, 2)
    assert (parsed.adapter.rank, parsed.adapter.alpha) == (4, 2)
    assert parsed.output.dir == tmp_path / "out" and parsed.output.name == "test"


def test_a_module_two_algorithms_claim_is_read_as_documented():
    """Both claim it; the file's ``loraengine.algorithm`` comes first, else the
    built-in before the plugin."""
    from loraengine.core.files import read_adapter_file
    from loraengine.plugins import build_plugin_manager
    from loraengine.plugins.adapters import lora
    from loraengine.testing.conformance import build_adapter, perturb
    from loraengine.testing.harness import registered

    host = build_plugin_manager(entry_points=False)
    adapter = build_adapter(lora.SPEC, nn.Linear(8, 4))
    perturb(adapter)
    module = {k: v.detach() for k, v in adapter.file_tensors().items()}
    tensors = host.registry.get("exporter", "kohya").to_file({"blocks.0": module})
    with registered(host, replace(lora.SPEC, name="lora_twin")):
        plain = read_adapter_file(tensors, host.registry, ["blocks.0"])
        named = read_adapter_file(tensors, host.registry, ["blocks.0"],
                                  metadata={"loraengine.algorithm": "lora_twin"})
    assert [s.name for s in plain.modules["blocks.0"].owners] == ["lora", "lora_twin"]
    assert [s.name for s in named.modules["blocks.0"].owners] == ["lora_twin", "lora"]
    assert named.modules["blocks.0"].algorithm == "lora_twin"
    assert torch.equal(named.modules["blocks.0"].params["lora_up.weight"],
                       module["lora_up.weight"])
