"""Noise tweaks: noise offset and input perturbation, applied per sample right after its
noise is drawn (from the trainer's seeded noise generator).

- Noise offset (Guttenberg 2023, "Diffusion with offset noise"): ``ε ← ε + o·η``, with
  ``η ~ N(0, 1)`` one value per channel, broadcast over the sample; ``x_t`` and the
  target both use the offset noise. With ``noise_offset_random_strength`` the strength
  is ``o·u``, ``u ~ U[0, 1)``, drawn per sample (before ``η``).
- Input perturbation (Ning et al. 2023, "Input perturbation reduces exposure bias"):
  ``x_t`` is made from ``ε + γ·ξ``, ``ξ ~ N(0, I)``, while the target keeps ``ε``. With
  ``input_perturbation_random_strength`` the strength is ``γ·u`` (``u`` drawn first).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from loraengine.core.plugins.specs import PluginOptions, RecipeSpec
from loraengine.core.recipe import Recipe


class NoiseOffsetOptions(PluginOptions):
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="Strength of a "
                                "per-channel offset added to the noise (0: off).")
    noise_offset_random_strength: bool = Field(False, description="Scale the offset by "
                                               "a uniform draw per sample.")


class InputPerturbationOptions(PluginOptions):
    input_perturbation: float = Field(0.0, ge=0.0, le=1.0, description="Strength of extra "
                                      "noise in x_t only, not in the target (0: off).")
    input_perturbation_random_strength: bool = Field(False, description="Scale it by a "
                                                     "uniform draw per sample.")


class _PerSampleStrength(Recipe):
    """A noise recipe of some strength, scaled per sample by a uniform draw when
    ``random`` (the draw comes first from the sample's generator)."""

    def __init__(self, strength: float, random: bool):
        self.strength, self.random = strength, random

    def strength_for(self, generator: torch.Generator) -> float:
        if not self.random:
            return self.strength
        return self.strength * float(torch.rand((), generator=generator,
                                                dtype=torch.float64))


class NoiseOffset(_PerSampleStrength):
    name = "noise_offset"

    def perturb_noise(self, noise_xt: torch.Tensor, noise_target: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.strength_for(generator)
        channels = noise_xt.shape[0]
        offset = torch.randn(channels, generator=generator, dtype=noise_xt.dtype)
        offset = s * offset.reshape(channels, *([1] * (noise_xt.ndim - 1)))
        return noise_xt + offset, noise_target + offset


class InputPerturbation(_PerSampleStrength):
    name = "input_perturbation"

    def perturb_noise(self, noise_xt: torch.Tensor, noise_target: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.strength_for(generator)
        extra = torch.randn(noise_xt.shape, generator=generator, dtype=noise_xt.dtype)
        return noise_xt + s * extra, noise_target


def _noise_offset(config: Any, pipe: Any) -> NoiseOffset:
    r = config.recipe
    return NoiseOffset(r.noise_offset, r.noise_offset_random_strength)


def _input_perturbation(config: Any, pipe: Any) -> InputPerturbation:
    r = config.recipe
    return InputPerturbation(r.input_perturbation, r.input_perturbation_random_strength)


SPECS = [
    RecipeSpec("noise_offset", NoiseOffsetOptions, enabled=lambda c: c.recipe.noise_offset > 0,
               build=_noise_offset, order=10,
               description="Per-channel offset noise (recipe.noise_offset)."),
    RecipeSpec("input_perturbation", InputPerturbationOptions,
               enabled=lambda c: c.recipe.input_perturbation > 0, build=_input_perturbation,
               order=20, description="Extra noise in x_t only (recipe.input_perturbation)."),
]
