"""Lumina 2's default (``diffusers``) LoRA file at the released model's q/k/v widths,
and LTX-2's default LoRA file on the tiny LTX-2, as ComfyUI 0.8.0 loaded them: pinned by
tests/fixtures/interop/make_comfyui_released_fixtures.py (ComfyUI's
``load_lora_for_models`` + ``patch_model`` on its NextDiT at those widths, and on its
LTXAV model).

The file of each target set (every block layer; the default targets ``layers.*``) is
the seeded network of the script, written by our exporter today: it must be the file
ComfyUI loaded (same keys), which it loaded whole (0 keys not loaded), and our reader's
merge must change the weights ComfyUI changed, to ComfyUI's values.

Tolerance: ComfyUI and loraengine compute W + ΔW in fp32 from the same fp32 factors, in
possibly different orders (measured: 1.6e-7 of the largest weight); the pins are fp64
products of those fp32 weights with Gaussian probes, whose difference relative to their
largest value is of the same order. 1e-4 is the interop issue's bound, far above it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from fixtures.interop.comfy_layout import native_by_layout
from fixtures.interop.make_comfyui_released_fixtures import (
    LTX2_STEM,
    STEM,
    TARGETS,
    network,
    summary,
    video_network,
)
from safetensors.torch import load_file

import loraengine
from loraengine.core.files import in_layout, module_layouts
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models import comfy_names
from loraengine.testing import tiny_pipelines as tp
from loraengine.testing import tiny_video as tv

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
HOST = build_plugin_manager()
REG = HOST.registry
TOL = 1e-4


@pytest.fixture(scope="module")
def released():
    return tp.lumina2_released_width_transformer(0).eval()


def _native(model, state):
    return native_by_layout(module_layouts(REG, model).get(comfy_names.LAYOUT, {}), state)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("targets", sorted(TARGETS))
def test_lumina2_default_file_loads_whole_in_comfyui_with_our_weights(released, targets):
    record = json.loads((FIXTURES / f"{STEM}.json").read_text())["targets"][targets]
    pins = load_file(str(FIXTURES / f"{STEM}_patched.safetensors"))
    model = copy.deepcopy(released)
    net = network(model, targets)
    exporter = REG.get("exporter", "diffusers")
    tensors = exporter.to_file(in_layout(net.file_modules(), exporter,
                                         module_layouts(REG, model)))
    assert sorted(tensors) == record["file_keys"]  # the file ComfyUI loaded
    assert record["not_loaded"] == 0
    # every key is one ComfyUI 0.8.0's key map has for the weight of its own name (the
    # tiny Lumina 2 fixture: a narrower model with the same names)
    key_map = json.loads((FIXTURES / "lumina2_comfyui_transformer.json").read_text())[
        "model_lora_keys_unet"]
    for key in tensors:
        stem = key.rsplit(".", 2)[0]
        assert key_map[stem] == f"{stem}.weight", key
    base = _native(model, {k: v.detach() for k, v in released.state_dict().items()})
    loraengine.apply(model, {k: v.clone() for k, v in tensors.items()}, mode="merge",
                     host=HOST)
    ours = _native(model, {k: v.detach() for k, v in model.state_dict().items()})
    changed = sorted(k for k in ours if not torch.equal(ours[k], base[k]))
    assert changed == record["changed"]
    for index, key in enumerate(changed):
        mine = summary(ours[key], index)
        for part in ("rows", "probes"):
            err = _rel(mine[part], pins[f"{targets}/{key}.{part}"])
            assert err <= TOL, (key, part, err)


def test_ltx2_default_file_loads_whole_in_comfyui_with_our_weights():
    record = json.loads((FIXTURES / f"{LTX2_STEM}.json").read_text())
    pins = load_file(str(FIXTURES / f"{LTX2_STEM}_patched.safetensors"))
    model = tv.ltx2_transformer(0).eval()
    net = video_network(model)
    exporter = REG.get("exporter", "diffusers")
    tensors = exporter.to_file(in_layout(net.file_modules(), exporter,
                                         module_layouts(REG, model)))
    assert sorted(tensors) == record["file_keys"]  # the file ComfyUI loaded
    assert record["not_loaded"] == 0 and record["modules"] == len(net.paths)
    base = _native(model, {k: v.detach().clone() for k, v in model.state_dict().items()})
    loraengine.apply(model, tensors, mode="merge", host=HOST)
    ours = _native(model, {k: v.detach() for k, v in model.state_dict().items()})
    changed = sorted(k for k in ours if not torch.equal(ours[k], base[k]))
    assert changed == record["changed"] and len(changed) == len(net.paths)
    for index, key in enumerate(changed):
        mine = summary(ours[key], index)
        for part in ("rows", "probes"):
            err = _rel(mine[part], pins[f"{key}.{part}"])
            assert err <= TOL, (key, part, err)
