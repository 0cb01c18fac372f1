"""DoRA files trained with ``weight_decompose_norm: comfyui`` read in ComfyUI exactly;
with the standard norm ComfyUI's reading differs by the error ``convert`` measures.

Pinned by fixtures made with ComfyUI's own loader
(tests/fixtures/interop/make_comfyui_dora_fixtures.py, the commit in the results file):
loraengine's ``comfyui`` export of perturbed DoRA LoRA/LoHa/LoKr networks on the
SD1.5-structured tiny UNet, a few layers of each file, and the weights ComfyUI's
``load_lora_for_models`` + ``patch_model`` computed for those layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

import loraengine
from loraengine.core.adapter import layer_op
from loraengine.core.files import read_metadata
from loraengine.plugins.adapters.dora import NORM_KEY
from loraengine.plugins.exporters import comfyui_limits
from loraengine.testing.models import sd15_structure_unet_config
from loraengine.tools.convert.logic import convert_file, measure

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
RESULTS = json.loads((FIXTURES / "sd15_dora_results.json").read_text())
CASES = sorted(RESULTS["cases"])
COMFYUI_CASES = [c for c in CASES if c.endswith("_comfyui")]
STANDARD_CASES = [c for c in CASES if c.endswith("_standard")]
#: the acceptance bound of a consumer reading a file exactly (issue 16); ComfyUI's
#: float32 patching against ours is a few ulps (the fixture script measured ~2e-7)
EXACT = 1e-4


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)  # as the fixture script builds it
    return UNet2DConditionModel(**sd15_structure_unet_config()).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def comfyui_weights() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "sd15_dora_patched.safetensors"))


def _file(case: str) -> Path:
    return FIXTURES / f"sd15_dora_{case}.safetensors"


def test_comfyui_loaded_every_key_of_every_case():
    """What ComfyUI's loader reported over the whole network (every adaptable layer):
    nothing unloaded, and with the comfyui norm its weights are ours."""
    assert set(CASES) == {f"{a}_{n}" for a in ("lora", "loha", "lokr")
                          for n in ("comfyui", "standard")}
    for case in CASES:
        got = RESULTS["cases"][case]
        assert got["not_loaded"] == 0 and got["modules"] > 250, case
        if case in COMFYUI_CASES:
            assert got["max_rel_error"] <= EXACT, case
        else:  # the limit is real: ComfyUI reads these weights differently
            assert got["max_rel_error"] > 1e-2, case


@pytest.mark.parametrize("case", CASES)
def test_the_file_records_its_norm(case):
    norm = case.rsplit("_", 1)[1]
    assert read_metadata(_file(case))[NORM_KEY] == norm
    with safe_open(str(_file(case)), "pt") as fh:  # ComfyUI's keys, with dora_scale
        keys = list(fh.keys())
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert any(k.endswith(".dora_scale") for k in keys)


@pytest.mark.parametrize("case", COMFYUI_CASES)
def test_merge_is_comfyuis_weight(case, comfyui_weights):
    """``apply(mode="merge")`` reads the norm from the metadata: every layer ComfyUI's
    patched weight, to the acceptance bound."""
    unet = _unet()
    applied = loraengine.apply(unet, _file(case), mode="merge")
    assert sorted(applied.modules) == sorted(RESULTS["kept_layers"])
    for path in RESULTS["kept_layers"]:
        theirs = comfyui_weights[f"{case}/{path}.weight"]
        assert _rel(unet.get_submodule(path).weight.detach(), theirs) <= EXACT, path


@pytest.mark.parametrize("case", COMFYUI_CASES)
def test_bypass_gives_comfyuis_outputs(case, comfyui_weights):
    """Bypass hooks (the factored route of the comfyui norm) give the output of the
    layer with ComfyUI's weight."""
    unet = _unet()
    g = torch.Generator().manual_seed(1)
    with loraengine.apply(unet, _file(case), mode="bypass"):
        for path in RESULTS["kept_layers"]:
            layer = unet.get_submodule(path)
            w = layer.weight
            x = torch.randn((2, w.shape[1], 8, 8) if w.ndim == 4 else (2, 5, w.shape[1]),
                            generator=g)
            with torch.no_grad():
                got = layer(x)
                want = layer_op(layer, x, comfyui_weights[f"{case}/{path}.weight"],
                                layer.bias)
            # outputs are sums of fan-in products of weights within EXACT of ComfyUI's
            assert _rel(got, want) <= EXACT, path


@pytest.mark.parametrize("case", STANDARD_CASES)
def test_standard_norm_error_is_what_convert_measures(case, comfyui_weights):
    """With the standard norm ComfyUI's weights differ from ours, and ``convert``'s
    measured error (its formula for ComfyUI's reading) is the error ComfyUI's own code
    makes, layer for layer."""
    unet = _unet()
    ours = _unet()
    loraengine.apply(ours, _file(case), mode="merge")
    actual = max(_rel(comfyui_weights[f"{case}/{p}.weight"],
                      ours.get_submodule(p).weight.detach())
                 for p in RESULTS["kept_layers"])
    assert actual > 1e-2
    from loraengine.core.files import read_adapter_file
    from loraengine.inference import adaptable_layers
    from loraengine.plugins import build_plugin_manager

    reg = build_plugin_manager().registry
    file = read_adapter_file(_file(case), reg, adaptable_layers(unet), model=unet)
    (limit, (measured, _, count)), = measure("comfyui", file, unet).items()
    assert "DoRA" in limit and count == len(RESULTS["kept_layers"])
    # both are fp32 computations of the same weights: they agree to a few ulps of it
    assert measured == pytest.approx(actual, rel=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_convert_to_comfyui_warns_only_for_the_standard_norm(case, tmp_path):
    res = convert_file(_file(case), "comfyui", model=_unet(), out=tmp_path / "c.safetensors")
    dora = [w for w in res["warnings"] if "DoRA" in w]
    if case in COMFYUI_CASES:
        assert dora == []
    else:
        (line,) = dora
        assert line.startswith("ComfyUI: ") and f"{len(RESULTS['kept_layers'])} layer(s)" \
            in line and "max relative weight error" in line
    # the record goes with the converted file
    assert read_metadata(tmp_path / "c.safetensors")[NORM_KEY] == case.rsplit("_", 1)[1]


@pytest.mark.parametrize("case", CASES)
def test_exporter_limits_follow_the_files_norm(case):
    meta = read_metadata(_file(case))
    modules = {p: ("lora", {"lora_down.weight", "lora_up.weight", "dora_scale"})
               for p in RESULTS["kept_layers"]}
    lines = [line for line in comfyui_limits(modules, metadata=meta) if "DoRA" in line]
    assert len(lines) == (0 if case in COMFYUI_CASES else 1)
