"""LoRA's side path as one autograd node per layer, with its backward written out.

Autograd's own graph of ``y = base(x) + up(down(x))·s`` holds five or six nodes per
layer (the down and up products, the scale, the add, casts), each with its own buffers
and bookkeeping; on a model with a few hundred small layers that overhead is a large
share of the step. The functions here do the same arithmetic in one node:

- forward: the base op (weight mode) or the given base output (bypass), then the
  low-rank product added in place: ``y += s · up · (down ⋆ x)`` (``⋆`` the base's own
  operation: a matrix product, or its convolution with stride, padding and dilation);
- backward, from ``g = dL/dy``: ``dUp = s · gᵀh``, ``dh = s · g·up``,
  ``dDown = dhᵀ ⋆ x`` (the convolution's weight gradient), ``dx = g·W + dhᵀ·down``
  (the transposed operations). Only ``x`` and the rank-r ``h`` are kept.

They apply when the base layer is frozen (weight and bias need no gradient) and its
convolution pads with zeros by numbers (not ``"same"``/``"valid"`` strings, not reflect);
otherwise LoRA keeps the plain autograd route. The up factor of a convolution is 1×1,
so it is a matrix product over the channel axis of the flattened output.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from loraengine.core.adapter import bias_of, weight_of
from loraengine.plugins.adapters.common import CONV_BY_NDIM


def fusable(base: nn.Module) -> bool:
    """Whether the fused functions can run ``base``: a Linear, or a zero-padded,
    ungrouped Conv1d/2d/3d with numeric padding, whose weight and bias are frozen."""
    weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.requires_grad:
        return False
    if isinstance(bias, torch.Tensor) and bias.requires_grad:
        return False
    if isinstance(base, nn.Linear):
        return True
    return (isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and base.groups == 1
            and base.padding_mode == "zeros" and not isinstance(base.padding, str))


class _LinearLoRA(torch.autograd.Function):
    """``y = (x·Wᵀ + b  or  base_out) + s·(x·downᵀ)·upᵀ`` over the last axis."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                scale: float, weight: torch.Tensor | None, bias: torch.Tensor | None,
                base_out: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        # The rank-r intermediate is kept as hᵀ [r, N]: this CPU's BLAS runs every thin
        # product below two to six times faster with the N axis last than with h [N, r].
        h_t = torch.mm(down, x2.t())
        if base_out is None:
            assert weight is not None
            y = (torch.mm(x2, weight.t()) if bias is None
                 else torch.addmm(bias, x2, weight.t()))
            y.addmm_(h_t.t(), up.t(), alpha=scale)
        else:
            y = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h_t.t(), up.t(),
                            alpha=scale)
        ctx.save_for_backward(x2, h_t, down, up, weight)
        ctx.scale, ctx.lead = scale, lead
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h_t, down, up, weight = ctx.saved_tensors
        s = ctx.scale
        need_x, need_down, need_up = ctx.needs_input_grad[:3]
        need_base = ctx.needs_input_grad[6]
        g2 = grad.reshape(-1, grad.shape[-1])
        d_up = torch.mm(h_t, g2).mul_(s).t() if need_up else None  # (hᵀg)ᵀ = gᵀh
        d_down = dx = None
        if need_down or need_x:
            dh_t = torch.mm((up * s).t(), g2.t())  # (g·up·s)ᵀ, [r, N]
            if need_down:
                d_down = torch.mm(dh_t, x2)
            if need_x:
                dx = (torch.mm(g2, weight).addmm_(dh_t.t(), down) if weight is not None
                      else torch.mm(dh_t.t(), down))
                dx = dx.reshape(*ctx.lead, dx.shape[-1])
        d_base = grad if need_base else None
        return dx, d_down, d_up, None, None, None, d_base


class _ConvLoRA(torch.autograd.Function):
    """``y = (conv(x, W) + b  or  base_out) + s·up·conv(x, down)``, ``up`` a 1×1 map
    applied as a matrix product over the channel axis."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                scale: float, weight: torch.Tensor | None, bias: torch.Tensor | None,
                base_out: torch.Tensor | None, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
        conv = CONV_BY_NDIM[down.ndim]
        h = conv(x, down, None, stride, padding, dilation)  # [n, r, *spatial]
        n, r = h.shape[0], h.shape[1]
        up2 = up.reshape(up.shape[0], r)
        h3, lift = h.reshape(n, r, -1), up2.expand(n, *up2.shape)  # lift: [n, out, r]
        if base_out is None:
            assert weight is not None
            y = conv(x, weight, bias, stride, padding, dilation)
            if y.is_contiguous():
                y.view(n, y.shape[1], -1).baddbmm_(lift, h3, alpha=scale)
            else:
                y = torch.baddbmm(y.reshape(n, y.shape[1], -1), lift, h3,
                                  alpha=scale).view(y.shape)
        else:
            y = torch.baddbmm(base_out.reshape(n, base_out.shape[1], -1), lift, h3,
                              alpha=scale).view(base_out.shape)
        ctx.save_for_backward(x, h, down, up2, weight)
        ctx.scale, ctx.conv, ctx.up_shape = scale, (stride, padding, dilation), up.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, down, up2, weight = ctx.saved_tensors
        s = ctx.scale
        stride, padding, dilation = ctx.conv
        need_x, need_down, need_up = ctx.needs_input_grad[:3]
        need_base = ctx.needs_input_grad[6]
        n, r = h.shape[0], h.shape[1]
        g3 = grad.reshape(n, grad.shape[1], -1)  # [n, out, L]
        h3 = h.reshape(n, r, -1)
        d_up = None
        if need_up:
            # Σₙ (h·gᵀ)ᵀ = Σₙ g·hᵀ, [out, r]: the faster order of the two here
            d_up = torch.matmul(h3, g3.transpose(1, 2)).sum(0).mul_(s).t()
            d_up = d_up.reshape(ctx.up_shape)
        dx = d_down = None
        if need_x or need_down:
            dh = torch.matmul((up2 * s).t(), g3).view(h.shape)  # [n, r, *spatial]
            zeros = [0] * len(stride)
            dx, d_down, _ = torch.ops.aten.convolution_backward(
                dh, x, down, None, stride, padding, dilation, False, zeros, 1,
                (need_x, need_down, False))
            if need_x and weight is not None:
                dx_base = torch.ops.aten.convolution_backward(
                    grad, x, weight, None, stride, padding, dilation, False, zeros, 1,
                    (True, False, False))[0]
                dx = dx_base.add_(dx)
        d_base = grad if need_base else None
        return dx, d_down, d_up, None, None, None, d_base, None, None, None


def lora_forward(base: nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                 scale: float, base_out: torch.Tensor | None = None) -> torch.Tensor:
    """The adapted output of ``base`` on ``x``: the base op with its own weight and bias
    (or ``base_out``, the base output already computed) plus ``scale·up·down(x)``, in one
    autograd node. ``fusable(base)`` must hold."""
    weight = None if base_out is not None else weight_of(base)
    bias = None if base_out is not None else bias_of(base)
    dt = x.dtype
    down, up = down.to(dt), up.to(dt)  # no-ops when the factors are in the compute dtype
    if isinstance(base, nn.Linear):
        out: torch.Tensor = _LinearLoRA.apply(x, down, up, scale, weight, bias, base_out)
        return out
    conv = cast(nn.modules.conv._ConvNd, base)
    out = _ConvLoRA.apply(x, down, up, scale, weight, bias, base_out, tuple(conv.stride),
                          tuple(cast("tuple[int, ...]", conv.padding)), tuple(conv.dilation))
    return out
