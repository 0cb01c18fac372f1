"""Make the quickstart's tiny model and data (run once; the outputs are committed).

- ``model/``: a small diffusers UNet2DConditionModel (random init, seeded) saved with
  ``save_pretrained`` in fp16, plus an SD-style ``scheduler/scheduler_config.json``.
- ``latents.safetensors``: 8 structured 4×16×16 latents (smooth colour fields with a
  bright square), ``conditioning.safetensors``: one 4×32 caption embedding each.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)


def latents(n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16),
                            indexing="ij")
    out = []
    for i in range(n):
        base = torch.randn(4, 1, 1, generator=g) * 0.5
        field = base + 0.4 * torch.sin(3 * xs + i) + 0.4 * torch.cos(2 * ys - i)
        y0, x0 = (torch.randint(0, 10, (2,), generator=g)).tolist()
        field[:, y0:y0 + 5, x0:x0 + 5] += 1.0
        out.append(field)
    return torch.stack(out).float()


def main() -> None:
    model_dir = HERE / "model"
    unet = tiny_unet().to(torch.float16)
    unet.save_pretrained(model_dir / "unet")
    (model_dir / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}, indent=1) + "\n")
    (model_dir / "scheduler").mkdir(exist_ok=True)
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
         "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"},
        indent=1) + "\n")
    g = torch.Generator().manual_seed(2)
    save_file({"latents": latents()}, str(HERE / "latents.safetensors"))
    save_file({"cond": torch.randn(8, 4, 32, generator=g)}, str(HERE / "conditioning.safetensors"))
    print("wrote", model_dir, "latents.safetensors", "conditioning.safetensors")


if __name__ == "__main__":
    main()
