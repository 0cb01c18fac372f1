"""The example recipes in examples/: each passes ``loraengine validate``, and each trains
two steps on a tiny pipeline of its own family with its recipe sections unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO
from safetensors.torch import save_file

import loraengine
from loraengine.cli.main import cli
from loraengine.core.config.root import read_yaml
from loraengine.testing import tiny_pipelines

EXAMPLES = {"sd15_lora.yaml": "sd15", "sdxl_lora.yaml": "sdxl", "flux_lora.yaml": "flux"}


def _needs(family_file: str) -> None:
    data, _ = read_yaml(REPO / "examples" / family_file)
    if data["optimizer"]["name"] == "prodigy":
        pytest.importorskip("prodigyopt")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_validates(name):
    _needs(name)
    path = REPO / "examples" / name
    data, _ = read_yaml(path)
    model = (path.parent / data["model"]["path"]) if "path" in data.get("model", {}) else None
    if model is not None and not model.exists():
        # a recipe for a model this repository does not ship: its syntax and plugin
        # options are checked; the full check says what is missing, naming the key
        full = CliRunner().invoke(cli, ["validate", str(path)])
        assert full.exit_code == 2 and "error: model.path: " in full.output, full.output
        out = CliRunner().invoke(cli, ["validate", "--syntax-only", str(path)])
        assert out.exit_code == 0, out.output
        assert out.output.strip() == f"{path}: ok (syntax only)"
    else:
        out = CliRunner().invoke(cli, ["validate", str(path)])
        assert out.exit_code == 0, out.output
        assert out.output.strip() == f"{path}: ok"


def tiny_data(family: str, folder) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"cond": torch.randn(2, 5, 32, generator=g)}
    if family in ("sdxl", "flux"):
        cond["pooled"] = torch.randn(2, 16, generator=g)
    lat, con = folder / "latents.safetensors", folder / "conditioning.safetensors"
    save_file({"latents": latents}, str(lat))
    save_file(cond, str(con))
    return str(lat), str(con)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_recipe_trains_on_a_tiny_model_of_its_family(name, tmp_path):
    _needs(name)
    family = EXAMPLES[name]
    data, _ = read_yaml(REPO / "examples" / name)
    assert data["model"]["family"] == family
    model_dir = tiny_pipelines.save(family, tmp_path / "model")
    lat, con = tiny_data(family, tmp_path)
    # only where and how long change; optimizer, schedule, weighting, sampler and recipe
    # sections are the example's own
    data["model"]["path"] = str(model_dir)
    data["data"] = {"latents": lat, "conditioning": con}
    data["training"].update(steps=2, batch_size=1, grad_accumulation_steps=1, dtype="fp32")
    data["adapter"].update(rank=4, alpha=4, dtype="fp32")
    data["memory"] = {"gradient_checkpointing": False}
    data["output"] = {"dir": str(tmp_path / "out"), "name": "ex", "plot": False}
    result = loraengine.train(data)
    assert len(result.loss_map["loss"]) == 2
    assert all(math.isfinite(v) for v in result.loss_map["loss"])
    assert result.path is not None and result.path.exists()
    if "ema" in data.get("recipe", {}):
        assert result.files["ema"].exists()
