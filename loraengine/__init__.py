"""loraengine: train LoRA-family adapters on diffusion models.

Public API: ``train``, ``TrainResult``, ``hookimpl``, the spec records, and
``build_plugin_manager``.
"""

from __future__ import annotations

from loraengine.core.plugins.hookspecs import hookimpl  # noqa: E402
from loraengine.core.plugins.specs import (  # noqa: E402
    AdapterSpec,
    ExporterSpec,
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
from loraengine.core.version import __version__  # noqa: E402

__all__ = [
    "AdapterSpec", "ExporterSpec", "LRSchedulerSpec", "LossSpec", "LossWeightingSpec",
    "MemoryStrategySpec", "ModelFamilySpec", "NoOptions", "OptimizerSpec", "PluginOptions",
    "RecipeSpec", "TimestepSamplerSpec", "TrainResult",
    "__version__", "apply", "build_plugin_manager", "hookimpl", "train",
]


def __getattr__(name: str):  # lazy: keep `import loraengine` light for plugin authors
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
