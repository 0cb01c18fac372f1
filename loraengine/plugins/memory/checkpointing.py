"""Gradient checkpointing at a chosen depth.

Depth 1 wraps each top-level block of the denoiser (each down/mid/up block, each
transformer block); each further level wraps the children of the level above. A
wrapped block keeps only its inputs during the forward pass and recomputes its
activations during the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraengine.core.model import top_level_blocks
from loraengine.core.patching import patch_forward
from loraengine.core.plugins.assembly import BuildContext, StrategyResult
from loraengine.core.plugins.specs import MemoryStrategySpec, PluginOptions


class CheckpointOptions(PluginOptions):
    gradient_checkpointing: bool = Field(True, description="Recompute block activations "
                                         "in the backward pass to save memory.")
    checkpoint_depth: int = Field(1, ge=1, le=5, description="1 wraps each top-level "
                                  "block; each further level wraps the children of the "
                                  "level above.")


def blocks_at_depth(top: list[nn.Module], depth: int) -> list[nn.Module]:
    """The modules wrapped at ``depth``: ``top`` at 1, then the children of the level
    above (module lists opened up). A layer without children cannot be split further
    and stays itself at deeper levels; modules without parameters are left out."""
    level = list(top)
    for _ in range(depth - 1):
        nxt: list[nn.Module] = []
        for mod in level:
            children = top_level_blocks(mod)
            nxt.extend(children if children else [mod])
        level = nxt
    return [m for m in level if any(True for _ in m.parameters())]


def _wrap(block: nn.Module) -> Callable[[], None]:
    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(_self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                # preserve_rng_state off: the base runs in eval mode and draws no random
                # numbers
                return checkpoint(inner, *args, use_reentrant=False,
                                  preserve_rng_state=False, **kwargs)
            return inner(*args, **kwargs)

        return forward

    return patch_forward(block, make)


def apply(ctx: BuildContext, memory: Any) -> StrategyResult:
    top = ctx.loaded.blocks or top_level_blocks(ctx.model)
    undos = [_wrap(b) for b in blocks_at_depth(top, memory.checkpoint_depth)]

    def undo_all() -> None:
        for u in reversed(undos):
            u()

    return StrategyResult(undo=undo_all)


SPEC = MemoryStrategySpec("gradient_checkpointing", CheckpointOptions,
                          enabled=lambda c: c.memory.gradient_checkpointing, apply=apply, order=50,
                          describe=lambda c: f"gradient_checkpointing(depth "
                                             f"{c.memory.checkpoint_depth})",
                          description="Gradient checkpointing at checkpoint_depth.")
