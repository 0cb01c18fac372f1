"""Tiny, complete video pipelines for tests: Wan 2.1 (one transformer) and Wan 2.2 A14B
(two experts and a ``boundary_ratio``), built from small configs of the real classes
with seeded random weights and saved with ``save_pretrained``; folders holding
only the transformer and scheduler of LTX-2 and HunyuanVideo 1.5
(:func:`save_video_denoiser`), and their whole pipelines with VAE, text encoders and
offline tokenizers (:func:`save_video_full`).

Wan's VAE is a tiny ``AutoencoderKLWan`` (8× space, 4× time: 5 frames of 32×32 become a
``[4, 2, 4, 4]`` latent) with per-channel ``latents_mean`` / ``latents_std`` that are
not the identity, so the normalization is exercised; the text encoder is a one-layer
``UMT5EncoderModel`` with the character tokenizer of :mod:`tiny_pipelines`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loraengine.testing.tiny_pipelines import _CHARS, t5_tokenizer

VIDEO_FAMILIES = ("wan", "wan22")
#: Latent channels, text width and the latent's temporal / spatial compression.
LATENT_CHANNELS, TEXT_DIM, TIME_FACTOR, SPACE_FACTOR = 4, 32, 4, 8
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0]
LATENTS_STD = [1.5, 0.8, 2.0, 1.0]
#: Wan 2.2 A14B text-to-video's expert hand-over.
BOUNDARY_RATIO = 0.875


def wan_transformer(seed: int = 0) -> Any:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM,
        freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan_vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1],
                             num_res_blocks=1, temperal_downsample=[False, True, True],
                             latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    return model.eval()  # type: ignore[attr-defined]


def umt5_text(seed: int = 0) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=4 + 2 * len(_CHARS), d_model=TEXT_DIM, d_kv=8,
                     d_ff=2 * TEXT_DIM, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                     decoder_start_token_id=0)
    return UMT5EncoderModel(cfg).eval()


def wan_scheduler(flow_shift: float = 3.0) -> Any:
    """The scheduler Wan's diffusers folders ship: UniPC on flow sigmas."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=flow_shift, num_train_timesteps=1000)


def build_video(family: str, seed: int = 0) -> Any:
    """A tiny ``WanPipeline``: ``wan`` (2.1) or ``wan22`` (two experts)."""
    from diffusers import WanPipeline

    if family not in VIDEO_FAMILIES:
        raise ValueError(f"unknown video family {family!r}; choose from "
                         f"{', '.join(VIDEO_FAMILIES)}")
    two = family == "wan22"
    return WanPipeline(tokenizer=t5_tokenizer(), text_encoder=umt5_text(seed),
                       vae=wan_vae(seed), transformer=wan_transformer(seed),
                       transformer_2=wan_transformer(seed + 1) if two else None,
                       scheduler=wan_scheduler(12.0 if two else 3.0),
                       boundary_ratio=BOUNDARY_RATIO if two else None)


def save_video(family: str, folder: Path, seed: int = 0) -> Path:
    """Build a tiny video pipeline and ``save_pretrained`` it into ``folder``."""
    folder = Path(folder)
    build_video(family, seed).save_pretrained(str(folder))
    return folder


def video_latents(n: int, frames: int = 2, height: int = 4, width: int = 4, seed: int = 0
                  ) -> torch.Tensor:
    """``[n, C, frames, height, width]`` smooth random latents (a learnable signal)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, LATENT_CHANNELS, frames, 2, 2, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(frames, height, width),
                                           mode="trilinear", align_corners=False)


# -- LTX-2 and HunyuanVideo 1.5: the transformer and the scheduler only ----------------

def ltx2_transformer(seed: int = 0) -> Any:
    """LTX-2, tiny: 8 video latent channels, text (connector) width 12, a 4-channel
    audio stream (video-only training runs it apart on one silent token)."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    return LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
        audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
        num_layers=2, caption_channels=12, rope_type="split")


