"""The ``chroma`` family: Chroma (``ChromaTransformer2DModel``), a FLUX.1-schnell
derivative without CLIP, pooled embedding or guidance input.

Latents ``[N,16,H/8,W/8]`` (FLUX.1's VAE) are packed 2×2 into tokens with FLUX.1's
position ids; the model sees σ. ``cond`` holds the T5 hidden states and ``mask``
(optional) the pipeline's text mask (the prompt's tokens and its first padding
token), which is extended with ones over the image tokens as the pipeline does.
"""

from __future__ import annotations

from torch import nn

from loraengine.plugins.models import family_marks as fm
from loraengine.plugins.models.common import family_spec, flow_transformer_family, submodules
from loraengine.plugins.models.flow import FlowCall, ShiftRule


def chroma_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "transformer_blocks", "single_transformer_blocks")


CHROMA = flow_transformer_family(
    name="chroma", model_class="ChromaTransformer2DModel",
    pipeline_classes=("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"),
    vae_scale=0.3611, vae_shift=0.1159, base_model_version="chroma",
    default_include=("transformer_blocks.*", "single_transformer_blocks.*"),
    blocks=chroma_blocks, flow_shift=1.0,
    call=FlowCall(packing="patch2", positions="flux1", timestep="sigma",
                  joint_mask="attention_mask"),
    shift_rule=ShiftRule(mu="linear", cells_per_token=4),
    known_as="a Chroma",
    marks=(fm.JOINT_ATTENTION, r"transformer_blocks.N.ff(_context)?.net.N(.proj)?",
           fm.FLUX_SINGLE, *fm.FLUX_ORIGINAL_BLOCKS, "distilled_guidance_layer",
           "img_in", "txt_in", "x_embedder", "context_embedder", "final_layer.linear",
           "proj_out"),
    description="Chroma transformer (rectified flow, packed 2×2 latents, T5 only).")

SPEC = family_spec(CHROMA)
