"""LoRA files of the real families load in diffusers with every key matched, and the
diffusers model then computes what the engine's merged model computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import diffusers_warnings
from safetensors.torch import load_file, save_file

from loraengine.api import resolve_config
from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.adapters.lora import LoRALayer
from loraengine.plugins.exporters import DIFFUSERS, KOHYA
from loraengine.testing import tiny_pipelines as tp

UNET = ["down_blocks.*", "mid_block.*", "up_blocks.*"]
CASES = {  # family -> (include, conditioning shapes, expected key format)
    "sd15": (["*"], {"cond": (9, 32)}, "lora_unet_"),
    "sdxl": (UNET, {"cond": (9, 32), "pooled": (16,)}, "lora_unet_"),
    "sd3": (["transformer_blocks.*"], {"cond": (9, 32), "pooled": (16,)}, "transformer."),
    "flux": (["transformer_blocks.*", "single_transformer_blocks.*"],
             {"cond": (9, 32), "pooled": (16,)}, "transformer."),
}


def _train(tmp_path: Path, family: str, folder: Path) -> tuple[Path, Path]:
    include, shapes, _ = CASES[family]
    g = torch.Generator().manual_seed(1)
    save_file({"latents": torch.randn(2, 4, 8, 8, generator=g)}, str(tmp_path / "lat.st"))
    save_file({k: torch.randn(2, *s, generator=g) for k, s in shapes.items()},
              str(tmp_path / "cond.st"))
    cfg = {"model": {"family": family, "path": str(folder)},
           "data": {"latents": str(tmp_path / "lat.st"), "conditioning": str(tmp_path / "cond.st")},
           "training": {"steps": 3, "batch_size": 2, "dtype": "fp32", "seed": 0},
           "optimizer": {"lr": 0.02},
           "adapter": {"rank": 4, "alpha": 2, "dtype": "fp32", "include": include},
           "memory": {"gradient_checkpointing": False},
           "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert result.exit_code == 0, result.output
    return path, tmp_path / "out" / "lora.safetensors"


def _inputs(family: str, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    _, shapes, _ = CASES[family]
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = {k: torch.randn(2, *s, generator=g) for k, s in shapes.items()}
    t = torch.tensor([0.3, 0.8]) * 1000 if family in ("sd3", "flux") else torch.tensor([50, 700])
    return x, t, cond


def _denoise(family: str, model, predict, x, t, cond):
    with torch.no_grad():
        if family == "sd15":  # diffusers' own call, independent of the family's predict
            return model(x, t, encoder_hidden_states=cond["cond"]).sample
        return predict(model, x, t, cond)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {fam: tp.save(fam, root / fam) for fam in CASES}


@pytest.mark.parametrize("family", list(CASES))
def test_lora_loads_in_diffusers_with_every_key_and_matches_the_merged_engine_model(
        tmp_path, pipes, family):
    import diffusers
    from peft.tuners.lora import LoraLayer

    config, lora = _train(tmp_path, family, pipes[family])
    tensors = load_file(str(lora))
    prefix = CASES[family][2]
    assert all(k.startswith(prefix) for k in tensors)
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}

    # The engine: the file read back, every adapter merged into the base weights.
    host = build_plugin_manager()
    conf, base = resolve_config(config, host, overrides=[f"adapter.existing={lora}"])
    engine = build_pipeline(conf, host, base_dir=base)
    x, t, cond = _inputs(family)
    try:
        engine.network.merge()
        merged = _denoise(family, engine.model, engine.loaded.predict, x, t, cond)
    finally:
        engine.close()

    # diffusers: the pipeline's own load_lora_weights, warnings captured.
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipes[family]),
                                                       local_files_only=True)
    with diffusers_warnings() as messages:
        pipe.load_lora_weights(str(lora))
    # diffusers warns about file keys it could not place (and the text encoders' absence)
    assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m]
    denoiser = pipe.unet if family in ("sd15", "sdxl") else pipe.transformer
    wrapped = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == len(modules)  # every module of the file found its layer
    loaded = _denoise(family, denoiser, engine.loaded.predict, x, t, cond)
    torch.testing.assert_close(loaded, merged, rtol=1e-4, atol=1e-4)

    base_model = diffusers.DiffusionPipeline.from_pretrained(str(pipes[family]),
                                                             local_files_only=True)
    plain = base_model.unet if family in ("sd15", "sdxl") else base_model.transformer
    untouched = _denoise(family, plain, engine.loaded.predict, x, t, cond)
    assert (loaded - untouched).abs().max() > 1e-3  # the LoRA does something


def _lora_layer(seed: int = 0) -> LoRALayer:
    base = torch.nn.Linear(6, 5)
    layer = LoRALayer(base, rank=3, alpha=1.5, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.lora_up.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return layer


def test_diffusers_format_folds_alpha_into_lora_b_and_reads_back_the_same_delta():
    layer = _lora_layer()
    modules = {"transformer_blocks.0.attn.to_q": layer.file_tensors()}
    tensors = DIFFUSERS.to_file({p: {k: v.detach() for k, v in m.items()}
                                 for p, m in modules.items()})
    a = tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    b = tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    assert set(tensors) == {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"}
    torch.testing.assert_close(b @ a, layer.delta_weight().detach())  # PEFT: ΔW = B·A
    back = DIFFUSERS.from_file(tensors, ["transformer_blocks.0.attn.to_q"])
    assert set(back["transformer_blocks.0.attn.to_q"]) == {"lora_down.weight",
                                                          "lora_up.weight"}
    from loraengine.plugins.adapters import lora as lora_algo

    again = lora_algo.load(layer.base, back["transformer_blocks.0.attn.to_q"], None)
    torch.testing.assert_close(again.delta_weight(), layer.delta_weight().detach())


def test_diffusers_format_uses_the_unet_prefix_for_unet_paths_and_ignores_other_formats():
    layer = _lora_layer()
    tensors = DIFFUSERS.to_file({"down_blocks.0.attentions.0.proj_in":
                                 {k: v.detach() for k, v in layer.file_tensors().items()}})
    assert all(k.startswith("unet.down_blocks.0.attentions.0.proj_in.") for k in tensors)
    kohya = KOHYA.to_file({"down_blocks.0.attentions.0.proj_in":
                           {k: v.detach() for k, v in layer.file_tensors().items()}})
    assert DIFFUSERS.from_file(kohya, ["down_blocks.0.attentions.0.proj_in"]) is None
