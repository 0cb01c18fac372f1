"""LoRA's side path as one autograd node per layer, with its backward written out.

Autograd's own graph of ``y = base(x) + up(down(x))·s`` holds four or five more nodes
per layer than the base op (the down and up products, the scale, the add, casts), each with its own buffers
and bookkeeping; on a model with a few hundred small layers that overhead is a large
share of the step. The functions here do the same arithmetic in one node:

- forward: from the base output (autograd's own base op), the low-rank product
  added: ``y = base_out + s · up · (down ⋆ x)`` (``⋆`` the base's own
  operation: a matrix product, or its convolution with stride, padding and dilation),
  ``h = down ⋆ x`` kept rank axis first (``[r, N]`` for a Linear), the layout in which
  this CPU's thin matrix products run fastest (two to six times faster than ``[N, r]``);
- backward, from ``g = dL/dy``: ``dUp = s · gᵀh``, ``dh = s · g·up``,
  ``dDown = dhᵀ ⋆ x`` (the convolution's weight gradient) and the side path's share of
  ``dx``, ``dhᵀ·down`` (the transposed operation; the base op's share is autograd's).
  Only ``x`` and the rank-r ``h`` are kept.

In bypass mode the base op is autograd's own (the hook gets its output). In weight mode
a Linear's base op joins the node (``_LinearBaseLoRA``): backward writes ``dx`` once,
the side path's share added into the base's (an activation-sized sum fewer per layer),
and forward adds the side path into the base product's output in place where nothing
watches the operators. Where something does (a dispatch mode: selective checkpointing
may keep a product's output as the very tensor, so it must not change afterwards; FLOP
counting; ``torch.compile`` tracing) forward writes the sum to a new tensor, with the
same values. Bypass mode sums the two shares of ``dx`` through autograd instead, so
the modes agree to float rounding (not bit for bit where an input feeds several
adapted layers: the shares are added in another order).

They apply when the base layer is frozen (weight and bias need no gradient) and its
convolution pads with zeros by numbers (not ``"same"``/``"valid"`` strings, not reflect);
otherwise LoRA keeps the plain autograd route. The up factor of a convolution is 1×1,
so it is a matrix product over the channel axis of the flattened output.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from loraengine.core.adapter import bias_of, layer_op, weight_of
from loraengine.plugins.adapters.common import CONV_BY_NDIM


def fusable_kind(base: nn.Module) -> bool:
    """Whether ``base`` is a layer the fused functions can run at all: a Linear, or a
    zero-padded, ungrouped Conv1d/2d/3d with numeric padding (type and geometry only)."""
    if isinstance(base, nn.Linear):
        return True
    return (isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and base.groups == 1
            and base.padding_mode == "zeros" and not isinstance(base.padding, str))


def frozen(base: nn.Module) -> bool:
    """Whether ``base`` has a weight and neither it nor its bias needs a gradient."""
    weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.requires_grad:
        return False
    return not (isinstance(bias, torch.Tensor) and bias.requires_grad)


def fusable(base: nn.Module) -> bool:
    """Whether the fused functions can run ``base``: ``fusable_kind`` and ``frozen``."""
    return fusable_kind(base) and frozen(base)


class _LinearLoRA(torch.autograd.Function):
    """``y = base_out + s·(x·downᵀ)·upᵀ`` over the last axis."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                scale: float, base_out: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        # The rank-r intermediate is kept as hᵀ [r, N]: this CPU's BLAS runs every thin
        # product below two to six times faster with the N axis last than with h [N, r].
        h_t = torch.mm(down, x2.t())
        y = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h_t.t(), up.t(),
                        alpha=scale)
        ctx.save_for_backward(x2, h_t, down, up)
        ctx.scale, ctx.lead = scale, lead
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h_t, down, up = ctx.saved_tensors
        s = ctx.scale
        need_x, need_down, need_up, _, need_base = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        d_up = torch.mm(h_t, g2).mul_(s).t() if need_up else None  # (hᵀg)ᵀ = gᵀh
        d_down = dx = None
        if need_down or need_x:
            dh_t = torch.mm((up * s).t(), g2.t())  # (g·up·s)ᵀ, [r, N]
            if need_down:
                d_down = torch.mm(dh_t, x2)
            if need_x:
                # written into a tensor of the input's shape (not a reshaped view of the
                # product's): autograd then adds the base op's share into it in place,
                # where a view would make it allocate a fresh sum (dx is activation-sized)
                dx = x2.new_empty((*ctx.lead, x2.shape[-1]))
                torch.mm(dh_t.t(), down, out=dx.view(-1, x2.shape[-1]))
        return dx, d_down, d_up, None, grad if need_base else None


