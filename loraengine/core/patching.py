"""Replacing a module's ``forward`` for a while, with an undo that puts back exactly what
was there (an instance-level forward someone else installed, or none)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn

#: ``make(current_forward)`` returns the new forward, a function taking the module first.
ForwardMaker = Callable[[Callable[..., Any]], Callable[..., Any]]


def patch_forward(module: nn.Module, make: ForwardMaker) -> Callable[[], None]:
    """Replace ``module.forward`` by ``make(current forward)``, bound to ``module``;
    return the undo. Patches nest: undo them in reverse order."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = types.MethodType(make(module.forward), module)

    def undo() -> None:
        if had_own:
            module.__dict__["forward"] = previous
        else:
            module.__dict__.pop("forward", None)

    return undo
