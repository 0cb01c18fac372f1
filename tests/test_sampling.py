"""Samplers, preview images during training and ``loraengine sample``.

The samplers are checked against models whose prediction is known in closed form: the
exact denoiser of Gaussian data x0 ~ N(μ, s²). For that data one step of each sampler
is an affine map of ``x − mean``, so the sampler's output has a closed form (a product
of per-step factors, derived by hand below), and the probability-flow ODE's exact
solution keeps the standardised value (x − mean_t)/std_t constant.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pydantic import Field
from safetensors.torch import save_file

import loraengine
from loraengine.api import resolve_config
from loraengine.cli.main import cli
from loraengine.core.build import build_pipeline
from loraengine.core.errors import ConfigError, PluginError
from loraengine.core.files import load_lora
from loraengine.core.model import LoadedModel
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.specs import PluginOptions, SamplerSpec
from loraengine.core.samplers import auto_sampler
from loraengine.core.schedule import NoiseSchedule
from loraengine.core.train.loop import Trainer
from loraengine.plugins import build_plugin_manager
from loraengine.plugins import samplers as P
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents
from loraengine.tools.sample import logic as S

MU, S_DATA = 0.7, 0.5
NOISE = torch.randn(2000, generator=torch.Generator().manual_seed(0))


# -- closed-form models -----------------------------------------------------------------

def ddpm_gaussian_model(schedule: NoiseSchedule, mu: float, s: float):
    """The exact epsilon / v prediction for x0 ~ N(mu, s²), for integer or fractional
    timesteps (fractional: log σ interpolated linearly between timesteps)."""
    ac = schedule.alphas_cumprod.double().numpy()
    log_sigma = np.log(np.sqrt((1 - ac) / ac))

    def alpha_bar(t: float) -> float:
        if t == round(t):
            return float(ac[int(t)])
        sigma = math.exp(np.interp(t, np.arange(len(ac)), log_sigma))
        return 1 / (1 + sigma * sigma)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alpha_bar(float(t))
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        x = x.double()
        x0 = mu + a * s * s / (a * a * s * s + b * b) * (x - a * mu)
        eps = (x - a * x0) / b
        out = eps if schedule.prediction_type == "epsilon" else a * eps - b * x0
        return out.float()

    return model_fn


def flow_gaussian_model(mu: float, s: float):
    """The exact velocity E[noise − x0 | x_σ] for x0 ~ N(mu, s²)."""
    def model_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sg = float(sigma)
        x = x.double()
        mean, var = (1 - sg) * mu, (1 - sg) ** 2 * s * s + sg * sg
        x0 = mu + (1 - sg) * s * s / var * (x - mean)
        noise = sg / var * (x - mean)
        return (noise - x0).float()

    return model_fn


def trailing(n: int, total: int = 1000) -> list[int]:
    return [round(total - i * total / n) - 1 for i in range(n)]


def sigma_bar_recurrence(sigmas: list[float], start: torch.Tensor, mu: float, s: float
                         ) -> torch.Tensor:
    """By hand: in x̄ = x/√ᾱ coordinates the exact ε̂ is (x̄ − μ)·σ/(s² + σ²), so each
    step x̄ += (σ' − σ)·ε̂ multiplies x̄ − μ by 1 + (σ' − σ)·σ/(s² + σ²)."""
    factor = 1.0
    for sg, nxt in zip(sigmas[:-1], sigmas[1:], strict=True):
        factor *= 1 + (nxt - sg) * sg / (s * s + sg * sg)
    return mu + (start - mu) * factor


def ode_solution_ddpm(schedule: NoiseSchedule, noise: torch.Tensor, mu: float, s: float
                      ) -> torch.Tensor:
    """Exact probability-flow ODE from x = noise at t = T−1 to the clean end."""
    ab = float(schedule.alphas_cumprod[-1])
    a, b = math.sqrt(ab), math.sqrt(1 - ab)
    return mu + s * (noise.double() - a * mu) / math.sqrt(a * a * s * s + b * b)


# -- DDIM and Euler on epsilon / v models ---------------------------------------------------

@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_reproduces_the_hand_computed_gaussian_case(kind):
    schedule = NoiseSchedule.ddpm(kind)
    ac = schedule.alphas_cumprod.double()
    model = ddpm_gaussian_model(schedule, MU, S_DATA)
    ddim = P.make_ddim(P.DDIMOptions())
    for n in (7, 50):
        ts = trailing(n)
        sigmas = [math.sqrt((1 - ac[t]) / ac[t]) for t in ts] + [0.0]
        expected = sigma_bar_recurrence(sigmas, NOISE.double() / ac[ts[0]].sqrt(), MU, S_DATA)
        out = ddim(model, NOISE, schedule, n)
        assert (out.double() - expected).abs().max() < 1e-5  # float32 rounding only
    # More steps approach the exact ODE solution at first order.
    exact = ode_solution_ddpm(schedule, NOISE, MU, S_DATA)
    err = {n: float((ddim(model, NOISE, schedule, n).double() - exact).abs().max())
           for n in (100, 200)}
    assert err[200] < 0.05
    assert 1.6 < err[100] / err[200] < 2.2


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_euler_karras_reproduces_the_hand_computed_gaussian_case(kind):
    schedule = NoiseSchedule.ddpm(kind)
    ac = schedule.alphas_cumprod.double()
    train_sigmas = ((1 - ac) / ac).sqrt()
    model = ddpm_gaussian_model(schedule, MU, S_DATA)
    euler = P.make_euler(P.EulerOptions(karras=True, rho=7.0))
    n = 12
    lo, hi = float(train_sigmas[0]) ** (1 / 7), float(train_sigmas[-1]) ** (1 / 7)
    sigmas = [(hi + i / (n - 1) * (lo - hi)) ** 7 for i in range(n)] + [0.0]
    start = NOISE.double() * math.sqrt(1 + sigmas[0] ** 2)
    expected = sigma_bar_recurrence(sigmas, start, MU, S_DATA)
    assert (euler(model, NOISE, schedule, n).double() - expected).abs().max() < 1e-5
    exact = ode_solution_ddpm(schedule, NOISE, MU, S_DATA)
    assert (euler(model, NOISE, schedule, 200).double() - exact).abs().max() < 0.03


def test_euler_on_the_training_timesteps_is_ddim():
    # Both are Euler steps of dx̄/dσ = ε̂ at the same σ: the same numbers.
    schedule = NoiseSchedule.ddpm("epsilon")
    model = ddpm_gaussian_model(schedule, MU, S_DATA)
    a = P.make_ddim(P.DDIMOptions())(model, NOISE, schedule, 30)
    b = P.make_euler(P.EulerOptions())(model, NOISE, schedule, 30)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_reproduces_the_hand_computed_gaussian_case(shift):
    schedule = NoiseSchedule.flow(shift=shift)
    model = flow_gaussian_model(MU, S_DATA)
    euler = P.make_euler(P.EulerOptions())
    n = 9
    u = [1 - i / n for i in range(n + 1)]
    sig = [shift * v / (1 + (shift - 1) * v) for v in u]
    # By hand: y = x − (1−σ)μ obeys y' = y·(1 + Δσ·(σ − (1−σ)s²)/var), var =
    # (1−σ)²s² + σ², starting from y = noise at σ = 1.
    factor = 1.0
    for sg, nxt in zip(sig[:-1], sig[1:], strict=True):
        var = (1 - sg) ** 2 * S_DATA ** 2 + sg * sg
        factor *= 1 + (nxt - sg) * (sg - (1 - sg) * S_DATA ** 2) / var
    expected = MU + NOISE.double() * factor
    assert (euler(model, NOISE, schedule, n).double() - expected).abs().max() < 1e-5
    exact = MU + S_DATA * NOISE.double()  # the ODE maps noise to μ + s·noise
    err = {k: float((euler(model, NOISE, schedule, k).double() - exact).abs().max())
           for k in (100, 200)}
    assert err[200] < 0.04
    assert 1.6 < err[100] / err[200] < 2.2


def test_point_mass_data_is_reached_exactly_by_every_sampler():
    # s = 0: the ODE's paths are straight lines into μ, so any step count lands on it,
    # and DDIM's re-injected noise (eta) is gone by the final step.
    ddpm = NoiseSchedule.ddpm("epsilon")
    model = ddpm_gaussian_model(ddpm, MU, 0.0)
    g = torch.Generator().manual_seed(3)
    outs = [P.make_ddim(P.DDIMOptions(eta=eta))(model, NOISE, ddpm, 13, g) for eta in (0, 1)]
    outs.append(P.make_euler(P.EulerOptions(karras=True))(model, NOISE, ddpm, 13))
    outs.append(P.make_euler(P.EulerOptions())(flow_gaussian_model(MU, 0.0), NOISE,
                                               NoiseSchedule.flow(shift=3.0), 7))
    for out in outs:
        assert (out - MU).abs().max() < 1e-6


def test_stochastic_ddim_draws_only_from_its_generator():
    schedule = NoiseSchedule.ddpm("epsilon")
    model = ddpm_gaussian_model(schedule, MU, S_DATA)
    ddim = P.make_ddim(P.DDIMOptions(eta=0.5))
    torch.manual_seed(123)
    a = ddim(model, NOISE, schedule, 20, torch.Generator().manual_seed(1))
    torch.manual_seed(456)  # the global RNG plays no part
    b = ddim(model, NOISE, schedule, 20, torch.Generator().manual_seed(1))
    c = ddim(model, NOISE, schedule, 20, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_refuses_a_flow_model(host):
    with pytest.raises(ConfigError, match=r"output.samples.sampler: sampler 'ddim' cannot "
                       r"sample a flow model; use one of: euler"):
        S.resolve_sampler(host.registry, "ddim", {}, NoiseSchedule.flow())
    assert auto_sampler(NoiseSchedule.flow(), host.registry) == "euler"
    assert auto_sampler(NoiseSchedule.ddpm("v_prediction"), host.registry) == "ddim"


# -- guidance, seeds and the adapter ------------------------------------------------------

def affine_model(schedule: NoiseSchedule) -> LoadedModel:
    """A model affine in its conditioning: 0.3·x + mean(cond)."""
    def predict(module, x, t, cond):
        return 0.3 * x + cond["cond"].mean(dim=(1, 2)).view(-1, 1, 1, 1)

    return LoadedModel(module=torch.nn.Linear(1, 1), predict=predict, schedule=schedule)


def test_guidance_extrapolates_from_the_negative_prediction(host):
    loaded = affine_model(NoiseSchedule.ddpm("epsilon"))
    g = torch.Generator().manual_seed(0)
    cond = {"cond": torch.randn(3, 2, 4, generator=g)}
    neg = {"cond": torch.randn(1, 2, 4, generator=g)}
    settings = S.SampleSettings(steps=8, guidance=4.0, seed=5)
    guided = S.sample_latents(loaded, cond, (1, 2, 2), settings, host.registry, negative=neg)
    # For a prediction affine in cond, u + g·(c − u) is the prediction at n + g·(c − n).
    moved = {"cond": neg["cond"] + 4.0 * (cond["cond"] - neg["cond"])}
    plain = S.SampleSettings(steps=8, guidance=1.0, seed=5)
    direct = S.sample_latents(loaded, moved, (1, 2, 2), plain, host.registry)
    assert (guided - direct).abs().max() < 1e-4
    # Without a negative, guidance pushes away from an empty (all-zero) conditioning.
    empty = S.sample_latents(loaded, cond, (1, 2, 2), settings, host.registry)
    zeros = S.sample_latents(loaded, cond, (1, 2, 2), settings, host.registry,
                             negative={"cond": torch.zeros(1, 2, 4)})
    assert torch.equal(empty, zeros)


def test_sampling_is_deterministic_and_each_image_has_its_own_noise(host):
    loaded = LoadedModel(module=TinyDenoiser(cond_dim=8).eval(),
                         predict=lambda m, x, t, c: m(x, t, c["cond"]),
                         schedule=NoiseSchedule.ddpm("epsilon"))
    cond = {"cond": tiny_conditioning(3, dim=8)}
    settings = S.SampleSettings(steps=5, seed=11, batch_size=4)
    a = S.sample_latents(loaded, cond, (4, 8, 8), settings, host.registry, per_prompt=2)
    torch.manual_seed(999)
    b = S.sample_latents(loaded, cond, (4, 8, 8), settings, host.registry, per_prompt=2)
    assert a.shape == (6, 4, 8, 8) and torch.equal(a, b)
    other = S.SampleSettings(steps=5, seed=12, batch_size=4)
    assert not torch.allclose(a, S.sample_latents(loaded, cond, (4, 8, 8), other,
                                                  host.registry, per_prompt=2))
    # Image i's noise depends on (seed, i) only, not on how many images are drawn.
    assert torch.equal(S.start_noise((4, 8, 8), 11, 2, first=3)[1],
                       S.start_noise((4, 8, 8), 11, 6)[4])


def test_a_zero_initialised_adapter_gives_the_base_images(host, unet_config):
    settings = S.SampleSettings(steps=4, seed=1)
    cond = {"cond": tiny_conditioning(2, dim=16)}
    for bypass in (False, True):
        cfg = dict(unet_config, memory={"gradient_checkpointing": False,
                                        "bypass_mode": bypass})
        pipe = build_pipeline(resolve_config(cfg, host)[0], host)
        try:
            assert pipe.network.mode == ("bypass" if bypass else "weight")
            adapted = S.sample_latents(pipe.loaded, cond, (4, 8, 8), settings, host.registry)
            pipe.network.detach()
            base = S.sample_latents(pipe.loaded, cond, (4, 8, 8), settings, host.registry)
        finally:
            pipe.close()
        assert torch.equal(adapted, base)


def test_adapters_off_restores_the_base_exactly_after_training(host, unet_config):
    cfg = dict(unet_config, optimizer={"lr": 0.05})
    cfg = resolve_config(cfg, host)[0]
    pipe = build_pipeline(cfg, host)
    settings = S.SampleSettings(steps=3, seed=2)
    cond = {"cond": tiny_conditioning(1, dim=16)}
    try:
        Trainer(pipe, write_files=False).run()
        with S.adapters_off(pipe.network):
            off = S.sample_latents(pipe.loaded, cond, (4, 8, 8), settings, host.registry)
        adapted = S.sample_latents(pipe.loaded, cond, (4, 8, 8), settings, host.registry)
        pipe.network.detach()
        detached = S.sample_latents(pipe.loaded, cond, (4, 8, 8), settings, host.registry)
    finally:
        pipe.close()
    assert torch.equal(off, detached)
    assert not torch.allclose(adapted, detached, atol=1e-4)


def test_decode_without_a_vae_shows_the_first_channels():
    latents = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    img = S.decode(LoadedModel(torch.nn.Identity(), None, NoiseSchedule.flow()), latents)
    assert img.shape == (1, 3, 2, 2)
    assert img[0, :, 0, 0].tolist() == [0.0, 0.5, 1.0]
    grey = S.decode(LoadedModel(torch.nn.Identity(), None, NoiseSchedule.flow()),
                    torch.zeros(2, 1, 3, 3))
    assert grey.shape == (2, 3, 3, 3) and bool((grey == 0.5).all())


# -- previews during training ---------------------------------------------------------------

def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.slow  # 1.5–3.4 s: the full suite runs it
def test_previews_are_written_without_changing_training(tmp_path, host, unet_config, unet_dir):
    samples = {"every": 2, "steps": 4, "count": 3, "per_prompt": 2, "seed": 7}
    with_samples = dict(unet_config)
    with_samples["training"] = dict(unet_config["training"], steps=4)
    with_samples["output"] = dict(unet_config["output"], samples=samples)
    plain = dict(with_samples, output=dict(unet_config["output"], dir=str(tmp_path / "plain")))
    result = loraengine.train(with_samples)
    reference = loraengine.train(plain)
    folder = Path(unet_config["output"]["dir"]) / "test.samples"
    assert result.files["samples"] == folder
    assert sorted(p.name for p in folder.iterdir()) == ["compare.png", "step_2.png",
                                                        "step_4.png"]
    # Sampling never touches the training streams: the adapter is the same.
    got, _ = load_lora(result.path)
    want, _ = load_lora(reference.path)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # 3 prompts x 2 seeds of 8x8 latents, tiles scaled to 64 px with 2 px padding.
    step4 = _pixels(folder / "step_4.png")
    assert step4.shape == (3 * 66 + 2, 2 * 66 + 2, 3)
    assert not np.array_equal(step4, _pixels(folder / "step_2.png"))
    # compare.png: the real base model (loaded afresh, no adapter) beside step 4.
    spec = host.registry.get("model", "diffusers")
    cfg = resolve_config(with_samples, host)[0]
    fresh = spec.load(cfg.model, {"base_dir": None, "module": None})
    fresh.module.eval()
    cond = S.distinct_entries({"cond": tiny_conditioning(dim=16)}, 3)
    latents = S.sample_latents(fresh, cond, (4, 8, 8), S.SampleSettings(steps=4, seed=7),
                               host.registry, per_prompt=2)
    base_grid = np.asarray(S.grid_image(S.decode(fresh, latents), 2))
    compare = _pixels(folder / "compare.png")
    h, w = base_grid.shape[:2]
    assert np.array_equal(compare[16:16 + h, :w], base_grid)
    assert np.array_equal(compare[16:16 + h, w + 12:], step4)


def test_previews_are_off_by_default_and_need_files(unet_config, host):
    cfg = resolve_config(unet_config, host)[0]
    assert cfg.output.samples is None
    # Asked for, but the run writes no files: no previews either.
    in_memory = dict(unet_config, output=dict(unet_config["output"], samples={"every": 1}))
    result = loraengine.train(in_memory, write_files=False)
    assert "samples" not in result.files
    assert not Path(unet_config["output"]["dir"]).exists()


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_sampler_settings_are_checked_with_the_config(tmp_path, unet_config):
    import yaml

    bad = {"sampler": "nope"}, {"sampler": "ddim", "sampler_options": {"eta": 5}}
    needles = ("output.samples.sampler: unknown sampler 'nope'; installed: ddim, euler",
               "output.samples.sampler_options: eta: Input should be less than or equal "
               "to 1")
    for samples, needle in zip(bad, needles, strict=True):
        cfg = dict(unet_config, output=dict(unet_config["output"], samples=samples))
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = run_cli("validate", str(path))
        assert result.exit_code == 2, result.output
        assert f"error: {needle}" in result.output
        assert "Traceback" not in result.output


class HalfwayOptions(PluginOptions):
    stop: float = Field(0.5, gt=0, lt=1)


class HalfwaySamplerPlugin:
    """A third-party sampler: Euler on a flow model, stopping at σ = ``stop`` and
    returning the predicted clean image from there."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    @hookimpl
    def loraengine_samplers(self):
        def factory(options):
            def sample(model_fn, noise, schedule, steps, generator=None):
                self.calls.append((options.stop, steps))
                v = model_fn(noise, torch.tensor(1.0, dtype=torch.float64))
                x = noise + (options.stop - 1.0) * v
                return x - options.stop * model_fn(x, torch.tensor(options.stop))

            return sample

        return [SamplerSpec("halfway", factory, HalfwayOptions, prediction_types=("flow",))]


