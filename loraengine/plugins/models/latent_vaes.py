"""VAEs that decode the latents a record family trains on, for previews and
``loraengine sample``: each undoes what the pipeline does after its VAE's encoder
(FLUX.2: batch-norm statistics and 2×2 patches; Qwen-Image: per-channel mean and std
of a single frame), then decodes as the pipeline does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from loraengine.core.errors import DataError


class Flux2LatentVAE(nn.Module):
    """``AutoencoderKLFlux2`` for normalised, patchified latents ``[N,4C,h,w]``."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae
        self.config = SimpleNamespace(latent_channels=4 * int(vae.config.latent_channels))

    def decode(self, latents: torch.Tensor) -> Any:
        bn = self.vae.bn
        std = torch.sqrt(bn.running_var + float(self.vae.config.batch_norm_eps))
        z = latents * std.view(1, -1, 1, 1).to(latents) + \
            bn.running_mean.view(1, -1, 1, 1).to(latents)
        b, c4, h, w = z.shape
        z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return self.vae.decode(z.reshape(b, c4 // 4, 2 * h, 2 * w))


class QwenLatentVAE(nn.Module):
    """``AutoencoderKLQwenImage`` for normalised single-frame latents ``[N,C,h,w]``."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.config = SimpleNamespace(latent_channels=int(cfg.z_dim))
        shape = (1, int(cfg.z_dim), 1, 1)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)

    def decode(self, latents: torch.Tensor) -> Any:
        z = latents * self.std.to(latents) + self.mean.to(latents)
        frames = self.vae.decode(z.unsqueeze(2)).sample
        return SimpleNamespace(sample=frames[:, :, 0])


def vae_loader(class_name: str, wrap: Callable[[Any], nn.Module]
               ) -> Callable[[Path | None], Callable[[], nn.Module] | None]:
    """A family's ``latent_vae``: given the pipeline folder, a loader of its ``vae/``
    as ``class_name`` wrapped by ``wrap`` (``None`` without a ``vae/`` folder)."""
    def for_root(root: Path | None) -> Callable[[], nn.Module] | None:
        folder = None if root is None else Path(root) / "vae"
        if folder is None or not (folder / "config.json").exists():
            return None

        def load() -> nn.Module:
            import diffusers

            try:
                vae = getattr(diffusers, class_name).from_pretrained(
                    str(folder), local_files_only=True)
            except Exception as exc:  # a broken VAE folder should name itself
                raise DataError(f"{folder}: cannot load the {class_name}: {exc}") from None
            return wrap(vae.eval().requires_grad_(False))

        return load

    return for_root


class LTX2LatentVAE(nn.Module):
    """``AutoencoderKLLTX2Video`` for normalised latents ``[N,C,T,h,w]``: undoes
    ``(z − mean) · scaling_factor / std`` per channel, as LTX2Pipeline does before
    decoding."""

    decodes_video = True

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae
        self.config = SimpleNamespace(latent_channels=int(vae.config.latent_channels))
        self.mean = vae.latents_mean.detach().float().view(1, -1, 1, 1, 1)
        self.std = vae.latents_std.detach().float().view(1, -1, 1, 1, 1)
        self.scaling = float(vae.config.scaling_factor)

    def decode(self, latents: torch.Tensor) -> Any:
        z = latents * self.std.to(latents) / self.scaling + self.mean.to(latents)
        return self.vae.decode(z)


class HunyuanVideo15LatentVAE(nn.Module):
    """``AutoencoderKLHunyuanVideo15`` for latents ``[N,C,T,h,w]`` scaled by its
    ``scaling_factor``, divided out before decoding as HunyuanVideo15Pipeline does."""

    decodes_video = True

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae
        self.config = SimpleNamespace(latent_channels=int(vae.config.latent_channels))
        self.scaling = float(vae.config.scaling_factor)

    def decode(self, latents: torch.Tensor) -> Any:
        return self.vae.decode(latents / self.scaling)
