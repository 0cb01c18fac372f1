"""What the built-in algorithm modules share: a few tensor operations (a pointwise
channel map, the Tucker product, the base layer's own forward), the rank beyond which a
low-rank update gains nothing and, for reading a saved
module, its ``alpha``, the key test behind ``owns_keys`` and the checked copy of a saved
tensor into a fresh parameter."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from loraengine.core.adapter import AdapterLayer, layer_op, weight_of

#: The functional convolution for a weight (or batched input) of this many dimensions.
CONV_BY_NDIM = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}

#: A convolution's stride, padding and dilation.
ConvArgs = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def conv_args(base: nn.Module) -> ConvArgs | None:
    """A convolution's stride, padding and dilation as tuples; ``None`` for a Linear."""
    if isinstance(base, nn.Linear):
        return None
    c = cast(nn.modules.conv._ConvNd, base)
    return (tuple(c.stride), tuple(cast("tuple[int, ...]", c.padding)), tuple(c.dilation))


def update_width(base: nn.Module) -> int | None:
    """The largest rank an update of ``base``'s weight can have: min(out, in) for a
    Linear, min(out, in/groups · kernel) for a convolution (its kernel flattened into
    the columns); ``None`` for another kind of layer. Read from the layer's settings,
    not its weight, which a memory strategy may have moved away."""
    if isinstance(base, nn.Linear):
        return min(int(base.out_features), int(base.in_features))
    if isinstance(base, nn.modules.conv._ConvNd):
        fan_in = int(base.in_channels) // int(base.groups) * math.prod(base.kernel_size)
        return min(int(base.out_channels), fan_in)
    return None


def low_rank_bound(adapter: AdapterLayer) -> int | None:
    """``AdapterSpec.full_rank`` of an algorithm whose update holds a free low-rank
    product ``up·down`` of the adapter's rank (LoRA, GLoRA's ``B``) or one free
    factor of it (each LoHa half): at the layer's :func:`update_width` that product
    is any matrix of the weight's shape, so every update is reachable."""
    return update_width(adapter.base)


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


class _InputFreeConv(torch.autograd.Function):
    """A convolution by a frozen weight that keeps nothing of its input for backward:
    dL/dx needs only the weight and the input's shape (autograd's own convolution
    keeps the input, for a weight gradient that is not wanted here)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int
                ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return CONV_BY_NDIM[weight.ndim](x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        like = grad.new_empty(1).expand(shape)  # only its shape is read
        dx = torch.ops.aten.convolution_backward(
            grad, like, weight, None, stride, padding, dilation, False,
            [0] * len(stride), groups, (True, False, False))[0]
        return dx, None, None, None, None, None


def frozen_weight_op(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base``'s operation with its own weight and no bias. For a convolution whose
    weight is frozen (zero padding, numeric padding), backward keeps no copy of ``x``;
    otherwise the plain operation."""
    weight = base.weight
    if (isinstance(base, nn.modules.conv._ConvNd) and isinstance(weight, torch.Tensor)
            and not weight.requires_grad and base.padding_mode == "zeros"
            and not isinstance(base.padding, str) and torch.is_grad_enabled()):
        out: torch.Tensor = _InputFreeConv.apply(
            x, weight.to(x.dtype), tuple(base.stride), tuple(base.padding),
            tuple(base.dilation), base.groups)
        return out
    return layer_op(base, x, weight_of(base), None)