def test_a_plugin_sampler_drives_the_previews(tmp_path):
    plugin = HalfwaySamplerPlugin()
    host = build_plugin_manager(extra=[plugin])
    assert host.registry.names("sampler") == ["ddim", "euler", "halfway"]
    cfg = {"model": {"family": "module", "prediction_type": "flow"},
           "training": {"steps": 2, "dtype": "fp32"},
           "memory": {"gradient_checkpointing": False},
           "output": {"dir": str(tmp_path), "plot": False, "samples": {
               "sampler": "halfway", "sampler_options": {"stop": 0.25}, "steps": 3,
               "count": 2, "per_prompt": 1, "compare": False}}}
    loraengine.train(cfg, model=TinyDenoiser(), latents=tiny_latents(),
                     conditioning=tiny_conditioning(), host=host)
    assert plugin.calls == [(0.25, 3)]  # one batch, at the last step only
    assert _pixels(tmp_path / "lora.samples" / "step_2.png").shape == (2 * 66 + 2, 68, 3)
    with pytest.raises(ConfigError, match=r"output.samples.sampler_options: stop: Input "
                       r"should be less than 1"):
        bad = dict(cfg, output=dict(cfg["output"], samples={"sampler": "halfway",
                                                            "sampler_options": {"stop": 2}}))
        resolve_config(bad, host, has_model=True)


