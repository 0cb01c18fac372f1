"""Files in every naming of a UNet's layers load on the diffusers model, and the
``comfyui``/``kohya`` exporters write the names those programs use (tiny UNets with the
real SD1.5 and SDXL block layouts).

The reference is the in-memory network merged into a copy of the model: reading the
file back must place every module and give bit-identical merged weights (the same
tensors, the same code: no rounding can differ)."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from diffusers import UNet2DConditionModel

import loraengine
from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.errors import DataError
from loraengine.core.files import in_layout, module_layouts, read_adapter_file, save_lora
from loraengine.inference import adaptable_layers
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models.unet_names import LDM, ldm_names
from loraengine.testing.conformance import perturb
from loraengine.testing.models import sd15_structure_unet_config, sdxl_structure_unet_config

HOST = build_plugin_manager()
REG = HOST.registry
CONFIGS = {"sd15": sd15_structure_unet_config, "sdxl": sdxl_structure_unet_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request: pytest.FixtureRequest):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[request.param]()).eval()
    spec = REG.get("adapter", "lora")
    layers = select_layers(unet, ["*"], [], ADAPTABLE)
    g = torch.Generator().manual_seed(0)
    built = {}
    for i, (path, base) in enumerate(sorted(layers.items())):
        layer = spec.create(base, 2, 3.0, spec.config_model(), g)
        layer.algorithm = "lora"
        perturb(layer, i)
        built[path] = layer
    network = AdapterNetwork(built, {})
    # the reference: each layer's ΔW added to a copy of the model, by path
    merged = copy.deepcopy(unet)
    for path, layer in built.items():
        base = merged.get_submodule(path)
        with torch.no_grad():
            base.weight += layer.delta_weight().to(base.weight.dtype)
    return request.param, unet, network, merged


def _write(tmp_path, unet, network, exporter, layout=None):
    spec = REG.get("exporter", exporter)
    if layout is not None:
        spec = dataclasses.replace(spec, layouts=(layout,))
    modules = network.file_modules()
    tensors = spec.to_file(in_layout(modules, spec, module_layouts(REG, unet)))
    path = tmp_path / f"{exporter}-{layout}.safetensors"
    save_lora(path, tensors, {})
    return path, tensors


def _check_loads(path, unet, network, merged):
    file = read_adapter_file(path, REG, adaptable_layers(unet), model=unet)
    assert sorted(file.modules) == sorted(network.paths)
    model = copy.deepcopy(unet)
    loraengine.apply(model, path, mode="merge", host=HOST)
    got, want = model.state_dict(), merged.state_dict()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_comfyui_export_uses_the_checkpoint_names(case, tmp_path):
    family, unet, network, merged = case
    path, tensors = _write(tmp_path, unet, network, "comfyui")
    names = ldm_names(unet)
    want = {f"diffusion_model.{names[p]}.{param}" for p, params in
            network.file_modules().items() for param in params}
    assert set(tensors) == want
    assert not any(".down_blocks." in k or ".up_blocks." in k for k in tensors)
    _check_loads(path, unet, network, merged)


def test_kohya_export_writes_sai_names_for_sdxl_only(case, tmp_path):
    family, unet, network, merged = case
    path, tensors = _write(tmp_path, unet, network, "kohya")
    stems = {k.split(".", 1)[0] for k in tensors}
    if family == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in stems
        assert not any(s.startswith("lora_unet_down_blocks") for s in stems)
    else:
        assert "lora_unet_down_blocks_0_attentions_0_proj_in" in stems
        assert not any(s.startswith("lora_unet_input_blocks") for s in stems)
    _check_loads(path, unet, network, merged)


@pytest.mark.parametrize("exporter,layout", [
    ("kohya", LDM),        # A1111 compvis / sd-scripts SAI names on SD1.5 too
    ("kohya", None),       # kohya diffusers-style names (forced below)
    ("comfyui", None),     # ComfyUI keys on diffusers paths, as older files had
    ("diffusers", None),   # PEFT/diffusers keys
])
def test_every_naming_loads_on_the_diffusers_model(case, tmp_path, exporter, layout):
    family, unet, network, merged = case
    spec = REG.get("exporter", exporter)
    if layout is None:
        spec = dataclasses.replace(spec, layouts=())
    tensors = spec.to_file(in_layout(network.file_modules(), spec, module_layouts(REG, unet)))
    path = tmp_path / "f.safetensors"
    save_lora(path, tensors, {})
    if exporter == "diffusers":  # α/r is folded into lora_B there: equal up to rounding
        file = read_adapter_file(path, REG, adaptable_layers(unet), model=unet)
        assert sorted(file.modules) == sorted(network.paths)
        return
    _check_loads(path, unet, network, merged)


def test_a_file_that_fits_no_layer_names_its_keys(case, tmp_path):
    family, unet, network, merged = case
    path = tmp_path / "odd.safetensors"
    save_lora(path, {"lora_unet_nowhere_block_9.lora_down.weight": torch.ones(2, 4),
                     "lora_unet_nowhere_block_9.lora_up.weight": torch.ones(4, 2)}, {})
    with pytest.raises(DataError, match="nowhere_block_9"):
        loraengine.apply(copy.deepcopy(unet), path, host=HOST)


def test_an_sdxl_file_on_an_sd15_model_says_so(tmp_path):
    """sd-scripts' SDXL layout (SAI names) against an SD1.5-structured UNet: one line,
    the first keys, the formats and layouts tried and the family it looks made for."""
    torch.manual_seed(0)
    sdxl = UNet2DConditionModel(**sdxl_structure_unet_config()).eval()
    sd15 = UNet2DConditionModel(**sd15_structure_unet_config()).eval()
    spec = REG.get("adapter", "lora")
    g = torch.Generator().manual_seed(0)
    layers = select_layers(sdxl, ["down_blocks.2.*", "mid_block.*"], [], ADAPTABLE)
    network = AdapterNetwork({p: spec.create(m, 1, 1.0, spec.config_model(), g)
                              for p, m in layers.items()}, {})
    path, _ = _write(tmp_path, sdxl, network, "kohya")
    with pytest.raises(DataError) as info:
        loraengine.apply(copy.deepcopy(sd15), path, host=HOST)
    message = str(info.value)
    assert "\n" not in message
    assert "lora_unet_input_blocks_7_1_transformer_blocks_1" in message
    tried = re.search(r"key formats tried: ([^;]*);", message).group(1).split(", ")
    assert {"kohya", "comfyui", "diffusers", "peft"} <= set(tried)
    assert "module names tried: the model's own, ldm" in message
    assert message.endswith("the file looks made for an SDXL UNet")
    # on its own family, nothing is unplaced and no family is named
    loraengine.apply(copy.deepcopy(sdxl), path, host=HOST).remove()


@pytest.mark.slow  # a tiny SDXL pipeline around the UNet (~10 s)
def test_diffusers_reads_the_sai_named_sdxl_export(tmp_path):
    """The ``kohya`` SDXL export (SAI names) through diffusers' own
    ``load_lora_weights`` + ``fuse_lora``: every module of the file changes its layer,
    to the weights the in-memory network merges (bit-identical where both compute
    W + up·down·α/r the same way; the bound is fp32 rounding of that sum, 2u·|W + ΔW|
    per element with u = 2⁻²⁴)."""
    from loraengine.plugins.models.unet import UNET_TARGETS
    from loraengine.testing import tiny_pipelines

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sdxl_structure_unet_config()).eval()
    before = copy.deepcopy(unet.state_dict())
    pipe = tiny_pipelines.build("sdxl")
    pipe.register_modules(unet=unet)
    spec = REG.get("adapter", "lora")
    g = torch.Generator().manual_seed(0)
    built = {}
    for i, (path, base) in enumerate(sorted(
            select_layers(unet, list(UNET_TARGETS), [], ADAPTABLE).items())):
        layer = spec.create(base, 2, 2.0, spec.config_model(), g)
        perturb(layer, i)
        built[path] = layer
    exporter = REG.get("exporter", "kohya")
    tensors = exporter.to_file(in_layout(AdapterNetwork(built, {}).file_modules(), exporter,
                                         module_layouts(REG, unet)))
    assert all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block",
                             "lora_unet_output_blocks")) for k in tensors)
    want = {}
    for path, layer in built.items():
        want[path] = (before[f"{path}.weight"] + layer.delta_weight()).detach()
    path = tmp_path / "sai.safetensors"
    save_lora(path, tensors, {})
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    got = pipe.unet.state_dict()
    U = 2.0 ** -24
    for module, weight in want.items():
        have = got[f"{module}.weight"]
        assert not torch.equal(have, before[f"{module}.weight"]), module
        assert bool(((have - weight).abs() <= 2 * U * weight.abs()).all()), module
