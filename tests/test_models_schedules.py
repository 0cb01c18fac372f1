"""Each family's noise schedule, targets and denoiser call, against hand computations
and diffusers' own schedulers at fixed timesteps."""

from __future__ import annotations

import math

import pytest
import torch

from loraengine.core.seeding import make_generator
from loraengine.plugins import build_plugin_manager
from loraengine.plugins.models import flux as flux_family
from loraengine.plugins.models.common import ddpm_schedule, flow_schedule
from loraengine.plugins.models.flow import flux1_image_ids as image_ids
from loraengine.plugins.models.flow import pack2 as pack
from loraengine.plugins.models.flow import unpack2 as unpack
from loraengine.plugins.models.unet import SD2, SD15, default_time_ids
from loraengine.testing import tiny_pipelines as tp


def _x0_noise(shape=(2, 4, 8, 8), seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _hand_alpha_bar(t: int) -> float:
    """SD's scaled-linear betas, written out: β_i = (√β₀ + i·(√β₁ − √β₀)/999)²."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    for i in range(t + 1):
        beta = (lo + i * (hi - lo) / 999) ** 2
        prod *= 1.0 - beta
    return prod


def _options(family, **kw):
    return family.options(path="unused", **kw)


def test_epsilon_schedule_matches_hand_computation_and_diffusers():
    from diffusers import DDPMScheduler

    sched = ddpm_schedule(SD15, _options(SD15), {"prediction_type": "epsilon"})
    x0, noise = _x0_noise()
    t = torch.tensor([500, 500])
    ab = _hand_alpha_bar(500)
    x_t = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise)
    torch.testing.assert_close(sched.target(x0, noise, t), noise)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(x_t, ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    assert sched.model_timesteps(t).tolist() == [500, 500]


def test_v_prediction_is_sd2_default_and_matches_hand_computation_and_diffusers():
    from diffusers import DDPMScheduler

    sched = ddpm_schedule(SD2, _options(SD2), None)  # no scheduler config: family default
    assert sched.prediction_type == "v_prediction"
    assert ddpm_schedule(SD2, _options(SD2), {"prediction_type": "epsilon"}
                         ).prediction_type == "epsilon"  # SD2-base says so itself
    x0, noise = _x0_noise()
    t = torch.tensor([700, 700])
    ab = _hand_alpha_bar(700)
    torch.testing.assert_close(sched.add_noise(x0, noise, t),
                               math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise)
    v = sched.target(x0, noise, t)
    torch.testing.assert_close(v, math.sqrt(ab) * noise - math.sqrt(1 - ab) * x0)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="v_prediction")
    torch.testing.assert_close(v, ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_flow_target_and_xt_match_hand_computation_and_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from loraengine.plugins.models.sd3 import SD3

    sched = flow_schedule(SD3, _options(SD3), {"shift": 3.0})
    x0, noise = _x0_noise()
    sigma = torch.tensor([0.3, 0.3], dtype=torch.float64)
    x_t = sched.add_noise(x0, noise, sigma)
    torch.testing.assert_close(x_t, 0.7 * x0 + 0.3 * noise)
    torch.testing.assert_close(sched.target(x0, noise, sigma), noise - x0)
    assert sched.model_timesteps(sigma).tolist() == pytest.approx([300.0, 300.0])
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    i = 4
    s = float(ref.sigmas[i])
    got = sched.add_noise(x0, noise, torch.tensor([s, s], dtype=torch.float64))
    want = ref.scale_noise(x0, ref.timesteps[i:i + 1], noise)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flow_shift_matches_diffusers_shifted_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from loraengine.plugins.models.sd3 import SD3

    sched = flow_schedule(SD3, _options(SD3), {"shift": 3.0})
    assert sched.shift == 3.0
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000)
    plain = torch.linspace(1.0, 1 / 1000, 1000, dtype=torch.float64)  # unshifted σ grid
    torch.testing.assert_close(sched.shift_sigma(plain).float(), ref.sigmas.float(),
                               rtol=1e-5, atol=1e-6)


def test_flow_sampling_is_logit_normal_then_shifted_and_seeded():
    from loraengine.plugins.models.sd3 import SD3

    # the family's own distribution, logit-normal(0, 1); another one is chosen in the
    # timestep_sampler section (tests/test_recipes_timesteps.py)
    sched = flow_schedule(SD3, _options(SD3), {"shift": 3.0})
    assert sched.sampling == "logit_normal"
    g1, g2 = make_generator(7, "noise"), make_generator(7, "noise")
    draws = torch.stack([sched.sample_timestep(g1) for _ in range(5)])
    z = torch.stack([torch.randn((), generator=g2, dtype=torch.float64) for _ in range(5)])
    sig = torch.sigmoid(z)
    torch.testing.assert_close(draws, 3 * sig / (1 + 2 * sig))


def test_flux_with_dynamic_shifting_trains_unshifted_unless_told():
    cfg = {"shift": 3.0, "use_dynamic_shifting": True}
    flux = flux_family.FLUX
    assert flow_schedule(flux, _options(flux), cfg).shift == 1.0
    assert flow_schedule(flux, _options(flux, flow_shift=2.0), cfg).shift == 2.0


def test_flux_pack_unpack_and_ids_follow_the_2x2_token_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = pack(x)
    assert tokens.shape == (2, 6, 12)
    # token (row 1, col 2) holds channels 0..2 of pixels (2..3, 4..5), channel-major
    want = x[0, :, 2:4, 4:6].reshape(3, 4).reshape(-1)
    torch.testing.assert_close(tokens[0, 1 * 3 + 2], want)
    torch.testing.assert_close(unpack(tokens, 4, 6), x)
    ids = image_ids(4, 6, torch.device("cpu"), torch.float32)
    assert ids[1 * 3 + 2].tolist() == [0.0, 1.0, 2.0]


def test_flux_predict_passes_sigma_guidance_and_ids_to_the_transformer():
    model = tp.flux_transformer(seed=1)
    opts = _options(flux_family.FLUX, guidance=2.5)
    sched = flow_schedule(flux_family.FLUX, opts, None)
    predict = flux_family.FLUX.predictor(opts, model, sched, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 6, generator=g)
    cond = {"cond": torch.randn(2, 5, 32, generator=g), "pooled": torch.randn(2, 16, generator=g)}
    sigma = torch.tensor([0.25, 0.6])
    with torch.no_grad():
        got = predict(model, x, sched.model_timesteps(sigma), cond)
        packed = x.reshape(2, 4, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 6, 16)
        ids = torch.tensor([[0.0, r, c] for r in range(2) for c in range(3)])
        out = model(hidden_states=packed, encoder_hidden_states=cond["cond"],
                    pooled_projections=cond["pooled"], timestep=sigma, img_ids=ids,
                    txt_ids=torch.zeros(5, 3), guidance=torch.tensor([2.5, 2.5]),
                    return_dict=False)[0]
    want = out.reshape(2, 2, 3, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 4, 6)
    torch.testing.assert_close(got, want)


def test_sdxl_predict_maps_pooled_to_text_embeds_and_derives_time_ids():
    from loraengine.plugins.models.unet import sdxl_predictor

    unet = tp.unet(32, sdxl_pooled=16, linear_proj=True, seed=2).eval()
    predict = sdxl_predictor(None, unet, None, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=g)
    cond = {"cond": torch.randn(2, 7, 32, generator=g), "pooled": torch.randn(2, 16, generator=g)}
    t = torch.tensor([10, 900])
    assert default_time_ids(x, 8)[0].tolist() == [64, 96, 0, 0, 64, 96]
    with torch.no_grad():
        got = predict(unet, x, t, cond)
        want = unet(x, t, encoder_hidden_states=cond["cond"], added_cond_kwargs={
            "text_embeds": cond["pooled"],
            "time_ids": torch.tensor([[64.0, 96, 0, 0, 64, 96]] * 2)}).sample
        other = predict(unet, x, t, {**cond, "time_ids": torch.tensor([[80.0, 80, 8, 8, 64, 96]] * 2)})
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, other)  # a file's own time_ids are used


def test_every_family_is_registered_with_its_defaults():
    from loraengine.plugins.models.sd3 import SD3
    from loraengine.plugins.models.unet import SDXL

    reg = build_plugin_manager().registry
    want = {SD15: ("kohya", "epsilon"), SD2: ("kohya", "v_prediction"),
            SDXL: ("kohya", "epsilon"), SD3: ("diffusers", "flow"),
            flux_family.FLUX: ("diffusers", "flow")}
    for fam, (exporter, prediction) in want.items():
        spec = reg.get("model", fam.name)
        assert spec.make_encoder is not None and spec.detect is not None
        assert (fam.default_exporter, fam.prediction_type) == (exporter, prediction)
        assert spec.config_model is fam.options
    assert {"diffusers", "peft"} <= set(reg.names("exporter"))


def test_explicit_prediction_type_keeps_the_scheduler_betas(tmp_path):
    import json

    from loraengine.core.errors import ConfigError
    from loraengine.plugins.models.diffusers_folder import DiffusersOptions, schedule_from

    sched = tmp_path / "scheduler_config.json"
    sched.write_text(json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": 500,
                                 "beta_start": 0.0001, "beta_end": 0.02,
                                 "beta_schedule": "linear", "prediction_type": "epsilon"}))
    auto = schedule_from(DiffusersOptions(path=tmp_path), sched)
    v = schedule_from(DiffusersOptions(path=tmp_path, prediction_type="v_prediction"), sched)
    assert (auto.prediction_type, v.prediction_type) == ("epsilon", "v_prediction")
    assert v.num_timesteps == 500 and torch.equal(v.alphas_cumprod, auto.alphas_cumprod)
    sched.write_text(json.dumps({"_class_name": "DDPMScheduler",
                                 "beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(ConfigError, match="beta_schedule 'squaredcos_cap_v2' is not supported"):
        schedule_from(DiffusersOptions(path=tmp_path), sched)


def test_zero_terminal_snr_rescale_matches_diffusers():
    from diffusers import DDPMScheduler

    from loraengine.core.schedule import NoiseSchedule

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=True).alphas_cumprod.double()
    ours = NoiseSchedule.ddpm("v_prediction", rescale_zero_terminal_snr=True).alphas_cumprod
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert float(ours[-1]) < 1e-12  # the last step is pure noise
    plain = NoiseSchedule.ddpm("v_prediction").alphas_cumprod
    assert float(ours[0]) == pytest.approx(float(plain[0]))