def test_a_sampler_name_provided_twice_is_a_conflict():
    class Clash:
        @hookimpl
        def loraengine_samplers(self):
            return [SamplerSpec("euler", lambda o: None)]

    with pytest.raises(PluginError, match="conflicting plugins: sampler 'euler'"):
        build_plugin_manager(extra=[Clash()]).registry  # noqa: B018


def test_a_sampler_that_cannot_sample_the_model_stops_before_training(tmp_path):
    cfg = {"model": {"family": "module", "prediction_type": "flow"},
           "training": {"steps": 2, "dtype": "fp32"},
           "output": {"dir": str(tmp_path), "samples": {"sampler": "ddim"}}}
    with pytest.raises(ConfigError, match="sampler 'ddim' cannot sample a flow model"):
        loraengine.train(cfg, model=TinyDenoiser(), latents=tiny_latents(),
                         conditioning=tiny_conditioning())
    assert not (tmp_path / "lora.safetensors").exists()


# -- loraengine sample ------------------------------------------------------------------

def test_cli_sample_writes_the_grid_and_base_vs_adapted(tmp_path, unet_config, unet_dir):
    cfg = dict(unet_config, optimizer={"lr": 0.05})
    lora = loraengine.train(cfg).path
    prompts = tmp_path / "prompts.safetensors"
    save_file({"cond": tiny_conditioning(2, dim=16, seed=4)}, str(prompts))
    common = ["sample", "--model", str(unet_dir), "--prompts", str(prompts), "--steps", "4",
              "--per-prompt", "2", "--seed", "3", "--guidance", "2.5"]
    result = run_cli(*common, "--lora", str(lora), "--out", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    assert "4 image(s)" in result.output and "compare.png" in result.output
    # The base model again, named by a training config's model section this time.
    import yaml

    (tmp_path / "train.yaml").write_text(yaml.safe_dump(unet_config))
    common[2] = str(tmp_path / "train.yaml")
    base = run_cli(*common, "--out", str(tmp_path / "b"))
    assert base.exit_code == 0, base.output
    assert "of a diffusers model" in base.output
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"grid.png", "compare.png", "image_0_0.png", "image_1_1.png"} <= names
    assert _pixels(tmp_path / "a" / "image_0_0.png").shape == (8, 8, 3)
    compare, base_grid = _pixels(tmp_path / "a" / "compare.png"), \
        _pixels(tmp_path / "b" / "grid.png")
    adapted = _pixels(tmp_path / "a" / "grid.png")
    h, w = base_grid.shape[:2]
    assert np.array_equal(compare[16:16 + h, :w], base_grid)
    assert np.array_equal(compare[16:16 + h, w + 12:], adapted)
    assert not np.array_equal(adapted, base_grid)


