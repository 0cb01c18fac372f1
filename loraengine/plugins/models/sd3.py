"""The ``sd3`` family: Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``), trained
with rectified flow.

A conditioning file holds ``cond`` (the joint CLIP-L/G + T5 sequence, ``[N,L,D]``) and
``pooled`` (the two CLIP pooled embeddings side by side). The transformer sees the
timestep as ``σ·1000`` and predicts the velocity ``noise − x0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from loraengine.core.model import PredictFn
from loraengine.plugins.models.common import family_spec, flow_transformer_family, submodules

#: Every Linear of the joint transformer blocks: attention (both streams), feed-forward
#: and the AdaLN modulation; patch/timestep/caption embedders stay frozen.
SD3_TARGETS = ("transformer_blocks.*",)


def sd3_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "transformer_blocks")


def sd3_predictor(options: Any, module: nn.Module, schedule: Any, vae_factor: int
                  ) -> PredictFn:
    def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(hidden_states=x_t, encoder_hidden_states=cond["cond"],
                     pooled_projections=cond["pooled"], timestep=t.float(),
                     return_dict=False)[0]

    return predict


SD3 = flow_transformer_family(
    name="sd3", model_class="SD3Transformer2DModel",
    pipeline_classes=("StableDiffusion3Pipeline",), vae_scale=1.5305, vae_shift=0.0609,
    default_include=SD3_TARGETS, base_model_version="sd3", predictor=sd3_predictor,
    blocks=sd3_blocks, flow_shift=3.0,
    description="Stable Diffusion 3 / 3.5 MMDiT (rectified flow, shift 3).")

SPEC = family_spec(SD3)
