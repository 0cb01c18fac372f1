"""Built-in model families: ``sd15``, ``sd2``, ``sdxl``, ``sd3``, ``flux``, ``flux2``,
``qwen_image``, ``z_image``, ``lumina2``, ``chroma``, ``hidream`` and the video families
``wan``, ``ltx2`` and ``hunyuan_video15`` on diffusers, plus ``diffusers`` (any local UNet
folder), ``module`` (an in-memory ``nn.Module``) and ``comfyui`` (ComfyUI's own model in
memory)."""

from __future__ import annotations

import dataclasses

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.plugins.models import (
    chroma,
    comfy_names,
    comfyui,
    diffusers_folder,
    family_marks,
    flux,
    flux2,
    hidream,
    hunyuan_video15,
    ltx2,
    lumina2,
    module,
    qwen_image,
    sd3,
    unet,
    wan,
    wan_keys,
    z_image,
)

#: The transformer families' records (the UNet ones are ``unet.FAMILIES``).
TRANSFORMERS = (sd3.SD3, flux.FLUX, flux2.FLUX2, qwen_image.QWEN_IMAGE, z_image.Z_IMAGE,
                lumina2.LUMINA2, chroma.CHROMA, hidream.HIDREAM, wan.WAN, ltx2.LTX2,
                hunyuan_video15.HUNYUAN_VIDEO15)


@hookimpl
def loraengine_models():
    # ComfyUI's own (original checkpoint) names, where its model is laid out so
    named = (sd3.SPEC, flux.SPEC, flux2.SPEC, z_image.SPEC, lumina2.SPEC, chroma.SPEC,
             wan.SPEC, ltx2.SPEC, hunyuan_video15.SPEC)
    specs = [diffusers_folder.SPEC, module.SPEC, comfyui.SPEC, *unet.SPECS, sd3.SPEC,
             flux.SPEC, flux2.SPEC, qwen_image.SPEC, z_image.SPEC, lumina2.SPEC, chroma.SPEC,
             hidream.SPEC, wan.SPEC, ltx2.SPEC, hunyuan_video15.SPEC]
    specs = [dataclasses.replace(spec, layouts=comfy_names.comfyui_layouts)
             if any(spec is n for n in named) else spec for spec in specs]
    # which transformer family a file was made for: one matcher over their records
    looks_like = family_marks.looks_like_among(TRANSFORMERS)
    names = {f.name for f in TRANSFORMERS}
    return [dataclasses.replace(spec, looks_like=looks_like) if spec.name in names else spec
            for spec in specs]


@hookimpl
def loraengine_exporters():
    """Key formats that belong to one family (Wan's original names for ComfyUI)."""
    return [wan_keys.SPEC]
