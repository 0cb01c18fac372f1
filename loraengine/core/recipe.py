"""Training tweaks the trainer calls at fixed points, and their wiring into a pipeline.

A ``Recipe`` (its base lives with the plugin contracts, ``core/plugins/assembly.py``,
and is re-exported here) (built by a ``RecipeSpec`` plugin from the ``recipe`` config section) may
change each sample's noise right after it is drawn, act after every optimizer step,
and offer other versions of the adapter to save next to it
(``<name>.<suffix>.safetensors``). The timestep sampler and the loss weighting the
config names are built here as well (``build_recipes``), before the pipeline is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loraengine.core.plugins.assembly import BuildContext, Recipe
from loraengine.core.plugins.registry import Registry


@dataclass(frozen=True)
class TrainingRecipes:
    """The configured timestep sampler, loss weighting and enabled recipes, built
    before the pipeline is (``None``/empty keep the model family's own behaviour)."""

    timestep_sampler: Callable[[torch.Generator], torch.Tensor] | None = None
    loss_weighting: Callable[[torch.Tensor], torch.Tensor] | None = None
    loss_timestep_aware: bool = False
    recipes: list[Recipe] = field(default_factory=list)
    #: The record name each of ``recipes`` was built from (what errors name).
    recipe_names: tuple[str, ...] = ()


#: What the trainer calls on a built recipe (``Recipe`` has them all).
_RECIPE_HOOKS = ("perturb_noise", "after_optimizer_step", "variants", "state_dict",
                "load_state_dict")


def _made(made: object, needs: str) -> None:
    """A ``TypeError`` (which the surrounding ``blame`` names the plugin for) when a
    factory made something that is not a function: ``needs`` says what it should be."""
    if not callable(made):
        got = "None" if made is None else f"a {type(made).__name__}"
        raise TypeError(f"it returned {got}, not a function; the factory returns {needs}")


def build_recipes(ctx: BuildContext, registry: Registry) -> TrainingRecipes:
    """Build what the ``timestep_sampler``, ``loss_weighting``, ``loss`` and ``recipe``
    sections ask for, on the model and adapters of ``ctx``."""
    config = ctx.config
    schedule = ctx.loaded.schedule
    sampler = weighting = None
    sampler_cfg = getattr(config, "timestep_sampler", None)
    if sampler_cfg is not None:
        with registry.blame("timestep_sampler", sampler_cfg.name, "factory"):
            sampler = registry.get("timestep_sampler", sampler_cfg.name).factory(
                sampler_cfg, schedule)
            _made(sampler, "draw(generator) -> one timestep (a 0-dim tensor)")
    weighting_cfg = getattr(config, "loss_weighting", None)
    if weighting_cfg is not None:
        with registry.blame("loss_weighting", weighting_cfg.name, "factory"):
            weighting = registry.get("loss_weighting", weighting_cfg.name).factory(
                weighting_cfg, schedule, config.loss.target)
            _made(weighting, "weights(t) -> a tensor [B] of per-sample loss weights")
    recipes: list[Recipe] = []
    names: list[str] = []
    if getattr(config, "recipe", None) is not None:
        for spec in sorted(registry.specs("recipe"), key=lambda s: s.order):
            with registry.blame("recipe", spec.name, "enabled"):
                wanted = spec.enabled(config)
            if wanted:
                with registry.blame("recipe", spec.name, "build"):
                    recipe = spec.build(config, ctx)
                    missing = [h for h in _RECIPE_HOOKS
                               if not callable(getattr(recipe, h, None))]
                    if missing:
                        got = "None" if recipe is None else f"a {type(recipe).__name__}"
                        raise TypeError(f"it returned {got}, which has no "
                                        f"{', '.join(missing)}; build returns a "
                                        f"loraengine.Recipe")
                recipes.append(recipe)
                names.append(spec.name)
    return TrainingRecipes(
        timestep_sampler=sampler, loss_weighting=weighting,
        loss_timestep_aware=bool(registry.get("loss", config.loss.name).timestep_aware),
        recipes=recipes, recipe_names=tuple(names))


__all__ = ["Recipe", "TrainingRecipes", "build_recipes"]
