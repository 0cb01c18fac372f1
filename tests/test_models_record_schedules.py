"""The flow schedules of the record families against diffusers'
FlowMatchEulerDiscreteScheduler with each pipeline's scheduler config: the inference
sigmas (including the resolution-dependent shift at two sizes, with μ computed by the
pipeline module's own function), the training shift at a resolution, x_t and the
velocity target."""

from __future__ import annotations

import pytest
import torch

from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models.common import flow_schedule
from loraengine.plugins.models.flow import ShiftRule, inference_sigmas, mu_for
from loraengine.testing import tiny_pipelines as tp

#: name -> (family record module, the pipeline module's μ function)
CASES = ("flux2", "qwen_image", "z_image", "chroma", "hidream")
SIZES = ((32, 32), (64, 96))  # latent cells: 1024² and 2048×3072 pixels at factor 32


def _family(name: str):
    from loraengine.plugins.models import chroma, flux2, hidream, qwen_image, z_image

    return {"flux2": flux2.FLUX2, "qwen_image": qwen_image.QWEN_IMAGE,
            "z_image": z_image.Z_IMAGE, "chroma": chroma.CHROMA,
            "hidream": hidream.HIDREAM}[name]


def _pipeline_mu(name: str, cfg: dict, h: int, w: int, steps: int) -> float:
    """μ as the pipeline's __call__ computes it from its packed latents."""
    from diffusers.pipelines.chroma import pipeline_chroma
    from diffusers.pipelines.flux2 import pipeline_flux2
    from diffusers.pipelines.qwenimage import pipeline_qwenimage

    if name == "hidream":  # from the model's largest size; unused, its shift is static
        from diffusers.pipelines.hidream_image import pipeline_hidream_image

        return pipeline_hidream_image.calculate_shift(16 * 16 // 4)
    if name == "flux2":  # latents are patchified: one token per cell
        return pipeline_flux2.compute_empirical_mu(image_seq_len=h * w, num_steps=steps)
    # both compute μ from the packed (2×2) token count
    shift = pipeline_chroma.calculate_shift if name == "chroma" else \
        pipeline_qwenimage.calculate_shift
    return shift(
        h * w // 4, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


def _scheduler(cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**cfg)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("size", SIZES)
def test_inference_sigmas_match_the_scheduler_at_two_resolutions(name, size):
    import numpy as np

    cfg = tp.DENOISERS[name][2]
    family = _family(name)
    steps = 50 if name == "flux2" else 28
    rule = family.shift_rule
    if name == "flux2":
        rule = ShiftRule(mu="flux2", cells_per_token=1, steps=steps)
    sched = _scheduler(cfg)
    mu = _pipeline_mu(name, cfg, *size, steps)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    want = sched.sigmas[:-1].double()
    got = inference_sigmas(rule, cfg, *size, steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if cfg.get("use_dynamic_shifting"):
        assert mu_for(rule, cfg, *size) == pytest.approx(mu, rel=1e-9)


def test_the_two_resolutions_shift_differently():
    cfg = tp.DENOISERS["qwen_image"][2]
    rule = _family("qwen_image").shift_rule
    small, large = (inference_sigmas(rule, cfg, *s, 20) for s in SIZES)
    assert (large[1:-1] > small[1:-1] + 1e-3).all()  # more tokens, more noise


@pytest.mark.parametrize("name", ("flux2", "qwen_image", "chroma"))
def test_training_at_a_resolution_uses_the_schedulers_time_shift(name):
    """``model.shift_resolution``: σ' of every draw is the scheduler's own
    ``time_shift(μ, 1, σ)`` at that resolution; x_t is its ``scale_noise`` and one
    Euler step with the engine's target lands on the engine's next x_t."""
    cfg = tp.DENOISERS[name][2]
    family = _family(name)
    factor = family.vae_factor
    opts = family.options(path="unused", shift_resolution=64 * factor)
    schedule = flow_schedule(family, opts, cfg, factor)
    mu = mu_for(family.shift_rule, cfg, 64, 64)
    sched = _scheduler(cfg)
    u = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    want = torch.as_tensor(sched.time_shift(mu, 1.0, u.numpy()))
    torch.testing.assert_close(schedule.shift_sigma(u), want.double(), rtol=1e-5, atol=1e-7)

    sched.set_timesteps(num_inference_steps=10, mu=mu)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i in (1, 5):
        sigma = sched.sigmas[i].double().expand(2)
        x_t = schedule.add_noise(x0, noise, sigma)
        theirs = sched.scale_noise(x0, sched.timesteps[i:i + 1], noise)
        torch.testing.assert_close(x_t, theirs, rtol=1e-5, atol=1e-5)
        sched._step_index = i
        stepped = sched.step(schedule.target(x0, noise, sigma).float(), sched.timesteps[i],
                             x_t.float(), return_dict=False)[0]
        nxt = schedule.add_noise(x0, noise, sched.sigmas[i + 1].double().expand(2))
        torch.testing.assert_close(stepped, nxt.float(), rtol=1e-5, atol=1e-5)


def test_loaded_schedules_follow_the_pipeline_configs(tmp_path):
    host = build_plugin_manager()
    for name, want in (("z_image", 3.0), ("qwen_image", 1.0), ("flux2", 1.0),
                       ("chroma", 1.0), ("hidream", 3.0)):
        folder = tp.save_denoiser(name, tmp_path / name)
        spec = host.registry.get("model", name)
        loaded = spec.load(spec.config_model(path=folder), {"base_dir": None, "module": None})
        assert loaded.schedule.shift == want
        assert loaded.schedule.timestep_scale == 1000.0
    # the option: Qwen-Image at 1024² trains with the pipeline's 1024² shift
    spec = host.registry.get("model", "qwen_image")
    loaded = spec.load(spec.config_model(path=tmp_path / "qwen_image", shift_resolution=1024),
                       {"base_dir": None, "module": None})
    import math

    mu = mu_for(ShiftRule(), tp.DENOISERS["qwen_image"][2], 128, 128)
    assert loaded.schedule.shift == pytest.approx(math.exp(mu))


def test_each_scheduler_config_says_where_its_values_come_from():
    """The typed-in scheduler configs carry their sources, and diffusers'
    scheduler keeps every value as given (no key it does not know)."""
    import json
    from importlib import resources

    from diffusers import FlowMatchEulerDiscreteScheduler

    data = json.loads(resources.files("loraengine.testing").joinpath(
        "scheduler_configs.json").read_text(encoding="utf-8"))
    assert set(tp.DENOISERS) <= set(data)
    for name, (_, _, cfg, _, _) in tp.DENOISERS.items():
        assert cfg == data[name]["config"] and len(data[name]["sources"]) > 20, name
        built = FlowMatchEulerDiscreteScheduler(**cfg).config
        assert {k: built[k] for k in cfg} == cfg, name
