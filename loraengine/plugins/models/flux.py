"""The ``flux`` family: FLUX.1 (``FluxTransformer2DModel``), trained with rectified flow.

Latents are ``[N,C,H,W]`` as the VAE gives them; the family packs each 2×2 patch into
one token (``[N, H/2·W/2, 4C]``), builds the image position ids, and unpacks the
prediction. A conditioning file holds ``cond`` (T5 hidden states), ``pooled`` (CLIP's
pooled embedding) and optionally ``txt_ids`` (zeros when absent). Guidance-distilled
models (Flux dev) are given the ``guidance`` value through their guidance embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import nn

from loraengine.core.model import PredictFn
from loraengine.plugins.models.common import (
    FlowOptions,
    ModelInputs,
    family_spec,
    flow_transformer_family,
    submodules,
    transformer_inputs,
)

#: Every Linear of the double- and single-stream blocks.
FLUX_TARGETS = ("transformer_blocks.*", "single_transformer_blocks.*")


class FluxOptions(FlowOptions):
    guidance: float = Field(1.0, ge=0, description="Guidance value fed to a guidance-"
                            "distilled model (Flux dev) while training.")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` -> ``[B, H/2·W/2, 4C]``: each 2×2 patch becomes one token."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a latent of ``height × width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype
              ) -> torch.Tensor:
    """Position ids ``[H/2·W/2, 3]``: (0, row, column) of each packed token."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def flux_inputs(model: nn.Module) -> ModelInputs:
    """Flux's ``in_channels`` counts the 2×2 packed values: four per latent channel."""
    return transformer_inputs(model, tokens_per_channel=4)


def flux_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "transformer_blocks", "single_transformer_blocks")


def flux_predictor(options: Any, module: nn.Module, schedule: Any, vae_factor: int
                   ) -> PredictFn:
    scale = float(schedule.timestep_scale)
    guidance_value = float(getattr(options, "guidance", 1.0))

    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        b, _, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents need even sides; got {h}×{w}")
        txt = cond["cond"]
        txt_ids = cond.get("txt_ids")
        if txt_ids is None:
            txt_ids = torch.zeros(txt.shape[1], 3, device=txt.device, dtype=x_t.dtype)
        elif txt_ids.ndim == 3:
            txt_ids = txt_ids[0]  # the same for every sample; the model takes one
        guidance = None
        if getattr(model.config, "guidance_embeds", False):
            guidance = torch.full((b,), guidance_value, device=x_t.device, dtype=x_t.dtype)
        # The transformer multiplies timestep (and guidance) by 1000 itself.
        out = model(hidden_states=pack(x_t), encoder_hidden_states=txt,
                    pooled_projections=cond["pooled"], timestep=(t / scale).to(x_t.dtype),
                    img_ids=image_ids(h, w, x_t.device, x_t.dtype), txt_ids=txt_ids,
                    guidance=guidance, return_dict=False)[0]
        return unpack(out, h, w)

    return predict


FLUX = flow_transformer_family(
    name="flux", model_class="FluxTransformer2DModel", pipeline_classes=("FluxPipeline",),
    vae_scale=0.3611, vae_shift=0.1159, default_include=FLUX_TARGETS,
    base_model_version="flux1", options=FluxOptions, predictor=flux_predictor,
    blocks=flux_blocks, flow_shift=1.0, inputs=flux_inputs,
    description="FLUX.1 transformer (rectified flow, packed 2×2 latents, guidance).")

SPEC = family_spec(FLUX)
