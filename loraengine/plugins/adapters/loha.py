"""LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · α/r — the Hadamard product of two low-rank
matrices (LyCORIS keys ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``,
``alpha``). ``w2a`` starts at zero.

Shapes follow LyCORIS: ``w?a`` is ``[out, r]`` and ``w?b`` is ``[r, in·k]`` (a conv
kernel flattened into the columns). With ``use_tucker`` on a conv whose kernel is not
1×1, each half is a Tucker product instead: ``hada_t?`` ``[r, r, *k]`` with ``w?a``
``[r, out]`` and ``w?b`` ``[r, in]``, ``W? = Σ t[i,j]·w?a[i,:]ᵀ·w?b[j,:]``.

Without Tucker, the Hadamard product is itself a rank-r² product with structured
factors: (w1a·w1b) ⊙ (w2a·w2b) = U·V with U = w1a ⊙ᵣ w2a (the row-wise Khatri–Rao
product, ``[out, r²]``, U[o, i·r+j] = w1a[o,i]·w2a[o,j]) and V = w1b ⊙꜀ w2b (the
column-wise one, ``[r², in·k]``). So the factored path is a LoRA of rank r²: the
input through V (for a conv, an r²-channel convolution with kernel V) and then U (a
1×1 one), and no weight-sized tensor is built forwards or backwards. With Tucker
halves the product is a Tucker product of rank r²: core C[(i,i'),(j,j')] =
t1[i,j]·t2[i',j'] (per kernel tap) between the Khatri–Rao products of the ``w?b``
and of the ``w?a``, so the factored path is a 1×1 convolution in → r², the core as
an r² → r² convolution with the layer's stride and padding, and a 1×1 one r² → out.
(bypass never reads the base weight, unless DoRA is on.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from loraengine.core.adapter import AdapterLayer, bias_of, layer_dims, layer_op, weight_of
from loraengine.core.plugins.specs import AdapterSpec
from loraengine.plugins.adapters.common import (
    CONV_BY_NDIM,
    ConvArgs,
    conv_args,
    copy_saved,
    has_keys,
    pointwise,
    saved_alpha,
    tucker,
    update_width,
)
from loraengine.plugins.adapters.dora import (
    AdditiveAdapter,
    DoRAOptions,
    dora_file_options,
    dora_metadata,
    load_dora,
    with_dora,
)
from loraengine.plugins.adapters.lora_fused import fusable, lora_forward

KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
#: A saved module is LoHa when it has the first and the last factor.
owns_keys = has_keys("hada_w1_a", "hada_w2_b")


class LoHaOptions(DoRAOptions):
    use_tucker: bool = Field(False, description="Tucker-decompose conv kernels larger than "
                             "1×1 (hada_t1/hada_t2) instead of flattening them.")


class HadamardProduct(torch.autograd.Function):
    """``(w1a·w1b) ⊙ (w2a·w2b) · scale`` that keeps only the four small factors for the
    backward pass and recomputes the two full-size products there: two weight-sized
    tensors per layer less held between the passes."""

    @staticmethod
    def forward(ctx: Any, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                w2b: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)  # d/d(w1a·w1b)
        g2 = grad * (w1a @ w1b)  # d/d(w2a·w2b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None




class _RebuildLoHa(torch.autograd.Function):
    """The rebuild path as one node: ``y = op(x, W + s·(w1a·w1b) ⊙ (w2a·w2b), b)`` with
    the frozen ``W``, ``b`` and the base's operation (a Linear, or a zero-padded
    ungrouped convolution) inside, and its backward written out.

    Autograd's graph of the same sum holds seven or eight nodes per layer (two products,
    the Hadamard product and scale, the multiplier, the add, the base op), each with a
    weight-sized output or gradient of its own; on a CPU every fresh weight-sized buffer
    is memory the allocator may have handed back and must fault in again. Here forward
    makes the two products and ``W'`` (the one tensor kept, as the base op keeps its
    weight), and backward the weight gradient ``G = dL/dW'`` and one product at a time,
    each multiplied in place: ``dL/d(w1a·w1b) = s·G ⊙ (w2a·w2b)`` and likewise for the
    second half."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                scale: float, conv: ConvArgs | None) -> torch.Tensor:
        # in the factors' dtype (the master fp32 where the base is in half precision)
        adapted = torch.addcmul(weight.reshape(weight.shape[0], -1).to(w1a.dtype), w1a @ w1b,
                                w2a @ w2b, value=scale).view(weight.shape).to(weight.dtype)
        if conv is None:
            y = F.linear(x, adapted, bias)
        else:
            stride, padding, dilation = conv
            y = CONV_BY_NDIM[weight.ndim](x, adapted, bias, stride, padding, dilation)
        ctx.save_for_backward(x, adapted, w1a, w1b, w2a, w2b)
        ctx.scale, ctx.conv = scale, conv
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, adapted, w1a, w1b, w2a, w2b = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_factors = any(ctx.needs_input_grad[3:7])
        dx = gw = None
        if ctx.conv is None:
            g2 = grad.reshape(-1, grad.shape[-1])
            if need_x:
                dx = x.new_empty(x.shape)  # not a view of the product: autograd adds into it
                torch.mm(g2, adapted, out=dx.view(-1, x.shape[-1]))
            if need_factors:
                gw = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]))
        else:
            stride, padding, dilation = ctx.conv
            dx, gw, _ = torch.ops.aten.convolution_backward(
                grad, x, adapted, None, stride, padding, dilation, False,
                [0] * len(stride), 1, (need_x, need_factors, False))
        d1a = d1b = d2a = d2b = None
        if gw is not None:
            gw = gw.reshape(gw.shape[0], -1).to(w1a.dtype).mul_(ctx.scale)
            half = torch.mm(w2a, w2b).mul_(gw)  # dL/d(w1a·w1b)
            d1a, d1b = torch.mm(half, w1b.t()), torch.mm(w1a.t(), half)
            torch.mm(w1a, w1b, out=half)
            half.mul_(gw)  # dL/d(w2a·w2b)
            d2a, d2b = torch.mm(half, w2b.t()), torch.mm(w2a.t(), half)
        return (dx, None, None, d1a, d1b, d2a, d2b, None, None)


