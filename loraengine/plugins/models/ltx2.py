"""The ``ltx2`` family: LTX-2 (``LTX2VideoTransformer3DModel``), trained on video only.

Latents are the pipeline's normalised video latents ``[N,128,T,H/32,W/32]``; each cell
is one token, frame-major as ``LTX2Pipeline._pack_latents`` orders them, and the model
builds its positions from the latent's frames, height and width. It sees the
scheduler's timestep ``σ·1000``. ``cond`` holds the text connector's video embeddings
(``mask`` their mask, optional). Training is video only: the model runs with its
modalities isolated (``isolate_modalities``: no audio-video cross-attention, as when
LTX-2 is run without audio) and an audio stream of one silent token and one zero text
token, which it computes apart and whose output is dropped. The default targets are
the video stream's attention and feed-forward layers. The pipeline shifts
by the token count (``use_dynamic_shifting``); each batch trains with its own size's
shift. ``prepare`` encodes clips with the pipeline's video VAE and captions with Gemma 3
and the connectors (:class:`~loraengine.plugins.models.video_encoders.LTX2Encoder`).
LTX-2.3 is the same class configured otherwise (gated attention, prompt modulation fed
``sigma``, no text projection: its connectors give the attention widths).
"""

from __future__ import annotations

from loraengine.plugins.models.common import blocks_of, family_spec, flow_transformer_family
from loraengine.plugins.models.flow import FlowCall, ShiftRule
from loraengine.plugins.models.latent_vaes import LTX2LatentVAE, vae_loader

#: LTX-2 projects the connectors' text to the attention width; LTX-2.3 does not
PROJECTS = "use_prompt_embeddings"

LTX2 = flow_transformer_family(
    name="ltx2", model_class="LTX2VideoTransformer3DModel",
    pipeline_classes=("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline"),
    vae_scale=1.0, vae_shift=0.0, vae_factor=32, base_model_version="ltx2",
    default_include=("transformer_blocks.*.attn1.*", "transformer_blocks.*.attn2.*",
                     "transformer_blocks.*.ff.*"),
    blocks=blocks_of("transformer_blocks"), flow_shift=1.0, default_resolution=512,
    call=FlowCall(packing="tokens", positions="grid", timestep="scaled", latent_ndim=5,
                  also_timestep=("sigma",), optional_args=(("mask", "encoder_attention_mask"),),
                  zeros=(("audio_hidden_states", 1, "audio_in_channels"),
                         ("audio_encoder_hidden_states", 1, (PROJECTS, "caption_channels",
                                                             "audio_cross_attention_dim"))),
                  constants=(("audio_num_frames", 1), ("isolate_modalities", True)),
                  widths=(("cond", (PROJECTS, "caption_channels", "cross_attention_dim")),)),
    shift_rule=ShiftRule(mu="linear", cells_per_token=1),
    known_as="an LTX-2",
    marks=("transformer_blocks.N.(audio_)?attn[12].(to_[qkv]|to_out.N|norm_[qk]|[qk]_norm)",
           "transformer_blocks.N.(audio_to_video|video_to_audio)_attn.(to_[qkv]|to_out.N|"
           "norm_[qk]|[qk]_norm)", "transformer_blocks.N.(audio_)?ff.net.N(.proj)?",
           "(audio_)?caption_projection.linear_[12]", "audio_proj_(in|out)",
           "(audio_)?time_embed", "av_cross_attn", "proj_in", "proj_out",
           # the original checkpoint's names (ComfyUI's LTXAV model)
           "(audio_)?patchify_proj", "(audio_)?adaln_single",
           "av_ca_(video_scale_shift|a2v_gate|audio_scale_shift|v2a_gate)_adaln_single"),
    latent_vae=vae_loader("AutoencoderKLLTX2Video", LTX2LatentVAE),
    description="LTX-2 audio-video transformer, video stream (rectified flow on "
    "[N,C,T,H,W] latents, one token per cell).")


SPEC = family_spec(LTX2)
