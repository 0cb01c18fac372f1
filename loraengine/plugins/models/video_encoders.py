"""Front ends of ``loraengine prepare`` for video families: the pipeline's video VAE
and text encoder (see :mod:`encoders` for the image families')."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loraengine.plugins.models.common import Family
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
