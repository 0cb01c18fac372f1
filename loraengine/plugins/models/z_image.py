"""The ``z_image`` family: Z-Image and Z-Image-Turbo (``ZImageTransformer2DModel``).

The model takes a list of per-sample latents ``[C,1,H,W]`` and of caption features
``[L,D]`` (``cond``, trimmed by ``mask`` when given), sees the timestep as 1 − σ and
predicts x0 − noise, the negated velocity, which the family turns back.
"""

from __future__ import annotations

from torch import nn

from loraengine.plugins.models import family_marks as fm
from loraengine.plugins.models.common import family_spec, flow_transformer_family, submodules
from loraengine.plugins.models.flow import FlowCall, ShiftRule


def z_image_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "noise_refiner", "context_refiner", "layers")


Z_IMAGE = flow_transformer_family(
    name="z_image", model_class="ZImageTransformer2DModel",
    pipeline_classes=("ZImagePipeline",), vae_scale=0.3611, vae_shift=0.1159,
    base_model_version="z_image", default_include=("layers.*",), blocks=z_image_blocks,
    flow_shift=3.0,
    call=FlowCall(packing="frames", timestep="one_minus_sigma", negate=True,
                  latent_arg="x", timestep_arg="t", args=(("cond", "cap_feats"),),
                  widths=(("cond", "cap_feat_dim"),)),
    shift_rule=ShiftRule(mu="linear", cells_per_token=4),
    known_as="a Z-Image",
    marks=(fm.NEXT_DIT,
           "(noise_refiner|context_refiner|layers).N.attention.(to_[qkv]|to_out.N|norm_[qk])",
           "all_x_embedder", "all_final_layer", "cap_embedder.N", "t_embedder.mlp.N",
           "x_embedder", "final_layer"),
    description="Z-Image single-stream DiT (rectified flow, shift 3, 1−σ timesteps).")

SPEC = family_spec(Z_IMAGE)
