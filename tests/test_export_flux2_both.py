"""Flux.2's default (``diffusers``) export: one file that diffusers' Flux.2 pipelines and
ComfyUI both read.

The file names the released checkpoint's layers under ``diffusion_model.`` (q/k/v fused
into ``qkv`` as ComfyUI's model fuses them) with ``lora_A``/``lora_B`` and α/r folded
into ``lora_B``; diffusers 0.42.1's ``Flux2LoraLoaderMixin`` converts it
(``_convert_non_diffusers_flux2_lora_to_diffusers``, LoKr through
``..._lokr_to_diffusers``), ComfyUI 0.8.0 reads it by its own names (every module is a
key of its ``model_lora_keys_unet``, pinned by the fixture of
``tests/fixtures/interop/make_comfyui_transformer_fixtures.py``, which also measured its
patched weights: docs/compatibility.md).

Tolerance: diffusers computes W + B·A (the fused ``qkv`` LoRA gives each projection the
whole stacked A and its rows of the block-diagonal B, whose zero columns add exact
zeros) in fp32 in another order than our merge; a few ulps of |W|, far below the 1e-4
asked of every consumer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import loraengine
from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.files import in_layout, module_layouts, read_adapter_file, write_adapter_file
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.exporters import diffusers_limits, flux2_both_read
from loraengine.testing import tiny_pipelines as tp
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
QKV = re.compile(r"\.attn\.(to_[qkv]|add_[qkv]_proj)$")
#: what each algorithm is put on: every Linear but ``norm_out.linear`` (which no file
#: gives both readers, see ``flux2_both_read``); LoKr also not on q/k/v
SKIP = {"lora": re.compile(r"^norm_out\."), "loha": re.compile(r"^norm_out\."),
        "lokr": re.compile(r"(^norm_out\.|\.attn\.(to_[qkv]|add_[qkv]_proj)$)")}


def _network(model: nn.Module, algorithm: str, options: dict | None = None,
             skip: re.Pattern[str] | None = None) -> AdapterNetwork:
    skip = skip or SKIP[algorithm]
    return linear_network(model, algorithm, RANK, ALPHA, options, lambda p: not skip.search(p))


def _write(path: Path, network: AdapterNetwork) -> dict[str, torch.Tensor]:
    return write_adapter_file(path, network.file_modules(), REG.get("exporter", "diffusers"), {})


@pytest.mark.parametrize("family", ["flux2", "flux2_klein"])
@pytest.mark.parametrize("algorithm,options", [("lora", {}), ("lokr", {}),
                                               ("lokr", {"factor": -1})],
                         ids=["lora", "lokr", "lokr-factor-1"])
def test_the_pipeline_places_every_key_and_fuses_our_merged_weights(family, algorithm,
                                                                     options, tmp_path):
    make, sched = tp.DENOISERS[family][1], tp.DENOISERS[family][2]
    ours = make(0).eval()
    network = _network(ours, algorithm, options)
    tensors = _write(tmp_path / "f.safetensors", network)
    assert all(k.startswith("diffusion_model.") for k in tensors)
    assert not [k for k in tensors if k.endswith(".alpha")]
    if algorithm == "lora":
        assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in tensors
        assert not [k for k in tensors if ".lora_up." in k or ".lora_down." in k]
    # nothing to warn about: diffusers reads it, ComfyUI reads it whole
    mods = {p: (algorithm, tuple(t)) for p, t in network.file_modules().items()}
    assert diffusers_limits(mods) == []
    network.merge()

    pipe = tp.denoiser_pipeline(family, make(0).eval(),
                                diffusers.FlowMatchEulerDiscreteScheduler(**sched))
    factors = ("lora_A",) if algorithm == "lora" else ("lokr_w1", "lokr_w1_a")
    assert_pipeline_fuses_our_merge(pipe, tmp_path / "f.safetensors", network, ours, make(0),
                                    factors, TOL)


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_our_readers_take_the_file_back_to_the_same_delta(algorithm, tmp_path):
    """``adapter.existing``'s reader and ``loraengine.apply(mode="merge")`` give every
    layer the ΔW the network had (the fused ``qkv`` split back by its bands)."""
    model = tp.DENOISERS["flux2"][1](0).eval()
    network = _network(model, algorithm)
    path = tmp_path / "f.safetensors"
    _write(path, network)
    paths = list(select_layers(model, ["*"], [], ADAPTABLE))
    file = read_adapter_file(path, REG, paths, model=model)
    assert sorted(file.modules) == sorted(network.paths)
    spec = REG.get("adapter", algorithm)
    for p, layer in network.items():
        back = spec.load(model.get_submodule(p), file.modules[p].params, spec.config_model())
        assert relative_error(back.delta_weight(), layer.delta_weight()) <= 1e-6, p
    merged = tp.DENOISERS["flux2"][1](0).eval()
    loraengine.apply(merged, str(path), mode="merge", host=HOST)
    network.merge()
    for p in network.paths:
        assert relative_error(merged.get_submodule(p).weight, model.get_submodule(p).weight) \
            <= 1e-6, p


@pytest.mark.parametrize("family", ["flux2", "flux2_klein"])
@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_every_module_is_a_key_comfyui_loads_onto_its_own_weight(family, algorithm):
    """On the fixtures' tiny models (ComfyUI 0.8.0's ``model_lora_keys_unet``): every
    module of the file is a key ComfyUI reads, patching the weight of its own name, with
    lora_B's rows and lora_A's columns that weight's (LoRA)."""
    model = tp.comfyui_transformer(family)
    key_map = json.loads((FIXTURES / f"{family}_comfyui_transformer.json").read_text())[
        "model_lora_keys_unet"]
    network = _network(model, algorithm)
    spec = REG.get("exporter", "diffusers")
    tensors = spec.to_file(in_layout(network.file_modules(), spec, module_layouts(REG, model)))
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
             for k in tensors}
    assert stems and all(key_map.get(s) == f"{s}.weight" for s in stems), \
        sorted(s for s in stems if key_map.get(s) != f"{s}.weight")
    weights = tp.comfyui_transformer(family).state_dict()
    if algorithm == "lora":
        # ComfyUI's fused qkv has the rows of q, k and v together
        qkv = tensors["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
        assert qkv.shape[0] == 3 * weights["transformer_blocks.0.attn.to_q.weight"].shape[0]


def test_files_no_layout_gives_both_stay_in_diffusers_names():
    """Where no one file gives both readers the same layers, the export keeps
    diffusers' names (diffusers reads it; ``train`` warns what ComfyUI leaves out):
    ``norm_out.linear``, LoKr on q/k/v, DoRA, norm deltas; and a FLUX.1 file is not
    touched."""
    model = tp.DENOISERS["flux2"][1](0).eval()
    for network in (_network(model, "lora", skip=re.compile("^$")),
                    _network(model, "lokr", skip=re.compile("^norm_out")),
                    _network(model, "lora", {"weight_decompose": True})):
        mods = {p: set(t) for p, t in network.file_modules().items()}
        assert not flux2_both_read(mods)
        tensors = REG.get("exporter", "diffusers").to_file(network.file_modules())
        assert all(k.startswith("transformer.") for k in tensors)
        assert any(ln.startswith("ComfyUI reads Flux.2's diffusers names") for ln in
                   diffusers_limits({p: ("x", t) for p, t in mods.items()}))
    flux = _network(tp.flux_transformer(0), "lora", skip=re.compile("^$"))
    assert not flux2_both_read({p: set(t) for p, t in flux.file_modules().items()})


def test_diffusers_places_the_released_final_modulation_without_swapping_its_halves(
        tmp_path):
    """Why ``norm_out.linear`` keeps a file in diffusers' names: diffusers 0.42.1's
    Flux.2 LoRA converter maps ``final_layer.adaLN_modulation.1`` onto
    ``norm_out.linear`` as it is, where its checkpoint converter (and ComfyUI) swap the
    (shift, scale) halves; a file in the released names gives diffusers the swapped ΔW
    there. (Should diffusers swap it one day, this fails and the layer can join.)"""
    from loraengine.plugins.exporters import flux2_native_file
    from loraengine.plugins.models import comfy_names

    make, sched = tp.DENOISERS["flux2"][1], tp.DENOISERS["flux2"][2]
    model = make(0).eval()
    network = _network(model, "lora", skip=re.compile(r"^(?!norm_out\.linear$)"))
    assert network.paths == ["norm_out.linear"]
    tensors = flux2_native_file(network.file_modules())
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight" in tensors
    save_file(tensors, str(tmp_path / "n.safetensors"))
    pipe = tp.denoiser_pipeline("flux2", make(0).eval(),
                                diffusers.FlowMatchEulerDiscreteScheduler(**sched))
    pipe.load_lora_weights(str(tmp_path / "n.safetensors"))
    pipe.fuse_lora()
    linear = pipe.transformer.norm_out.linear
    got = getattr(linear, "base_layer", linear).weight
    base = make(0).norm_out.linear.weight
    delta = network["norm_out.linear"].delta_weight()
    swapped = torch.cat(delta.chunk(2, dim=0)[::-1])
    assert relative_error(got, base + swapped) <= TOL
    assert relative_error(got, base + delta) > 100 * TOL
    assert comfy_names.parse(comfy_names.flux2_native("norm_out.linear", 1))[1] == \
        comfy_names.SWAP


def test_convert_takes_the_file_to_comfyuis_layout_and_back_without_a_warning(tmp_path):
    """``loraengine convert --to comfyui --model`` reads the file (no warning: ComfyUI
    reads all of it) and writes ComfyUI's trainer layout; ``--to diffusers`` of that
    gives the released-name file again, with the same tensors."""


    model = tp.comfyui_transformer("flux2")
    folder = tmp_path / "model"
    model.save_pretrained(str(folder))
    network = _network(model, "lora")
    source = tmp_path / "d.safetensors"
    _write(source, network)
    comfy = convert_round_trip(source, folder, tmp_path)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in comfy
