"""The ``sd3`` family: Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``), trained
with rectified flow.

A conditioning file holds ``cond`` (the joint CLIP-L/G + T5 sequence, ``[N,L,D]``) and
``pooled`` (the two CLIP pooled embeddings side by side). The transformer sees the
timestep as ``σ·1000`` and predicts the velocity ``noise − x0``.
"""

from __future__ import annotations

from torch import nn

from loraengine.plugins.models import family_marks as fm
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
    known_as="an SD3",
    marks=(fm.JOINT_ATTENTION, fm.JOINT_FEED_FORWARD, fm.JOINT_MODULATION,
           r"transformer_blocks.N.attn2.(to_[qkv]|to_out.N)", "joint_blocks.N",
           "pos_embed.proj", "x_embedder.proj", "[ty]_embedder.mlp.N",
           r"time_text_embed.(timestep|text)_embedder.linear_[12]", "context_embedder",
           "final_layer", "norm_out.linear", "proj_out"),
    description="Stable Diffusion 3 / 3.5 MMDiT (rectified flow, shift 3).")

SPEC = family_spec(SD3)
