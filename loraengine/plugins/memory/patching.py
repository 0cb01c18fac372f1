"""Replacing a module's ``forward`` and putting it back: what checkpointing and
offloading wrap blocks with (a wrapped forward, unlike a module hook, also runs when
checkpointing recomputes a block by calling its forward directly)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn


def patch_forward(module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]
                  ) -> Callable[[], None]:
    """Replace ``module.forward`` by ``make(current forward)`` (a function taking the
    module first); return the undo, which restores the forward it found."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = types.MethodType(make(module.forward), module)

    def undo() -> None:
        if had_own:
            module.__dict__["forward"] = previous
        else:
            module.__dict__.pop("forward", None)

    return undo
