"""The ``flux2`` family: FLUX.2 dev and Klein (``Flux2Transformer2DModel``).

Latents are the pipeline's own: the VAE's latents patchified 2×2 and batch-normalised,
``[N,128,H/16,W/16]``; each cell is one token with position ids (t, row, column, 0), the
text tokens (0, 0, 0, index). The model sees σ; dev's guidance embedding is given the
``guidance`` value, Klein has none. A ``reference`` latent (edit training) is appended
as the pipeline appends a condition image, at time 10.
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
from loraengine.plugins.models.flow import FlowCall, ShiftRule
from loraengine.plugins.models.latent_vaes import Flux2LatentVAE, vae_loader


def flux2_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "transformer_blocks", "single_transformer_blocks")


FLUX2 = flow_transformer_family(
    name="flux2", model_class="Flux2Transformer2DModel",
    pipeline_classes=("Flux2Pipeline", "Flux2KleinPipeline"),
    vae_scale=1.0, vae_shift=0.0, vae_factor=16, base_model_version="flux2",
    default_include=("transformer_blocks.*", "single_transformer_blocks.*"),
    options=GuidanceOptions, blocks=flux2_blocks, flow_shift=1.0,
    call=FlowCall(packing="tokens", positions="flux2", timestep="sigma", guidance=True,
                  reference="reference"),
    latent_vae=vae_loader("AutoencoderKLFlux2", Flux2LatentVAE),
    shift_rule=ShiftRule(mu="flux2", cells_per_token=1),
    known_as="a Flux.2",
    marks=(fm.JOINT_ATTENTION, "transformer_blocks.N.ff(_context)?.linear_(in|out)",
           "single_transformer_blocks.N.attn.(to_qkv_mlp_proj|to_out|norm_[qk])",
           *fm.FLUX_ORIGINAL_BLOCKS, "(double|single)_stream_modulation(_img|_txt)?.lin(ear)?",
           r"time_guidance_embed.(timestep|guidance)_embedder.linear_[12]",
           "(time|guidance)_in.(in|out)_layer", "img_in", "txt_in", "x_embedder",
           "context_embedder", "final_layer", "norm_out.linear", "proj_out"),
    description="FLUX.2 dev / Klein transformer (rectified flow, patchified latents).")

SPEC = family_spec(FLUX2)
