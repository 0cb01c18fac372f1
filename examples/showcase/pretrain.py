"""Pretrain the showcase's base model on red, green and blue shapes (run once; the
result, ``base_model.safetensors``, is committed).

Rectified flow with loraengine's own noise schedule (``x_σ = (1−σ)·x0 + σ·noise``,
target ``noise − x0``, σ uniform), fresh procedurally drawn images every step, AdamW
with a cosine decay and an exponential moving average of the weights (the EMA is what is
saved). One conditioning in ten is replaced by zeros so the model also learns an
unconditional prediction, which classifier-free guidance needs. Everything is seeded.

    python examples/showcase/pretrain.py [--steps 3000] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraengine.core.schedule import NoiseSchedule

try:
    from shapes import BASE_COLOURS, ShapesDenoiser, make_images
except ImportError:  # imported as examples.showcase.pretrain
    from .shapes import BASE_COLOURS, ShapesDenoiser, make_images

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "base_model.safetensors"


def pretrain(steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0,
             log_every: int = 250) -> tuple[ShapesDenoiser, list[float]]:
    torch.manual_seed(seed)  # weight init only; every other draw uses a generator
    model = ShapesDenoiser()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    schedule = NoiseSchedule.flow()
    g = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        x0, cond = make_images(batch, BASE_COLOURS, g)
        drop = torch.rand(batch, generator=g) < 0.1
        cond[drop] = 0.0
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(batch, generator=g, dtype=torch.float64)
        x_t = schedule.add_noise(x0, noise, sigma)
        pred = model(x_t, schedule.model_timesteps(sigma), cond)
        loss = torch.nn.functional.mse_loss(pred, schedule.target(x0, noise, sigma).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"step {step + 1}/{steps}  loss {recent:.4f}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    return ema, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, losses = pretrain(args.steps)
    meta = {"steps": str(args.steps), "final_loss": f"{sum(losses[-100:]) / 100:.4f}",
            "seconds": f"{time.perf_counter() - t0:.0f}",
            "colours": json.dumps(list(BASE_COLOURS)), "prediction_type": "flow"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out), meta)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n:,} parameters, {args.out.stat().st_size / 1e6:.2f} MB) "
          f"in {meta['seconds']} s")


if __name__ == "__main__":
    main()
