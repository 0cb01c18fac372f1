"""Built-in model families: ``sd15``, ``sd2``, ``sdxl``, ``sd3``, ``flux`` and ``wan``
(video) on diffusers, plus ``diffusers`` (any local UNet folder) and ``module`` (an in-memory
``nn.Module``)."""

from __future__ import annotations

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.plugins.models import diffusers_folder, flux, module, sd3, unet, wan, wan_keys


@hookimpl
def loraengine_models():
    return [diffusers_folder.SPEC, module.SPEC, *unet.SPECS, sd3.SPEC, flux.SPEC, wan.SPEC]


@hookimpl
def loraengine_exporters():
    """Key formats that belong to one family (Wan's original names for ComfyUI)."""
    return [wan_keys.SPEC]
