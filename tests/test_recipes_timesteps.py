"""Timestep samplers: sample moments and quantiles against their distributions, shift
for flow models, DDPM mapping, seeded draws only, validation, and the trainer using the
configured sampler."""

from __future__ import annotations

import math

import pytest
import torch

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.core.schedule import NoiseSchedule
from loraengine.core.seeding import make_generator
from loraengine.core.train.loop import Trainer
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents

N = 20000


def sampler(host, section: dict, schedule: NoiseSchedule):
    cfg = parse_config({"model": {"family": "module"}, "timestep_sampler": section},
                       host.registry)
    return host.registry.get("timestep_sampler", section["name"]).factory(
        cfg.timestep_sampler, schedule)


def draws(draw, n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([draw(g) for _ in range(n)])


def test_logit_normal_sample_moments(host):
    mean, std = 0.5, 0.8
    s = draws(sampler(host, {"name": "logit_normal", "mean": mean, "std": std},
                      NoiseSchedule.flow()))
    assert s.dtype == torch.float64 and bool(((s > 0) & (s < 1)).all())
    z = torch.logit(s)
    # standard errors: std/sqrt(N) = 0.0057 for the mean, ~0.004 for the std
    assert float(z.mean()) == pytest.approx(mean, abs=0.025)
    assert float(z.std()) == pytest.approx(std, abs=0.02)
    assert float(s.median()) == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.01)


@pytest.mark.slow  # seconds a run: kept out of the fast default
def test_shift_moves_sigma_and_inverts_exactly(host):
    shift = 3.0
    base = draws(sampler(host, {"name": "logit_normal"}, NoiseSchedule.flow()))
    # the model's one shift (model.flow_shift sets it on the schedule)
    shifted = draws(sampler(host, {"name": "logit_normal"}, NoiseSchedule.flow(shift=shift)))
    # same stream: sigma' = s·u / (1 + (s-1)·u) for each draw u
    torch.testing.assert_close(shifted, shift * base / (1 + (shift - 1) * base))
    assert float(shifted.mean()) > float(base.mean()) + 0.15  # more time at high noise


def test_shift_defaults_to_the_familys(host):
    family = NoiseSchedule.flow(shift=2.0)
    mine = draws(sampler(host, {"name": "uniform"}, family), n=200)
    theirs = draws(family.sample_timestep, n=200)  # the family's own uniform + shift
    torch.testing.assert_close(mine, theirs)


def test_mode_sampling_quantiles(host):
    scale = 1.29
    s = draws(sampler(host, {"name": "mode", "scale": scale},
                      NoiseSchedule.flow()))

    def f(v: float) -> float:
        return 1 - v - scale * (math.cos(math.pi / 2 * v) ** 2 - 1 + v)

    # f is decreasing, so P(t <= f(v0)) = P(v >= v0) = 1 - v0
    for v0 in (0.1, 0.25, 0.5, 0.75, 0.9):
        frac = float((s <= f(v0)).double().mean())
        assert frac == pytest.approx(1 - v0, abs=0.012), v0
    # mean of f(v) over U[0, 1] is 1/2 for any scale; the spread shrinks with scale > 0
    assert float(s.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(s.std()) < 1 / math.sqrt(12) - 0.03


def test_ddpm_schedules_get_integer_timesteps(host):
    ddpm = NoiseSchedule.ddpm()
    u = draws(sampler(host, {"name": "uniform"}, ddpm))
    assert u.dtype == torch.int64 and int(u.min()) >= 0 and int(u.max()) <= 999
    assert float(u.double().mean()) == pytest.approx(499.5, abs=6)
    ln = draws(sampler(host, {"name": "logit_normal", "std": 0.5}, ddpm))
    frac = ln.double() / 1000  # the logit-normal lands in the middle
    assert float((frac - 0.5).abs().mean()) < 0.12


@pytest.mark.parametrize("name", ["uniform", "logit_normal", "mode"])
def test_the_shift_is_the_models_alone(host, name):
    """One flow-shift knob: ``model.flow_shift``. A sampler takes no shift of its own."""
    with pytest.raises(ConfigError, match="timestep_sampler.shift: unknown key"):
        sampler(host, {"name": name, "shift": 3.0}, NoiseSchedule.flow())


def test_family_sampler_is_the_schedules_own(host):
    ddpm = NoiseSchedule.ddpm()
    torch.testing.assert_close(draws(sampler(host, {"name": "family"}, ddpm), n=100),
                               draws(ddpm.sample_timestep, n=100))


@pytest.mark.parametrize("name,options", [("uniform", {}), ("logit_normal", {}),
                                          ("mode", {})])
def test_samplers_draw_only_from_their_generator(host, name, options):
    draw = sampler(host, {"name": name, **options}, NoiseSchedule.flow())
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = draws(draw, n=50, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a, draws(draw, n=50, seed=5))


@pytest.mark.parametrize("section,message", [
    ({"name": "mode", "scale": 2.0}, "timestep_sampler.scale: Input should be less than"),
    ({"name": "logit_normal", "sd": 1.0}, "timestep_sampler.sd: unknown key"),
    ({"name": "family", "shift": 3.0}, "timestep_sampler.shift: unknown key"),
    ({"name": "logit_normal", "std": 0}, "timestep_sampler.std: Input should be greater"),
])
def test_sampler_options_are_validated(host, section, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"family": "module"}, "timestep_sampler": section},
                     host.registry)
    assert message in str(err.value)


def test_trainer_draws_timesteps_from_the_configured_sampler(host):
    cfg = parse_config({
        "model": {"family": "module", "prediction_type": "flow", "flow_shift": 2.0},
        "training": {"steps": 1, "batch_size": 3, "dtype": "fp32", "seed": 4},
        "timestep_sampler": {"name": "logit_normal", "mean": -1.0, "std": 0.3},
        "adapter": {"rank": 2, "dtype": "fp32"},
        "memory": {"gradient_checkpointing": False}}, host.registry)
    pipe = build_pipeline(cfg, host, model=TinyDenoiser(), latents=tiny_latents(),
                          conditioning=tiny_conditioning())
    x0 = tiny_latents()[:3]
    _, t, _ = Trainer(pipe, write_files=False)._noise_and_timesteps(x0)
    g = make_generator(4, "noise")
    want = []
    for _ in range(3):  # per sample: its noise, then its timestep
        torch.randn(x0.shape[1:], generator=g)
        u = torch.sigmoid(-1.0 + 0.3 * torch.randn((), generator=g, dtype=torch.float64))
        want.append(2.0 * u / (1 + u))
    torch.testing.assert_close(t, torch.stack(want))
    pipe.close()