class LoHaLayer(AdditiveAdapter):
    """Hadamard product of two low-rank updates of one Linear/Conv layer."""

    algorithm = "loha"

    def __init__(self, base: nn.Module, rank: int, alpha: float, use_tucker: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__(base, rank, alpha)
        w = weight_of(base)
        out, cin, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        self.tucker = bool(use_tucker and any(k != 1 for k in kernel))

        def randn(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(shape, generator=generator) * std)

        if self.tucker:
            self.hada_t1 = randn(rank, rank, *kernel, std=0.1)
            self.hada_t2 = randn(rank, rank, *kernel, std=0.1)
            self.hada_w1_a = randn(rank, out, std=0.1)
            self.hada_w1_b = randn(rank, cin, std=1.0)
            self.hada_w2_a = nn.Parameter(torch.zeros(rank, out))
            self.hada_w2_b = randn(rank, cin, std=1.0)
        else:
            cols = int(w[0].numel())
            self.hada_w1_a = randn(out, rank, std=0.1)
            self.hada_w1_b = randn(rank, cols, std=1.0)
            self.hada_w2_a = nn.Parameter(torch.zeros(out, rank))
            self.hada_w2_b = randn(rank, cols, std=1.0)

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = weight_of(self.base).shape
        if self.tucker:
            return (tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b),
                    tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b))
        return ((self.hada_w1_a @ self.hada_w1_b).reshape(shape),
                (self.hada_w2_a @ self.hada_w2_b).reshape(shape))

    def raw_delta(self) -> torch.Tensor:
        if not self.tucker:
            product: torch.Tensor = HadamardProduct.apply(  # Function.apply is untyped
                self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)
            return product.reshape(weight_of(self.base).shape)
        w1, w2 = self.halves()
        return w1 * w2 * self.scale

    def khatri_rao(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)``: ``U`` ``[out, r²]`` and ``V`` ``[r², in·k]`` with U·V equal to the
        unscaled Hadamard product (not for Tucker halves)."""
        r = self.rank
        u = (self.hada_w1_a.unsqueeze(2) * self.hada_w2_a.unsqueeze(1)).reshape(-1, r * r)
        v = (self.hada_w1_b.unsqueeze(1) * self.hada_w2_b.unsqueeze(0)).reshape(r * r, -1)
        return u, v

    def raw_bypass(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        dt = x.dtype
        w = weight_of(self.base)
        ones = [1] * (w.ndim - 2)
        r2 = self.rank * self.rank
        if self.tucker:
            # hada_w?_a/b are [r, out] / [r, in]: the Khatri–Rao products across r
            a = (self.hada_w1_a.unsqueeze(1) * self.hada_w2_a.unsqueeze(0)).reshape(r2, -1)
            b = (self.hada_w1_b.unsqueeze(1) * self.hada_w2_b.unsqueeze(0)).reshape(r2, -1)
            t1, t2 = self.hada_t1, self.hada_t2
            core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(r2, r2, *w.shape[2:])
            h = pointwise(x, b.reshape(r2, -1, *ones).to(dt))  # in -> r²
            h = layer_op(self.base, h, core.to(dt), None)  # the kernel, r² -> r²
            up = (a.t() * (self.scale * gain)).reshape(-1, r2, *ones).to(dt)
            return pointwise(h, up)  # r² -> out
        u, v = self.khatri_rao()
        v = v.reshape(v.shape[0], *w.shape[1:]).to(dt)  # a conv kernel of r² channels
        u = (u * (self.scale * gain)).reshape(*u.shape, *ones).to(dt)
        return pointwise(layer_op(self.base, x, v, None), u)

    # Without Tucker or DoRA the factored path and bypass are a rank-r² LoRA with
    # down = V and up = U: LoRA's fused node runs it (autograd reaches the four factors
    # through the two Khatri–Rao products).
    def _fused(self) -> bool:
        return not self.tucker and self.dora_scale is None and fusable(self.base)

    def _fused_forward(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        w = weight_of(self.base)
        u, v = self.khatri_rao()
        v = v.reshape(v.shape[0], *w.shape[1:])  # for a conv: a kernel of r² channels
        return lora_forward(self.base, x, v, u, self.scale * self.multiplier, base_out)

    def bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if not self._fused():
            return super().bypass(x, base_out)
        return self._fused_forward(x.to(base_out.dtype), base_out)

    def run_factored(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused():
            return super().run_factored(x)
        return self._fused_forward(x, None)

    def factored_flops(self, x: torch.Tensor) -> float | None:
        n, fan_in, out = layer_dims(self.base, x)
        r2 = self.rank * self.rank
        if self.tucker:
            w = weight_of(self.base)
            ksize = fan_in // int(w.shape[1])
            per_position = r2 * (int(w.shape[1]) + r2 * ksize + out)
            return 6.0 * n * per_position + 3.0 * r2 * (r2 * ksize + fan_in + out)
        # the two Khatri–Rao products, then a rank-r² LoRA; backward twice forward
        return 3.0 * r2 * (fan_in + out) * (2.0 * n + 1.0)

    def build_flops(self) -> float:
        w = weight_of(self.base)
        return 3.0 * w.numel() * (4.0 * self.rank + 2.0)  # two products and the Hadamard

    def rebuild(self, x: torch.Tensor) -> torch.Tensor:
        """Without Tucker or DoRA, on a frozen Linear or zero-padded convolution: one
        node (``_RebuildLoHa``); otherwise W+ΔW through autograd."""
        if not self._fused():
            return super().rebuild(x)
        base = self.base
        w = weight_of(base)
        conv = conv_args(base)
        out: torch.Tensor = _RebuildLoHa.apply(
            x, w, bias_of(base), self.hada_w1_a, self.hada_w1_b, self.hada_w2_a,
            self.hada_w2_b, self.scale * self.multiplier, conv)
        return out

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {k: getattr(self, k) for k in KEYS}
        if self.tucker:
            out["hada_t1"], out["hada_t2"] = self.hada_t1, self.hada_t2
        out["alpha"] = torch.tensor(self.alpha)
        return out


def create(base: nn.Module, rank: int, alpha: float, options: object,
           generator: torch.Generator | None) -> LoHaLayer:
    use_tucker = bool(getattr(options, "use_tucker", False))
    return with_dora(LoHaLayer(base, rank, alpha, use_tucker, generator), options)


def load(base: nn.Module, tensors: Mapping[str, torch.Tensor], options: object) -> LoHaLayer:
    """Rebuild from saved tensors: rank from ``hada_w1_b``, Tucker from ``hada_t1``."""
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise ValueError(f"LoHa module lacks {', '.join(missing)}")
    use_tucker = "hada_t1" in tensors
    rank = int(tensors["hada_w1_b"].shape[0])
    layer = LoHaLayer(base, rank, saved_alpha(tensors, rank), use_tucker)
    if use_tucker and not layer.tucker:
        raise ValueError("LoHa Tucker tensors (hada_t1) on a layer without a spatial kernel")
    for name in (*KEYS, *(("hada_t1", "hada_t2") if use_tucker else ())):
        saved = tensors[name]
        copy_saved(getattr(layer, name), saved,
                   f"{name} of shape {list(saved.shape)} does not fit a layer with weight "
                   f"{list(weight_of(base).shape)} at rank {rank}")
    return load_dora(layer, tensors, options)


def full_rank(adapter: AdapterLayer) -> int | None:
    """At the layer's width one half alone can be any matrix (the other all ones), so
    a higher rank reaches nothing new. Below it the product of the halves may already
    reach every update (its rank can be r²) but where exactly is not clear, so no bound
    is claimed there; nor for Tucker halves, whose cores mix the kernel taps."""
    return None if getattr(adapter, "tucker", False) else update_width(adapter.base)


SPEC = AdapterSpec(
    name="loha", create=create, load=load, owns_keys=owns_keys, full_rank=full_rank,
    file_metadata=dora_metadata, file_options=dora_file_options, config_model=LoHaOptions,
    network_module="lycoris.kohya", description="LoHa: Hadamard product of two low-rank "
    "updates (LyCORIS), optional Tucker conv and DoRA.")