def ltx23_transformer(seed: int = 0) -> Any:
    """LTX-2.3, tiny: :func:`ltx2_transformer` configured as diffusers' converter
    configures LTX-2.3 (gated attention and prompt modulation in both streams,
    perturbed attention, no caption projection: text comes at the attention widths,
    16 for video and 8 for audio)."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    return LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
        audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
        num_layers=2, caption_channels=12, rope_type="split", gated_attn=True,
        cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True,
        use_prompt_embeddings=False, perturbed_attn=True)


def hunyuan_video15_transformer(seed: int = 0) -> Any:
    """HunyuanVideo 1.5, tiny: 4 latent channels (9 in: latent, condition latent, mask),
    Qwen2.5-VL width 24, ByT5 width 12, image-embedding width 8."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_refiner_layers=1, text_embed_dim=24, text_embed_2_dim=12,
        image_embed_dim=8, rope_axes_dim=(2, 2, 4), task_type="t2v")


#: family -> (pipeline class, transformer builder, scheduler config, latent channels,
#: text width); the scheduler configs are those of the released pipelines (LTX-2's
#: shifts by token count; HunyuanVideo 1.5 480p text-to-video's is static).
VIDEO_DENOISERS: dict[str, tuple[str, Any, dict[str, Any], int, int]] = {
    "ltx2": ("LTX2Pipeline", ltx2_transformer,
             dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                  base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1),
             8, 12),
    "hunyuan_video15": ("HunyuanVideo15Pipeline", hunyuan_video15_transformer,
                        dict(shift=5.0), 4, 24),
}


def save_video_denoiser(family: str, folder: Path, seed: int = 0) -> Path:
    """A pipeline folder of ``family`` (``ltx2``, ``hunyuan_video15``) holding its tiny
    transformer and its scheduler only."""
    import json

    import diffusers as d

    pipe_cls, make, sched_cfg, _, _ = VIDEO_DENOISERS[family]
    folder = Path(folder)
    model = make(seed)
    model.save_pretrained(str(folder / "transformer"))
    d.FlowMatchEulerDiscreteScheduler(**sched_cfg).save_pretrained(  # type: ignore[attr-defined]
        str(folder / "scheduler"))
    index = {"_class_name": pipe_cls, "_diffusers_version": d.__version__,
             "transformer": ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


# -- LTX-2: the whole pipeline -----------------------------------------------------------

#: Tiny LTX-2 pipeline: video latent channels, Gemma 3 width (= connector and caption
#: width) and the video VAE's per-channel statistics (not the identity).
LTX2_CHANNELS, LTX2_TEXT_DIM = 8, 16
LTX2_LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0, 0.05, -0.1, 0.2, -0.3]
LTX2_LATENTS_STD = [1.5, 0.8, 2.0, 1.0, 1.2, 0.9, 1.1, 0.7]


def gemma3_text(seed: int = 0) -> Any:
    """``Gemma3ForConditionalGeneration`` with two text layers of width 16 (its tiny
    vision tower is never run: LTX-2 encodes text only)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from loraengine.testing.tiny_pipelines import gemma_tokenizer

    vocab = len(gemma_tokenizer())
    cfg = Gemma3Config(
        text_config=dict(vocab_size=vocab + 3, hidden_size=LTX2_TEXT_DIM, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=2048, sliding_window=64,
                         rope_scaling=None),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4),
        mm_tokens_per_image=4, boi_token_index=vocab, eoi_token_index=vocab + 1,
        image_token_index=vocab + 2)
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(cfg).eval()


def ltx2_parts(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny ``LTX2Pipeline``: VAE (8× space, 2× time: 5 frames of
    32×32 become ``[8, 3, 4, 4]``), Gemma 3, the text connectors, the transformer, and
    the audio VAE and vocoder the pipeline requires (training never runs them)."""
    import diffusers as d
    from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder

    from loraengine.testing.tiny_pipelines import gemma_tokenizer

    torch.manual_seed(seed)
    vae: Any = d.AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=LTX2_CHANNELS,
        block_out_channels=(8,), decoder_block_out_channels=(8,), layers_per_block=(1,),
        decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False),
        downsample_type=("spatiotemporal",), upsample_residual=(False,),
        upsample_factor=(1,), timestep_conditioning=False, patch_size=4, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    vae.latents_mean.copy_(torch.tensor(LTX2_LATENTS_MEAN))
    vae.latents_std.copy_(torch.tensor(LTX2_LATENTS_STD))
    text = gemma3_text(seed)
    layers = int(text.config.text_config.num_hidden_layers)
    torch.manual_seed(seed)
    connectors = LTX2TextConnectors(
        caption_channels=LTX2_TEXT_DIM, text_proj_in_factor=layers + 1,
        video_connector_num_attention_heads=2, video_connector_attention_head_dim=8,
        video_connector_num_layers=1, video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1, audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32, rope_double_precision=False, rope_type="split")
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=LTX2_CHANNELS, out_channels=LTX2_CHANNELS, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
        audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=2, caption_channels=LTX2_TEXT_DIM,
        rope_type="split")
    torch.manual_seed(seed)
    audio_vae = d.AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1,
        attn_resolutions=None, in_channels=2, resolution=32, latent_channels=2,
        norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160,
        is_causal=True, mel_bins=8)
    vocoder = LTX2Vocoder(in_channels=2 * 8, hidden_channels=32, out_channels=2,
                          upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
                          resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                          leaky_relu_negative_slope=0.1, output_sampling_rate=16000)
    sched = d.FlowMatchEulerDiscreteScheduler(**VIDEO_DENOISERS["ltx2"][2])
    return dict(vae=vae, audio_vae=audio_vae, text_encoder=text, tokenizer=gemma_tokenizer(),
                connectors=connectors, transformer=transformer, vocoder=vocoder,
                scheduler=sched, processor=None, prompt_enhancer=None, duration_head=None)


