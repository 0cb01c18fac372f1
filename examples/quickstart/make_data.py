"""Make the quickstart's tiny pipeline, images and data (run once; the outputs are
committed, and running it again rewrites the same bytes).

- ``model/``: a complete SD1.5-structured diffusers pipeline with seeded random weights,
  saved with ``save_pretrained``: a small ``UNet2DConditionModel`` (fp16), an
  ``AutoencoderKL`` that downsamples 8× as SD's does, a 2-layer ``CLIPTextModel``, a
  character-level ``CLIPTokenizer`` (its ``vocab.json``/``merges.txt`` are written
  here, nothing is downloaded) and a ``DDPMScheduler`` with SD's betas.
- ``images/``: 6 small PNGs of coloured shapes (four 128×128, two 128×96) with a
  caption ``.txt`` beside each, for ``loraengine prepare``.
- ``prompts.txt``: prompts for ``loraengine sample``.
- ``latents.safetensors``: 8 structured 4×16×16 latents (smooth colour fields with a
  bright square), ``conditioning.safetensors``: one 4×32 caption embedding each, so
  ``loraengine train examples/quickstart.yaml`` runs without preparing anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from loraengine.testing import tiny_pipelines as tp

HERE = Path(__file__).resolve().parent

#: (file stem, (width, height), shape, shape colour, background colour): the captions
#: name what is drawn, in the tokenizer's alphabet (lower case, digits, punctuation).
IMAGES = [
    ("red_circle", (128, 128), "circle", "red", "blue"),
    ("green_square", (128, 128), "square", "green", "white"),
    ("blue_triangle", (128, 128), "triangle", "blue", "yellow"),
    ("yellow_circle", (128, 128), "circle", "yellow", "black"),
    ("white_square_wide", (128, 96), "square", "white", "red"),
    ("black_triangle_wide", (128, 96), "triangle", "black", "green"),
]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (240, 220, 40), "white": (245, 245, 245), "black": (20, 20, 20)}
PROMPTS = ["a red circle on a blue background", "a yellow square on a black background"]


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)


def pipeline() -> StableDiffusionPipeline:
    """The quickstart pipeline: the UNet above, an 8× VAE and a CLIP text encoder whose
    width (32) is the UNet's ``cross_attention_dim``."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon",
                              steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(
        vae=tp.vae(block_out_channels=(8, 8, 16, 16), sample_size=128, seed=1),
        text_encoder=tp.clip_text(32, seed=2), tokenizer=tp.clip_tokenizer(),
        unet=tiny_unet().to(torch.float16), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def write_images(folder: Path) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for stem, (w, h), shape, fg, bg in IMAGES:
        img = Image.new("RGB", (w, h), COLOURS[bg])
        draw = ImageDraw.Draw(img)
        side = min(w, h) // 2
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[fg])
        else:
            draw.polygon([(left + side // 2, top), (left, top + side), (left + side, top + side)],
                         fill=COLOURS[fg])
        img.save(folder / f"{stem}.png", optimize=False)
        (folder / f"{stem}.txt").write_text(f"a {fg} {shape} on a {bg} background\n",
                                            encoding="utf-8")


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
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    model_dir = HERE / "model"
    pipeline().save_pretrained(str(model_dir))
    write_images(HERE / "images")
    (HERE / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    g = torch.Generator().manual_seed(2)
    save_file({"latents": latents()}, str(HERE / "latents.safetensors"))
    save_file({"cond": torch.randn(8, 4, 32, generator=g)}, str(HERE / "conditioning.safetensors"))
    print("wrote", model_dir, "images/", "prompts.txt", "latents.safetensors",
          "conditioning.safetensors")


if __name__ == "__main__":
    main()
