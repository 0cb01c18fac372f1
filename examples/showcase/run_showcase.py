"""The showcase: a LoRA teaches the pretrained shapes model the colour yellow.

1. Load the base model (``base_model.safetensors``, made by ``pretrain.py`` from red,
   green and blue shapes only).
2. Train a LoRA with ``lora.yaml`` on 64 yellow shapes plus 64 red, green and blue
   ones as regularisation images (preview grids are written while it trains).
3. Put the saved LoRA file on a fresh copy of the base with ``loraengine.apply`` and
   sample the same prompts from the same noise with and without it.
4. Print the adoption figure, the share of "yellow <shape>" samples whose dominant
   colour is yellow (a plain pixel statistic, see ``shapes.dominant_colour``), for the
   base model and the adapted one, and how often each still draws red, green and blue
   when asked. The side-by-side grid goes to ``docs/showcase.png``, the training
   preview's base-vs-adapted grid to ``docs/showcase_previews.png``.

    python examples/showcase/run_showcase.py [--steps N] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shapes import (  # noqa: E402
    BASE_COLOURS,
    NEW_COLOUR,
    SHAPES,
    ShapesDenoiser,
    adoption,
    conditioning,
    make_images,
)

import loraengine  # noqa: E402
from loraengine.core.model import LoadedModel  # noqa: E402
from loraengine.core.schedule import NoiseSchedule  # noqa: E402
from loraengine.plugins import build_plugin_manager  # noqa: E402
from loraengine.tools.sample import logic as S  # noqa: E402

WEIGHTS = HERE / "base_model.safetensors"
CONFIG = HERE / "lora.yaml"
GRID = HERE.parents[1] / "docs" / "showcase.png"
SEEDS_PER_PROMPT = 16     # samples per (shape, colour) prompt for the figures
SAMPLER = S.SampleSettings(steps=20, seed=1234, batch_size=48)


def base_model() -> ShapesDenoiser:
    model = ShapesDenoiser()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval().requires_grad_(False)


def as_loaded(model: ShapesDenoiser) -> LoadedModel:
    """The model as the sampler sees it: the ``module`` family's call and schedule."""
    return LoadedModel(module=model, predict=lambda m, x, t, c: m(x, t, c["cond"]),
                       schedule=NoiseSchedule.flow())


def render(model: ShapesDenoiser, colour: str, host: Any, per_prompt: int) -> torch.Tensor:
    """``per_prompt`` images of each shape in ``colour``, as RGB in [0, 1]."""
    loaded = as_loaded(model)
    cond = {"cond": torch.stack([conditioning(s, colour) for s in SHAPES])}
    latents = S.sample_latents(loaded, cond, (3, 16, 16), SAMPLER, host.registry,
                               per_prompt=per_prompt)
    return S.decode(loaded, latents)


def figures(model: ShapesDenoiser, host: Any) -> dict[str, float]:
    """Share of samples in the colour asked for, per colour."""
    return {c: adoption(render(model, c, host, SEEDS_PER_PROMPT) * 2 - 1, c)
            for c in (NEW_COLOUR, *BASE_COLOURS)}


def train_lora(steps: int | None, out_dir: Path | None) -> Path:
    g = torch.Generator().manual_seed(2024)
    images, cond = make_images(64, (NEW_COLOUR,), g)
    # Regularisation images: the colours the model already knows, so the LoRA learns
    # "yellow" for the yellow prompt rather than "everything yellow".
    known, known_cond = make_images(64, BASE_COLOURS, g)
    images, cond = torch.cat([images, known]), torch.cat([cond, known_cond])
    overrides = {}
    if steps is not None:
        overrides["training.steps"] = steps
    if out_dir is not None:
        overrides["output.dir"] = str(out_dir)
    host = build_plugin_manager()
    from loraengine.core.config.root import load_config

    cfg = load_config(CONFIG, host.registry, [f"{k}={v}" for k, v in overrides.items()])
    result = loraengine.train(cfg, model=base_model().requires_grad_(False), latents=images,
                              conditioning=cond, host=host)
    assert result.path is not None
    return result.path


def run(steps: int | None = None, out_dir: Path | None = None, grid: Path | None = GRID
        ) -> dict[str, Any]:
    """The whole showcase; returns its figures."""
    t0 = time.perf_counter()
    lora = train_lora(steps, out_dir)
    trained = time.perf_counter() - t0
    host = build_plugin_manager()
    base = base_model()
    adapted = base_model()
    loraengine.apply(adapted, lora, mode="bypass", host=host)
    result = {"lora": str(lora), "train_seconds": round(trained, 1),
              "base": figures(base, host), "adapted": figures(adapted, host)}
    if grid is not None:
        left = S.grid_image(render(base, NEW_COLOUR, host, 8), 8, min_tile=48)
        right = S.grid_image(render(adapted, NEW_COLOUR, host, 8), 8, min_tile=48)
        S.save_png(S.side_by_side(left, right, ("base model: 'yellow square/disc/triangle'",
                                                "with the LoRA: same prompts, same noise")),
                   grid)
        result["grid"] = str(grid)
        # The engine's own end-of-training preview (output.samples) goes beside it.
        previews = lora.with_name(lora.name.replace(".safetensors", ".samples"))
        shutil.copyfile(previews / "compare.png", grid.with_name(f"{grid.stem}_previews.png"))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="LoRA steps (default: "
                        "lora.yaml's).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Output folder (default: "
                        "lora.yaml's).")
    parser.add_argument("--grid", type=Path, default=GRID)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = run(args.steps, args.out, args.grid)
    n = len(SHAPES) * SEEDS_PER_PROMPT
    print(f"LoRA: {r['lora']} (trained in {r['train_seconds']} s)")
    print(f"asked for {NEW_COLOUR}: {n} samples each, dominant colour {NEW_COLOUR} in")
    print(f"  base model     {r['base'][NEW_COLOUR]:6.1%}")
    print(f"  with the LoRA  {r['adapted'][NEW_COLOUR]:6.1%}")
    for c in BASE_COLOURS:
        print(f"asked for {c:6s}: base {r['base'][c]:6.1%}, with the LoRA "
              f"{r['adapted'][c]:6.1%}")
    if "grid" in r:
        print(f"grid: {r['grid']}")
    print(f"total {r['seconds']} s")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