# -- HunyuanVideo 1.5: the whole pipeline -----------------------------------------------

#: Tiny HunyuanVideo 1.5 VAE: latent channels and its compression (4x space, 2x time).
HUNYUAN_CHANNELS, HUNYUAN_SPACE, HUNYUAN_TIME = 4, 4, 2
#: Qwen2.5-VL and ByT5 widths (the transformer's ``text_embed_dim`` / ``text_embed_2_dim``).
HUNYUAN_TEXT_DIM, HUNYUAN_BYT5_DIM = 24, 12


def hunyuan_video15_parts(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny ``HunyuanVideo15Pipeline``: VAE (its released
    ``scaling_factor``; 5 frames of 32x32 become ``[4, 3, 8, 8]``), the Qwen2.5-VL text
    model with the byte-level Qwen tokenizer and its chat template, ByT5 (a T5 encoder
    over ``ByT5Tokenizer``'s bytes, which needs no vocabulary file) and the guider."""
    import diffusers as d
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        T5Config,
        T5EncoderModel,
    )

    from loraengine.testing.tiny_pipelines import QWEN_VOCAB, qwen_tokenizer

    torch.manual_seed(seed)
    vae: Any = d.AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=HUNYUAN_CHANNELS,
        block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=HUNYUAN_SPACE, temporal_compression_ratio=HUNYUAN_TIME,
        downsample_match_channel=False, upsample_match_channel=False)
    torch.manual_seed(seed)
    text = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=QWEN_VOCAB, hidden_size=HUNYUAN_TEXT_DIM, intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=2048, pad_token_id=0, bos_token_id=0, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [2, 2, 2]}))
    byt5 = ByT5Tokenizer()
    torch.manual_seed(seed)
    glyph = T5EncoderModel(T5Config(
        vocab_size=len(byt5), d_model=HUNYUAN_BYT5_DIM, d_kv=6, d_ff=24, num_layers=1,
        num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))  # type: ignore[call-arg]
    sched = d.FlowMatchEulerDiscreteScheduler(**VIDEO_DENOISERS["hunyuan_video15"][2])
    return dict(vae=vae.eval(), text_encoder=text.eval(), tokenizer=qwen_tokenizer(),
                transformer=hunyuan_video15_transformer(seed), scheduler=sched,
                text_encoder_2=glyph.eval(), tokenizer_2=byt5,
                guider=d.ClassifierFreeGuidance(guidance_scale=1.0))


#: family -> (pipeline class, its parts) of the whole tiny video record pipelines.
VIDEO_FULL = {"ltx2": ("LTX2Pipeline", ltx2_parts),
              "hunyuan_video15": ("HunyuanVideo15Pipeline", hunyuan_video15_parts)}


def save_video_full(family: str, folder: Path, seed: int = 0) -> Path:
    """A whole tiny pipeline of a record video family (``ltx2``, ``hunyuan_video15``)
    saved with ``save_pretrained`` into ``folder``."""
    import diffusers as d

    if family not in VIDEO_FULL:
        raise ValueError(f"no whole tiny pipeline of {family!r}; choose from "
                         f"{', '.join(VIDEO_FULL)}")
    cls, parts = VIDEO_FULL[family]
    folder = Path(folder)
    getattr(d, cls)(**parts(seed)).save_pretrained(str(folder))
    return folder
