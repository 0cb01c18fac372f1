"""Built-in losses: elementwise, reduced by the engine.

``scheduled_huber`` is the pseudo-Huber loss ``2c(√(d² + c²) − c)`` of the prediction
error ``d`` whose threshold ``c`` follows the timestep, as in "Improved diffusion
training with scheduled pseudo-Huber loss" (Khrapov et al. 2024): close to L2 (large
``c``) where the sample is nearly clean, close to L1 (small ``c``) where it is mostly
noise. With ``τ`` the noise level in [0, 1] (``t / num_timesteps`` for DDPM schedules,
σ for flow) and ``s = scale``:

- ``constant``:    c_t = s·c
- ``exponential``: c_t = s·c^τ           (s at τ = 0, s·c at τ = 1)
- ``snr``:         c_t = s·((1 − c) / (1 + σ_t)² + c),  σ_t = b/a where x_t = a·x0 + b·ε
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.specs import LossSpec, NoOptions, PluginOptions, TimestepLossFn
from loraengine.core.schedule import NoiseSchedule


class HuberOptions(PluginOptions):
    delta: float = Field(1.0, gt=0, description="Where the loss turns from quadratic to linear.")


class SmoothL1Options(PluginOptions):
    beta: float = Field(1.0, gt=0, description="Width of the quadratic region.")


class ScheduledHuberOptions(PluginOptions):
    c: float = Field(0.1, gt=0, le=1, description="Threshold at the noisiest timestep "
                     "(times scale).")
    schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr", description="How the threshold follows the timestep.")
    scale: float = Field(1.0, gt=0, description="Multiplies the threshold everywhere.")


def noise_level(t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The timestep as a fraction in [0, 1]: ``t / N`` for DDPM, σ for flow."""
    if schedule.is_flow:
        return t.double()
    return t.double() / schedule.num_timesteps


def huber_threshold(t: torch.Tensor, schedule: NoiseSchedule, o: ScheduledHuberOptions
                    ) -> torch.Tensor:
    """The per-sample threshold ``c_t`` (float64, shape of ``t``)."""
    if o.schedule == "constant":
        c = torch.full(t.shape, o.c, dtype=torch.float64, device=t.device)
    elif o.schedule == "exponential":
        c = torch.exp(math.log(o.c) * noise_level(t, schedule))
    else:
        a, b = schedule.coefficients(t)
        sigma = b / a.clamp_min(1e-12)  # noise-to-signal ratio; grows without bound near pure noise
        c = (1.0 - o.c) / (1.0 + sigma) ** 2 + o.c
    return (o.scale * c).to(t.device)


def scheduled_huber(o: ScheduledHuberOptions) -> TimestepLossFn:
    def loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
             schedule: NoiseSchedule) -> torch.Tensor:
        c = huber_threshold(t, schedule, o).to(pred.dtype)
        c = c.reshape(-1, *([1] * (pred.ndim - 1)))
        d2 = (pred - target) ** 2
        # 2c(√(d² + c²) − c) rewritten without the cancellation that loses small errors
        return 2.0 * c * d2 / (torch.sqrt(d2 + c * c) + c)

    return loss


@hookimpl
def loraengine_losses() -> list[LossSpec]:
    return [
        LossSpec("mse", lambda o: lambda p, t: F.mse_loss(p, t, reduction="none"), NoOptions,
                 "Mean squared error."),
        LossSpec("l1", lambda o: lambda p, t: F.l1_loss(p, t, reduction="none"), NoOptions,
                 "Mean absolute error."),
        LossSpec("huber", lambda o: lambda p, t: F.huber_loss(
            p, t, reduction="none", delta=o.delta), HuberOptions, "Huber loss."),
        LossSpec("smooth_l1", lambda o: lambda p, t: F.smooth_l1_loss(
            p, t, reduction="none", beta=o.beta), SmoothL1Options, "Smooth L1 loss."),
        LossSpec("scheduled_huber", scheduled_huber, ScheduledHuberOptions,
                 "Pseudo-Huber loss whose threshold follows the timestep.",
                 timestep_aware=True),
    ]
