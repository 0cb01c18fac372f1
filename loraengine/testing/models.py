"""Tiny models and data for tests (random init, seeded; nothing downloaded)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class TinyDenoiser(nn.Module):
    """A small conv + attention-free denoiser called as ``model(x_t, t, cond)``.

    It has Linear, Conv1d-free Conv2d layers and a time/conditioning path, enough to
    exercise adapters, checkpointing and the training loop in well under a second.
    """

    def __init__(self, channels: int = 4, hidden: int = 16, cond_dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond_proj = nn.Linear(cond_dim, hidden)
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(4, hidden),
                          nn.SiLU(), nn.Conv2d(hidden, hidden, 1))
            for _ in range(2)])
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        temb = self.time_mlp((t.float().reshape(-1, 1) / 1000.0).to(x.dtype))
        c = self.cond_proj(cond.mean(dim=1))
        h = h + (temb + c)[:, :, None, None]
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(h)


def tiny_latents(n: int = 6, channels: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g)


def tiny_conditioning(n: int = 6, length: int = 3, dim: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, dim, generator=g)


def tiny_unet_config(cross_attention_dim: int = 16) -> dict:
    """Config of a ~100k-parameter diffusers UNet2DConditionModel."""
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(16, 32),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=cross_attention_dim, attention_head_dim=4,
                norm_num_groups=8)


def tiny_unet_output(unet: nn.Module) -> torch.Tensor:
    """The output of a ``tiny_unet_config`` UNet on fixed inputs (batch 2, 8×8 latents,
    3 tokens of width 16, timesteps 10 and 700): a model-level check of merges and
    bypass hooks that does not depend on what else the test draws."""
    g = torch.Generator().manual_seed(11)
    x, t, cond = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
                  torch.randn(2, 3, 16, generator=g))
    with torch.no_grad():
        out: torch.Tensor = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
    return out


def small_unet_config() -> dict:
    """Config of a ~1.5M-parameter UNet2DConditionModel (three levels, cross-attention
    on two, cross_attention_dim 64): the memory benchmark's model, for 32×32 latents."""
    return dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)


def sd15_structure_unet_config() -> dict:
    """A tiny UNet2DConditionModel with SD1.5's block layout (four levels, two layers per
    block, cross-attention on the first three, one transformer per attention), narrow
    enough for tests: what the ``input_blocks``/``output_blocks`` names are checked on.
    Channels are multiples of 32 because ComfyUI's UNet has 32 norm groups built in."""
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(32, 64, 64, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                "CrossAttnUpBlock2D"),
                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=32)


def sdxl_structure_unet_config() -> dict:
    """A tiny UNet2DConditionModel with SDXL's block layout (three levels, no attention
    on the first, two layers per block, 2 transformers per attention where SDXL has 2
    and 10, linear projections, ``text_time`` added conditioning)."""
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 2), cross_attention_dim=16,
                attention_head_dim=4, norm_num_groups=32, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=8 + 6 * 4)


def save_tiny_unet(folder: Path, seed: int = 0, prediction_type: str = "epsilon",
                   config: dict | None = None) -> Path:
    """Save a tiny UNet (or one built from ``config``) as a diffusers pipeline folder
    (``unet/`` + ``scheduler/``)."""
    import json

    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # diffusers types save_pretrained on a mixin mypy does not see through
    unet: Any = UNet2DConditionModel(**(config or tiny_unet_config()))
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline",
         "unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
         "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "prediction_type": prediction_type}))
    return folder


def save_tiny_unet_data(folder: Path, n: int = 6) -> tuple[Path, Path]:
    """Write latents ``[n,4,8,8]`` and conditioning ``[n,3,16]`` for the tiny UNet as
    ``latents.safetensors`` and ``cond.safetensors`` in ``folder``; return both paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lat, cond = folder / "latents.safetensors", folder / "cond.safetensors"
    save_file({"latents": tiny_latents(n=n)}, str(lat))
    save_file({"cond": tiny_conditioning(n=n, dim=16)}, str(cond))
    return lat, cond


def tiny_unet_train_config(model_dir: Path, data: tuple[Path, Path],
                           overlay: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A config training the tiny UNet folder ``model_dir`` (``save_tiny_unet``) on the
    ``data`` files (``save_tiny_unet_data``): 3 steps of batch 2, fp32, rank 4,
    checkpointing off, nothing written unless ``overlay`` adds an ``output`` section.
    ``overlay`` is merged over it section by section."""
    from loraengine.testing.harness import deep_merge

    base: dict[str, Any] = {
        "model": {"family": "diffusers", "path": str(model_dir)},
        "data": {"latents": str(data[0]), "conditioning": str(data[1])},
        "training": {"steps": 3, "batch_size": 2, "dtype": "fp32", "seed": 0},
        "adapter": {"rank": 4, "dtype": "fp32"},
        "memory": {"gradient_checkpointing": False},
    }
    return deep_merge(base, overlay or {})
