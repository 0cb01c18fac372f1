"""Single-file checkpoints of the sdxl and sd3 families: a tiny denoiser written in the
original key layout (LDM UNet / MMDiT) loads offline through ``loraengine train`` with a
local diffusers config folder, bit for bit equal to the model it was written from, and
trains. Flux is left out: diffusers' Flux converter assumes full-size dimensions."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from loraengine.cli.main import cli
from loraengine.core import build as orchestrator
from loraengine.plugins import build_plugin_manager
from loraengine.testing import tiny_pipelines as tp

FAMILIES = ("sdxl", "sd3")
SUBFOLDER = {"sdxl": "unet", "sd3": "transformer"}
#: (cond length, cond width, pooled width) of each tiny pipeline's denoiser
COND_SHAPE = {"sdxl": (5, 32, 16), "sd3": (5, 32, 16)}
#: a few keys of the other components a released all-in-one checkpoint also holds
BUNDLED = {"sdxl": ("first_stage_model.encoder.conv_in.weight",
                    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                    "conditioner.embedders.1.model.ln_final.weight"),
           "sd3": ("first_stage_model.encoder.conv_in.weight",
                   "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
                   "text_encoders.t5xxl.transformer.shared.weight")}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {fam: tp.save(fam, root / fam) for fam in FAMILIES}


@pytest.fixture
def offline(monkeypatch) -> None:
    """Fail any attempt to open a network connection."""
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def _to_original(family: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    if family == "sd3":
        return tp.sd3_to_original(module.state_dict())
    return tp.unet_to_original(module.state_dict(), module.config)


def _write_single_file(family: str, model_dir: Path, dest: Path, bundled: bool = False
                       ) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write the denoiser saved in ``model_dir`` to ``dest`` in the original layout
    (with stand-ins for the other components when ``bundled``); return the file and the
    denoiser's own state dict."""
    import diffusers

    cls = diffusers.SD3Transformer2DModel if family == "sd3" else \
        diffusers.UNet2DConditionModel
    module = cls.from_pretrained(str(model_dir))
    original = _to_original(family, module)
    assert not set(original) & set(module.state_dict())  # really a different layout
    if bundled:
        original.update({key: torch.ones(4, 4) for key in BUNDLED[family]})
    save_file(original, str(dest))
    return dest, module.state_dict()


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def _load(family: str, **options: Any) -> Any:
    spec = build_plugin_manager().registry.get("model", family)
    return spec.load(spec.config_model(**options), {"base_dir": None, "module": None})


def _write_data(family: str, folder: Path, n: int = 4) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(3)
    length, width, pooled = COND_SHAPE[family]
    lat, cond = folder / "latents.safetensors", folder / "conditioning.safetensors"
    save_file({"latents": torch.randn(n, 4, 8, 8, generator=g)}, str(lat))
    save_file({"cond": torch.randn(n, length, width, generator=g),
               "pooled": torch.randn(n, pooled, generator=g)}, str(cond))
    return lat, cond


def _spy_on_load(monkeypatch) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Record a copy of every denoiser ``build_pipeline`` loads, as it comes from the
    family's loader (before adapters or training touch it)."""
    seen: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
    real: Callable[..., Any] = orchestrator.load_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        loaded = real(*args, **kwargs)
        state = {k: v.detach().clone() for k, v in loaded.module.state_dict().items()}
        root = loaded.pipeline_root
        seen.append((state, {"single_file": loaded.single_file, "path": loaded.source,
                             "pipeline": str(root) if root else None}))
        return loaded

    monkeypatch.setattr(orchestrator, "load_model", spy)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_train_loads_the_original_layout_file_exactly_and_trains(
        pipes, tmp_path, monkeypatch, offline, family):
    ckpt, want = _write_single_file(family, pipes[family] / SUBFOLDER[family],
                                    tmp_path / f"{family}-original.safetensors",
                                    bundled=True)
    lat, cond = _write_data(family, tmp_path)
    cfg = {"model": {"family": family, "path": str(ckpt), "config": str(pipes[family])},
           "data": {"latents": str(lat), "conditioning": str(cond)},
           "training": {"steps": 2, "batch_size": 2, "dtype": "fp32", "seed": 0},
           "adapter": {"rank": 4, "alpha": 2, "dtype": "fp32"},
           "memory": {"gradient_checkpointing": False},
           "output": {"dir": str(tmp_path / "out"), "name": family, "plot": False}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seen = _spy_on_load(monkeypatch)

    result = CliRunner().invoke(cli, ["train", str(path), "-q"])

    assert result.exit_code == 0, result.output
    assert len(seen) == 1
    state, info = seen[0]
    assert info["single_file"] is True and info["path"] == str(ckpt)
    assert info["pipeline"] == str(pipes[family])
    _assert_same(state, want)
    losses = json.loads((tmp_path / "out" / f"{family}.loss.json").read_text())["loss"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "out" / f"{family}.safetensors").stat().st_size > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_config_may_be_the_pipeline_or_its_model_folder(pipes, tmp_path, offline,
                                                            family):
    model_dir = pipes[family] / SUBFOLDER[family]
    ckpt, want = _write_single_file(family, model_dir, tmp_path / "model.safetensors")
    by_pipeline = _load(family, path=ckpt, config=pipes[family])
    by_model = _load(family, path=ckpt, config=model_dir)
    for loaded in (by_pipeline, by_model):
        _assert_same(loaded.module.state_dict(), want)
        assert loaded.single_file is True
    # the scheduler and VAE settings still come from the pipeline next to the config
    assert by_model.schedule.prediction_type == by_pipeline.schedule.prediction_type
    assert (by_model.vae_scale, by_model.vae_shift) == \
        (by_pipeline.vae_scale, by_pipeline.vae_shift)


def _sdxl_shaped_unet() -> Any:
    """SDXL's block order (plain first level, attention deeper), two layers per block
    and more than one transformer layer per attention block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(4)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)


def _sd35_shaped_transformer() -> Any:
    """SD3.5's extras: RMS qk-norm and a second (image-only) attention in some blocks."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(5)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=32,
        qk_norm="rms_norm", dual_attention_layers=(0, 1))


@pytest.mark.parametrize("family, make", [("sdxl", _sdxl_shaped_unet),
                                          ("sd3", _sd35_shaped_transformer)])
def test_layout_variants_of_the_real_models_load_exactly(tmp_path, offline, family, make):
    module = make()
    module.save_pretrained(str(tmp_path / "model"))
    ckpt = tmp_path / "model.safetensors"
    save_file(_to_original(family, module), str(ckpt))
    loaded = _load(family, path=ckpt, config=tmp_path / "model")
    _assert_same(loaded.module.state_dict(), module.state_dict())


def test_sd3_original_layout_names():
    """A few names and the fused/reordered tensors, as the original files store them."""
    module = tp.sd3_transformer()
    sd = module.state_dict()
    original = tp.sd3_to_original(sd)
    p = "model.diffusion_model."
    qkv = original[p + "joint_blocks.0.x_block.attn.qkv.weight"]
    assert torch.equal(qkv, torch.cat([sd[f"transformer_blocks.0.attn.to_{x}.weight"]
                                       for x in "qkv"]))
    shift, scale = original[p + "final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(torch.cat([scale, shift]), sd["norm_out.linear.weight"])
    assert p + "pos_embed" in original and p + "x_embedder.proj.weight" in original
    # the last block's context stream has no output projection or MLP
    assert not any(k.startswith(p + "joint_blocks.1.context_block.mlp") for k in original)
    assert sum(v.numel() for v in original.values()) == sum(v.numel() for v in sd.values())
