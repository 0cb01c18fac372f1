"""loraengine: train LoRA-family adapters on diffusion models.

Public API: ``train``, ``TrainResult``, ``apply``, ``hookimpl``, the spec records (with
the protocols their fields name: ``ExporterLimits``, ``SampleFn``, ``DataEncoder``),
what plugins are handed (``RunView`` in lifecycle hooks; ``NoiseSchedule`` in timestep
samplers, loss weightings and timestep-aware losses; ``BuildContext``,
``StrategyResult`` and the ``Recipe`` base while a run is assembled) and
``build_plugin_manager``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from loraengine.core.version import __version__

if TYPE_CHECKING:  # imported on first use below; named here for type checkers
    from loraengine.api import train
    from loraengine.core.plugins.assembly import BuildContext, Recipe, StrategyResult
    from loraengine.core.plugins.hookspecs import hookimpl
    from loraengine.core.plugins.run import RunView
    from loraengine.core.plugins.specs import (
        AdapterSpec,
        DataEncoder,
        ExporterLimits,
        ExporterSpec,
        LoggerSpec,
        LossSpec,
        LossWeightingSpec,
        LRSchedulerSpec,
        MemoryStrategySpec,
        ModelFamilySpec,
        NoOptions,
        OptimizerSpec,
        PluginOptions,
        RecipeSpec,
        SampleFn,
        SamplerSpec,
        TimestepSamplerSpec,
    )
    from loraengine.core.schedule import NoiseSchedule
    from loraengine.core.train.loop import TrainResult
    from loraengine.inference import apply
    from loraengine.plugins import build_plugin_manager

__all__ = [
    "AdapterSpec", "BuildContext", "DataEncoder", "ExporterLimits", "ExporterSpec",
    "LRSchedulerSpec", "LoggerSpec", "LossSpec", "LossWeightingSpec", "MemoryStrategySpec",
    "ModelFamilySpec", "NoOptions", "NoiseSchedule", "OptimizerSpec", "PluginOptions",
    "Recipe", "RecipeSpec", "RunView", "SampleFn", "SamplerSpec", "StrategyResult",
    "TimestepSamplerSpec", "TrainResult", "__version__", "apply", "build_plugin_manager",
    "hookimpl", "train",
]


#: Where each public name lives. Imported on first use, so that ``import loraengine``
#: stays light (the command line's Ctrl-C handling starts right after it).
_HOMES = {
    "train": "loraengine.api", "TrainResult": "loraengine.core.train.loop",
    "apply": "loraengine.inference", "build_plugin_manager": "loraengine.plugins",
    "hookimpl": "loraengine.core.plugins.hookspecs", "RunView": "loraengine.core.plugins.run",
    "NoiseSchedule": "loraengine.core.schedule",
    **dict.fromkeys(("BuildContext", "Recipe", "StrategyResult"),
                    "loraengine.core.plugins.assembly"),
    **dict.fromkeys(("AdapterSpec", "DataEncoder", "ExporterLimits", "ExporterSpec",
                     "LoggerSpec", "LossSpec", "LossWeightingSpec", "LRSchedulerSpec",
                     "MemoryStrategySpec", "ModelFamilySpec", "NoOptions", "OptimizerSpec",
                     "PluginOptions", "RecipeSpec", "SampleFn", "SamplerSpec",
                     "TimestepSamplerSpec"),
                    "loraengine.core.plugins.specs"),
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'loraengine' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
