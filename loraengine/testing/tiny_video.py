"""Tiny, complete video pipelines for tests: Wan 2.1 (one transformer) and Wan 2.2 A14B
(two experts and a ``boundary_ratio``), built from small configs of the real classes
with seeded random weights and saved with ``save_pretrained``.

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
