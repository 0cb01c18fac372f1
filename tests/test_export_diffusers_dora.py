"""DoRA in the diffusers/PEFT key layout, checked with diffusers' own loader.

PEFT stores a LoRA's DoRA magnitude as ``<module>.lora_magnitude_vector``, one value
per output channel: ``[out]`` for a Linear, ``[1, out, 1, 1]`` for a Conv2d. diffusers'
``load_lora_adapter`` switches DoRA on when it sees that name and drops ``dora_scale``
(the LyCORIS/kohya name). The math is the same as ours: PEFT merges
``m · (W + ΔW) / ‖W + ΔW‖`` with the norm per output channel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import loraengine
from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.files import read_adapter_file, write_adapter_file
from loraengine.plugins import build_plugin_manager
from loraengine.testing.conformance import perturb, relative_error

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

REG = build_plugin_manager().registry
#: α ≠ r and α/r not a power of two, so folding the scale into lora_B is exercised.
RANK, ALPHA = 2, 3.0
#: The agreement asked of another program's patched weights.
TOL = 1e-4


def _fresh_unet(unet_dir):
    return diffusers.UNet2DConditionModel.from_pretrained(
        str(unet_dir / "unet"), local_files_only=True, torch_dtype=torch.float32).eval()


def _dora_network(model: nn.Module) -> AdapterNetwork:
    spec = REG.get("adapter", "lora")
    options = spec.config_model.model_validate({"weight_decompose": True})
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i, (path, base) in enumerate(sorted(select_layers(model, ["*"], [], ADAPTABLE).items())):
        layer = spec.create(base, RANK, ALPHA, options, g)
        layer.algorithm = "lora"
        perturb(layer, i)  # the magnitude too: it no longer equals ‖W‖
        layers[path] = layer
    return AdapterNetwork(layers)


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a layer, under PEFT's wrapper when it has one."""
    return getattr(module, "base_layer", module).weight


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(4, 6, 3)


def test_the_peft_layout_is_the_one_peft_saves():
    """Key names and shapes of our export equal those of PEFT's own state dict for the
    same layers (its adapter name and model prefix removed)."""
    model = _Two()
    net = _dora_network(model)
    ours = REG.get("exporter", "peft").to_file(net.file_modules())
    theirs = peft.get_peft_model_state_dict(peft.get_peft_model(_Two(), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["lin", "conv"], use_dora=True)))
    theirs = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in theirs.items()}
    assert {k.split(".", 1)[1]: tuple(v.shape) for k, v in ours.items()} == theirs
    assert theirs["lin.lora_magnitude_vector"] == (6,)
    assert theirs["conv.lora_magnitude_vector"] == (1, 6, 1, 1)


def test_diffusers_loads_our_dora_file_and_fuses_our_merged_weights(unet_dir, tmp_path):
    ours = _fresh_unet(unet_dir)
    network = _dora_network(ours)
    path = tmp_path / "dora.safetensors"
    tensors = write_adapter_file(path, network.file_modules(), REG.get("exporter", "peft"), {})
    assert not [k for k in tensors if "dora_scale" in k]
    network.merge()

    theirs = _fresh_unet(unet_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dropped or unexpected key warns
        theirs.load_lora_adapter(str(path), prefix="unet", adapter_name="ours")
    placed = [p for p in network.paths
              if "ours" in getattr(theirs.get_submodule(p), "lora_magnitude_vector", {})]
    assert placed == network.paths  # every module loaded, each with its magnitude
    theirs.fuse_lora()
    worst = max(relative_error(_base_weight(theirs.get_submodule(p)),
                               ours.get_submodule(p).weight) for p in network.paths)
    assert worst <= TOL, worst


def test_a_dora_file_written_by_diffusers_applies_like_diffusers_fuses_it(unet_dir, tmp_path):
    """The reverse direction: diffusers' own writer (``save_lora_weights`` of a
    PEFT-DoRA UNet) gives a file that ``apply`` merges to diffusers' fused weights."""
    from diffusers import StableDiffusionPipeline

    source = _fresh_unet(unet_dir)
    network = _dora_network(source)
    ours_file = tmp_path / "ours.safetensors"
    write_adapter_file(ours_file, network.file_modules(), REG.get("exporter", "peft"), {})
    theirs = _fresh_unet(unet_dir)
    theirs.load_lora_adapter(str(ours_file), prefix="unet", adapter_name="default")
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "diffusers", unet_lora_layers=peft.get_peft_model_state_dict(theirs),
        safe_serialization=True)
    written = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    theirs.fuse_lora()

    applied = _fresh_unet(unet_dir)
    handle = loraengine.apply(applied, written, mode="merge")
    assert sorted(handle.modules) == sorted(network.paths)
    worst = max(relative_error(applied.get_submodule(p).weight,
                               _base_weight(theirs.get_submodule(p))) for p in network.paths)
    assert worst <= TOL, worst


def test_both_magnitude_names_read_back_to_the_same_adapter(unet_dir, tmp_path):
    """``dora_scale`` (kohya/LyCORIS layout) and ``lora_magnitude_vector`` (PEFT) give
    the same modules and the same ΔW, including convolutions with in = out channels,
    where a ``[1, out, 1, 1]`` magnitude could be mistaken for one per input column."""
    model = _fresh_unet(unet_dir)
    network = _dora_network(model)
    paths = list(select_layers(model, ["*"], [], ADAPTABLE))
    files = {}
    for name in ("kohya", "peft"):
        path = tmp_path / f"{name}.safetensors"
        write_adapter_file(path, network.file_modules(), REG.get("exporter", name), {})
        files[name] = read_adapter_file(path, REG, paths)
    square = [p for p in paths if isinstance(model.get_submodule(p), nn.Conv2d)
              and model.get_submodule(p).in_channels == model.get_submodule(p).out_channels]
    assert square
    for path in network.paths:
        a, b = files["kohya"].modules[path], files["peft"].modules[path]
        assert "dora_scale" in a.params and "dora_scale" in b.params
        assert a.algorithm == b.algorithm == "lora"
        base = model.get_submodule(path)
        la = REG.get("adapter", "lora").load(base, a.params, None)
        lb = REG.get("adapter", "lora").load(base, b.params, None)
        assert la.dora_on_out and lb.dora_on_out
        with torch.no_grad():
            # the PEFT file holds lora_B·α/r (one rounding) and α = r: a few ulps apart
            assert relative_error(lb.delta_weight(), la.delta_weight()) < 1e-6, path
