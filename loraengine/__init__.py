"""loraengine: train LoRA-family adapters on diffusion models.

Public API: ``train``, ``TrainResult``, ``hookimpl``, the spec records, and
``build_plugin_manager``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from loraengine.core.hookspecs import hookimpl  # noqa: E402
from loraengine.core.specs import (  # noqa: E402
    AdapterSpec,
    ExporterSpec,
    LossSpec,
    LRSchedulerSpec,
    MemoryStrategySpec,
    ModelFamilySpec,
    NoOptions,
    OptimizerSpec,
    PluginOptions,
)

__all__ = [
    "AdapterSpec", "ExporterSpec", "LRSchedulerSpec", "LossSpec", "MemoryStrategySpec",
    "ModelFamilySpec", "NoOptions", "OptimizerSpec", "PluginOptions", "TrainResult",
    "__version__", "build_plugin_manager", "hookimpl", "train",
]


def __getattr__(name: str):  # lazy: keep `import loraengine` light for plugin authors
    if name == "train":
        from loraengine.api import train

        return train
    if name == "TrainResult":
        from loraengine.core.trainer import TrainResult

        return TrainResult
    if name == "build_plugin_manager":
        from loraengine.core.manager import build_plugin_manager

        return build_plugin_manager
    raise AttributeError(name)
