"""Training tweaks the trainer calls at fixed points, and their wiring into a pipeline.

A ``Recipe`` (built by a ``RecipeSpec`` plugin from the ``recipe`` config section) may
change each sample's noise right after it is drawn, act after every optimizer step,
and offer other versions of the adapter to save next to it
(``<name>.<suffix>.safetensors``). The timestep sampler and the loss weighting the
config names are built here as well, so the orchestrator only calls ``install_recipes``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch


class Recipe:
    """Base of what a ``RecipeSpec.build`` returns; every hook defaults to doing nothing."""

    name: str = ""

    def perturb_noise(self, noise_xt: torch.Tensor, noise_target: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Change one sample's noise (no batch dimension). Returns the noise that makes
        ``x_t`` and the noise the target is built from. Draw only from ``generator``."""
        return noise_xt, noise_target

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step that was not skipped."""

    def variants(self) -> dict[str, Callable[[], AbstractContextManager[None]]]:
        """Other versions of the adapter to save: file suffix -> a context manager during
        which the adapter network holds that version's weights."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume this recipe exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


def install_recipes(pipe: Any) -> None:
    """Build the configured timestep sampler, loss weighting and enabled recipes onto
    ``pipe`` (a ``Pipeline``)."""
    config, reg = pipe.config, pipe.host.registry
    schedule = pipe.loaded.schedule
    sampler_cfg = getattr(config, "timestep_sampler", None)
    if sampler_cfg is not None:
        spec = reg.get("timestep_sampler", sampler_cfg.name)
        pipe.timestep_sampler = spec.factory(sampler_cfg, schedule)
    weighting_cfg = getattr(config, "loss_weighting", None)
    if weighting_cfg is not None:
        spec = reg.get("loss_weighting", weighting_cfg.name)
        pipe.loss_weighting = spec.factory(weighting_cfg, schedule, config.loss.target)
    pipe.loss_timestep_aware = bool(reg.get("loss", config.loss.name).timestep_aware)
    if getattr(config, "recipe", None) is not None:
        pipe.recipes = [spec.build(config, pipe)
                        for spec in sorted(reg.specs("recipe"), key=lambda s: s.order)
                        if spec.enabled(config)]
