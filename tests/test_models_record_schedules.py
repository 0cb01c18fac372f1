"""The flow schedules of every image flow family against diffusers'
FlowMatchEulerDiscreteScheduler with each pipeline's scheduler config: the inference
sigmas (including the resolution-dependent shift at two sizes, with μ computed by the
pipeline module's own function), and, for the schedule each family loads from its
folder, the training draws at two latent sizes, the model timestep, x_t and the velocity
target (one Euler step of the scheduler lands on the next x_t). The video families are
checked the same way in tests/test_models_wan.py and tests/test_models_video_records.py."""

from __future__ import annotations

import pytest
import torch

from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models.common import flow_schedule
from loraengine.plugins.models.flow import ShiftRule, inference_sigmas, mu_for
from loraengine.testing import tiny_pipelines as tp

#: the image flow families: records saved by tiny_pipelines.DENOISERS, and the two
#: ported families (SD3, FLUX.1) saved here with the scheduler tiny_pipelines.build
#: gives their pipelines (the released SD3 and FLUX.1-dev scheduler configs)
CASES = ("flux2", "flux2_klein", "qwen_image", "z_image", "lumina2", "chroma", "hidream",
         "sd3", "flux")
PORTED = {"sd3": ("StableDiffusion3Pipeline", {"shift": 3.0}),
          "flux": ("FluxPipeline", {"shift": 3.0, "use_dynamic_shifting": True,
                                    "base_shift": 0.5, "max_shift": 1.15,
                                    "base_image_seq_len": 256,
                                    "max_image_seq_len": 4096})}
SIZES = ((32, 32), (64, 96))  # latent cells: 1024² and 2048×3072 pixels at factor 32


def _family(name: str):
    from loraengine.plugins.models import (
        chroma,
        flux,
        flux2,
        hidream,
        lumina2,
        qwen_image,
        sd3,
        z_image,
    )

    return {"flux2": flux2.FLUX2, "flux2_klein": flux2.FLUX2,
            "qwen_image": qwen_image.QWEN_IMAGE, "z_image": z_image.Z_IMAGE,
            "lumina2": lumina2.LUMINA2, "chroma": chroma.CHROMA,
            "hidream": hidream.HIDREAM, "sd3": sd3.SD3, "flux": flux.FLUX}[name]


def _config(name: str) -> dict:
    return PORTED[name][1] if name in PORTED else tp.DENOISERS[name][2]


