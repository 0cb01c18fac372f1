"""The ``sd3`` family: Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``), trained
with rectified flow.

A conditioning file holds ``cond`` (the joint CLIP-L/G + T5 sequence, ``[N,L,D]``) and
``pooled`` (the two CLIP pooled embeddings side by side). The transformer sees the
timestep as ``σ·1000`` and predicts the velocity ``noise − x0``.
"""

from __future__ import annotations

from torch import nn

from loraengine.plugins.models.common import family_spec, flow_transformer_family, submodules
from loraengine.plugins.models.flow import FlowCall

#: Every Linear of the joint transformer blocks: attention (both streams), feed-forward
#: and the AdaLN modulation; patch/timestep/caption embedders stay frozen.
SD3_TARGETS = ("transformer_blocks.*",)


def sd3_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "transformer_blocks")


SD3 = flow_transformer_family(
    name="sd3", model_class="SD3Transformer2DModel",
    pipeline_classes=("StableDiffusion3Pipeline",), vae_scale=1.5305, vae_shift=0.0609,
    default_include=SD3_TARGETS, base_model_version="sd3", blocks=sd3_blocks, flow_shift=3.0,
    call=FlowCall(timestep="scaled", args=(("cond", "encoder_hidden_states"),
                                              ("pooled", "pooled_projections"))),
    description="Stable Diffusion 3 / 3.5 MMDiT (rectified flow, shift 3).")

SPEC = family_spec(SD3)
