"""The ``qwen_image`` family: Qwen-Image and Qwen-Image-Edit
(``QwenImageTransformer2DModel``).

Latents ``[N,16,H/8,W/8]`` (the VAE's single frame, normalised by its per-channel mean
and std) are packed 2×2 into tokens; the model is told each image's token grid
(``img_shapes``) and sees σ. ``cond`` holds the Qwen2.5-VL hidden states, ``mask``
(optional) their attention mask. For Edit, ``reference`` holds the source image's
latents: appended to the image tokens as the Edit pipeline does, its prediction
dropped.
"""

from __future__ import annotations

from torch import nn

from loraengine.plugins.models import family_marks as fm
from loraengine.plugins.models.common import family_spec, flow_transformer_family, submodules
from loraengine.plugins.models.flow import FlowCall, ShiftRule
from loraengine.plugins.models.latent_vaes import QwenLatentVAE, vae_loader


def qwen_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "transformer_blocks")


QWEN_IMAGE = flow_transformer_family(
    name="qwen_image", model_class="QwenImageTransformer2DModel",
    pipeline_classes=("QwenImagePipeline", "QwenImageEditPipeline",
                      "QwenImageEditPlusPipeline"),
    vae_scale=1.0, vae_shift=0.0, base_model_version="qwen_image",
    default_include=("transformer_blocks.*",), blocks=qwen_blocks, flow_shift=1.0,
    call=FlowCall(packing="patch2", positions="qwen", timestep="sigma",
                  optional_args=(("mask", "encoder_hidden_states_mask"),),
                  reference="reference"),
    latent_vae=vae_loader("AutoencoderKLQwenImage", QwenLatentVAE),
    shift_rule=ShiftRule(mu="linear", cells_per_token=4),
    known_as="a Qwen-Image",
    marks=(fm.JOINT_ATTENTION,
           "transformer_blocks.N.(img|txt)_(mlp.net.N(.proj)?|mod.N)", "img_in", "txt_in",
           "txt_norm", "time_text_embed.timestep_embedder.linear_[12]", "norm_out.linear",
           "proj_out"),
    description="Qwen-Image / Qwen-Image-Edit MMDiT (rectified flow, packed 2×2 latents).")

SPEC = family_spec(QWEN_IMAGE)