def test_cli_sample_errors_name_the_option(tmp_path, unet_dir, data_files):
    _, cond = data_files
    missing = run_cli("sample", "--model", str(unet_dir), "--prompts",
                      str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o"))
    assert missing.exit_code == 1
    assert "error: --prompts file not found:" in missing.output
    bad = run_cli("sample", "--model", str(unet_dir), "--prompts", str(cond), "--out",
                  str(tmp_path / "o"), "--sampler", "nope")
    assert bad.exit_code == 2
    assert "error: --sampler: unknown sampler 'nope'; installed: ddim, euler" in bad.output
    opt = run_cli("sample", "--model", str(unet_dir), "--prompts", str(cond), "--out",
                  str(tmp_path / "o"), "--sampler", "euler", "--sampler-option", "rho=-1")
    assert opt.exit_code == 2
    assert "error: --sampler-option: rho: Input should be greater than 0" in opt.output
    assert "Traceback" not in bad.output + missing.output + opt.output


def test_cli_sample_encodes_text_prompts_and_decodes_with_the_vae(tmp_path):
    from loraengine.testing import tiny_pipelines

    pipe = tiny_pipelines.save("sd15", tmp_path / "sd15")
    (tmp_path / "p.txt").write_text("a red square\n\na blue disc\n")
    result = run_cli("sample", "--model", str(pipe), "--prompts", str(tmp_path / "p.txt"),
                     "--out", str(tmp_path / "o"), "--steps", "3", "--size", "8", "8")
    assert result.exit_code == 0, result.output
    assert "2 image(s) of a sd15 model" in result.output
    # The tiny VAE upsamples 2x: 8x8 latents become 16x16 pictures.
    assert _pixels(tmp_path / "o" / "image_1_0.png").shape == (16, 16, 3)


def test_cli_sample_on_the_shipped_quickstart_pipeline_writes_a_grid(tmp_path):
    """The quickstart's own pipeline and prompts: the UNet's 16x16 sample size, decoded
    by its 8x VAE, gives 128x128 tiles, one row per prompt, 2 px apart in grid.png."""
    qs = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
    prompts = [p for p in (qs / "prompts.txt").read_text().splitlines() if p.strip()]
    result = run_cli("sample", "--model", str(qs / "model"), "--prompts",
                     str(qs / "prompts.txt"), "--out", str(tmp_path / "o"), "--steps", "2")
    assert result.exit_code == 0, result.output
    assert f"{len(prompts)} image(s) of a sd15 model (latents 4x16x16)" in result.output
    grid = _pixels(tmp_path / "o" / "grid.png")
    assert grid.shape == (2 + 130 * len(prompts), 2 + 130, 3)
    for p in range(len(prompts)):
        tile = _pixels(tmp_path / "o" / f"image_{p}_0.png")
        assert tile.shape == (128, 128, 3)
        assert np.array_equal(grid[2 + 130 * p:130 + 130 * p, 2:130], tile)


def test_stochastic_ddim_image_does_not_depend_on_the_batch(host):
    """With eta > 0 each image draws its step noise from its own generator."""
    loaded = LoadedModel(module=TinyDenoiser(cond_dim=8).eval(),
                         predict=lambda m, x, t, c: m(x, t, c["cond"]),
                         schedule=NoiseSchedule.ddpm("epsilon"))
    cond = {"cond": tiny_conditioning(4, dim=8)}
    one = S.SampleSettings(steps=4, seed=3, batch_size=1, sampler="ddim",
                           sampler_options={"eta": 1.0})
    four = S.SampleSettings(steps=4, seed=3, batch_size=4, sampler="ddim",
                            sampler_options={"eta": 1.0})
    a = S.sample_latents(loaded, cond, (4, 8, 8), one, host.registry)
    b = S.sample_latents(loaded, cond, (4, 8, 8), four, host.registry)
    # batch size changes only float rounding in the model (about 1e-3 after the steps);
    # a shared noise stream would change whole images (differences of order 1 and more)
    assert float((a - b).abs().max()) < 1e-2


def test_guidance_with_a_negative_lacking_extra_keys(host):
    """An SDXL-style prompt file has time_ids; a plain negative does not."""
    def predict(module, x, t, cond):
        return 0.3 * x + cond["cond"].mean(dim=(1, 2)).view(-1, 1, 1, 1) + \
            0.0 * cond["time_ids"].sum(dim=1).view(-1, 1, 1, 1)

    loaded = LoadedModel(module=torch.nn.Linear(1, 1), predict=predict,
                         schedule=NoiseSchedule.ddpm("epsilon"))
    cond = {"cond": torch.randn(2, 2, 4), "time_ids": torch.randn(2, 6)}
    settings = S.SampleSettings(steps=3, guidance=3.0, seed=1)
    out = S.sample_latents(loaded, cond, (1, 2, 2), settings, host.registry,
                           negative={"cond": torch.zeros(1, 2, 4)})
    assert bool(torch.isfinite(out).all())


def test_cli_sample_refuses_to_write_images_of_non_finite_samples(tmp_path, unet_config,
                                                                  unet_dir):
    # finite weights, but a strength that takes the adapted model's output past fp32
    lora = loraengine.train(unet_config).path
    prompts = tmp_path / "prompts.safetensors"
    save_file({"cond": tiny_conditioning(1, dim=16, seed=4)}, str(prompts))
    result = run_cli("sample", "--model", str(unet_dir), "--prompts", str(prompts), "--steps",
                     "1", "--lora", str(lora), "--strength", "1e30", "--out", str(tmp_path / "a"))
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: the model's samples with --lora {lora} at --strength 1e+30 hold NaN or inf "
        "values; no image is written")
    assert not (tmp_path / "a").exists()
