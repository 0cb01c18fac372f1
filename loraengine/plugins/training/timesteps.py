"""Timestep samplers: which noise levels training sees.

Each sampler draws ``u`` in [0, 1] from ``generator`` and maps it onto the model's
schedule: ``t = ⌊u·N⌋`` for DDPM schedules of ``N`` steps, and for flow models
``σ = s·u / (1 + (s − 1)·u)`` with the shift ``s`` (the family's unless ``shift`` is
given; a larger shift spends more steps at high noise, as SD3 and Flux train).

- ``family``: the model family's own distribution (the default; unchanged behaviour).
- ``uniform``: ``u ~ U[0, 1)``.
- ``logit_normal``: ``u = sigmoid(mean + std·z)``, ``z ~ N(0, 1)`` (SD3's default).
- ``mode``: ``u = 1 − v − scale·(cos²(πv/2) − 1 + v)``, ``v ~ U[0, 1)`` (SD3's
  "mode sampling with heavy tails"; ``scale`` > 0 favours the middle).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pydantic import Field

from loraengine.core.plugins.specs import NoOptions, PluginOptions, TimestepSamplerSpec
from loraengine.core.schedule import NoiseSchedule, shift_sigma

Draw = Callable[[torch.Generator], torch.Tensor]

#: The mode-sampling density stays positive (the map stays monotone) on this range.
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)


class LogitNormalOptions(PluginOptions):
    mean: float = Field(0.0, description="Mean of the normal before the sigmoid.")
    std: float = Field(1.0, gt=0, description="Standard deviation before the sigmoid.")


class ModeOptions(PluginOptions):
    scale: float = Field(1.29, ge=-1.0, le=MODE_SCALE_MAX, description="Heavy-tail "
                         "scale: 0 is uniform, positive favours mid noise levels.")


def to_timestep(u: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Map ``u`` in [0, 1] onto the schedule's timestep units (flow: shifted by the
    model's one shift, ``model.flow_shift``)."""
    if schedule.is_flow:
        return shift_sigma(u.double(), schedule.shift)
    n = schedule.num_timesteps
    return (u.double() * n).long().clamp(0, n - 1)


def uniform_u(generator: torch.Generator) -> torch.Tensor:
    return torch.rand((), generator=generator, dtype=torch.float64)


def logit_normal_u(mean: float, std: float) -> Callable[[torch.Generator], torch.Tensor]:
    def draw(generator: torch.Generator) -> torch.Tensor:
        z = torch.randn((), generator=generator, dtype=torch.float64)
        return torch.sigmoid(mean + std * z)

    return draw


def mode_u(scale: float) -> Callable[[torch.Generator], torch.Tensor]:
    def draw(generator: torch.Generator) -> torch.Tensor:
        v = torch.rand((), generator=generator, dtype=torch.float64)
        return 1.0 - v - scale * (torch.cos(math.pi / 2.0 * v) ** 2 - 1.0 + v)

    return draw


def _sampler(make_u: Callable[[PluginOptions], Draw]
             ) -> Callable[[PluginOptions, NoiseSchedule], Draw]:
    def factory(o: PluginOptions, schedule: NoiseSchedule) -> Draw:
        draw_u = make_u(o)
        return lambda generator: to_timestep(draw_u(generator), schedule)

    return factory


SPECS = [
    TimestepSamplerSpec("family", lambda o, schedule: schedule.sample_timestep, NoOptions,
                        "The model family's own timestep distribution (default)."),
    TimestepSamplerSpec("uniform", _sampler(lambda o: uniform_u), NoOptions,
                        "Uniform over the schedule (flow: then shifted)."),
    TimestepSamplerSpec("logit_normal", _sampler(
        lambda o: logit_normal_u(o.mean, o.std)),  # type: ignore[attr-defined]
        LogitNormalOptions, "sigmoid of a normal (mean, std)."),
    TimestepSamplerSpec("mode", _sampler(
        lambda o: mode_u(o.scale)),  # type: ignore[attr-defined]
        ModeOptions, "SD3's mode sampling with heavy tails (scale)."),
]
