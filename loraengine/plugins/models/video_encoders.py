"""Front ends of ``loraengine prepare`` for video families (Wan, LTX-2): the pipeline's
video VAE and text encoder (see :mod:`encoders` for the image families')."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loraengine.core.errors import DataError
from loraengine.plugins.models.common import Family, read_json
from loraengine.plugins.models.encoders import PipelineEncoder

#: Text tokens WanPipeline encodes a prompt to when it is called (zero-padded).
WAN_SEQUENCE_LENGTH = 512


class WanEncoder(PipelineEncoder):
    """Wan: clips ``[B,3,T,H,W]`` through ``AutoencoderKLWan`` (posterior mean,
    normalized per channel by the VAE config's ``latents_mean`` / ``latents_std``, as
    WanPipeline undoes before decoding) and captions through UMT5, as the pipeline's
    ``encode_prompt`` gives them to the transformer."""

    #: ``loraengine prepare`` reads clips (video files or frame folders), not images.
    video = True

    def __init__(self, family: Family, root: Path, options: Mapping[str, Any]):
        super().__init__(family, root, options)
        cfg = self.pipe.vae.config
        shape = (1, int(cfg.z_dim), 1, 1, 1)
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
        self.latents_std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)
        #: A clip of 1 + k·frame_step frames becomes 1 + k latent frames.
        self.frame_step = int(2 ** sum(bool(d) for d in cfg.temperal_downsample))

    def _latent_multiple(self, family: Family) -> int:
        path = self.root / family.subfolder / "config.json"
        from loraengine.plugins.models.common import read_json

        patch = read_json(path).get("patch_size", [1, 2, 2]) if path.exists() else [1, 2, 2]
        return int(patch[-1])

    @torch.no_grad()
    def encode_videos(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        mean = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean.float().cpu()
        return (mean - self.latents_mean) / self.latents_std

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        length = int(self.max_sequence_length or WAN_SEQUENCE_LENGTH)
        embeds, _ = self.pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                            num_videos_per_prompt=1,
                                            max_sequence_length=length, device=self.device)
        return {"cond": embeds}


#: Text tokens LTX2Pipeline encodes a prompt to when it is called (left-padded).
LTX2_SEQUENCE_LENGTH = 1024


class LTX2Encoder(PipelineEncoder):
    """LTX-2: clips ``[B,3,T,H,W]`` through ``AutoencoderKLLTX2Video`` (posterior mean,
    ``(z − latents_mean) · scaling_factor / latents_std`` per channel, as
    ``LTX2Pipeline._normalize_latents`` does); captions through Gemma 3 (every layer's
    hidden states, as ``encode_prompt`` gives them) and then the pipeline's text
    connectors, whose video embeddings and mask are what the transformer receives.
    The audio embeddings are dropped: training is video only."""

    video = True

    def __init__(self, family: Family, root: Path, options: Mapping[str, Any]):
        super().__init__(family, root, options)
        vae = self.pipe.vae
        if getattr(self.pipe, "connectors", None) is None:
            raise DataError(f"--model: pipeline {root} has no connectors; LTX-2's text "
                            f"embeddings pass through them")
        self.latents_mean = vae.latents_mean.float().cpu().view(1, -1, 1, 1, 1)
        self.latents_std = vae.latents_std.float().cpu().view(1, -1, 1, 1, 1)
        self.scaling = float(vae.config.scaling_factor)
        self.frame_step = int(vae.temporal_compression_ratio)
        self.bucket_multiple = int(vae.spatial_compression_ratio) * self._latent_multiple(family)

    def _latent_multiple(self, family: Family) -> int:
        path = self.root / family.subfolder / "config.json"
        return int(read_json(path).get("patch_size", 1)) if path.exists() else 1

    @torch.no_grad()
    def encode_videos(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        mean = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean.float().cpu()
        return (mean - self.latents_mean) * self.scaling / self.latents_std

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        length = int(self.max_sequence_length or LTX2_SEQUENCE_LENGTH)
        embeds, mask, _, _ = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, num_videos_per_prompt=1,
            max_sequence_length=length, device=self.device)
        side = getattr(self.pipe.tokenizer, "padding_side", "left")
        video, _, video_mask = self.pipe.connectors(embeds, mask, padding_side=side)
        return {"cond": video, "mask": video_mask.long()}


class HunyuanVideo15Encoder(PipelineEncoder):
    """HunyuanVideo 1.5: clips ``[B,3,T,H,W]`` through ``AutoencoderKLHunyuanVideo15``
    (posterior mean times the config's ``scaling_factor``, which the pipeline divides
    out before decoding); captions through the pipeline's ``encode_prompt``: Qwen2.5-VL's
    hidden states under its video-description template (``cond``, ``mask``) and the
    ByT5 glyph encoder's states of the caption's quoted text (``byt5``, ``byt5_mask``;
    zeros with an empty mask when it quotes nothing)."""

    video = True

    def __init__(self, family: Family, root: Path, options: Mapping[str, Any]):
        super().__init__(family, root, options)
        cfg = self.pipe.vae.config
        self.scaling = float(cfg.scaling_factor)
        self.frame_step = int(cfg.temporal_compression_ratio)
        path = self.root / family.subfolder / "config.json"
        patch = int(read_json(path).get("patch_size", 1)) if path.exists() else 1
        self.bucket_multiple = int(cfg.spatial_compression_ratio) * patch

    @torch.no_grad()
    def encode_videos(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        mean = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean.float().cpu()
        return mean * self.scaling

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, glyph, glyph_mask = self.pipe.encode_prompt(
            captions, device=self.device, batch_size=len(captions), num_videos_per_prompt=1)
        return {"cond": embeds, "mask": mask.long(), "byt5": glyph,
                "byt5_mask": glyph_mask.long()}


ENCODERS: dict[str, type[PipelineEncoder]] = {
    "wan": WanEncoder, "ltx2": LTX2Encoder, "hunyuan_video15": HunyuanVideo15Encoder,
}
