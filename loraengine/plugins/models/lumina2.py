"""The ``lumina2`` family: Lumina-Image 2.0 (``Lumina2Transformer2DModel``).

Latents ``[N,16,H/8,W/8]`` go in as they are (the model patchifies); ``cond`` holds the
Gemma hidden states and ``mask`` their attention mask. The model sees 1 − σ (its t = 0
is noise) and predicts x0 − noise, which the family turns back into the velocity.
"""

from __future__ import annotations

from torch import nn

from loraengine.plugins.models import family_marks as fm
from loraengine.plugins.models.common import family_spec, flow_transformer_family, submodules
from loraengine.plugins.models.flow import FlowCall, ShiftRule


def lumina2_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "noise_refiner", "context_refiner", "layers")


LUMINA2 = flow_transformer_family(
    name="lumina2", model_class="Lumina2Transformer2DModel",
    pipeline_classes=("Lumina2Pipeline",), vae_scale=0.3611, vae_shift=0.1159,
    base_model_version="lumina2", default_include=("layers.*",), blocks=lumina2_blocks,
    flow_shift=6.0,
    call=FlowCall(timestep="one_minus_sigma", negate=True,
                  args=(("cond", "encoder_hidden_states"), ("mask", "encoder_attention_mask")),
                  widths=(("cond", "cap_feat_dim"),)),
    shift_rule=ShiftRule(mu="linear", cells_per_token=4),
    known_as="a Lumina 2",
    marks=(fm.NEXT_DIT,
           "(noise_refiner|context_refiner|layers).N.(attn.(to_[qkv]|to_out.N|norm_[qk])|"
           "feed_forward.linear_[123]|norm1.(linear|norm)|norm[12]|ffn_norm[12])",
           "time_caption_embed", "norm_out.linear_[12]", "cap_embedder.N", "t_embedder.mlp.N",
           "x_embedder", "final_layer"),
    description="Lumina-Image 2.0 DiT (rectified flow, 1−σ timesteps, Gemma text).")

SPEC = family_spec(LUMINA2)
