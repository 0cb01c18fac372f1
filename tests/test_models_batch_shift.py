"""Per-batch resolution-dependent shift: a family whose pipeline shifts by resolution
(``use_dynamic_shifting``) trains each batch with the shift its pipeline computes for
that batch's latent size. Checked in one run over two buckets against diffusers:
``calculate_shift`` of the pipeline module for μ, the scheduler's ``time_shift`` for
the training draws and ``retrieve_timesteps`` for the sampler's steps.
``model.shift_resolution`` still fixes one resolution for every batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from loraengine.api import resolve_config
from loraengine.core.build import build_pipeline
from loraengine.core.train.step import draw_noise
from loraengine.plugins import build_plugin_manager
from loraengine.testing import tiny_pipelines as tp

#: Chroma latents (C, H, W): 16×16 and 32×48 cells, 64 and 384 packed (2×2) tokens
SHAPES = ((4, 16, 16), (4, 32, 48))


def _pipeline_mu(shape: tuple[int, int, int], cfg: dict) -> float:
    """μ as ChromaPipeline.__call__ computes it from its packed latents."""
    from diffusers.pipelines.chroma import pipeline_chroma

    return pipeline_chroma.calculate_shift(
        shape[1] * shape[2] // 4, cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15))


def _config(tmp_path, folder, **model) -> dict:
    g = torch.Generator().manual_seed(0)
    latents, cond = {}, {}
    for i, shape in enumerate(SHAPES):
        latents[f"latents.{i}"] = torch.randn(3, *shape, generator=g)
        cond[f"cond.{i}"] = torch.randn(3, 5, 24, generator=g)
    save_file(latents, str(tmp_path / "lat.st"))
    save_file(cond, str(tmp_path / "cond.st"))
    return {"model": {"family": "chroma", "path": str(folder), **model},
            "data": {"latents": str(tmp_path / "lat.st"),
                     "conditioning": str(tmp_path / "cond.st"), "bucket_mode": True},
            "timestep_sampler": {"name": "uniform"},
            "training": {"steps": 2, "batch_size": 3, "dtype": "fp32", "seed": 0},
            "adapter": {"rank": 2, "alpha": 2, "dtype": "fp32"},
            "output": {"dir": str(tmp_path / "out"), "name": "lora", "plot": False}}


def _pipe(tmp_path, cfg):
    host = build_plugin_manager()
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    conf, base = resolve_config(path, host)
    return build_pipeline(conf, host, base_dir=base)


def _uniform_draws(shape, n: int, seed: int) -> torch.Tensor:
    """The u that ``draw_noise`` draws for ``n`` samples: per sample its noise, then u."""
    g = torch.Generator().manual_seed(seed)
    us = []
    for _ in range(n):
        torch.randn(shape, generator=g)
        us.append(torch.rand((), generator=g, dtype=torch.float64))
    return torch.stack(us)


def test_each_bucket_trains_with_its_own_sizes_shift_in_one_run(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.chroma.pipeline_chroma import retrieve_timesteps

    from loraengine.plugins.samplers import SPECS, EulerOptions

    folder = tp.save_denoiser("chroma", tmp_path / "chroma")
    cfg = tp.DENOISERS["chroma"][2]
    pipe = _pipe(tmp_path, _config(tmp_path, folder))
    try:
        schedule = pipe.loaded.schedule
        assert schedule.shift == 1.0 and schedule.shift_by_shape is not None
        mus = []
        for i, shape in enumerate(SHAPES):  # batches of both buckets, one pipeline
            bucket = pipe.dataset.buckets[i]
            x0, _ = bucket.batch(torch.arange(len(bucket)))
            assert tuple(x0.shape[1:]) == shape
            _, t, _ = draw_noise(pipe, x0, torch.Generator().manual_seed(3))
            mu = _pipeline_mu(shape, cfg)
            sched = FlowMatchEulerDiscreteScheduler(**cfg)
            u = _uniform_draws(shape, len(bucket), 3)
            want = torch.as_tensor(sched.time_shift(mu, 1.0, u.numpy())).double()
            torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-7)
            mus.append(mu)
            # previews at this size step through the pipeline's own sigmas
            steps, seen = 12, []
            retrieve_timesteps(sched, steps, sigmas=np.linspace(1.0, 1 / steps, steps),
                               mu=mu)
            euler = next(s for s in SPECS if s.name == "euler").factory(EulerOptions())

            def record(x, sigma, seen=seen):
                seen.append(float(sigma))
                return torch.zeros_like(x)

            euler(record, torch.zeros(1, *shape), schedule, steps)
            torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64),
                                       sched.sigmas[:-1].double(), rtol=1e-5, atol=1e-6)
        assert schedule.shift == 1.0  # restored after each batch
        # the two sizes' shifts differ far beyond the tolerance: each batch got its own
        assert mus[1] - mus[0] > 0.05
        assert schedule.shift_for(SHAPES[1]) > 1.05 * schedule.shift_for(SHAPES[0])
    finally:
        pipe.close()


def test_shift_resolution_and_flow_shift_still_fix_one_shift(tmp_path):
    import math

    from loraengine.plugins.models.flow import ShiftRule, mu_for

    folder = tp.save_denoiser("chroma", tmp_path / "chroma")
    cfg = tp.DENOISERS["chroma"][2]
    pipe = _pipe(tmp_path, _config(tmp_path, folder, shift_resolution=256))
    try:
        schedule = pipe.loaded.schedule
        assert schedule.shift_by_shape is None
        want = math.exp(mu_for(ShiftRule(), cfg, 32, 32))  # 256 px at the VAE's 8×
        assert schedule.shift == pytest.approx(want)
        for shape in SHAPES:
            assert schedule.shift_for(shape) == pytest.approx(want)
    finally:
        pipe.close()
    pipe = _pipe(tmp_path, _config(tmp_path, folder, flow_shift=2.5))
    try:
        assert pipe.loaded.schedule.shift_by_shape is None
        assert pipe.loaded.schedule.shift == 2.5
    finally:
        pipe.close()
