"""Tiny, complete video pipelines for tests: Wan 2.1 (one transformer) and Wan 2.2 A14B
(two experts and a ``boundary_ratio``), built from small configs of the real classes
with seeded random weights and saved with ``save_pretrained``; and folders holding
only the transformer and scheduler of LTX-2 and HunyuanVideo 1.5
(:func:`save_video_denoiser`).

The VAE is a tiny ``AutoencoderKLWan`` (8× space, 4× time: 5 frames of 32×32 become a
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
