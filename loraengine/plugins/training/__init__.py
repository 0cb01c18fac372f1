"""Built-in training recipes: timestep samplers, loss weightings, and the ``recipe``
section's tweaks (noise offset, input perturbation, EMA of the adapter weights)."""

from __future__ import annotations

from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.specs import LossWeightingSpec, RecipeSpec, TimestepSamplerSpec
from loraengine.plugins.training import ema, noise, timesteps, weighting


@hookimpl
def loraengine_timestep_samplers() -> list[TimestepSamplerSpec]:
    return list(timesteps.SPECS)


@hookimpl
def loraengine_loss_weightings() -> list[LossWeightingSpec]:
    return list(weighting.SPECS)


@hookimpl
def loraengine_recipes() -> list[RecipeSpec]:
    return [*noise.SPECS, ema.SPEC]