class _LinearBaseLoRA(torch.autograd.Function):
    """``y = x·Wᵀ + b + s·(x·downᵀ)·upᵀ`` with the frozen ``W``, ``b`` inside: the side
    path accumulates into the base product's output, and backward writes ``dx`` once
    (``g·W``, then ``dhᵀ·down`` added into it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                down: torch.Tensor, up: torch.Tensor, scale: float, in_place: bool
                ) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        h_t = torch.mm(down, x2.t())  # kept rank axis first, as in _LinearLoRA
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        if in_place:
            y.addmm_(h_t.t(), up.t(), alpha=scale)
        else:  # the same product and sum, into a new tensor
            y = torch.addmm(y, h_t.t(), up.t(), alpha=scale)
        ctx.save_for_backward(x2, h_t, down, up, weight)
        ctx.scale, ctx.lead = scale, lead
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h_t, down, up, weight = ctx.saved_tensors
        s = ctx.scale
        need_x, _, _, need_down, need_up = ctx.needs_input_grad[:5]
        g2 = grad.reshape(-1, grad.shape[-1])
        d_up = torch.mm(h_t, g2).mul_(s).t() if need_up else None
        d_down = dx = None
        if need_down or need_x:
            dh_t = torch.mm((up * s).t(), g2.t())
            if need_down:
                d_down = torch.mm(dh_t, x2)
            if need_x:
                dx = x2.new_empty((*ctx.lead, x2.shape[-1]))  # not a view: see _LinearLoRA
                dx2 = dx.view(-1, x2.shape[-1])
                torch.mm(g2, weight, out=dx2)
                dx2.addmm_(dh_t.t(), down)
        return dx, None, None, d_down, d_up, None, None


def _unwatched() -> bool:
    """Whether forward may add in place (see the module doc): no dispatch or function
    mode is active (selective checkpointing enters its dispatch mode from a function
    mode, around each product) and nothing is being compiled."""
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._len_torch_function_stack() == 0)


class _ConvLoRA(torch.autograd.Function):
    """``y = base_out + s·up·conv(x, down)``, ``up`` a 1×1 map applied as a matrix
    product over the channel axis."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                scale: float, base_out: torch.Tensor, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
        h = CONV_BY_NDIM[down.ndim](x, down, None, stride, padding, dilation)
        n, r = h.shape[0], h.shape[1]  # h: [n, r, *spatial]
        up2 = up.reshape(up.shape[0], r)
        lift = up2.expand(n, *up2.shape)  # [n, out, r]
        y = torch.baddbmm(base_out.reshape(n, base_out.shape[1], -1), lift,
                          h.reshape(n, r, -1), alpha=scale).view(base_out.shape)
        ctx.save_for_backward(x, h, down, up2)
        ctx.scale, ctx.conv, ctx.up_shape = scale, (stride, padding, dilation), up.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, down, up2 = ctx.saved_tensors
        s = ctx.scale
        stride, padding, dilation = ctx.conv
        need_x, need_down, need_up, _, need_base = ctx.needs_input_grad[:5]
        n, r = h.shape[0], h.shape[1]
        g3 = grad.reshape(n, grad.shape[1], -1)  # [n, out, L]
        d_up = None
        if need_up:
            # Σₙ (h·gᵀ)ᵀ = Σₙ g·hᵀ, [out, r]: the faster order of the two here
            h3 = h.reshape(n, r, -1)
            d_up = torch.matmul(h3, g3.transpose(1, 2)).sum(0).mul_(s).t()
            d_up = d_up.reshape(ctx.up_shape)
        dx = d_down = None
        if need_x or need_down:
            dh = torch.matmul((up2 * s).t(), g3).view(h.shape)  # [n, r, *spatial]
            dx, d_down, _ = torch.ops.aten.convolution_backward(
                dh, x, down, None, stride, padding, dilation, False, [0] * len(stride), 1,
                (need_x, need_down, False))
        return dx, d_down, d_up, None, grad if need_base else None, None, None, None


def lora_forward(base: nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                 scale: float, base_out: torch.Tensor | None = None) -> torch.Tensor:
    """The adapted output of ``base`` on ``x``: ``base_out`` (the base output; computed
    here with the base's own weight and bias when not given) plus ``scale·up·down(x)``
    in one autograd node. ``fusable(base)`` must hold.

    Without ``base_out`` (weight mode) a Linear's base op joins the node; otherwise it
    is autograd's own."""
    dt = x.dtype
    # cast only where needed: ``.to`` with the tensor's own dtype returns it unchanged,
    # but the call alone is a few microseconds per layer and step
    if down.dtype != dt:
        down = down.to(dt)
    if up.dtype != dt:
        up = up.to(dt)
    if base_out is None and isinstance(base, nn.Linear):
        folded: torch.Tensor = _LinearBaseLoRA.apply(x, weight_of(base), bias_of(base), down,
                                                     up, scale, _unwatched())
        return folded
    if base_out is None:
        base_out = layer_op(base, x, weight_of(base), bias_of(base))
    if isinstance(base, nn.Linear):
        out: torch.Tensor = _LinearLoRA.apply(x, down, up, scale, base_out)
        return out
    conv = cast(nn.modules.conv._ConvNd, base)
    out = _ConvLoRA.apply(x, down, up, scale, base_out, tuple(conv.stride),
                          tuple(cast("tuple[int, ...]", conv.padding)), tuple(conv.dilation))
    return out
