"""What the built-in algorithm modules share when they read a saved module: its
``alpha``, the key test behind ``owns_keys`` and the checked copy of a saved tensor
into a fresh parameter."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch


def saved_alpha(tensors: Mapping[str, torch.Tensor], rank: int) -> float:
    """The module's saved ``alpha``; without one, ``rank`` (a scale of 1)."""
    return float(tensors["alpha"]) if "alpha" in tensors else float(rank)


def has_keys(*names: str) -> Callable[[Collection[str]], bool]:
    """``owns_keys`` for a format recognised by these keys all being present (given
    the key names, or the tensors by name)."""
    def owns_keys(keys: Collection[str]) -> bool:
        return all(name in keys for name in names)

    return owns_keys


def copy_saved(param: torch.Tensor, saved: torch.Tensor, mismatch: str) -> None:
    """Copy ``saved`` into ``param`` (reshaped, as fp32); raise ``ValueError(mismatch)``
    when the value counts differ."""
    if saved.numel() != param.numel():
        raise ValueError(mismatch)
    with torch.no_grad():
        param.copy_(saved.reshape(param.shape).float())
