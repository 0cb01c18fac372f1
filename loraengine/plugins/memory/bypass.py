"""Bypass mode: adapters run as forward hooks on the untouched base layers."""

from __future__ import annotations

from pydantic import BaseModel, Field

from loraengine.core.plugins.assembly import BuildContext, StrategyResult
from loraengine.core.plugins.specs import MemoryStrategySpec, PluginOptions


class BypassOptions(PluginOptions):
    bypass_mode: bool = Field(False, description="Apply adapters as forward hooks "
                              "(y = f(x) + h(x)); base weights are never read for "
                              "adaptation nor modified.")


def apply(ctx: BuildContext, memory: BaseModel) -> StrategyResult:
    ctx.network.attach("bypass")
    return StrategyResult(attach_mode="bypass")


SPEC = MemoryStrategySpec("bypass_mode", BypassOptions, enabled=lambda c: c.memory.bypass_mode,
                          apply=apply, order=10, description="Adapters as forward hooks.")
