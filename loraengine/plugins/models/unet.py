"""The UNet families: ``sd15``, ``sd2`` (v-prediction) and ``sdxl`` (added conditioning).

All three are diffusers ``UNet2DConditionModel`` denoisers on a DDPM schedule. SDXL's
UNet also takes ``text_embeds`` (the pooled caption embedding, ``pooled`` in a
conditioning file) and ``time_ids`` (original size, crop corner, target size); when a
file has no ``time_ids`` they are derived from the latent size (no crop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraengine.core.model import PredictFn
from loraengine.plugins.models.common import (
    family_spec,
    pipeline_class,
    read_json,
    unet_blocks,
    unet_family,
)
from loraengine.plugins.models.unet_names import unet_layouts, unet_looks_like

#: Every Linear/Conv inside the down/mid/up blocks: attention, feed-forward, resnets
#: and resamplers (kohya's LoRA + LoCon set); embeddings and conv_in/out stay frozen.
UNET_TARGETS = ("down_blocks.*", "mid_block.*", "up_blocks.*")


def sd_predictor(options: Any, module: nn.Module, schedule: Any, vae_factor: int
                 ) -> PredictFn:
    def predict(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return unet(x_t, t, encoder_hidden_states=cond["cond"], return_dict=False)[0]

    return predict


def default_time_ids(x_t: torch.Tensor, vae_factor: int) -> torch.Tensor:
    """SDXL micro-conditioning for an uncropped image the size of the latents."""
    h, w = (int(s) * vae_factor for s in x_t.shape[-2:])
    row = torch.tensor([h, w, 0, 0, h, w], dtype=x_t.dtype, device=x_t.device)
    return row.expand(x_t.shape[0], 6)


def sdxl_predictor(options: Any, module: nn.Module, schedule: Any, vae_factor: int
                   ) -> PredictFn:
    def predict(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        time_ids = cond.get("time_ids")
        if time_ids is None:
            time_ids = default_time_ids(x_t, vae_factor)
        added = {"text_embeds": cond["pooled"], "time_ids": time_ids.to(x_t.dtype)}
        return unet(x_t, t, encoder_hidden_states=cond["cond"], added_cond_kwargs=added,
                    return_dict=False)[0]

    return predict


def _looks_sd2(path: Path) -> bool:
    """SD 2.x pipelines: a v-prediction scheduler, or OpenCLIP-H's 1024-wide context."""
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.exists() and read_json(sched).get("prediction_type") == "v_prediction":
        return True
    unet = path / "unet" / "config.json"
    return unet.exists() and read_json(unet).get("cross_attention_dim") == 1024


def _detect_sd15(path: Any) -> bool:
    path = Path(path)
    return pipeline_class(path) == "StableDiffusionPipeline" and not _looks_sd2(path)


def _detect_sd2(path: Any) -> bool:
    path = Path(path)
    return pipeline_class(path) == "StableDiffusionPipeline" and _looks_sd2(path)


SD15 = unet_family(
    name="sd15", pipeline_classes=("StableDiffusionPipeline",), prediction_type="epsilon",
    vae_scale=0.18215, default_include=UNET_TARGETS, base_model_version="sd_v1",
    cond_keys=("cond",), default_resolution=512, predictor=sd_predictor,
    description="Stable Diffusion 1.x UNet (epsilon prediction).")

SD2 = unet_family(
    name="sd2", pipeline_classes=("StableDiffusionPipeline",), prediction_type="v_prediction",
    vae_scale=0.18215, default_include=UNET_TARGETS, base_model_version="sd_v2_768_v",
    cond_keys=("cond",), default_resolution=768, predictor=sd_predictor,
    description="Stable Diffusion 2.x UNet (v-prediction unless the scheduler says "
    "epsilon).")

SDXL = unet_family(
    name="sdxl", pipeline_classes=("StableDiffusionXLPipeline",), prediction_type="epsilon",
    vae_scale=0.13025, default_include=UNET_TARGETS, base_model_version="sdxl_base_v1-0",
    cond_keys=("cond", "pooled"), default_resolution=1024, predictor=sdxl_predictor,
    description="Stable Diffusion XL UNet (pooled text embeds + size/crop time_ids).")

FAMILIES = {f.name: f for f in (SD15, SD2, SDXL)}

# a UNet's layers are also known by their original names (``unet_names``)
SPECS = [dataclasses.replace(spec, layouts=unet_layouts, looks_like=unet_looks_like)
         for spec in
         (family_spec(SD15, _detect_sd15), family_spec(SD2, _detect_sd2), family_spec(SDXL))]

__all__ = ["FAMILIES", "SD2", "SD15", "SDXL", "SPECS", "UNET_TARGETS", "default_time_ids",
           "sd_predictor", "sdxl_predictor", "unet_blocks"]
