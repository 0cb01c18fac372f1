"""The ``hunyuan_video15`` family: HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``),
trained text-to-video.

Latents ``[N,32,T,H/16,W/16]`` go to the model as they are (it patchifies them), with
the zero condition latents and zero mask channel the text-to-video pipeline appends
(33 channels, up to the config's ``in_channels``) and a zero image embedding of 729
tokens; the model sees the scheduler's timestep ``σ·1000``. ``cond`` holds Qwen2.5-VL's
hidden states and ``mask`` their mask (all ones when absent); ``byt5`` / ``byt5_mask``
the glyph encoder's, given no tokens when absent. The shift is the scheduler config's;
``prepare``'s encoder is ``video_encoders.HunyuanVideo15Encoder``.
"""

from __future__ import annotations

from torch import nn

from loraengine.plugins.models import family_marks as fm
from loraengine.plugins.models.common import family_spec, flow_transformer_family, submodules
from loraengine.plugins.models.flow import FlowCall
from loraengine.plugins.models.latent_vaes import HunyuanVideo15LatentVAE, vae_loader


def hunyuan_blocks(model: nn.Module) -> list[nn.Module]:
    return submodules(model, "transformer_blocks")


HUNYUAN_VIDEO15 = flow_transformer_family(
    name="hunyuan_video15", model_class="HunyuanVideo15Transformer3DModel",
    pipeline_classes=("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
    vae_scale=1.0, vae_shift=0.0, vae_factor=16, base_model_version="hunyuan_video15",
    default_include=("transformer_blocks.*",), blocks=hunyuan_blocks, flow_shift=5.0,
    default_resolution=480, default_exporter="comfyui",
    latent_vae=vae_loader("AutoencoderKLHunyuanVideo15", HunyuanVideo15LatentVAE),
    call=FlowCall(timestep="scaled", latent_ndim=5, pad_channels=True,
                  text_mask="encoder_attention_mask",
                  optional_args=(("byt5", "encoder_hidden_states_2"),
                                 ("byt5_mask", "encoder_attention_mask_2")),
                  zeros=(("encoder_hidden_states_2", 0, "text_embed_2_dim"),
                         ("encoder_attention_mask_2", 0, None),
                         ("image_embeds", 729, "image_embed_dim")),
                  widths=(("cond", "text_embed_dim"), ("byt5", "text_embed_2_dim"))),
    known_as="a HunyuanVideo 1.5",
    marks=(fm.JOINT_ATTENTION, fm.JOINT_FEED_FORWARD, fm.JOINT_MODULATION,
           "context_embedder.(proj_in|time_text_embed|token_refiner)", "context_embedder_2",
           "image_embedder", "cond_type_embed", "time_embed.timestep_embedder",
           # the original checkpoint's names (diffusers' single-file converter)
           "double_blocks.N.(img|txt)_(attn_(qkv|proj|[qk]_norm)|mlp.fc[12]|mod.linear)",
           "txt_in.individual_token_refiner", "x_embedder.proj", "norm_out.linear",
           "proj_out",
           # ComfyUI's model: FLUX.1-style blocks and embedders, and its own inputs
           fm.FLUX_ORIGINAL_BLOCKS[0], "double_blocks.N.(img|txt)_mod.lin",
           "txt_in.(input_embedder|[tc]_embedder.(in|out)_layer)", "time_in.(in|out)_layer",
           "img_in.proj", "byt5_in.(fc[123]|layernorm)", "vision_in.proj.N",
           "cond_type_embedding", "final_layer.(linear|adaLN_modulation.N)"),
    description="HunyuanVideo 1.5 transformer, text-to-video (rectified flow on "
    "[N,C,T,H,W] latents).")


SPEC = family_spec(HUNYUAN_VIDEO15)