def _pipeline_mu(name: str, cfg: dict, h: int, w: int, steps: int) -> float:
    """μ as the pipeline's __call__ computes it from its packed latents."""
    from diffusers.pipelines.chroma import pipeline_chroma
    from diffusers.pipelines.flux import pipeline_flux
    from diffusers.pipelines.flux2 import pipeline_flux2, pipeline_flux2_klein
    from diffusers.pipelines.qwenimage import pipeline_qwenimage

    if name == "hidream":  # from the model's largest size; unused, its shift is static
        from diffusers.pipelines.hidream_image import pipeline_hidream_image

        return pipeline_hidream_image.calculate_shift(16 * 16 // 4)
    if name in ("flux2", "flux2_klein"):  # latents are patchified: one token per cell
        module = pipeline_flux2 if name == "flux2" else pipeline_flux2_klein
        return module.compute_empirical_mu(image_seq_len=h * w, num_steps=steps)
    # these compute μ from the packed (2×2) token count
    shift = {"chroma": pipeline_chroma, "flux": pipeline_flux}.get(
        name, pipeline_qwenimage).calculate_shift
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

    cfg = _config(name)
    family = _family(name)
    steps = 50 if name.startswith("flux2") else 28
    rule = family.shift_rule or ShiftRule()
    if name.startswith("flux2"):
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


def _save_folder(name: str, folder) -> object:
    """A pipeline folder with the family's tiny transformer and its scheduler only."""
    if name not in PORTED:
        return tp.save_denoiser(name, folder)
    import json

    import diffusers as d

    pipe_cls, cfg = PORTED[name]
    model = tp.sd3_transformer(0) if name == "sd3" else tp.flux_transformer(0)
    model.save_pretrained(str(folder / "transformer"))
    d.FlowMatchEulerDiscreteScheduler(**cfg).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": pipe_cls, "_diffusers_version": d.__version__,
         "transformer": ["diffusers", type(model).__name__],
         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    return folder


@pytest.fixture(scope="module")
def loaded_schedule(tmp_path_factory):
    """name -> the schedule ``model.family`` loads from that family's saved folder."""
    host = build_plugin_manager()
    done: dict = {}

    def load(name: str):
        if name not in done:
            folder = _save_folder(name, tmp_path_factory.mktemp(name))
            spec = host.registry.get("model", "flux2" if name == "flux2_klein" else name)
            done[name] = spec.load(spec.config_model(path=folder),
                                   {"base_dir": None, "module": None}).schedule
        return done[name]

    return load


def _channels(name: str) -> int:
    return 16 if name in PORTED else tp.DENOISERS[name][3]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("size", SIZES)
def test_training_draws_xt_and_target_match_the_scheduler_at_two_resolutions(
        loaded_schedule, name, size):
    """Each batch of latents of ``size`` trains with the σ the pipeline's scheduler gives
    at that size: the scheduler built from the saved config, ``set_timesteps`` with the
    same unshifted draws (and, where the shift is dynamic, the μ the pipeline module
    computes for that size) returns the σ we draw with the uniform sampler. At those
    σ, x_t is the scheduler's ``scale_noise``, the model timestep is its timestep, and
    one Euler ``step`` with our target lands on our x_t at the next σ.

    ``shift_terminal`` (Qwen-Image) stretches an inference table so that its last step
    ends at that σ; it depends on the step count and is no part of a training draw, so
    the scheduler for the draws is built without it (its time shift is then the
    scheduler's own ``time_shift(μ, 1, σ)``, checked too)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from loraengine.core.plugins.specs import NoOptions
    from loraengine.plugins.training.timesteps import SPECS

    cfg = _config(name)
    schedule = loaded_schedule(name)
    shape = (_channels(name), *size)
    dynamic = bool(cfg.get("use_dynamic_shifting"))
    mu = _pipeline_mu(name, cfg, *size, 50) if dynamic else None
    sched = FlowMatchEulerDiscreteScheduler(
        **{k: v for k, v in cfg.items() if k != "shift_terminal"})
    assert schedule.timestep_scale == sched.config.num_train_timesteps

    uniform = next(s for s in SPECS if s.name == "uniform").factory(NoOptions(), schedule)
    n = 16
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with schedule.shifted_for(shape):
        ours = torch.stack([uniform(g) for _ in range(n)])
        # descending, as an inference table runs; the scheduler appends σ = 0
        order = torch.argsort(u, descending=True)
        sched.set_timesteps(sigmas=u[order].numpy(), mu=mu)
        torch.testing.assert_close(ours[order], sched.sigmas[:-1].double(),
                                   rtol=1e-5, atol=1e-6)
        if dynamic:
            want = torch.as_tensor(sched.time_shift(mu, 1.0, u.numpy())).double()
            torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
        else:  # the scheduler's own training table: its σ at every train timestep
            plain = torch.linspace(1.0, 1 / 1000, 1000, dtype=torch.float64)
            torch.testing.assert_close(
                schedule.shift_sigma(plain).float(),
                FlowMatchEulerDiscreteScheduler(**cfg).sigmas.float(), rtol=1e-5, atol=1e-6)

        gen = torch.Generator().manual_seed(1)
        x0 = torch.randn(2, *shape, generator=gen)
        noise = torch.randn(2, *shape, generator=gen)
        for i in (0, 7, n - 2):
            sigma = sched.sigmas[i].double().expand(2)
            x_t = schedule.add_noise(x0, noise, sigma)
            theirs = sched.scale_noise(x0, sched.timesteps[i:i + 1], noise)
            torch.testing.assert_close(x_t, theirs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(schedule.model_timesteps(sigma),
                                       sched.timesteps[i].float().expand(2),
                                       rtol=1e-5, atol=1e-3)
            sched._step_index = i
            stepped = sched.step(schedule.target(x0, noise, sigma).float(),
                                 sched.timesteps[i], x_t.float(), return_dict=False)[0]
            nxt = schedule.add_noise(x0, noise, sched.sigmas[i + 1].double().expand(2))
            torch.testing.assert_close(stepped, nxt.float(), rtol=1e-5, atol=1e-5)


def test_a_static_shift_is_the_same_at_every_resolution_and_a_dynamic_one_is_not(
        loaded_schedule):
    for name in CASES:
        shifts = []
        for size in SIZES:
            with loaded_schedule(name).shifted_for((_channels(name), *size)) as s:
                shifts.append(s.shift)
        if _config(name).get("use_dynamic_shifting"):
            # Flux.2's empirical μ falls again past 4300 tokens, so only "differs"
            assert abs(shifts[1] - shifts[0]) > 0.1, name
        else:
            assert shifts == [_config(name)["shift"]] * 2, name


def test_loaded_schedules_follow_the_pipeline_configs(tmp_path):
    host = build_plugin_manager()
    for name, want in (("z_image", 3.0), ("qwen_image", 1.0), ("flux2", 1.0),
                       ("chroma", 1.0), ("hidream", 3.0), ("lumina2", 6.0)):
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
