"""What the built-in algorithm modules share: a few tensor operations (a pointwise
channel map, the Tucker product, the base layer's own forward) and, for reading a saved
module, its ``alpha``, the key test behind ``owns_keys`` and the checked copy of a saved
tensor into a fresh parameter."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: The functional convolution for a weight (or batched input) of this many dimensions.
CONV_BY_NDIM = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply a ``[o, i(,1…)]`` weight on the channel axis (last for 2-D weights, else
    dim 1 through the convolution of the weight's rank)."""
    if weight.ndim == 2:
        return F.linear(x, weight)
    return CONV_BY_NDIM[weight.ndim](x, weight)


def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``[p, q, *k]`` from a core ``t`` ``[r, r, *k]``, ``wa`` ``[r, p]`` and ``wb``
    ``[r, q]``: ``Σ t[i,j]·wa[i,:]ᵀ·wb[j,:]``."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


def base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base layer's own operation, skipping its hooks and any patched forward (so
    a quantized or otherwise custom layer runs its own code)."""
    out: torch.Tensor = type(base).forward(base, x)  # forward is typed Any on nn.Module
    return out


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
