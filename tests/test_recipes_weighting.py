"""Loss weightings and the timestep-scheduled Huber loss pinned against their formulas
(SNR from diffusers' own DDPM scheduler as an independent oracle), and the trainer
applying per-sample weights."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from loraengine.core.build import build_pipeline
from loraengine.core.config.root import parse_config
from loraengine.core.errors import ConfigError
from loraengine.core.schedule import NoiseSchedule
from loraengine.core.seeding import make_generator
from loraengine.core.train.loop import Trainer
from loraengine.plugins.losses import ScheduledHuberOptions, huber_threshold, scheduled_huber
from loraengine.testing.models import TinyDenoiser, tiny_conditioning, tiny_latents

T = torch.tensor([0, 10, 100, 400, 750, 999])
SIGMAS = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)


def oracle_snr(prediction_type: str = "epsilon") -> torch.Tensor:
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type=prediction_type)
    return compute_snr(sched, T).double()


def weights(host, section: dict, schedule: NoiseSchedule, t: torch.Tensor,
            target: str = "native") -> torch.Tensor:
    cfg = parse_config({"model": {"family": "module"}, "loss_weighting": section,
                        "loss": {"target": target}}, host.registry)
    spec = host.registry.get("loss_weighting", section["name"])
    return spec.factory(cfg.loss_weighting, schedule, target)(t).double()


def test_min_snr_on_epsilon_and_v_prediction_matches_the_paper(host):
    snr = oracle_snr()
    gamma = 5.0
    eps = weights(host, {"name": "min_snr", "gamma": gamma}, NoiseSchedule.ddpm("epsilon"), T)
    torch.testing.assert_close(eps, torch.minimum(snr, torch.full_like(snr, gamma)) / snr,
                               rtol=1e-4, atol=0)
    v = weights(host, {"name": "min_snr", "gamma": gamma},
                NoiseSchedule.ddpm("v_prediction"), T)
    torch.testing.assert_close(v, torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1),
                               rtol=1e-4, atol=0)
    # low-noise timesteps are damped, high-noise ones (SNR < gamma) keep weight 1
    assert eps[0] < 0.01 and eps[-1] == pytest.approx(1.0)


def test_min_snr_on_an_x0_loss_and_on_flow(host):
    snr = oracle_snr()
    x0 = weights(host, {"name": "min_snr", "gamma": 2.0}, NoiseSchedule.ddpm("epsilon"), T,
                 target="x0")
    torch.testing.assert_close(x0, torch.minimum(snr, torch.full_like(snr, 2.0)), rtol=1e-4,
                               atol=0)
    flow_snr = ((1 - SIGMAS) / SIGMAS) ** 2
    flow = weights(host, {"name": "min_snr", "gamma": 2.0}, NoiseSchedule.flow(), SIGMAS)
    # velocity error = x0 error / sigma, so the x0 weight min(SNR, g) becomes min(SNR, g)·σ²
    torch.testing.assert_close(flow, torch.minimum(flow_snr, torch.full_like(flow_snr, 2.0))
                               * SIGMAS**2, rtol=1e-6, atol=1e-7)


def test_debiased_estimation_is_inverse_sqrt_snr_capped(host):
    snr = oracle_snr()
    w = weights(host, {"name": "debiased"}, NoiseSchedule.ddpm("epsilon"), T)
    torch.testing.assert_close(w, 1 / torch.sqrt(torch.clamp(snr, max=1000.0)), rtol=1e-4,
                               atol=0)
    assert snr[0] > 1000  # t=0 exercises the cap
    v = weights(host, {"name": "debiased", "max_snr": 50}, NoiseSchedule.ddpm("v_prediction"),
                T)
    torch.testing.assert_close(v, snr / (snr + 1) / torch.sqrt(torch.clamp(snr, max=50.0)),
                               rtol=1e-4, atol=0)


def test_noise_pred_scale_turns_a_v_loss_into_an_epsilon_loss(host):
    snr = oracle_snr("v_prediction")
    v = weights(host, {"name": "noise_pred_scale"}, NoiseSchedule.ddpm("v_prediction"), T)
    torch.testing.assert_close(v, snr / (snr + 1), rtol=1e-4, atol=0)
    eps = weights(host, {"name": "noise_pred_scale"}, NoiseSchedule.ddpm("epsilon"), T)
    torch.testing.assert_close(eps, torch.ones_like(eps))


@pytest.mark.slow  # 1.5–3.4 s: the full suite runs it
def test_v_pred_like_adds_a_scaled_v_loss(host):
    snr = torch.clamp(oracle_snr(), max=1000.0)
    w = weights(host, {"name": "v_pred_like", "strength": 0.3}, NoiseSchedule.ddpm("epsilon"),
                T)
    torch.testing.assert_close(w, 1 + 0.3 * (snr + 1) / snr, rtol=1e-4, atol=0)


def test_weights_stay_finite_at_the_ends_of_a_flow_schedule(host):
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for section in ({"name": "min_snr"}, {"name": "debiased"}, {"name": "noise_pred_scale"},
                    {"name": "v_pred_like", "strength": 1.0}):
        w = weights(host, section, NoiseSchedule.flow(), ends)
        assert torch.isfinite(w).all(), section


@pytest.mark.parametrize("section,message", [
    ({"name": "v_pred_like"}, "loss_weighting.strength: required key is missing"),
    ({"name": "min_snr", "gama": 5}, "loss_weighting.gama: unknown key"),
    ({"name": "none", "gamma": 5}, "loss_weighting.gamma: unknown key"),
    ({"name": "min_snr", "gamma": 0}, "loss_weighting.gamma: Input should be greater than 0"),
    ({"name": "p2"}, "loss_weighting.name: unknown loss_weighting 'p2'; installed: debiased"),
])
def test_weighting_options_are_validated(host, section, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"family": "module"}, "loss_weighting": section}, host.registry)
    assert message in str(err.value)


# -- scheduled pseudo-Huber -----------------------------------------------------------

def test_scheduled_huber_thresholds(host):
    ddpm = NoiseSchedule.ddpm("epsilon")
    t = torch.tensor([0, 500, 1000 - 1])
    const = huber_threshold(t, ddpm, ScheduledHuberOptions(c=0.2, schedule="constant",
                                                           scale=2.0))
    torch.testing.assert_close(const, torch.full((3,), 0.4, dtype=torch.float64))
    exp = huber_threshold(t, ddpm, ScheduledHuberOptions(c=0.2, schedule="exponential",
                                                         scale=2.0))
    # scale at the clean end, scale·c at the noisy end, scale·sqrt(c) half way
    torch.testing.assert_close(exp, 2.0 * 0.2 ** (t.double() / 1000))
    assert float(exp[1]) == pytest.approx(2.0 * math.sqrt(0.2))
    snr = huber_threshold(t, ddpm, ScheduledHuberOptions(c=0.1, schedule="snr"))
    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012).alphas_cumprod[t].double()
    sigma = ((1 - ac) / ac) ** 0.5
    torch.testing.assert_close(snr, (1 - 0.1) / (1 + sigma) ** 2 + 0.1, rtol=1e-5, atol=0)
    flow = huber_threshold(SIGMAS, NoiseSchedule.flow(),
                           ScheduledHuberOptions(c=0.1, schedule="snr"))
    torch.testing.assert_close(flow, 0.9 / (1 + SIGMAS / (1 - SIGMAS)) ** 2 + 0.1)


def test_scheduled_huber_values_and_limits():
    loss = scheduled_huber(ScheduledHuberOptions(c=0.5, schedule="constant"))
    pred = torch.tensor([[0.0, 1.2, -1.2, 1e-3]])
    out = loss(pred, torch.zeros_like(pred), torch.tensor([10]), NoiseSchedule.ddpm())
    # 2c(sqrt(d² + c²) - c): d = 1.2, c = 0.5 -> sqrt(1.69) - 0.5 = 0.8
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.8, 0.8, 1e-6]]), rtol=1e-3,
                               atol=1e-9)
    # per-sample thresholds broadcast over the sample: L2-like (c large) vs L1-like
    two = scheduled_huber(ScheduledHuberOptions(c=0.01, schedule="exponential"))
    d = torch.full((2, 3), 0.5)
    per = two(d, torch.zeros_like(d), torch.tensor([0, 999]), NoiseSchedule.ddpm())
    assert per[0, 0] == pytest.approx(2 * (math.sqrt(0.25 + 1) - 1))
    assert per[1, 0] == pytest.approx(2 * 0.01 * 0.5, rel=0.05)  # ~ 2c|d| when c << |d|


# -- wiring: the trainer weights each sample ------------------------------------------

def pipeline(host, **sections):
    cfg = parse_config({"model": {"family": "module"},
                        "training": {"steps": 1, "batch_size": 2, "dtype": "fp32", "seed": 3},
                        "adapter": {"rank": 2, "dtype": "fp32"},
                        "memory": {"gradient_checkpointing": False}, **sections},
                       host.registry)
    return build_pipeline(cfg, host, model=TinyDenoiser(), latents=tiny_latents(),
                          conditioning=tiny_conditioning())


def test_micro_step_multiplies_each_samples_loss_by_its_weight(host):
    plain = Trainer(pipeline(host), write_files=False)
    weighted = Trainer(pipeline(host, loss_weighting={"name": "min_snr", "gamma": 1.0}),
                       write_files=False)
    with torch.no_grad():
        l0 = float(plain.micro_step(torch.tensor([0])))
        l1 = float(plain.micro_step(torch.tensor([1])))  # per-sample draws: a batch of 2's
        both = float(weighted.micro_step(torch.tensor([0, 1])))
    # replay the noise stream: per sample a noise tensor, then its timestep
    g = make_generator(3, "noise")
    sched = weighted.pipe.loaded.schedule
    ts = []
    for _ in range(2):
        torch.randn(tiny_latents().shape[1:], generator=g)
        ts.append(int(sched.sample_timestep(g)))
    snr = compute_snr(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012), torch.tensor(ts)).double()
    w = torch.clamp(1.0 / snr, max=1.0)
    assert both == pytest.approx(float((w[0] * l0 + w[1] * l1) / 2), rel=1e-5)


def test_timestep_aware_loss_trains(host):
    trainer = Trainer(pipeline(host, loss={"name": "scheduled_huber", "schedule": "snr"}),
                      write_files=False)
    assert trainer.pipe.loss_timestep_aware
    metrics = trainer.step()
    assert math.isfinite(metrics["loss"]) and metrics["skipped"] == 0.0
