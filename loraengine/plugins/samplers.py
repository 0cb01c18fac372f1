"""Built-in samplers: ``ddim`` (epsilon / v models) and ``euler`` (all three kinds).

Both integrate the probability-flow ODE from pure noise to a clean latent. For DDPM
schedules they work in the scaled coordinates ``x̄ = x/√ᾱ`` with ``σ = √((1−ᾱ)/ᾱ)``,
where the ODE is ``dx̄/dσ = ε̂``. With the same timesteps and ``eta = 0`` the two are the
same update (DDIM is that ODE's Euler method), so ``euler``'s own contribution is its
Karras σ spacing and the flow case, where it steps ``dx/dσ = v`` from σ = 1 to 0.

Timesteps are spaced "trailing" (the first step at the last training timestep); the
last step lands on the clean latent (ᾱ = 1, σ = 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.specs import PluginOptions, SamplerSpec
from loraengine.core.schedule import NoiseSchedule, shift_sigma

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DDIMOptions(PluginOptions):
    eta: float = Field(0.0, ge=0.0, le=1.0, description="Noise re-injected per step: 0 is "
                       "the deterministic DDIM, 1 matches DDPM's posterior variance.")


class EulerOptions(PluginOptions):
    karras: bool = Field(False, description="Space σ as Karras et al. (denser near the "
                         "clean end) instead of at evenly spaced training timesteps. "
                         "DDPM schedules only.")
    rho: float = Field(7.0, gt=0, description="The Karras spacing exponent.")



def row_noise(shape: torch.Size, generator: Any) -> torch.Tensor:
    """Fresh unit noise of ``shape``: row ``i`` from ``generator[i]`` when given one
    generator per image (so an image does not depend on what is sampled beside it)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32)
                            for g in generator])
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)

def trailing_timesteps(num_train: int, steps: int) -> list[int]:
    """``steps`` descending training timesteps, the first at ``num_train − 1``."""
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must be between 1 and {num_train}, got {steps}")
    return [round(num_train - i * num_train / steps) - 1 for i in range(steps)]


def split_prediction(pred: torch.Tensor, x_t: torch.Tensor, a: float, b: float, kind: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a model output, where ``x_t = a·x0 + b·ε``."""
    if kind == "epsilon":
        return (x_t - b * pred) / a, pred
    if kind == "v_prediction":  # v = a·ε − b·x0
        return a * x_t - b * pred, a * pred + b * x_t
    raise ValueError(f"cannot split a {kind!r} prediction")


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _alphas(schedule: NoiseSchedule) -> torch.Tensor:
    if schedule.alphas_cumprod is None:
        raise ValueError("this sampler needs a DDPM schedule (alphas_cumprod)")
    return schedule.alphas_cumprod.double().cpu()


def make_ddim(options: DDIMOptions) -> Callable[..., torch.Tensor]:
    eta = float(options.eta)

    def sample(model_fn: ModelFn, noise: torch.Tensor, schedule: NoiseSchedule, steps: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        ac = _alphas(schedule)
        ts = trailing_timesteps(int(ac.shape[0]), steps)
        x = noise.float()
        for i, t in enumerate(ts):
            a_t = float(ac[t])
            a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            pred = model_fn(x, _scalar(float(t))).float()
            x0, eps = split_prediction(pred, x, a_t ** 0.5, (1 - a_t) ** 0.5,
                                       schedule.prediction_type)
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
            x = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if sigma > 0:
                z = row_noise(x.shape, generator)
                x = x + sigma * z.to(x.device)
        return x

    return sample


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float
                  ) -> torch.Tensor:
    """σ from ``sigma_max`` down to ``sigma_min``, evenly spaced in σ^(1/ρ)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigma: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional training timestep of each σ, interpolating log σ linearly between
    neighbouring timesteps (``train_sigmas`` increases with the timestep)."""
    log_s, log_train = sigma.log(), train_sigmas.log()
    hi = torch.searchsorted(log_train, log_s).clamp(1, len(log_train) - 1)
    lo = hi - 1
    w = ((log_s - log_train[lo]) / (log_train[hi] - log_train[lo])).clamp(0, 1)
    return lo.double() + w


def make_euler(options: EulerOptions) -> Callable[..., torch.Tensor]:
    def sample(model_fn: ModelFn, noise: torch.Tensor, schedule: NoiseSchedule, steps: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        if schedule.is_flow:
            return _euler_flow(model_fn, noise, schedule, steps, options)
        ac = _alphas(schedule)
        train_sigmas = ((1 - ac) / ac).sqrt()
        if options.karras:
            sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), steps,
                                   options.rho)
            ts = sigma_to_timestep(sigmas, train_sigmas)
        else:
            ts = torch.tensor(trailing_timesteps(int(ac.shape[0]), steps), dtype=torch.float64)
            sigmas = train_sigmas[ts.long()]
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        x_bar = noise.float() * float((1 + sigmas[0] ** 2).sqrt())
        for i in range(steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            a = (1 + s * s) ** -0.5
            x_t = x_bar * a
            pred = model_fn(x_t, ts[i]).float()
            _, eps = split_prediction(pred, x_t, a, s * a, schedule.prediction_type)
            x_bar = x_bar + (s_next - s) * eps
        return x_bar

    return sample


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` values from σ = 1 to 0, evenly spaced before the shift."""
    return shift_sigma(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)


def _euler_flow(model_fn: ModelFn, noise: torch.Tensor, schedule: NoiseSchedule, steps: int,
                options: EulerOptions) -> torch.Tensor:
    # the model's one shift, or that of this latent size when it shifts by resolution
    sigmas = flow_sigmas(steps, schedule.shift_for(noise.shape[1:]))
    x = noise.float()
    for i in range(steps):
        v = model_fn(x, sigmas[i]).float()
        x = x + float(sigmas[i + 1] - sigmas[i]) * v  # x_σ = (1−σ)·x0 + σ·n, v = n − x0
    return x


SPECS = [
    SamplerSpec("ddim", make_ddim, DDIMOptions, prediction_types=("epsilon", "v_prediction"),
                default_for=("epsilon", "v_prediction"),
                description="DDIM (deterministic at eta 0) for epsilon and v models."),
    SamplerSpec("euler", make_euler, EulerOptions, default_for=("flow",),
                description="Euler steps of the probability-flow ODE; flow models too."),
]


@hookimpl
def loraengine_samplers() -> list[Any]:
    return list(SPECS)
