"""The ``hidream`` family: HiDream-I1 Full, Dev and Fast
(``HiDreamImageTransformer2DModel``).

Latents ``[N,16,H/8,W/8]`` (FLUX.1's VAE) go in as they are (the model patchifies).
``cond`` holds the T5 hidden states, ``llama3`` the Llama hidden states of every layer
``[N, layers, L, D]`` (the model picks its ``llama_layers``), ``pooled`` CLIP's pooled
embeddings. The model sees the scheduler's timestep (σ·1000) and predicts x0 − noise,
which the family turns back into the velocity.
"""

from __future__ import annotations

from torch import nn

from loraengine.plugins.models.common import family_spec, flow_transformer_family, submodules
from loraengine.plugins.models.flow import FlowCall


def hidream_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "double_stream_blocks", "single_stream_blocks")


HIDREAM = flow_transformer_family(
    name="hidream", model_class="HiDreamImageTransformer2DModel",
    pipeline_classes=("HiDreamImagePipeline",), vae_scale=0.3611, vae_shift=0.1159,
    base_model_version="hidream_i1",
    default_include=("double_stream_blocks.*", "single_stream_blocks.*"),
    blocks=hidream_blocks, flow_shift=3.0,
    call=FlowCall(timestep="scaled", timestep_arg="timesteps", negate=True,
                  args=(("cond", "encoder_hidden_states_t5"),
                        ("llama3", "encoder_hidden_states_llama3"),
                        ("pooled", "pooled_embeds")),
                  batch_second=("llama3",), widths=(("pooled", "text_emb_dim"),)),
    known_as="a HiDream-I1",
    marks=("(double|single)_stream_blocks.N", "caption_projection.N.linear", "p_embedder",
           "t_embedder.timestep_embedder", "x_embedder.proj", "final_layer"),
    description="HiDream-I1 sparse DiT (rectified flow, T5 + Llama + CLIP text).")

SPEC = family_spec(HIDREAM)
