"""Built-in model families: ``sd15``, ``sd2``, ``sdxl``, ``sd3``, ``flux``, ``flux2``,
``qwen_image``, ``z_image``, ``lumina2``, ``chroma``, ``hidream`` and ``wan`` (video) on
diffusers, plus ``diffusers`` (any local UNet folder) and ``module`` (an in-memory
``nn.Module``)."""

from __future__ import annotations

import dataclasses

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.plugins.models import (
    chroma,
    comfy_names,
    diffusers_folder,
    flux,
    flux2,
    hidream,
    lumina2,
    module,
    qwen_image,
    sd3,
    unet,
    wan,
    wan_keys,
    z_image,
)


@hookimpl
def loraengine_models():
    # ComfyUI's own (original checkpoint) names, where its model is laid out so
    comfy = [dataclasses.replace(spec, layouts=comfy_names.comfyui_layouts)
             for spec in (sd3.SPEC, flux.SPEC, flux2.SPEC, z_image.SPEC, lumina2.SPEC,
                          chroma.SPEC)]
    return [diffusers_folder.SPEC, module.SPEC, *unet.SPECS, *comfy, qwen_image.SPEC,
            hidream.SPEC, dataclasses.replace(wan.SPEC, layouts=comfy_names.comfyui_layouts)]


@hookimpl
def loraengine_exporters():
    """Key formats that belong to one family (Wan's original names for ComfyUI)."""
    return [wan_keys.SPEC]
