"""The ``flux`` family: FLUX.1 (``FluxTransformer2DModel``), trained with rectified flow.

Latents are ``[N,C,H,W]`` as the VAE gives them; the family packs each 2×2 patch into
one token (``[N, H/2·W/2, 4C]``), builds the image position ids, and unpacks the
prediction. A conditioning file holds ``cond`` (T5 hidden states), ``pooled`` (CLIP's
pooled embedding) and optionally ``txt_ids`` (zeros when absent). Guidance-distilled
models (Flux dev) are given the ``guidance`` value through their guidance embedding.
"""

from __future__ import annotations

from torch import nn

from loraengine.plugins.models import family_marks as fm
from loraengine.plugins.models.common import (
    GuidanceOptions,
    family_spec,
    flow_transformer_family,
    submodules,
)
from loraengine.plugins.models.flow import FlowCall

#: Every Linear of the double- and single-stream blocks.
FLUX_TARGETS = ("transformer_blocks.*", "single_transformer_blocks.*")


def flux_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "transformer_blocks", "single_transformer_blocks")


#: The transformer multiplies timestep (and guidance) by 1000 itself.
FLUX_CALL = FlowCall(packing="patch2", positions="flux1", timestep="sigma", guidance=True,
                     args=(("cond", "encoder_hidden_states"),
                           ("pooled", "pooled_projections")))

FLUX = flow_transformer_family(
    name="flux", model_class="FluxTransformer2DModel", pipeline_classes=("FluxPipeline",),
    vae_scale=0.3611, vae_shift=0.1159, default_include=FLUX_TARGETS,
    base_model_version="flux1", options=GuidanceOptions, call=FLUX_CALL,
    blocks=flux_blocks, flow_shift=1.0,
    known_as="a FLUX.1",
    marks=(fm.JOINT_ATTENTION, fm.JOINT_FEED_FORWARD, fm.JOINT_MODULATION, fm.FLUX_SINGLE,
           "single_transformer_blocks.N.norm.linear", *fm.FLUX_ORIGINAL_BLOCKS,
           "double_blocks.N.(img|txt)_mod.lin", "single_blocks.N.modulation.lin",
           r"time_text_embed.(timestep|text|guidance)_embedder.linear_[12]",
           "(time|vector|guidance)_in.(in|out)_layer", "img_in", "txt_in", "x_embedder",
           "context_embedder", "final_layer", "norm_out.linear", "proj_out"),
    description="FLUX.1 transformer (rectified flow, packed 2×2 latents, guidance).")

SPEC = family_spec(FLUX)
