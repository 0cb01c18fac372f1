"""Memory options of the node whose strategies are not built yet. They are in the
schema with the node's defaults; a non-default value is refused by config validation
("not implemented yet"), so nothing is silently ignored."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from loraengine.core.errors import NotImplementedYetError
from loraengine.core.specs import MemoryStrategySpec, PluginOptions


class OffloadOptions(PluginOptions):
    offloading: bool = Field(False, description="Keep frozen base weights on the CPU and "
                             "move them to the device block by block.")


class QuantizedBackwardOptions(PluginOptions):
    quantized_backward: bool = Field(False, description="Compute the input gradient with "
                                     "the quantized matmul (quantized models, dtype none).")


def _refuse(key: str):
    def apply(pipe: Any, memory: Any) -> None:
        raise NotImplementedYetError(f"memory.{key}: not implemented yet")

    return apply


SPECS = [
    MemoryStrategySpec("offloading", OffloadOptions, enabled=lambda c: c.memory.offloading,
                       apply=_refuse("offloading"), order=60),
    MemoryStrategySpec("quantized_backward", QuantizedBackwardOptions,
                       enabled=lambda c: c.memory.quantized_backward,
                       apply=_refuse("quantized_backward"), order=5),
]
