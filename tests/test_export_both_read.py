"""The default (``diffusers``) export of Lumina 2 and LTX-2: one file that the family's
diffusers pipeline and ComfyUI both read (``exporters.BOTH_READ``, the rule Flux.2's
file follows too: tests/test_export_flux2_both.py).

The file names ComfyUI's layers under ``diffusion_model.`` with ``lora_A``/``lora_B``
and α/r folded into ``lora_B`` (no ``alpha``). diffusers 0.42.1 converts it:
``Lumina2LoraLoaderMixin`` with ``_convert_non_diffusers_lumina2_lora_to_diffusers``
(whole blocks only, the fused ``attention.qkv`` split at the released model's rows,
2304/768/768, so the Lumina 2 model here has the released q/k/v widths and a narrow
feed-forward), ``LTX2LoraLoaderMixin`` with ``_convert_non_diffusers_ltx2_lora_to_
diffusers`` (a renaming). ComfyUI 0.8.0 reads every module of it by its own name (each
is a key of its ``model_lora_keys_unet``, pinned by the committed fixtures of
make_comfyui_transformer_fixtures.py / make_comfyui_video_fixtures.py).

Tolerance: diffusers computes W + B·A in fp32 in another order than our merge (for the
fused ``qkv``, each projection gets the whole stacked A and its rows of the
block-diagonal B, whose zero columns add exact zeros): a few ulps of |W|, far below
the 1e-4 asked of every consumer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import loraengine
from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.files import read_adapter_file, write_adapter_file
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.exporters import both_read_rule, diffusers_limits
from loraengine.testing import tiny_pipelines as tp
from loraengine.testing import tiny_video as tv
from loraengine.testing.conformance import relative_error
from tests.conftest import assert_pipeline_fuses_our_merge, convert_round_trip, linear_network

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

HOST = build_plugin_manager()
REG = HOST.registry
FIXTURES = Path(__file__).parent / "fixtures" / "interop"
TOL = 1e-4
#: α ≠ r and α/r not a power of two, so the folding of α/r into lora_B is exercised
RANK, ALPHA = 2, 3.0
#: the layers of a Lumina 2 block diffusers' converter takes (all of them)
LUMINA_BLOCK = re.compile(r"^(noise_refiner|context_refiner|layers)\.\d+\.(attn\.(to_[qkv]|"
                          r"to_out\.0)|feed_forward\.linear_[123]|norm1\.linear)$")
EVERY = re.compile(r"")


def lumina2_released_width(seed: int = 0) -> nn.Module:
    return tp.lumina2_released_width_transformer(seed).eval()


def _network(model: nn.Module, algorithm: str = "lora", only: re.Pattern[str] = EVERY,
             options: dict | None = None) -> AdapterNetwork:
    return linear_network(model, algorithm, RANK, ALPHA, options, lambda p: bool(only.search(p)))


def _write(path: Path, network: AdapterNetwork) -> dict[str, torch.Tensor]:
    return write_adapter_file(path, network.file_modules(), REG.get("exporter", "diffusers"), {})


def _summary(network: AdapterNetwork) -> dict:
    return {p: ("lora", {k: tuple(v.shape) for k, v in t.items()})
            for p, t in network.file_modules().items()}


def _pipeline(family: str, model: nn.Module):
    if family == "ltx2":
        sched = diffusers.FlowMatchEulerDiscreteScheduler(**tv.VIDEO_DENOISERS["ltx2"][2])
        names = diffusers.LTX2Pipeline.__init__.__code__.co_varnames[
            1:diffusers.LTX2Pipeline.__init__.__code__.co_argcount]
        parts = {n: None for n in names}
        parts.update(transformer=model, scheduler=sched)
        return diffusers.LTX2Pipeline(**parts)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**tp.DENOISERS[family][2])
    return tp.denoiser_pipeline(family, model, sched)


def _check_in_diffusers(family: str, make, network: AdapterNetwork, ours: nn.Module,
                        file: Path) -> nn.Module:
    """The family's pipeline places every module and fuses our merged weights; returns
    the model as ``make`` builds it (untouched here), for further checks."""
    network.merge()
    fresh = make(0).eval()
    pipe = _pipeline(family, make(0).eval())
    assert_pipeline_fuses_our_merge(pipe, file, network, ours, fresh, ("lora_A",), TOL)
    return fresh


@pytest.mark.parametrize("targets", [pytest.param("every", marks=pytest.mark.slow),
                                     "default"])
def test_ltx2_file_loads_in_ltx2pipeline_with_every_key_and_our_merge(targets, tmp_path):
    """LoRA on every Linear of LTX-2 (the renamed patchify projections, timestep
    embedders and audio-video modulations included), and on the family's default
    targets (the video stream's attention and feed-forward)."""
    ours = tv.ltx2_transformer(0).eval()
    only = EVERY if targets == "every" else re.compile(
        r"^transformer_blocks\.\d+\.(attn1|attn2|ff)\.")
    network = _network(ours, "lora", only)
    tensors = _write(tmp_path / "f.safetensors", network)
    assert all(k.startswith("diffusion_model.") for k in tensors)
    assert not [k for k in tensors if k.endswith(".alpha") or ".lora_up." in k]
    if targets == "every":
        assert "diffusion_model.patchify_proj.lora_A.weight" in tensors
        assert "diffusion_model.adaln_single.linear.lora_B.weight" in tensors
    assert diffusers_limits(_summary(network)) == []
    _check_in_diffusers("ltx2", tv.ltx2_transformer, network, ours, tmp_path / "f.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("targets", ["blocks", "layers"])
def test_lumina2_file_loads_in_lumina2pipeline_with_every_key_and_our_merge(targets,
                                                                            tmp_path):
    """LoRA on every layer of every block (noise and context refiners and the main
    layers), and on the family's default targets (``layers.*``), at the released
    model's q/k/v widths."""
    ours = lumina2_released_width(0)
    only = LUMINA_BLOCK if targets == "blocks" else re.compile(r"^layers\.")
    network = _network(ours, "lora", only)
    tensors = _write(tmp_path / "f.safetensors", network)
    assert all(k.startswith("diffusion_model.") for k in tensors)
    assert not [k for k in tensors if k.endswith(".alpha") or ".lora_up." in k]
    qkv = tensors["diffusion_model.layers.0.attention.qkv.lora_B.weight"]
    assert tuple(qkv.shape) == (3840, 3 * RANK)  # fused as ComfyUI's model is
    assert diffusers_limits(_summary(network)) == []
    model = _check_in_diffusers("lumina2", lumina2_released_width, network, ours,
                                tmp_path / "f.safetensors")
    # our readers take it back to the same ΔW (the qkv split back by its bands)
    fresh = _network(model, "lora", only)
    file = read_adapter_file(tmp_path / "f.safetensors", REG,
                             list(select_layers(model, ["*"], [], ADAPTABLE)), model=model)
    assert sorted(file.modules) == sorted(network.paths)
    spec = REG.get("adapter", "lora")
    for p, layer in fresh.items():
        back = spec.load(model.get_submodule(p), file.modules[p].params, spec.config_model())
        assert relative_error(back.delta_weight(), layer.delta_weight()) <= 1e-6, p


def test_ltx2_file_goes_back_through_our_readers_to_the_same_delta(tmp_path):
    """``adapter.existing``'s reader and ``loraengine.apply(mode="merge")``."""
    model = tv.ltx2_transformer(0).eval()
    network = _network(model)
    path = tmp_path / "f.safetensors"
    _write(path, network)
    file = read_adapter_file(path, REG, list(select_layers(model, ["*"], [], ADAPTABLE)),
                             model=model)
    assert sorted(file.modules) == sorted(network.paths)
    spec = REG.get("adapter", "lora")
    for p, layer in network.items():
        back = spec.load(model.get_submodule(p), file.modules[p].params, spec.config_model())
        assert relative_error(back.delta_weight(), layer.delta_weight()) <= 1e-6, p
    merged = tv.ltx2_transformer(0).eval()
    loraengine.apply(merged, str(path), mode="merge", host=HOST)
    network.merge()
    for p in network.paths:
        assert relative_error(merged.get_submodule(p).weight, model.get_submodule(p).weight) \
            <= 1e-6, p


def _stems(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
            for k in tensors}


def test_every_module_is_a_key_comfyui_loads_onto_its_own_weight(tmp_path):
    """ComfyUI 0.8.0's ``model_lora_keys_unet`` (the committed fixtures): every module of
    the LTX-2 file (every Linear) and of the Lumina 2 file (every block layer) is a key
    that patches the weight of its own name. The Lumina 2 fixture's model is narrower
    than the released one but has its names (two layers, one refiner block each), a
    superset of this file's; ComfyUI's qkv there has q, k and v's rows together, as
    the file's lora_B has."""
    ltx = _write(tmp_path / "l.safetensors", _network(tv.ltx2_transformer(0).eval()))
    key_map = json.loads((FIXTURES / "ltx2_comfyui_video.json").read_text())[
        "model_lora_keys_unet"]
    stems = _stems(ltx)
    assert len(stems) == 82  # every Linear of the tiny LTX-2
    assert all(key_map.get(s) == f"{s}.weight" for s in stems), \
        sorted(s for s in stems if key_map.get(s) != f"{s}.weight")
    network = _network(lumina2_released_width(0), "lora", LUMINA_BLOCK)
    lumina = _write(tmp_path / "n.safetensors", network)
    key_map = json.loads((FIXTURES / "lumina2_comfyui_transformer.json").read_text())[
        "model_lora_keys_unet"]
    stems = _stems(lumina)
    assert len(stems) == 3 * 6 - 1  # qkv, out, w1-3, modulation (none in the context refiner)
    assert all(key_map.get(s) == f"{s}.weight" for s in stems), \
        sorted(s for s in stems if key_map.get(s) != f"{s}.weight")


def test_files_the_converters_do_not_take_stay_in_diffusers_names_with_a_warning():
    """Where the converter does not take the file whole, the export keeps diffusers'
    names (``transformer.*``, which diffusers reads) and its limits say what ComfyUI
    does not load: LTX-2 LoHa (LTX2Pipeline takes keys naming lora_ only), DoRA; Lumina
    2 at the tiny widths (the converter splits qkv at the released rows only), a
    partial block, a layer outside the blocks."""
    ltx = tv.ltx2_transformer(0).eval()
    lumina = tp.lumina2_transformer(0).eval()
    big = lumina2_released_width(0)
    cases = [("LTX-2", _network(ltx, "loha")),
             ("LTX-2", _network(ltx, "lora", options={"weight_decompose": True})),
             ("Lumina 2", _network(lumina, "lora", LUMINA_BLOCK)),
             ("Lumina 2", _network(big, "lora", re.compile(r"^layers\.0\.attn\.to_[qkv]$"))),
             ("Lumina 2", _network(big, "lora", re.compile(
                 r"^(layers\.|time_caption_embed\.timestep_embedder\.linear_1$)")))]
    for model, network in cases:
        mods = network.file_modules()
        assert both_read_rule(mods) is None
        tensors = REG.get("exporter", "diffusers").to_file(mods)
        assert all(k.startswith("transformer.") for k in tensors)
        summary = {p: ("x", {k: tuple(v.shape) for k, v in t.items()})
                   for p, t in mods.items()}
        assert any(ln.startswith(f"ComfyUI reads no diffusers names for {model}")
                   for ln in diffusers_limits(summary)), (model, diffusers_limits(summary))


def test_convert_takes_the_ltx2_file_to_comfyuis_layout_and_back_without_a_warning(tmp_path):
    """``loraengine convert --to comfyui --model`` reads the file with no warning
    (ComfyUI reads all of it) and writes ComfyUI's trainer layout; ``--to diffusers`` of
    that gives the original-name file again, with the same tensors."""


    model = tv.ltx2_transformer(0).eval()
    folder = tmp_path / "model"
    model.save_pretrained(str(folder))
    _write(tmp_path / "d.safetensors", _network(model))
    comfy = convert_round_trip(tmp_path / "d.safetensors", folder, tmp_path)
    assert "diffusion_model.patchify_proj.lora_up.weight" in comfy
