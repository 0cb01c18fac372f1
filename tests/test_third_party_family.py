"""A model family published by another package: a record of under 60 lines in a
module named by a ``loraengine`` entry point is found by the plugin host and trains
through ``loraengine train`` like a built-in one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from loraengine.testing import tiny_pipelines as tp

#: The whole third-party package: a family record over a diffusers transformer.
PLUGIN = textwrap.dedent('''
    """acme_family: the Qwen-Image transformer with its attention as the only target."""
    from loraengine.core.plugins.hookspecs import hookimpl
    from loraengine.plugins.models.common import flow_transformer_family, make_spec, submodules
    from loraengine.plugins.models.flow import FlowCall, ShiftRule

    ACME = flow_transformer_family(
        name="acme_image", model_class="QwenImageTransformer2DModel",
        pipeline_classes=("AcmeImagePipeline",), vae_scale=1.0, vae_shift=0.0,
        base_model_version="acme", default_include=("transformer_blocks.*.attn.*",),
        blocks=lambda m: submodules(m, "transformer_blocks"), flow_shift=2.0,
        call=FlowCall(packing="patch2", positions="qwen", timestep="sigma"),
        shift_rule=ShiftRule(), description="Acme's image model.")


    @hookimpl
    def loraengine_models():
        return [make_spec(ACME)]
''')


def _install(site: Path) -> None:
    (site / "acme_family").mkdir(parents=True)
    (site / "acme_family" / "__init__.py").write_text(PLUGIN)
    info = site / "acme_family-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-family\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[loraengine]\nacme_family = acme_family\n")


def _cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    env["MPLBACKEND"] = "Agg"
    launcher = ("import sys; from loraengine.cli.main import main; "
                "sys.argv[0] = 'loraengine'; main()")
    return subprocess.run([sys.executable, "-c", launcher, *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_record_is_short():
    assert len(PLUGIN.strip().splitlines()) < 60


@pytest.mark.slow
def test_a_family_from_an_entry_point_trains_from_the_command_line(tmp_path, monkeypatch):
    from loraengine.api import resolve_config
    from loraengine.core.build import build_pipeline
    from loraengine.plugins import build_plugin_manager

    site = tmp_path / "site"
    _install(site)
    folder = tp.save_denoiser("qwen_image", tmp_path / "pipe")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    save_file({"latents": x + 0.1 * torch.randn(4, 4, 8, 8, generator=g)},
              str(tmp_path / "lat.st"))
    save_file({"cond": torch.randn(4, 7, 24, generator=g)}, str(tmp_path / "cond.st"))
    cfg = {"model": {"family": "acme_image", "path": str(folder)},
           "data": {"latents": str(tmp_path / "lat.st"),
                    "conditioning": str(tmp_path / "cond.st")},
           "training": {"steps": 20, "batch_size": 4, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 0.02}, "adapter": {"rank": 4, "alpha": 2, "dtype": "fp32"},
           "output": {"dir": str(tmp_path / "out"), "name": "acme", "plot": False}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))

    result = _cli(site, "train", str(tmp_path / "train.yaml"), "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    losses = json.loads((tmp_path / "out" / "acme.loss.json").read_text())["loss"]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))

    # In this process too the entry point brings the family; the file, read back,
    # beats the base model at fixed draws.
    monkeypatch.syspath_prepend(str(site))
    host = build_plugin_manager()
    assert host.registry.get("model", "acme_image").description == "Acme's image model."
    lora = tmp_path / "out" / "acme.safetensors"
    conf, base = resolve_config(tmp_path / "train.yaml", host,
                                overrides=[f"adapter.existing={lora}"])
    pipe = build_pipeline(conf, host, base_dir=base)
    try:
        trained = tp.fixed_draw_loss(pipe)
        pipe.network.set_multiplier(0.0)
        untouched = tp.fixed_draw_loss(pipe)
    finally:
        pipe.close()
    assert trained < untouched * 0.97, (trained, untouched)
    keys = load_file(str(tmp_path / "out" / "acme.safetensors"))
    modules = {k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}
    # the record's default targets: the attention projections of both blocks, nothing else
    assert modules and all(".attn." in m for m in modules)
    assert {m.split(".")[2] for m in modules} == {"0", "1"}
