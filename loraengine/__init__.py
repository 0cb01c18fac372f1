"""loraengine: train LoRA-family adapters on diffusion models.

Public API: ``train``, ``TrainResult``, ``apply``, ``hookimpl``, the spec records, what
plugins are handed (``RunView`` in lifecycle hooks; ``BuildContext``, ``StrategyResult``
and the ``Recipe`` base while a run is assembled) and ``build_plugin_manager``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraengine.core.plugins.assembly import BuildContext, Recipe, StrategyResult
from loraengine.core.plugins.hookspecs import hookimpl
from loraengine.core.plugins.run import RunView
from loraengine.core.plugins.specs import (
    AdapterSpec,
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
    TimestepSamplerSpec,
)
from loraengine.core.version import __version__

if TYPE_CHECKING:  # imported on first use below; named here for type checkers
    from loraengine.api import train
    from loraengine.core.train.loop import TrainResult
    from loraengine.inference import apply
    from loraengine.plugins import build_plugin_manager

__all__ = [
    "AdapterSpec", "BuildContext", "ExporterSpec", "LRSchedulerSpec", "LoggerSpec", "LossSpec", "LossWeightingSpec",
    "MemoryStrategySpec", "ModelFamilySpec", "NoOptions", "OptimizerSpec", "PluginOptions",
    "Recipe", "RecipeSpec", "RunView", "StrategyResult", "TimestepSamplerSpec", "TrainResult",
    "__version__", "apply", "build_plugin_manager", "hookimpl", "train",
]


def __getattr__(name: str) -> object:  # lazy: keep `import loraengine` light for plugin authors
    if name == "train":
        from loraengine.api import train

        return train
    if name == "TrainResult":
        from loraengine.core.train.loop import TrainResult

        return TrainResult
    if name == "apply":
        from loraengine.inference import apply

        return apply
    if name == "build_plugin_manager":
        from loraengine.plugins import build_plugin_manager

        return build_plugin_manager
    raise AttributeError(name)
