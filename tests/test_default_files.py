"""Each model family's default file (LoRA on its default targets, in its default
exporter's keys) against the consumers docs/compatibility.md says read it: ComfyUI 0.8.0
(its ``model_lora_keys_unet`` for the same tiny model, pinned in the interop fixtures:
a module whose key is not in that map is a ``lora key not loaded`` there) and the
family's diffusers pipeline (``load_lora_weights``, every module on a PEFT layer, no
key named unplaced). The table in docs/compatibility.md ("Each family's default file")
is this measurement."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import diffusers_warnings
from diffusers import UNet2DConditionModel

from loraengine.core.adapter import ADAPTABLE, AdapterNetwork
from loraengine.core.adapter.network import select_layers
from loraengine.core.files import in_layout, module_layouts
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models import TRANSFORMERS, unet
from loraengine.testing import tiny_pipelines as tp
from loraengine.testing import tiny_video as tv
from loraengine.testing.conformance import perturb
from loraengine.testing.models import sd15_structure_unet_config, sdxl_structure_unet_config

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"
REG = build_plugin_manager().registry
RECORDS = {f.name: f for f in (*unet.FAMILIES.values(), *TRANSFORMERS)}


def _unet(config):
    def make():
        torch.manual_seed(0)  # as the ComfyUI fixture script builds it
        return UNet2DConditionModel(**config())
    return make


#: family -> (the tiny model ComfyUI's key map was taken on, that key file)
MODELS = {"sd15": (_unet(sd15_structure_unet_config), "sd15_comfyui_keys.json"),
          "sdxl": (_unet(sdxl_structure_unet_config), "sdxl_comfyui_keys.json"),
          **{f: (lambda f=f: tp.comfyui_transformer(f), f"{f}_comfyui_transformer.json")
             for f in ("sd3", "flux", "flux2", "qwen_image", "z_image", "lumina2",
                       "chroma", "hidream")},
          **{f: (lambda f=f: getattr(tv, f"{f}_transformer")(0), f"{f}_comfyui_video.json")
             for f in ("wan", "ltx2", "hunyuan_video15")}}


#: the cells that are not "every module" in the docs' table, with their footnotes
LUMINA2_TINY = "lumina2"      # ComfyUI maps no diffusers name of Lumina 2 at these widths
NO_LOADER = "hunyuan_video15"  # HunyuanVideo15Pipeline has no LoRA loader
MARKS = {"sd15": ("¹", ""), "sdxl": ("¹", ""), LUMINA2_TINY: ("²", ""),
         NO_LOADER: ("", "³")}


def measure(family: str) -> tuple[str, int, int, int, int | None]:
    """(default exporter, modules of the file, those ComfyUI does not load, layers
    adapted, layers diffusers' loader placed, or None where the pipeline has none)."""
    import diffusers
    from peft.tuners.lora import LoraLayer

    record = RECORDS[family]
    make, keys = MODELS[family]
    model = make().eval()
    spec = REG.get("adapter", "lora")
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i, (path, base) in enumerate(sorted(select_layers(
            model, list(record.default_include), [], ADAPTABLE).items())):
        layers[path] = spec.create(base, 2, 3.0, spec.config_model(), g)
        layers[path].algorithm = "lora"
        perturb(layers[path], i)
    exporter = REG.get("exporter", record.default_exporter)
    tensors = exporter.to_file(in_layout(AdapterNetwork(layers).file_modules(), exporter,
                                         module_layouts(REG, model)))
    stems = {re.sub(r"\.(lora_(up|down|A|B)\.weight|alpha)$", "", k) for k in tensors}
    key_map = json.loads((FIXTURES / keys).read_text())["model_lora_keys_unet"]
    unloaded = sum(1 for s in stems if s not in key_map)
    pipe_cls = getattr(diffusers, record.pipeline_classes[0])
    if not hasattr(pipe_cls, "load_lora_weights"):
        return record.default_exporter, len(stems), unloaded, len(layers), None
    code = pipe_cls.__init__.__code__
    parts = {n: None for n in code.co_varnames[1:code.co_argcount]}
    parts.update({record.subfolder: model, "scheduler": None})
    if "requires_safety_checker" in parts:
        parts["requires_safety_checker"] = False
    with diffusers_warnings() as messages:
        pipe_cls(**parts).load_lora_weights(dict(tensors))
    # diffusers names the file keys it could not place
    assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m], \
        messages
    placed = sum(1 for m in model.modules() if isinstance(m, LoraLayer))
    return record.default_exporter, len(stems), unloaded, len(layers), placed


def row(family: str, measured: tuple[str, int, int, int, int | None]) -> str:
    exporter, stems, unloaded, layers, placed = measured
    comfy, loader = MARKS.get(family, ("", ""))
    placed_cell = "no LoRA loader" if placed is None else f"{placed} of {layers}"
    return (f"| `{family}` | `{exporter}` | {unloaded} of {stems}{comfy} | "
            f"{placed_cell}{loader} |")


@pytest.mark.parametrize("family", list(MODELS))
def test_each_familys_default_file_loads_where_the_docs_say(family):
    measured = measure(family)
    exporter, stems, unloaded, layers, placed = measured
    # ComfyUI loads every module of the default file, but Lumina 2's on a model whose
    # q/k/v widths are not the released ones (docs/compatibility.md, limit 3)
    assert unloaded == (stems if family == LUMINA2_TINY else 0)
    # the family's diffusers pipeline places every layer, where it has a LoRA loader
    assert placed == (None if family == NO_LOADER else layers)
    assert row(family, measured) in DOCS.read_text(encoding="utf-8").splitlines()


if __name__ == "__main__":
    for name in MODELS:
        print(row(name, measure(name)))
